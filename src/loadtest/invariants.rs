//! Invariant checks from what the harness observes over HTTP.
//!
//! A workflow is known to hold a deployable from the moment it reads `200 PROCURED`
//! until the moment it *sends* its RELEASE. The server's holding interval contains that
//! one (the commit happens before the answer, the release commit after the request is
//! sent), so if two such client-side intervals ever overlap on one name, the server
//! really handed one deployable to two workflows at once: a violation. Removing the
//! holder only when the RELEASE answer arrives would report false violations when
//! another workflow procures in between.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::loadtest::stats::Answer;

/// Most violation messages kept (the count keeps going).
const MAX_MESSAGES: usize = 100;

/// Tracks holders of deployables, PROCURED/RELEASED counts and 5xx answers.
#[derive(Debug, Default)]
pub struct HolderTracker {
    holders: Mutex<HashMap<String, usize>>,
    messages: Mutex<Vec<String>>,
    violations: AtomicU64,
    procured: AtomicU64,
    released: AtomicU64,
    server_errors: AtomicU64,
    submitted: AtomicU64,
    completed: AtomicU64,
}

/// What the tracker concluded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InvariantReport {
    /// Whether every invariant held.
    pub ok: bool,
    /// Number of violations (messages below are capped at 100).
    pub violations: u64,
    /// What went wrong, one line each.
    pub messages: Vec<String>,
    /// `200 PROCURED` answers seen.
    pub procured: u64,
    /// `200 RELEASED` answers seen.
    pub released: u64,
    /// PROCURED answers never followed by a RELEASED.
    pub unreleased: u64,
    /// Instances accepted (202) by the controller.
    pub instances_submitted: u64,
    /// Instances completed (200) afterwards.
    pub instances_completed: u64,
    /// 5xx answers of any request.
    pub server_errors: u64,
}

impl HolderTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    fn violation(&self, message: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut m = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < MAX_MESSAGES {
            m.push(message);
        }
    }

    /// Records any answer; 5xx answers break the "no 5xx" invariant.
    pub fn observe(&self, answer: Answer) {
        if answer.is_server_error() {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `workflow` read `200 PROCURED` for `name`. A violation when another workflow
    /// still holds it; `false` then.
    pub fn procured(&self, name: &str, workflow: usize) -> bool {
        self.procured.fetch_add(1, Ordering::Relaxed);
        let mut h = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        match h.get(name) {
            Some(&other) if other != workflow => {
                drop(h);
                self.violation(format!(
                    "{name} PROCURED by workflow {workflow} while workflow {other} holds it"
                ));
                false
            }
            _ => {
                h.insert(name.to_owned(), workflow);
                true
            }
        }
    }

    /// `workflow` is about to send RELEASE for `name`: from now on it no longer counts
    /// as the holder.
    pub fn releasing(&self, name: &str, workflow: usize) {
        let mut h = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        if h.get(name) == Some(&workflow) {
            h.remove(name);
        }
    }

    /// The RELEASE was answered `200 RELEASED`.
    pub fn released(&self) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }

    /// A request on a deployable the workflow holds was refused as if it did not
    /// (409 on min-pod-count or RELEASE): the server gave it to someone else, or lost
    /// the procurement.
    pub fn refused_while_held(&self, name: &str, workflow: usize, what: &str, status: u16) {
        self.violation(format!(
            "{what} of {name} by its holder (workflow {workflow}) answered {status}"
        ));
    }

    /// The controller accepted an instance.
    pub fn instance_submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    /// An accepted instance was completed.
    pub fn instance_completed(&self) {
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// Deployables currently held, as far as the harness knows.
    pub fn held(&self) -> usize {
        self.holders.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The verdict, once every workflow has finished.
    pub fn report(&self) -> InvariantReport {
        let procured = self.procured.load(Ordering::Relaxed);
        let released = self.released.load(Ordering::Relaxed);
        let submitted = self.submitted.load(Ordering::Relaxed);
        let completed = self.completed.load(Ordering::Relaxed);
        let server_errors = self.server_errors.load(Ordering::Relaxed);
        let mut messages = self
            .messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut violations = self.violations.load(Ordering::Relaxed);
        let unreleased = procured.saturating_sub(released);
        if unreleased > 0 {
            violations += 1;
            messages.push(format!(
                "{unreleased} of {procured} PROCURED deployables were never released"
            ));
        }
        if submitted > completed {
            violations += 1;
            messages.push(format!(
                "{} of {submitted} accepted instances were never completed",
                submitted - completed
            ));
        }
        if server_errors > 0 {
            violations += 1;
            messages.push(format!("{server_errors} answers were 5xx"));
        }
        InvariantReport {
            ok: violations == 0,
            violations,
            messages,
            procured,
            released,
            unreleased,
            instances_submitted: submitted,
            instances_completed: completed,
            server_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_holds_every_invariant() {
        let t = HolderTracker::new();
        assert!(t.procured("a", 0));
        assert!(t.procured("b", 1));
        t.releasing("a", 0);
        // Another workflow may procure once the holder has sent its release.
        assert!(t.procured("a", 2));
        t.released();
        t.releasing("b", 1);
        t.released();
        t.releasing("a", 2);
        t.released();
        t.observe(Answer::Status(409));
        let r = t.report();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.procured, r.released, r.unreleased), (3, 3, 0));
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn double_holding_is_a_violation() {
        let t = HolderTracker::new();
        assert!(t.procured("a", 0));
        assert!(!t.procured("a", 1));
        t.releasing("a", 0);
        t.released();
        // Workflow 1 never got to hold it in the tracker, so its release is a no-op
        // there; the PROCURED count still demands a release.
        let r = t.report();
        assert!(!r.ok);
        assert_eq!(r.violations, 2, "{r:?}");
        assert!(r.messages[0].contains("while workflow 0 holds it"), "{r:?}");
        assert!(r.messages[1].contains("never released"), "{r:?}");
    }

    #[test]
    fn releasing_by_a_non_holder_does_not_free_it() {
        let t = HolderTracker::new();
        assert!(t.procured("a", 0));
        t.releasing("a", 7);
        assert!(!t.procured("a", 1));
    }

    #[test]
    fn server_errors_unfinished_instances_and_refusals_break_it() {
        let t = HolderTracker::new();
        t.observe(Answer::Status(503));
        t.observe(Answer::Status(200));
        t.observe(Answer::Transport);
        t.instance_submitted();
        t.instance_submitted();
        t.instance_completed();
        t.refused_while_held("a", 3, "RELEASE", 409);
        let r = t.report();
        assert!(!r.ok);
        assert_eq!(r.server_errors, 1);
        assert_eq!(r.violations, 3, "{r:?}");
        assert!(r.messages.iter().any(|m| m.contains("RELEASE of a")));
    }
}
