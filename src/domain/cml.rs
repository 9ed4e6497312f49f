//! CML labs and the pure decision that reconciles a worker's instances with the labs its
//! CML host reports: which lab is which instance, which instance moves where, and which
//! labs nobody asked for.
//!
//! Mapping rule: a lab belongs to an instance when its `lab_title` equals the instance id,
//! or when one of its `tags` is `resource-plane/instance=<instance id>`. Labs that match no
//! instance known on the worker are *unknown*: reported, never stopped by this decision.

use crate::domain::worker::{Instance, InstanceState};

/// Tag prefix that names the instance a lab runs (`resource-plane/instance=<id>`).
pub const INSTANCE_TAG_PREFIX: &str = "resource-plane/instance=";

/// A lab's state as CML reports it (`DEFINED_ON_CORE`, `STARTED`, `STOPPED`); any other
/// value is kept as [`LabState::Other`] and counts as not started.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabState {
    /// `STARTED`.
    Started,
    /// `STOPPED`.
    Stopped,
    /// `DEFINED_ON_CORE` (defined, never started or wiped).
    Defined,
    /// Anything else (e.g. `QUEUED`): not started, and not known to be stopped either.
    Other(String),
}

impl LabState {
    /// Parses CML's wire value.
    pub fn from_wire(s: &str) -> LabState {
        match s {
            "STARTED" => LabState::Started,
            "STOPPED" => LabState::Stopped,
            "DEFINED_ON_CORE" => LabState::Defined,
            other => LabState::Other(other.to_owned()),
        }
    }

    /// The wire value.
    pub fn as_str(&self) -> &str {
        match self {
            LabState::Started => "STARTED",
            LabState::Stopped => "STOPPED",
            LabState::Defined => "DEFINED_ON_CORE",
            LabState::Other(s) => s,
        }
    }

    /// Only `STARTED` is started.
    pub fn is_started(&self) -> bool {
        *self == LabState::Started
    }

    /// `STOPPED` or `DEFINED_ON_CORE`: known not to be running.
    pub fn is_down(&self) -> bool {
        matches!(self, LabState::Stopped | LabState::Defined)
    }
}

/// One lab on a CML host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lab {
    /// CML lab id.
    pub id: String,
    /// `lab_title`.
    pub title: String,
    /// Lab tags (empty when CML sends none).
    pub tags: Vec<String>,
    /// State.
    pub state: LabState,
}

impl Lab {
    /// Whether this lab runs instance `instance_id` (title or tag match).
    pub fn belongs_to(&self, instance_id: &str) -> bool {
        self.title == instance_id
            || self.tags.iter().any(|t| {
                t.strip_prefix(INSTANCE_TAG_PREFIX)
                    .is_some_and(|rest| rest == instance_id)
            })
    }
}

/// One instance move the sync asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMove {
    /// Instance id.
    pub instance_id: String,
    /// Its state when decided.
    pub from: InstanceState,
    /// Target state.
    pub to: InstanceState,
}

/// A lab that matches no instance on the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLab {
    /// CML lab id.
    pub lab_id: String,
    /// `lab_title`.
    pub title: String,
    /// Whether it is started (only started labs are worth stopping).
    pub started: bool,
}

/// What a sync of one worker decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// Instance transitions, in instance-id order.
    pub moves: Vec<InstanceMove>,
    /// Labs no instance on this worker claims, in lab-id order.
    pub unknown: Vec<UnknownLab>,
}

/// Reconciles the instances placed on `worker_id` with the `labs` its CML reports.
///
/// Only instances with `worker_id == worker_id` count. For each of them:
/// - SCHEDULED and one of its labs STARTED -> RUNNING;
/// - RUNNING and none of its labs STARTED, every one of them STOPPED or DEFINED_ON_CORE
///   (or no lab at all) -> COMPLETED;
/// - anything else stays (a SCHEDULED instance whose lab does not exist yet is still being
///   set up; a lab in an unrecognised state is not started but not known stopped either).
///
/// Labs matching no instance on the worker (in any state) are returned as unknown.
pub fn plan_sync(worker_id: &str, instances: &[Instance], labs: &[Lab]) -> SyncPlan {
    let mine: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.worker_id.as_deref() == Some(worker_id))
        .collect();
    let mut plan = SyncPlan::default();
    for i in &mine {
        let labs_of: Vec<&Lab> = labs.iter().filter(|l| l.belongs_to(&i.id)).collect();
        let started = labs_of.iter().any(|l| l.state.is_started());
        let all_down = labs_of.iter().all(|l| l.state.is_down());
        let to = match i.state {
            InstanceState::Scheduled if started => InstanceState::Running,
            InstanceState::Running if all_down => InstanceState::Completed,
            _ => continue,
        };
        plan.moves.push(InstanceMove {
            instance_id: i.id.clone(),
            from: i.state,
            to,
        });
    }
    plan.moves.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    plan.unknown = labs
        .iter()
        .filter(|l| !mine.iter().any(|i| l.belongs_to(&i.id)))
        .map(|l| UnknownLab {
            lab_id: l.id.clone(),
            title: l.title.clone(),
            started: l.state.is_started(),
        })
        .collect();
    plan.unknown.sort_by(|a, b| a.lab_id.cmp(&b.lab_id));
    plan
}

/// What a CML URL template may name about one worker.
#[derive(Debug, Clone, Copy)]
pub struct UrlParts<'a> {
    /// `{worker_id}`.
    pub worker_id: &'a str,
    /// `{instance_id}`: the cloud instance id, once launched.
    pub instance_id: Option<&'a str>,
    /// `{private_ip}`: the cloud instance's private address, once known.
    pub private_ip: Option<&'a str>,
}

/// Expands a `CML_URL_TEMPLATE` for one worker into the API base (ending in `/api/v0/`).
///
/// Placeholder values are checked before they reach the URL (an IP address, or an id of
/// letters, digits, `.`, `_`, `-`), so no value can move the request to another host.
/// Only `https` is accepted unless `allow_http`; credentials, query and fragment are
/// refused.
pub fn expand_url_template(
    template: &str,
    parts: &UrlParts<'_>,
    allow_http: bool,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| "unclosed '{' in the template".to_owned())?;
        let name = &after[..close];
        let value = match name {
            "private_ip" => {
                let raw = parts
                    .private_ip
                    .ok_or_else(|| "the worker has no private IP yet".to_owned())?;
                match raw.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                    Ok(v4) => v4.to_string(),
                    Err(_) => return Err(format!("private IP {raw:?} is not an IP address")),
                }
            }
            "instance_id" => safe_id(
                parts
                    .instance_id
                    .ok_or_else(|| "the worker has no cloud instance id yet".to_owned())?,
            )?,
            "worker_id" => safe_id(parts.worker_id)?,
            other => return Err(format!("unknown placeholder {{{other}}}")),
        };
        out.push_str(&value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    let url = url::Url::parse(&out).map_err(|e| format!("{out:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => return Err("http:// is refused unless CML_ALLOW_HTTP=true".to_owned()),
        other => return Err(format!("scheme {other:?} is not https")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are refused (use CML_USERNAME/CML_PASSWORD)".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is refused".to_owned());
    }
    Ok(format!("{}/api/v0/", url.as_str().trim_end_matches('/')))
}

fn safe_id(v: &str) -> Result<String, String> {
    if !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Ok(v.to_owned())
    } else {
        Err(format!("{v:?} cannot be placed in a URL"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::worker::{is_legal_instance_transition, Resources};
    use chrono::Utc;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn inst(id: &str, state: InstanceState, worker: Option<&str>) -> Instance {
        let mut i = Instance::new(id, Resources::default(), false, Utc::now());
        i.state = state;
        i.worker_id = worker.map(str::to_owned);
        i
    }

    fn lab(id: &str, title: &str, tags: &[&str], state: LabState) -> Lab {
        Lab {
            id: id.into(),
            title: title.into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            state,
        }
    }

    fn mv(id: &str, from: InstanceState, to: InstanceState) -> InstanceMove {
        InstanceMove {
            instance_id: id.into(),
            from,
            to,
        }
    }

    #[test]
    fn wire_states_parse_and_others_are_not_started() {
        assert_eq!(LabState::from_wire("STARTED"), LabState::Started);
        assert_eq!(LabState::from_wire("STOPPED"), LabState::Stopped);
        assert_eq!(LabState::from_wire("DEFINED_ON_CORE"), LabState::Defined);
        let q = LabState::from_wire("QUEUED");
        assert_eq!(q, LabState::Other("QUEUED".into()));
        assert!(!q.is_started());
        assert!(!q.is_down());
        assert_eq!(q.as_str(), "QUEUED");
    }

    #[test]
    fn title_or_tag_maps_a_lab_to_its_instance() {
        use InstanceState::*;
        let instances = vec![
            inst("i-title", Scheduled, Some("w1")),
            inst("i-tag", Scheduled, Some("w1")),
        ];
        let labs = vec![
            lab("l1", "i-title", &[], LabState::Started),
            lab(
                "l2",
                "some human title",
                &["team=a", "resource-plane/instance=i-tag"],
                LabState::Started,
            ),
        ];
        let plan = plan_sync("w1", &instances, &labs);
        assert_eq!(
            plan.moves,
            vec![
                mv("i-tag", Scheduled, Running),
                mv("i-title", Scheduled, Running)
            ]
        );
        assert!(plan.unknown.is_empty());
    }

    #[test]
    fn stopped_or_gone_completes_running_instances() {
        use InstanceState::*;
        let instances = vec![
            inst("a", Running, Some("w1")),
            inst("b", Running, Some("w1")),
            inst("c", Running, Some("w1")),
            inst("d", Running, Some("w1")),
        ];
        let labs = vec![
            lab("l-a", "a", &[], LabState::Stopped),
            lab("l-c", "c", &[], LabState::Defined),
            lab("l-d", "d", &[], LabState::Started),
        ];
        let plan = plan_sync("w1", &instances, &labs);
        assert_eq!(
            plan.moves,
            vec![
                mv("a", Running, Completed),
                mv("b", Running, Completed),
                mv("c", Running, Completed),
            ]
        );
    }

    #[test]
    fn unrecognised_states_and_missing_labs_move_nothing() {
        use InstanceState::*;
        let instances = vec![
            inst("s-missing", Scheduled, Some("w1")),
            inst("s-queued", Scheduled, Some("w1")),
            inst("s-stopped", Scheduled, Some("w1")),
            inst("r-queued", Running, Some("w1")),
        ];
        let labs = vec![
            lab("l1", "s-queued", &[], LabState::Other("QUEUED".into())),
            lab("l2", "s-stopped", &[], LabState::Stopped),
            lab("l3", "r-queued", &[], LabState::Other("BOOTING".into())),
        ];
        assert_eq!(plan_sync("w1", &instances, &labs), SyncPlan::default());
    }

    #[test]
    fn labs_of_no_instance_on_this_worker_are_unknown() {
        use InstanceState::*;
        let instances = vec![
            inst("mine", Running, Some("w1")),
            inst("done", Completed, Some("w1")),
            inst("elsewhere", Running, Some("w2")),
        ];
        let labs = vec![
            lab("l1", "mine", &[], LabState::Started),
            lab("l2", "done", &[], LabState::Stopped),
            lab("l3", "elsewhere", &[], LabState::Started),
            lab(
                "l4",
                "hand made",
                &["resource-plane/instance="],
                LabState::Stopped,
            ),
        ];
        let plan = plan_sync("w1", &instances, &labs);
        assert!(plan.moves.is_empty(), "{plan:?}");
        assert_eq!(
            plan.unknown,
            vec![
                UnknownLab {
                    lab_id: "l3".into(),
                    title: "elsewhere".into(),
                    started: true
                },
                UnknownLab {
                    lab_id: "l4".into(),
                    title: "hand made".into(),
                    started: false
                },
            ]
        );
    }

    #[test]
    fn one_started_lab_of_several_keeps_the_instance_running() {
        use InstanceState::*;
        let instances = vec![inst("x", Running, Some("w1"))];
        let labs = vec![
            lab("l1", "x", &[], LabState::Stopped),
            lab(
                "l2",
                "other",
                &["resource-plane/instance=x"],
                LabState::Started,
            ),
        ];
        assert_eq!(plan_sync("w1", &instances, &labs), SyncPlan::default());
    }

    #[test]
    fn url_templates_expand_safely() {
        let parts = UrlParts {
            worker_id: "w-1",
            instance_id: Some("i-0abc"),
            private_ip: Some("10.1.2.3"),
        };
        assert_eq!(
            expand_url_template("https://{private_ip}", &parts, false).as_deref(),
            Ok("https://10.1.2.3/api/v0/")
        );
        assert_eq!(
            expand_url_template("http://127.0.0.1:9000/{worker_id}/", &parts, true).as_deref(),
            Ok("http://127.0.0.1:9000/w-1/api/v0/")
        );
        assert_eq!(
            expand_url_template("https://{instance_id}.cml.internal", &parts, false).as_deref(),
            Ok("https://i-0abc.cml.internal/api/v0/")
        );
        let v6 = UrlParts {
            private_ip: Some("fd00::5"),
            ..parts
        };
        assert_eq!(
            expand_url_template("https://{private_ip}:8443", &v6, false).as_deref(),
            Ok("https://[fd00::5]:8443/api/v0/")
        );
        assert!(expand_url_template("http://{private_ip}", &parts, false).is_err());
        assert!(expand_url_template("https://{nope}", &parts, false).is_err());
        assert!(expand_url_template("https://{private_ip", &parts, false).is_err());
        assert!(expand_url_template("https://u:p@{private_ip}", &parts, false).is_err());
        let no_ip = UrlParts {
            private_ip: None,
            ..parts
        };
        assert!(expand_url_template("https://{private_ip}", &no_ip, false).is_err());
        let evil = UrlParts {
            worker_id: "x@evil.example/",
            ..parts
        };
        assert!(expand_url_template("https://h/{worker_id}", &evil, false).is_err());
        let evil_ip = UrlParts {
            private_ip: Some("evil.example"),
            ..parts
        };
        assert!(expand_url_template("https://{private_ip}", &evil_ip, false).is_err());
    }

    fn arb_state() -> impl Strategy<Value = InstanceState> {
        prop_oneof![
            Just(InstanceState::Pending),
            Just(InstanceState::Scheduled),
            Just(InstanceState::Running),
            Just(InstanceState::Completed),
            Just(InstanceState::Failed),
        ]
    }

    fn arb_lab_state() -> impl Strategy<Value = LabState> {
        prop_oneof![
            Just(LabState::Started),
            Just(LabState::Stopped),
            Just(LabState::Defined),
            Just(LabState::Other("QUEUED".into())),
        ]
    }

    proptest! {
        #[test]
        fn plans_are_legal_and_account_for_every_lab(
            insts in proptest::collection::vec((0u8..6, arb_state(), 0u8..3), 0..8),
            labs in proptest::collection::vec((0u8..9, any::<bool>(), arb_lab_state()), 0..10),
        ) {
            let mut seen = BTreeSet::new();
            let instances: Vec<Instance> = insts
                .iter()
                .filter(|(n, _, _)| seen.insert(*n))
                .map(|(n, s, w)| inst(&format!("i{n}"), *s, Some(&format!("w{w}"))))
                .collect();
            let labs: Vec<Lab> = labs
                .iter()
                .enumerate()
                .map(|(k, (n, by_tag, st))| {
                    let name = format!("i{n}");
                    if *by_tag {
                        let tag = format!("{INSTANCE_TAG_PREFIX}{name}");
                        lab(&format!("l{k}"), "t", &[tag.as_str()], st.clone())
                    } else {
                        lab(&format!("l{k}"), &name, &[], st.clone())
                    }
                })
                .collect();
            let plan = plan_sync("w0", &instances, &labs);
            let mut moved = BTreeSet::new();
            for m in &plan.moves {
                prop_assert!(moved.insert(m.instance_id.clone()), "moved twice: {m:?}");
                let i = instances.iter().find(|i| i.id == m.instance_id);
                prop_assert!(i.is_some());
                let i = i.unwrap_or_else(|| unreachable!());
                prop_assert_eq!(i.worker_id.as_deref(), Some("w0"));
                prop_assert_eq!(i.state, m.from);
                prop_assert!(is_legal_instance_transition(m.from, m.to));
                let mine: Vec<&Lab> = labs.iter().filter(|l| l.belongs_to(&i.id)).collect();
                match m.to {
                    InstanceState::Running => prop_assert!(mine.iter().any(|l| l.state.is_started())),
                    InstanceState::Completed => prop_assert!(mine.iter().all(|l| l.state.is_down())),
                    other => prop_assert!(false, "unexpected target {other}"),
                }
            }
            // Every lab is either claimed by an instance on w0 or reported unknown, never both.
            let unknown: BTreeSet<&str> = plan.unknown.iter().map(|u| u.lab_id.as_str()).collect();
            for l in &labs {
                let claimed = instances
                    .iter()
                    .any(|i| i.worker_id.as_deref() == Some("w0") && l.belongs_to(&i.id));
                prop_assert_eq!(claimed, !unknown.contains(l.id.as_str()), "lab {:?}", l);
            }
            // A SCHEDULED instance on w0 with a started lab always moves.
            for i in instances.iter().filter(|i| i.worker_id.as_deref() == Some("w0")) {
                let started = labs.iter().any(|l| l.belongs_to(&i.id) && l.state.is_started());
                if i.state == InstanceState::Scheduled && started {
                    prop_assert!(moved.contains(&i.id));
                }
            }
        }
    }
}
