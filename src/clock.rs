//! Wall-clock time that follows tokio's clock, so controller tests can pause and advance
//! time (`tokio::time::pause`) and every deadline, idle timer and timestamp moves with it.

use chrono::{DateTime, SubsecRound, Utc};

/// The wall clock now, at the precision timestamps are stored and answered with
/// (milliseconds, see `domain::time`), so a record reads back equal to what was written.
pub fn utc_now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// A clock anchored at construction: wall time then, plus tokio-monotonic time since.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: DateTime<Utc>,
    at: tokio::time::Instant,
}

impl Clock {
    /// Anchors a clock now.
    pub fn new() -> Self {
        Self {
            wall: Utc::now(),
            at: tokio::time::Instant::now(),
        }
    }

    /// The current time, in whole milliseconds.
    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(self.at.elapsed()).unwrap_or_default();
        // Milliseconds, like every stored and answered timestamp.
        (self.wall + elapsed).trunc_subsecs(3)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
