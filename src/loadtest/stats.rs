//! Per-endpoint measurements: an HDR latency histogram, answer counts by status and
//! transport errors. Each task keeps its own [`Recorder`] (no lock on the hot path);
//! they are merged once at the end and summarized into [`EndpointSummary`] rows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::loadtest::timeline::Pending;

/// Highest latency the histograms track, in microseconds (60 s); larger values saturate.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What one request ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status (or, for etcd, 200 for an answered RPC).
    Status(u16),
    /// No answer: connection refused or reset, timeout, gRPC failure.
    Transport,
}

impl Answer {
    /// Whether the answer counts as a success (2xx).
    pub fn is_ok(self) -> bool {
        matches!(self, Answer::Status(s) if (200..300).contains(&s))
    }

    /// Whether the server answered 5xx.
    pub fn is_server_error(self) -> bool {
        matches!(self, Answer::Status(s) if s >= 500)
    }
}

/// Measurements of one endpoint (or one outcome of it, e.g. `procure (busy)`).
#[derive(Debug, Clone)]
pub struct EndpointStats {
    latency: Histogram<u64>,
    ok: u64,
    by_status: BTreeMap<u16, u64>,
    transport: u64,
}

impl EndpointStats {
    /// `None` only if hdrhistogram rejected the constant bounds, which it does not
    /// (low >= 1, high >= 2 * low, 3 significant figures).
    fn new() -> Option<Self> {
        let latency = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).ok()?;
        Some(Self {
            latency,
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
                self.latency.saturating_record(us);
                if answer.is_ok() {
                    self.ok += 1;
                } else {
                    *self.by_status.entry(s).or_insert(0) += 1;
                }
            }
            Answer::Transport => self.transport += 1,
        }
    }

    fn merge(&mut self, other: &EndpointStats) {
        // Same bounds on both sides, so adding cannot fail; saturate if it ever did.
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

/// Measurements of many endpoints, keyed by label. One per task, merged at the end.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    endpoints: BTreeMap<String, EndpointStats>,
    /// Time buckets not yet handed to the run's [`Timeline`](super::timeline::Timeline).
    pub(crate) pending: Pending,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one request of `label`.
    pub fn record(&mut self, label: &str, answer: Answer, latency: Duration) {
        if let Some(e) = self.endpoints.get_mut(label) {
            e.record(answer, latency);
            return;
        }
        if let Some(mut e) = EndpointStats::new() {
            e.record(answer, latency);
            self.endpoints.insert(label.to_owned(), e);
        }
    }

    /// Adds everything `other` recorded.
    pub fn merge(&mut self, other: &Recorder) {
        for (label, stats) in &other.endpoints {
            match self.endpoints.get_mut(label) {
                Some(mine) => mine.merge(stats),
                None => {
                    self.endpoints.insert(label.clone(), stats.clone());
                }
            }
        }
        self.pending.merge(&other.pending);
    }

    /// Requests of `label` recorded so far (answered or not).
    pub fn count(&self, label: &str) -> u64 {
        self.endpoints
            .get(label)
            .map(|e| e.latency.len() + e.transport)
            .unwrap_or(0)
    }

    /// Successful (2xx) requests of `label`.
    pub fn ok(&self, label: &str) -> u64 {
        self.endpoints.get(label).map(|e| e.ok).unwrap_or(0)
    }

    /// One row per endpoint, rates computed over `elapsed`.
    pub fn summaries(&self, elapsed: Duration) -> Vec<EndpointSummary> {
        let secs = elapsed.as_secs_f64().max(1e-9);
        self.endpoints
            .iter()
            .map(|(label, e)| {
                let ms = |q: f64| e.latency.value_at_quantile(q) as f64 / 1000.0;
                let count = e.latency.len() + e.transport;
                let mut errors: BTreeMap<String, u64> = e
                    .by_status
                    .iter()
                    .map(|(s, n)| (s.to_string(), *n))
                    .collect();
                if e.transport > 0 {
                    errors.insert("transport".into(), e.transport);
                }
                EndpointSummary {
                    endpoint: label.clone(),
                    count,
                    ok: e.ok,
                    ops_per_sec: count as f64 / secs,
                    mean_ms: if e.latency.is_empty() {
                        0.0
                    } else {
                        e.latency.mean() / 1000.0
                    },
                    p50_ms: ms(0.50),
                    p90_ms: ms(0.90),
                    p99_ms: ms(0.99),
                    max_ms: e.latency.max() as f64 / 1000.0,
                    errors,
                    elapsed_secs: elapsed.as_secs_f64(),
                }
            })
            .collect()
    }

    /// The latency distribution of every endpoint: answered requests counted in up to
    /// `bins` ranges, spaced evenly on a log scale from the smallest latency to the
    /// largest (latencies of a loaded service span orders of magnitude).
    pub fn distributions(&self, bins: usize) -> Vec<Distribution> {
        self.endpoints
            .iter()
            .map(|(label, e)| Distribution {
                endpoint: label.clone(),
                bins: log_bins(&e.latency, bins.max(1)),
            })
            .collect()
    }
}

fn log_bins(h: &Histogram<u64>, n: usize) -> Vec<Bin> {
    if h.is_empty() {
        return Vec::new();
    }
    let low = h.min().max(1) as f64;
    // The highest value equivalent to the max, so the top bin holds it.
    let high = (h.highest_equivalent(h.max()) + 1) as f64;
    // One value (give or take the histogram's precision): one bin.
    let n = if h.equivalent(h.min(), h.max()) { 1 } else { n };
    let step = (high / low).ln() / n as f64;
    let edge = |i: usize| low * (step * i as f64).exp();
    let mut bins: Vec<Bin> = (0..n)
        .map(|i| Bin {
            low_ms: edge(i) / 1000.0,
            high_ms: edge(i + 1) / 1000.0,
            count: 0,
        })
        .collect();
    for v in h.iter_recorded() {
        let x = v.value_iterated_to().max(1) as f64;
        let i = if step > 0.0 {
            ((x / low).ln() / step).floor().max(0.0) as usize
        } else {
            0
        };
        if let Some(b) = bins.get_mut(i.min(n - 1)) {
            b.count += v.count_at_value();
        }
    }
    bins
}

/// How the answered requests of one endpoint spread over latency ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    /// The endpoint label.
    pub endpoint: String,
    /// Ranges in increasing order; their counts add up to the answered requests.
    pub bins: Vec<Bin>,
}

/// One latency range of a [`Distribution`].
#[derive(Debug, Clone, PartialEq)]
pub struct Bin {
    /// Lower edge (inclusive).
    pub low_ms: f64,
    /// Upper edge (exclusive).
    pub high_ms: f64,
    /// Answered requests in the range.
    pub count: u64,
}

/// The figures of one endpoint over one phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointSummary {
    /// Label (`procure`, `procure (busy)`, `release`, `etcd txn`, ...).
    pub endpoint: String,
    /// Requests sent (answered or not).
    pub count: u64,
    /// 2xx answers.
    pub ok: u64,
    /// `count` per second of the phase.
    pub ops_per_sec: f64,
    /// Mean latency of answered requests.
    pub mean_ms: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 90th percentile latency.
    pub p90_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Largest latency.
    pub max_ms: f64,
    /// Non-2xx answers by status, plus `transport` for requests with no answer.
    pub errors: BTreeMap<String, u64>,
    /// Length of the phase the rates are computed over.
    pub elapsed_secs: f64,
}

/// Renders rows as a fixed-width text table.
pub fn table(rows: &[EndpointSummary]) -> String {
    let width = rows
        .iter()
        .map(|r| r.endpoint.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$} {:>9} {:>10} {:>8} {:>8} {:>8} {:>9}  errors",
        "endpoint", "count", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for r in rows {
        let errors = if r.errors.is_empty() {
            "-".to_owned()
        } else {
            r.errors
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "{:<width$} {:>9} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2}  {}",
            r.endpoint, r.count, r.ops_per_sec, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms, errors
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_quantiles_rates_and_errors_by_status() {
        let mut a = Recorder::new();
        for ms in 1..=100u64 {
            a.record("procure", Answer::Status(200), Duration::from_millis(ms));
        }
        let mut b = Recorder::new();
        b.record("procure", Answer::Status(503), Duration::from_millis(500));
        b.record("procure", Answer::Transport, Duration::from_secs(10));
        b.record("release", Answer::Status(409), Duration::from_millis(2));
        a.merge(&b);
        assert_eq!(a.count("procure"), 102);
        assert_eq!(a.ok("procure"), 100);
        let rows = a.summaries(Duration::from_secs(2));
        assert_eq!(rows.len(), 2);
        let p = &rows[0];
        assert_eq!(p.endpoint, "procure");
        assert_eq!(p.count, 102);
        assert!((p.ops_per_sec - 51.0).abs() < 1e-9, "{}", p.ops_per_sec);
        // 3 significant figures: quantiles are within 0.1 % of the exact values.
        assert!((p.p50_ms - 51.0).abs() < 0.1, "{}", p.p50_ms);
        assert!((p.p90_ms - 91.0).abs() < 0.1, "{}", p.p90_ms);
        assert!((p.max_ms - 500.0).abs() < 0.5, "{}", p.max_ms);
        assert_eq!(p.errors.get("503"), Some(&1));
        assert_eq!(p.errors.get("transport"), Some(&1));
        assert_eq!(rows[1].errors.get("409"), Some(&1));
        let text = table(&rows);
        assert!(text.contains("procure"), "{text}");
        assert!(text.contains("503:1 transport:1"), "{text}");
    }

    #[test]
    fn distributions_cover_every_answered_request_on_a_log_scale() {
        let mut r = Recorder::new();
        for ms in [1u64, 1, 2, 20, 300, 900] {
            r.record("procure", Answer::Status(200), Duration::from_millis(ms));
        }
        r.record("procure", Answer::Transport, Duration::from_secs(10));
        r.record("single", Answer::Status(200), Duration::from_millis(5));
        let d = r.distributions(3);
        assert_eq!(d.len(), 2);
        let bins = &d[0].bins;
        assert_eq!(bins.len(), 3);
        assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), 6, "{bins:?}");
        // 1 ms .. 900 ms over three bins: about a decade each.
        assert_eq!(bins.iter().map(|b| b.count).collect::<Vec<_>>(), [3, 1, 2]);
        assert!((bins[0].low_ms - 1.0).abs() < 0.01, "{bins:?}");
        assert!(bins[2].high_ms >= 900.0, "{bins:?}");
        assert!(bins.windows(2).all(|w| w[0].high_ms == w[1].low_ms));
        assert_eq!(d[1].bins.len(), 1);
        assert_eq!(d[1].bins[0].count, 1);
        assert!(Recorder::new().distributions(10).is_empty());
    }

    #[test]
    fn answers_classify() {
        assert!(Answer::Status(201).is_ok());
        assert!(!Answer::Status(409).is_ok());
        assert!(Answer::Status(503).is_server_error());
        assert!(!Answer::Transport.is_server_error());
        assert!(!Answer::Transport.is_ok());
    }
}
