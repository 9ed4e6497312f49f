//! The short nemesis soak: `scripts/soak.sh` for about 30 s with a fault every 6 s, on
//! the binary Cargo built for these tests (3 etcd members, moto, two replicas, the
//! harness and `soak-check`, all real processes on loopback). The checker's own
//! counting is tested on synthetic histories in `src/loadtest/history.rs`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::SERVICE_BIN;

/// Longest the script may take (30 s of load, start-up, the last fault, the check).
const LIMIT: Duration = Duration::from_secs(240);

fn figure(text: &str, after: &str, before: &str) -> u64 {
    text.split_once(after)
        .and_then(|(_, rest)| rest.split_once(before))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_under_faults_counts_no_violation() {
    // The fault tests and this one each take the machine; run them one at a time.
    let _serial = crate::faults::SERIAL.lock().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut child = Command::new("bash")
        .arg(root.join("scripts/soak.sh"))
        .env("RP_BIN", SERVICE_BIN)
        .env("SOAK_SECONDS", "30")
        .env("SOAK_FAULT_EVERY", "6")
        .env("SOAK_PAUSE_SECONDS", "4")
        .env("SOAK_WORKFLOWS", "8")
        .env("SOAK_DEPLOYABLES", "4")
        .env("SOAK_RATE", "1")
        .env("SOAK_OUT", out.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run scripts/soak.sh: {e}"));
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
            break Some(s);
        }
        if Instant::now() >= deadline {
            // SIGTERM: the script's trap stops everything it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = tokio::task::block_in_place(|| child.wait_with_output())
        .unwrap_or_else(|e| panic!("output: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = format!("{stdout}\n--- stderr ---\n{stderr}");
    let Some(status) = status else {
        panic!("the soak did not finish in {LIMIT:?}:\n{text}");
    };
    let operations = figure(&stdout, "soak check: ", " operations");
    let faults = figure(&stdout, "operations, ", " faults injected");
    println!("{stdout}");
    assert!(operations > 100, "too few operations recorded:\n{text}");
    assert!(faults >= 3, "too few faults injected:\n{text}");
    assert!(
        stdout.contains("| submit-instance | 202 |"),
        "no instance was accepted:\n{text}"
    );
    assert!(
        stdout.contains("| procure | 200 PROCURED |"),
        "no PROCURE succeeded:\n{text}"
    );
    assert!(
        status.success() && stdout.contains("verdict: OK"),
        "the soak counted violations (exit {status}):\n{text}"
    );
    assert!(
        out.path().join("faults.jsonl").is_file(),
        "SOAK_OUT kept nothing:\n{text}"
    );
    // Nothing it started is left running (each child carries SOAK_WORK=<work dir>).
    let work = stderr
        .lines()
        .find_map(|l| l.strip_prefix("soak: work dir "))
        .unwrap_or_else(|| panic!("no work dir reported:\n{text}"));
    let marker = format!("SOAK_WORK={work}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!Path::new(work).exists(), "work dir {work} left behind");
}
