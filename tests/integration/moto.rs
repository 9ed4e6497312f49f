//! Test support: a real moto EC2 emulator (`moto_server`) on a free loopback port, and
//! EC2 adapters pointed at it with dummy credentials.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use resource_plane::adapters::ec2::{Ec2Cloud, Ec2Settings};

use crate::support::free_port;

const INSTALL: &str =
    "run `bash scripts/setup.sh` (it installs moto[server] into /var/tmp/resource-plane-tools/venv), or set MOTO_SERVER";

/// Region the tests use (moto has default VPCs and subnets in every region).
pub const REGION: &str = "us-east-1";

/// An AMI among moto's built-in images.
pub const AMI: &str = "ami-12c6146b";

/// `moto_server` from `MOTO_SERVER`, else the virtualenv `scripts/setup.sh` makes
/// (`$RP_TOOLS/venv`, default `/var/tmp/resource-plane-tools`), else PATH.
fn moto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let tools = std::env::var_os("RP_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/resource-plane-tools"));
    let venv = tools.join("venv/bin/moto_server");
    if venv.is_file() {
        return venv;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`moto_server` not found on PATH: {INSTALL}"))
}

/// A `moto_server` started for one test; killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
    // Holds moto's log until the server is gone.
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto and waits until it answers HTTP.
    pub fn start() -> Self {
        let bin = moto_bin();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        // The port is released before moto binds it; another process may grab it in
        // between, so a start that loses that race is retried on a fresh port.
        for _ in 0..3 {
            if let Some((child, port)) = Self::try_start(&bin, &dir) {
                return Self {
                    child,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!(
            "moto_server did not start: {}",
            Self::log(dir.path()).trim_end()
        );
    }

    fn try_start(bin: &Path, dir: &tempfile::TempDir) -> Option<(Child, u16)> {
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log"))
            .unwrap_or_else(|e| panic!("moto log: {e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("moto log: {e}"));
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto_server ({e}): {INSTALL}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = Self::log(dir.path());
                if log.contains("Address already in use") {
                    return None;
                }
                // A pyenv shim stays on PATH after moto is uninstalled; it exits at once.
                panic!(
                    "moto_server exited with {status}: {}\n{INSTALL}",
                    log.trim_end()
                );
            }
            if answers_http(port) {
                return Some((child, port));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("moto_server did not answer HTTP in 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("moto.log")).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings for an EC2 adapter of `cluster_id` on this moto.
    pub fn settings(&self, cluster_id: &str) -> Ec2Settings {
        Ec2Settings {
            region: REGION.to_owned(),
            endpoint_url: Some(self.endpoint()),
            cluster_id: cluster_id.to_owned(),
        }
    }

    /// An EC2 adapter of `cluster_id` on this moto, with dummy credentials.
    pub async fn cloud(&self, cluster_id: &str) -> Ec2Cloud {
        dummy_credentials_cloud(self.settings(cluster_id)).await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An EC2 adapter on `settings` with dummy static credentials (never the process env).
pub async fn dummy_credentials_cloud(settings: Ec2Settings) -> Ec2Cloud {
    Ec2Cloud::with_static_credentials(settings, "testing", "testing").await
}

fn answers_http(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
        return false;
    }
    if write!(s, "GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/")
}

/// Creates IAM instance profile `name` in moto (the same server serves IAM). The crate
/// has no IAM SDK, so this is IAM's query API by hand; moto routes by the credential
/// scope of the `Authorization` header and does not check the signature.
pub async fn create_instance_profile(moto: &Moto, name: &str) -> String {
    let body =
        format!("Action=CreateInstanceProfile&InstanceProfileName={name}&Version=2010-05-08");
    let resp = reqwest::Client::new()
        .post(moto.endpoint())
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header(
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=testing/20240101/{REGION}/iam/aws4_request, SignedHeaders=host, Signature=0"
            ),
        )
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateInstanceProfile: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "CreateInstanceProfile: {status} {text}"
    );
    let arn = text
        .split("<Arn>")
        .nth(1)
        .and_then(|rest| rest.split("</Arn>").next())
        .unwrap_or_else(|| panic!("no Arn in {text}"));
    arn.to_owned()
}
