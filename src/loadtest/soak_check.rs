//! `resource-plane soak-check`: reads the soak's history files, the nemesis's fault log,
//! etcd's full history and moto's EC2 instances, runs [`history::check`] and prints
//! the figures. Exit 0 when every count is zero, 1 when any is not, 64/69 when the
//! check could not run.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};

use crate::adapters::ec2::{Ec2Cloud, Ec2Settings};
use crate::loadtest::history::{self, EtcdHistory, Fault, Launch, Op};

/// Arguments of `resource-plane soak-check`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "soak-check",
    about = "Judge a soak: its operation history against etcd's history and the EC2 launches"
)]
pub struct SoakCheckArgs {
    /// History files the harness wrote (`loadtest --history`); repeatable.
    #[arg(long = "history", required = true)]
    pub history: Vec<PathBuf>,
    /// The nemesis's fault log (JSON lines of kind, target, start_ms, end_ms).
    #[arg(long)]
    pub faults: Option<PathBuf>,
    /// etcd endpoints, `host:port`, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd_endpoints: Vec<String>,
    /// The service's `ETCD_PREFIX`.
    #[arg(long, default_value = "")]
    pub etcd_prefix: String,
    /// `{env}` of the shadow deployables the harness used.
    #[arg(long, default_value = "int")]
    pub env: String,
    /// EC2 endpoint (moto) to count launches on; without it launches are not checked.
    #[arg(long)]
    pub ec2_endpoint: Option<String>,
    /// The service's `CLUSTER_ID` (the `resource-plane/cluster` tag).
    #[arg(long, default_value = "default")]
    pub cluster_id: String,
    /// EC2 region.
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// Longest the reads of etcd and EC2 may take, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Print the verdict as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Reads every event etcd kept (from revision 1 to now) and files those under `prefix`.
pub async fn read_etcd(
    endpoints: &[String],
    prefix: &str,
    env: &str,
) -> Result<EtcdHistory, String> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(30));
    let mut client = Client::connect(endpoints, Some(opts))
        .await
        .map_err(|e| format!("etcd connect: {e}"))?;
    let head = client
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_count_only()),
        )
        .await
        .map_err(|e| format!("etcd get: {e}"))?
        .header()
        .map(|h| h.revision())
        .ok_or("etcd answered without a header")?;
    let mut out = EtcdHistory::default();
    if head <= 1 {
        return Ok(out);
    }
    // Every revision changed at least one key, so a watch of all keys from revision 1
    // sees revision `head` last: that is where the history read ends.
    let mut stream = client
        .watch(
            "",
            Some(WatchOptions::new().with_all_keys().with_start_revision(1)),
        )
        .await
        .map_err(|e| format!("etcd watch: {e}"))?;
    let mut seen = 0;
    while seen < head {
        let Some(resp) = stream
            .message()
            .await
            .map_err(|e| format!("etcd watch: {e}"))?
        else {
            return Err(format!("etcd watch ended at revision {seen} of {head}"));
        };
        if resp.compact_revision() > 0 {
            return Err(format!(
                "etcd compacted its history up to revision {}: cannot check",
                resp.compact_revision()
            ));
        }
        if resp.canceled() {
            return Err(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            ));
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            seen = seen.max(kv.mod_revision());
            let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(prefix)) else {
                continue;
            };
            let value = match event.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            out.add(env, key, kv.mod_revision(), value);
        }
    }
    Ok(out)
}

/// Every EC2 instance (any state) tagged with `cluster_id`.
pub async fn read_launches(
    endpoint: &str,
    region: &str,
    cluster_id: &str,
) -> Result<Vec<Launch>, String> {
    let settings = Ec2Settings {
        region: region.to_owned(),
        endpoint_url: Some(endpoint.to_owned()),
        cluster_id: cluster_id.to_owned(),
    };
    // moto accepts any credentials; the process environment's are never used.
    let cloud = Ec2Cloud::with_static_credentials(settings, "testing", "testing").await;
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..1_000 {
        let resp = cloud
            .sdk_client()
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:resource-plane/cluster")
                    .values(cluster_id)
                    .build(),
            )
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "DescribeInstances: {}",
                    aws_sdk_ec2::error::DisplayErrorContext(&e)
                )
            })?;
        for inst in resp.reservations().iter().flat_map(|r| r.instances()) {
            out.push(Launch {
                instance_id: inst.instance_id().unwrap_or_default().to_owned(),
                worker_id: inst
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some("resource-plane/worker-id"))
                    .and_then(|t| t.value())
                    .map(str::to_owned),
                state: inst
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
            });
        }
        match resp.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(out),
        }
    }
    Err("DescribeInstances: more than 1000 pages".into())
}

async fn run(args: &SoakCheckArgs) -> Result<history::Verdict, String> {
    let mut ops: Vec<Op> = Vec::new();
    for h in &args.history {
        ops.extend(history::read_jsonl::<Op>(h)?);
    }
    let faults: Vec<Fault> = match &args.faults {
        Some(f) => history::read_jsonl(f)?,
        None => Vec::new(),
    };
    let limit = Duration::from_secs(args.timeout_secs.max(1));
    let etcd = tokio::time::timeout(
        limit,
        read_etcd(&args.etcd_endpoints, &args.etcd_prefix, &args.env),
    )
    .await
    .map_err(|_| format!("reading etcd took more than {limit:?}"))??;
    let launches = match &args.ec2_endpoint {
        Some(e) => tokio::time::timeout(limit, read_launches(e, &args.region, &args.cluster_id))
            .await
            .map_err(|_| format!("reading EC2 took more than {limit:?}"))??,
        None => Vec::new(),
    };
    Ok(history::check(&ops, &faults, &etcd, &launches))
}

/// Runs the check for the binary; returns the exit code.
pub async fn main(args: SoakCheckArgs) -> u8 {
    if args.etcd_prefix.ends_with('/') {
        eprintln!("resource-plane soak-check: --etcd-prefix must not end with '/'");
        return 64;
    }
    match run(&args).await {
        Ok(verdict) => {
            if args.json {
                eprint!("{}", verdict.render());
                match serde_json::to_string_pretty(&verdict) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("resource-plane soak-check: cannot encode: {e}"),
                }
            } else {
                print!("{}", verdict.render());
            }
            if verdict.passed() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("resource-plane soak-check: {e}");
            69
        }
    }
}
