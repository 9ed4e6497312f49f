//! Time-bucketed measurements of the measured phase, for the HTML report: per endpoint
//! and per bucket (one second, or wider on long runs so a chart has at most
//! [`MAX_BUCKETS`] points) a latency histogram, the 2xx count and the other answers by
//! status.
//!
//! Each task keeps the buckets it is filling in its [`Recorder`](super::stats::Recorder)
//! ([`Pending`]) and hands a bucket to the shared [`Timeline`] once it has moved on to a
//! later one, so the lock is taken about once per task per bucket, not per request.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::loadtest::stats::Answer;

/// Largest latency recorded, in microseconds (60 s, as in [`super::stats`]); larger
/// ones count as 60 s.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Most buckets of a run as long as its time limit; longer runs get wider buckets.
pub const MAX_BUCKETS: u64 = 300;

/// What one endpoint saw during one bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// Latencies of answered requests, in microseconds; two significant figures are
    /// plenty for a chart and keep a bucket small (it grows with the largest value).
    latency: Histogram<u32>,
    ok: u64,
    by_status: BTreeMap<u16, u64>,
    transport: u64,
}

impl Bucket {
    fn new() -> Option<Self> {
        Some(Self {
            latency: Histogram::new(2).ok()?,
            ok: 0,
            by_status: BTreeMap::new(),
            transport: 0,
        })
    }

    fn record(&mut self, answer: Answer, latency: Duration) {
        match answer {
            Answer::Status(s) => {
                let us = u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                // `record` grows the histogram; the saturating variants never do.
                if self.latency.record(us.min(MAX_LATENCY_US)).is_err() {
                    self.latency.saturating_record(us);
                }
                if answer.is_ok() {
                    self.ok += 1;
                } else {
                    *self.by_status.entry(s).or_insert(0) += 1;
                }
            }
            Answer::Transport => self.transport += 1,
        }
    }

    fn merge(&mut self, other: &Bucket) {
        // Auto-resizing histograms of the same precision add without error; saturate if
        // one ever did not.
        if self.latency.add(&other.latency).is_err() {
            for v in other.latency.iter_recorded() {
                self.latency
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        self.ok += other.ok;
        for (s, n) in &other.by_status {
            *self.by_status.entry(*s).or_insert(0) += n;
        }
        self.transport += other.transport;
    }
}

/// Bucket index -> endpoint label -> what it saw.
type Buckets = BTreeMap<u32, BTreeMap<String, Bucket>>;

/// Buckets a task is still filling.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    buckets: Buckets,
}

impl Pending {
    /// Records one request of `label` in bucket `index`.
    pub fn record(&mut self, index: u32, label: &str, answer: Answer, latency: Duration) {
        let endpoints = self.buckets.entry(index).or_default();
        // Look up by `&str` first: no allocation per request once the label is known.
        if let Some(b) = endpoints.get_mut(label) {
            b.record(answer, latency);
            return;
        }
        if let Some(mut b) = Bucket::new() {
            b.record(answer, latency);
            endpoints.insert(label.to_owned(), b);
        }
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: &Pending) {
        merge_into(&mut self.buckets, &other.buckets);
    }

    /// Takes the buckets before `index` out (the ones the task has moved past).
    fn split_before(&mut self, index: u32) -> Option<Pending> {
        let first = *self.buckets.keys().next()?;
        if first >= index {
            return None;
        }
        let later = self.buckets.split_off(&index);
        let done = std::mem::replace(&mut self.buckets, later);
        Some(Pending { buckets: done })
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

fn merge_into(all: &mut Buckets, more: &Buckets) {
    for (index, endpoints) in more {
        let mine = all.entry(*index).or_default();
        for (label, b) in endpoints {
            match mine.get_mut(label) {
                Some(m) => m.merge(b),
                None => {
                    mine.insert(label.clone(), b.clone());
                }
            }
        }
    }
}

/// The shared, time-bucketed record of the measured phase.
#[derive(Debug)]
pub struct Timeline {
    width: Duration,
    buckets: Mutex<Buckets>,
}

impl Timeline {
    /// A timeline for a run limited to `limit`: one-second buckets, or wider ones so
    /// that the limit spans at most [`MAX_BUCKETS`].
    pub fn new(limit: Duration) -> Self {
        let secs = limit.as_secs().div_ceil(MAX_BUCKETS).max(1);
        Self::with_width(Duration::from_secs(secs))
    }

    /// A timeline of buckets `width` wide (at least a millisecond).
    pub fn with_width(width: Duration) -> Self {
        Self {
            width: width.max(Duration::from_millis(1)),
            buckets: Mutex::new(BTreeMap::new()),
        }
    }

    /// Width of one bucket.
    pub fn width(&self) -> Duration {
        self.width
    }

    /// The bucket a request that ended `since_start` into the phase falls in.
    pub fn index(&self, since_start: Duration) -> u32 {
        u32::try_from(since_start.as_nanos() / self.width.as_nanos()).unwrap_or(u32::MAX)
    }

    /// Records one request into the task's `pending` buckets, first handing over the
    /// buckets the task has moved past.
    pub fn record(
        &self,
        pending: &mut Pending,
        since_start: Duration,
        label: &str,
        answer: Answer,
        latency: Duration,
    ) {
        let index = self.index(since_start);
        if let Some(done) = pending.split_before(index) {
            self.absorb(&done);
        }
        pending.record(index, label, answer, latency);
    }

    /// Adds `pending` (a task's leftover buckets at the end of the phase).
    pub fn absorb(&self, pending: &Pending) {
        // A poisoned lock only means another task panicked mid-merge; the counts
        // are still the best there is for a chart.
        let mut all = match self.buckets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        merge_into(&mut all, &pending.buckets);
    }

    /// The figures of every bucket, one series per endpoint label, each covering every
    /// bucket from the first to the last seen in the run (empty buckets as zeros). The
    /// bucket the phase ended in (`phase_end` into it) is only as wide as the part of it
    /// the phase covered, so its rate is not understated.
    pub fn series(&self, phase_end: Duration) -> Vec<EndpointSeries> {
        let all = match self.buckets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let last = all.keys().next_back().copied();
        let mut out: BTreeMap<&str, EndpointSeries> = BTreeMap::new();
        let Some(last) = last else {
            return Vec::new();
        };
        let width = self.width.as_secs_f64();
        let end = phase_end.as_secs_f64();
        let width_at = |i: u32| {
            let covered = end - f64::from(i) * width;
            if covered > 0.0 && covered < width {
                covered
            } else {
                width
            }
        };
        for label in all.values().flat_map(BTreeMap::keys) {
            out.entry(label.as_str()).or_insert_with(|| EndpointSeries {
                endpoint: label.clone(),
                points: (0..=last)
                    .map(|i| Point {
                        start_secs: f64::from(i) * width,
                        width_secs: width_at(i),
                        ..Point::default()
                    })
                    .collect(),
            });
        }
        let each = all
            .iter()
            .flat_map(|(index, endpoints)| endpoints.iter().map(move |(l, b)| (index, l, b)));
        for (index, label, b) in each {
            let Some(s) = out.get_mut(label.as_str()) else {
                continue;
            };
            let Some(p) = s.points.get_mut(*index as usize) else {
                continue;
            };
            let ms = |q: f64| b.latency.value_at_quantile(q) as f64 / 1000.0;
            let count = b.latency.len() + b.transport;
            *p = Point {
                start_secs: p.start_secs,
                width_secs: p.width_secs,
                count,
                ok: b.ok,
                per_sec: count as f64 / p.width_secs,
                p50_ms: ms(0.50),
                p90_ms: ms(0.90),
                p99_ms: ms(0.99),
                errors: b
                    .by_status
                    .iter()
                    .map(|(s, n)| (s.to_string(), *n))
                    .chain((b.transport > 0).then(|| ("transport".to_owned(), b.transport)))
                    .collect(),
            };
        }
        out.into_values().collect()
    }
}

/// One endpoint's figures over time.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSeries {
    /// The endpoint label.
    pub endpoint: String,
    /// One point per bucket, in time order.
    pub points: Vec<Point>,
}

/// One endpoint's figures in one bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Point {
    /// Start of the bucket, seconds into the measured phase.
    pub start_secs: f64,
    /// Width of the bucket.
    pub width_secs: f64,
    /// Requests that ended in the bucket (answered or not).
    pub count: u64,
    /// 2xx answers.
    pub ok: u64,
    /// `count` per second of the bucket.
    pub per_sec: f64,
    /// Median latency (0 when nothing was answered).
    pub p50_ms: f64,
    /// 90th percentile latency.
    pub p90_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Non-2xx answers by status, plus `transport`.
    pub errors: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn buckets_are_one_second_or_wide_enough_for_the_limit() {
        assert_eq!(Timeline::new(Duration::from_secs(10)).width(), MS(1000));
        assert_eq!(Timeline::new(Duration::from_secs(300)).width(), MS(1000));
        assert_eq!(Timeline::new(Duration::from_secs(3600)).width(), MS(12_000));
        let t = Timeline::new(Duration::from_secs(10));
        assert_eq!(t.index(MS(999)), 0);
        assert_eq!(t.index(MS(1000)), 1);
        assert_eq!(t.index(MS(5500)), 5);
    }

    #[test]
    fn requests_land_in_the_bucket_they_ended_in_and_tasks_merge() {
        let t = Timeline::with_width(MS(1000));
        let mut a = Pending::default();
        let mut b = Pending::default();
        t.record(&mut a, MS(100), "procure", Answer::Status(200), MS(10));
        t.record(&mut a, MS(900), "procure", Answer::Status(200), MS(30));
        t.record(&mut b, MS(200), "procure", Answer::Status(503), MS(5));
        // Task a moves on to bucket 2: bucket 0 goes to the timeline, 2 stays pending.
        t.record(&mut a, MS(2100), "release", Answer::Transport, MS(10));
        assert!(!a.is_empty());
        t.absorb(&a);
        t.absorb(&b);
        let series = t.series(MS(2500));
        assert_eq!(series.len(), 2);
        let p = &series[0];
        assert_eq!(p.endpoint, "procure");
        assert_eq!(p.points.len(), 3, "buckets 0..=2, the empty ones as zeros");
        assert_eq!((p.points[0].count, p.points[0].ok), (3, 2));
        assert_eq!(p.points[0].errors.get("503"), Some(&1));
        assert!((p.points[0].per_sec - 3.0).abs() < 1e-9);
        assert!(
            (p.points[0].p99_ms - 30.0).abs() < 0.5,
            "{}",
            p.points[0].p99_ms
        );
        assert_eq!(p.points[1].count, 0);
        assert!((p.points[2].start_secs - 2.0).abs() < 1e-9);
        let r = &series[1];
        assert_eq!(r.endpoint, "release");
        assert_eq!(r.points[2].count, 1);
        // The phase ended half-way through bucket 2: one request in half a second.
        assert!((r.points[2].width_secs - 0.5).abs() < 1e-9);
        assert!((r.points[2].per_sec - 2.0).abs() < 1e-9);
        assert_eq!(r.points[2].errors.get("transport"), Some(&1));
        assert_eq!(r.points[2].p50_ms, 0.0, "no answered request, no latency");
    }

    #[test]
    fn an_empty_timeline_has_no_series() {
        assert!(Timeline::with_width(MS(1000)).series(MS(1000)).is_empty());
    }
}
