//! etcd RPC accounting from etcd's own Prometheus `/metrics`
//! (`grpc_server_handled_total{grpc_method="Txn"|"Range"}`): sampled around each
//! request when one workflow runs (exact per step), or around the whole phase.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Counts of the RPCs the accounting looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpcCounts {
    /// `Txn` calls handled.
    pub txn: u64,
    /// `Range` calls handled.
    pub range: u64,
}

impl RpcCounts {
    /// `self - earlier`, never negative.
    pub fn since(self, earlier: RpcCounts) -> RpcCounts {
        RpcCounts {
            txn: self.txn.saturating_sub(earlier.txn),
            range: self.range.saturating_sub(earlier.range),
        }
    }
}

/// Sums `grpc_server_handled_total` over every label set of each method.
pub fn parse_counts(metrics: &str) -> RpcCounts {
    let sum = |method: &str| -> u64 {
        let needle = format!("grpc_method=\"{method}\"");
        metrics
            .lines()
            .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    RpcCounts {
        txn: sum("Txn"),
        range: sum("Range"),
    }
}

/// Reads etcd's `/metrics`.
#[derive(Clone)]
pub struct Sampler {
    http: reqwest::Client,
    url: String,
}

impl Sampler {
    /// A sampler of `url` (etcd's client URL + `/metrics`).
    pub fn new(url: &str) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            url: url.to_owned(),
        })
    }

    /// The current counters.
    pub async fn sample(&self) -> Result<RpcCounts, String> {
        let resp = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.url))?;
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{}: {e}", self.url))?;
        Ok(parse_counts(&text))
    }
}

/// RPCs attributed to one kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepRpcs {
    /// Operations of this kind.
    pub ops: u64,
    /// Txn RPCs seen during them.
    pub txn: u64,
    /// Range RPCs seen during them.
    pub range: u64,
    /// `txn / ops`.
    pub txn_per_op: f64,
    /// `range / ops`.
    pub range_per_op: f64,
}

/// etcd RPCs per operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EtcdRpcReport {
    /// `per-request` (sampled around each request, one workflow) or `phase total`.
    pub attribution: String,
    /// Step label -> its RPCs.
    pub steps: BTreeMap<String, StepRpcs>,
}

impl EtcdRpcReport {
    /// An empty report of the given attribution.
    pub fn new(attribution: &str) -> Self {
        Self {
            attribution: attribution.to_owned(),
            steps: BTreeMap::new(),
        }
    }

    /// Adds one operation of `step` that caused `rpcs`.
    pub fn add(&mut self, step: &str, ops: u64, rpcs: RpcCounts) {
        let s = self.steps.entry(step.to_owned()).or_default();
        s.ops += ops;
        s.txn += rpcs.txn;
        s.range += rpcs.range;
        let n = s.ops.max(1) as f64;
        s.txn_per_op = s.txn as f64 / n;
        s.range_per_op = s.range as f64 / n;
    }

    /// Adds everything `other` saw.
    pub fn merge(&mut self, other: &EtcdRpcReport) {
        for (step, s) in &other.steps {
            self.add(
                step,
                s.ops,
                RpcCounts {
                    txn: s.txn,
                    range: s.range,
                },
            );
        }
    }

    /// A text table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "step", "ops", "Txn", "Range", "Txn/op", "Range/op"
        );
        for (step, s) in &self.steps {
            let _ = writeln!(
                out,
                "{:<16} {:>8} {:>8} {:>8} {:>8.2} {:>8.2}",
                step, s.ops, s.txn, s.range, s.txn_per_op, s.range_per_op
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_every_label_set_of_a_method() {
        let text = "\
# HELP grpc_server_handled_total Total number of RPCs completed on the server.
grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 12
grpc_server_handled_total{grpc_code=\"Unavailable\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 3
grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 7
grpc_server_started_total{grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 99
";
        let c = parse_counts(text);
        assert_eq!(c, RpcCounts { txn: 15, range: 7 });
        assert_eq!(
            c.since(RpcCounts { txn: 5, range: 9 }),
            RpcCounts { txn: 10, range: 0 }
        );
        let mut r = EtcdRpcReport::new("per-request");
        r.add("procure", 1, RpcCounts { txn: 1, range: 0 });
        r.add("procure", 1, RpcCounts { txn: 1, range: 1 });
        let s = r.steps["procure"];
        assert_eq!((s.ops, s.txn, s.range), (2, 2, 1));
        assert!((s.range_per_op - 0.5).abs() < 1e-9);
        assert!(r.table().contains("procure"));
    }
}
