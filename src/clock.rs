//! Wall-clock time that follows tokio's clock, so controller tests can pause and advance
//! time (`tokio::time::pause`) and every deadline, idle timer and timestamp moves with it.

use chrono::{DateTime, Utc};

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

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(self.at.elapsed()).unwrap_or_default();
        self.wall + elapsed
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
