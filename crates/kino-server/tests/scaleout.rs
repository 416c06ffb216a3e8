//! Several nodes on one Postgres queue and one S3 bucket (both real servers started here):
//! `kino-server --role api` and `--role worker` processes. A worker is SIGKILLed mid-job (its
//! job runs again after the lease and its half-made files are never served), another is
//! stopped and restarted, and the API node is restarted mid-run; every video completes exactly
//! once with one set of files in the bucket. Also the start-up errors of a node.

mod common;
mod rig;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create, get, model_dir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(600);
const PREFIX: &str = "e2e";
const LEASE_SECS: u64 = 3;

struct Node {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().ok();
    }
    /// SIGTERM, then wait for it to exit.
    fn stop(&mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let t0 = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(60), "did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn node_command(role: &str, pg_url: &str, weed: &rig::Weed, data: &Path, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kino-server"));
    c.args(["--cpu", "--poll-after-ms", "50", "--role", role])
        .args(["--port", &port.to_string()])
        .arg("--model")
        .arg(model_dir())
        .arg("--data-dir")
        .arg(data)
        .args(["--database", pg_url])
        .arg("--storage")
        .arg(format!("s3://{}/{PREFIX}", rig::BUCKET))
        .args(["--lease-secs", &LEASE_SECS.to_string()])
        .env("KINO_LOG", "warn");
    for (k, v) in weed.env() {
        c.env(k, v);
    }
    c
}

fn spawn_node(role: &str, pg: &rig::Postgres, weed: &rig::Weed, data: &Path) -> Node {
    spawn_node_on(role, pg, weed, data, 0)
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = String::from_utf8(get(addr, "/metrics").body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn ffprobe_ok(bytes: &[u8]) -> bool {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), bytes).unwrap();
    Command::new("ffprobe")
        .args(["-v", "error", "-show_streams", "-select_streams", "v"])
        .arg(f.path())
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("codec_type=video")
        })
        .unwrap_or(false)
}

fn submit(addr: SocketAddr, n: usize, steps: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            create(
                addr,
                json!({"prompt": format!("job {i}"), "seconds": "1", "steps": steps}),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Queues a slow video, waits until a worker is half-way through it and SIGKILLs that worker.
/// Returns the video, the killed worker's index, the attempt it died in and when.
fn kill_mid_job(
    api: SocketAddr,
    pg: &rig::Postgres,
    workers: &mut [Node],
) -> (String, usize, i64, Instant) {
    let slow = submit(api, 1, 200).remove(0);
    let t0 = Instant::now();
    let name = loop {
        let row = pg.psql(&format!(
            "SELECT worker FROM videos WHERE id = '{slow}' AND status = 'in_progress' AND progress > 20"
        ));
        if !row.is_empty() {
            break row;
        }
        assert!(t0.elapsed() < T, "the slow video never ran");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Worker names are HOST-PID-DEVICE-TAG.
    let pid: u32 = name.rsplit('-').nth(2).unwrap().parse().unwrap();
    let k = workers
        .iter()
        .position(|w| w.pid() == pid)
        .unwrap_or_else(|| panic!("no worker with pid {pid} ({name})"));
    workers[k].sigkill();
    let killed_at = Instant::now();
    let attempt: i64 = pg
        .psql(&format!("SELECT attempts FROM videos WHERE id = '{slow}'"))
        .parse()
        .unwrap();
    (slow, k, attempt, killed_at)
}

fn status_of(addr: SocketAddr, id: &str) -> Value {
    get(addr, &format!("/v1/videos/{id}")).json()
}

/// Every video completed once: the row says so, the bucket holds exactly the completing
/// attempt's three files, and the MP4 that the API serves is a valid video.
fn check_exactly_once(api: SocketAddr, pg: &rig::Postgres, weed: &rig::Weed, ids: &[String]) {
    weed.set_env();
    let outputs = kino_server::storage::Outputs::s3(&format!("s3://{}/{PREFIX}", rig::BUCKET))
        .expect("bucket");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for id in ids {
        let v = status_of(api, id);
        assert_eq!(v["status"], "completed", "{v}");
        let attempt: i64 = pg
            .psql(&format!(
                "SELECT output_attempt FROM videos WHERE id = '{id}'"
            ))
            .parse()
            .unwrap();
        let keys: Vec<String> = rt
            .block_on(outputs.list_video(id))
            .unwrap()
            .iter()
            .map(|k| k.to_string())
            .collect();
        let mut want: Vec<String> = ["spritesheet.jpg", "thumbnail.jpg", "video.mp4"]
            .iter()
            .map(|f| format!("{PREFIX}/videos/{id}/a{attempt}/{f}"))
            .collect();
        let mut got = keys.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{id}: exactly one set of outputs in the bucket");
        let mp4 = get(api, &format!("/v1/videos/{id}/content"));
        assert_eq!(mp4.status, 200);
        assert!(ffprobe_ok(&mp4.body), "{id}: ffprobe rejects the MP4");
    }
    assert_eq!(
        pg.psql("SELECT count(*) FROM videos WHERE status = 'completed'"),
        ids.len().to_string()
    );
    assert_eq!(
        pg.psql("SELECT count(DISTINCT id) FROM videos"),
        ids.len().to_string()
    );
}

#[test]
fn api_and_workers_survive_kill_stop_and_api_restart() {
    let _g = rig::serial();
    let Some((pg, weed)) = rig::both() else {
        return;
    };
    kino_server::pg::migrate(&pg.url()).unwrap();
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut api = spawn_node("api", &pg, &weed, dirs[0].path());
    let mut ws: Vec<Node> = (1..4)
        .map(|i| spawn_node("worker", &pg, &weed, dirs[i].path()))
        .collect();
    // Worker nodes answer only /health and /metrics.
    assert_eq!(get(ws[0].addr, "/v1/videos").status, 404);
    assert_eq!(get(ws[0].addr, "/health").status, 200);

    let mut ids = submit(api.addr, 24, 40);
    // SIGKILL the worker that runs a slow video, half-way through it.
    let (victim, k, attempt_killed, killed_at) = kill_mid_job(api.addr, &pg, &mut ws);
    ids.push(victim.clone());
    // Another worker: stopped (SIGTERM gives its job back) and started again.
    let j = (k + 1) % ws.len();
    ws[j].stop();
    ws[j] = spawn_node("worker", &pg, &weed, dirs[1 + j].path());
    // The API node dies too, and comes back on another port: nothing is lost.
    api.sigkill();
    let api = spawn_node("api", &pg, &weed, dirs[4].path());

    // The killed job runs again within the lease (plus a poll).
    let rerun_after = loop {
        let a: i64 = pg
            .psql(&format!(
                "SELECT attempts FROM videos WHERE id = '{victim}'"
            ))
            .parse()
            .unwrap();
        if a > attempt_killed {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < T, "never re-leased");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "SIGKILLed worker's job {victim} leased again after {:.2} s (lease {LEASE_SECS} s)",
        rerun_after.as_secs_f64()
    );
    assert!(
        rerun_after < Duration::from_secs(LEASE_SECS + 2),
        "re-run took {rerun_after:?}"
    );
    // While it re-runs, the API never serves the dead attempt's files.
    let r = get(api.addr, &format!("/v1/videos/{victim}/content"));
    if status_of(api.addr, &victim)["status"] != "completed" {
        assert_eq!(r.status, 409, "not ready yet");
    }
    for id in &ids {
        let v = common::wait_done(api.addr, id, T);
        assert_eq!(v["status"], "completed", "{v}");
    }
    let done_after = killed_at.elapsed();
    eprintln!(
        "all {} videos completed {:.1} s after the kill",
        ids.len(),
        done_after.as_secs_f64()
    );
    check_exactly_once(api.addr, &pg, &weed, &ids);
    let final_attempt: i64 = pg
        .psql(&format!(
            "SELECT output_attempt FROM videos WHERE id = '{victim}'"
        ))
        .parse()
        .unwrap();
    assert!(
        final_attempt > attempt_killed,
        "the killed attempt's outputs are not the video's"
    );
    let expiries: f64 = (0..ws.len())
        .filter(|i| *i != k)
        .map(|i| metric(ws[i].addr, "kino_lease_expiries_total"))
        .sum();
    assert!(expiries >= 1.0, "a worker reports the take-over");
    let m = String::from_utf8(get(api.addr, "/metrics").body).unwrap();
    assert!(m.contains("kino_queue_depth 0"), "{m}");
    // The SIGKILLed worker counts as live until it has been unseen for two leases; when the
    // queue drains faster than that (as it may: 25 tiny jobs), wait for it to age out.
    let deadline = Instant::now() + Duration::from_secs(3 * LEASE_SECS + 2);
    let m = loop {
        let m = String::from_utf8(get(api.addr, "/metrics").body).unwrap();
        if m.contains("kino_workers{model=\"model\"} 2") || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(m.contains("kino_workers{model=\"model\"} 2"), "{m}");
    let worker_m = String::from_utf8(get(ws[j].addr, "/metrics").body).unwrap();
    assert!(
        worker_m.contains("kino_job_duration_seconds_count"),
        "{worker_m}"
    );
    drop(ws);
    drop(api);
}

#[test]
fn cancel_and_delete_reach_the_worker_on_another_node() {
    let _g = rig::serial();
    let Some((pg, weed)) = rig::both() else {
        return;
    };
    kino_server::pg::migrate(&pg.url()).unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let api = spawn_node("api", &pg, &weed, dirs[0].path());
    let _w = spawn_node("worker", &pg, &weed, dirs[1].path());
    let ids = submit(api.addr, 2, 200);
    // Progress crosses nodes: the API node reports the worker's live stage.
    let v = common::wait_until(api.addr, &ids[0], T, |v| {
        v["status"] == "in_progress" && v["progress"].as_u64() > Some(12)
    });
    assert_eq!(v["status"], "in_progress");
    let t0 = Instant::now();
    let r = common::post_json(
        api.addr,
        &format!("/v1/videos/{}/cancel", ids[0]),
        &json!({}),
    );
    assert_eq!(r.status, 200);
    let v = common::wait_done(api.addr, &ids[0], Duration::from_secs(30));
    eprintln!("cancel reached the worker in {:?}", t0.elapsed());
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["code"], "cancelled");
    common::wait_until(api.addr, &ids[1], T, |v| v["status"] == "in_progress");
    let r = common::delete(api.addr, &format!("/v1/videos/{}", ids[1]));
    assert_eq!(r.status, 200);
    // The worker stops it: its lease keeper sees the row gone, or the NOTIFY arrives.
    let t0 = Instant::now();
    loop {
        let busy = pg.psql("SELECT count(*) FROM videos WHERE status = 'in_progress'");
        if busy == "0" && metric(_w.addr, "kino_jobs_run_total") >= 2.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the deleted job kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    weed.set_env();
    let outputs =
        kino_server::storage::Outputs::s3(&format!("s3://{}/{PREFIX}", rig::BUCKET)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(rt.block_on(outputs.list_video(&ids[1])).unwrap().is_empty());
}

/// A node that cannot use its database or bucket stops at start-up with one error line.
#[test]
fn node_start_up_errors() {
    let _g = rig::serial();
    let Some((pg, weed)) = rig::both() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let run = |role: &str, url: &str, weed_env: Vec<(&'static str, String)>, storage: &str| {
        let mut c = node_command(role, url, &weed, data.path(), 0);
        // Replace the storage argument and the S3 settings.
        let mut args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if let Some(i) = args.iter().position(|a| a == "--storage") {
            args[i + 1] = storage.to_string();
        }
        let mut c2 = Command::new(c.get_program());
        c2.args(&args).env("KINO_LOG", "warn");
        for (k, v) in weed_env {
            c2.env(k, v);
        }
        let _ = &mut c;
        let t0 = Instant::now();
        let out = c2.output().expect("runs");
        let took = t0.elapsed();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "{role} {url} {storage}: started: {err}"
        );
        assert!(took < Duration::from_secs(20), "{role}: took {took:?}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "one error line: {err}");
        eprintln!("{}", lines[0]);
        lines[0].to_string()
    };
    let good_s3 = format!("s3://{}/{PREFIX}", rig::BUCKET);
    let e = run("worker", &pg.url(), weed.env(), &good_s3);
    assert!(e.contains("kino migrate --database"), "{e}");
    kino_server::pg::migrate(&pg.url()).unwrap();
    let e = run(
        "api",
        &format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            rig::free_port()
        ),
        weed.env(),
        &good_s3,
    );
    assert!(e.contains("cannot reach the database server"), "{e}");
    let e = run("all", &pg.url(), weed.env(), "s3://missing-bucket/x");
    assert!(e.contains("`missing-bucket` does not exist"), "{e}");
    let mut bad = weed.env();
    bad.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    bad.push(("AWS_SECRET_ACCESS_KEY", "wrong".into()));
    let e = run("worker", &pg.url(), bad, &good_s3);
    assert!(e.contains("refused the credentials"), "{e}");
    let mut away = weed.env();
    away.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    away.push((
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", rig::free_port()),
    ));
    let e = run("worker", &pg.url(), away, &good_s3);
    assert!(e.contains("cannot reach the S3 server"), "{e}");
    // Roles other than `all` need Postgres.
    let out = Command::new(env!("CARGO_BIN_EXE_kino-server"))
        .args(["--port", "0", "--cpu", "--role", "api", "--model"])
        .arg(model_dir())
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--database"), "{err}");
}

/// Throughput with 1, 2 and 3 workers (one API node; 2-step jobs). Slow and machine-bound:
/// run with `cargo test -p kino-server --release --test scaleout -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_with_1_2_3_workers() {
    let _g = rig::serial();
    let Some((pg, weed)) = rig::both() else {
        return;
    };
    kino_server::pg::migrate(&pg.url()).unwrap();
    let n: usize = std::env::var("KINO_THROUGHPUT_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let api = spawn_node("api", &pg, &weed, dirs[0].path());
    let mut workers = Vec::new();
    // KINO_THROUGHPUT_THREADS: compute threads per worker (RAYON_NUM_THREADS), so that workers
    // sharing one machine's cores do not fight over them.
    let threads = std::env::var("KINO_THROUGHPUT_THREADS").ok();
    for (k, dir) in dirs.iter().enumerate().skip(1) {
        let mut cmd = node_command("worker", &pg.url(), &weed, dir.path(), 0);
        if let Some(t) = &threads {
            cmd.env("RAYON_NUM_THREADS", t);
        }
        workers.push(spawn_with(cmd, "worker"));
        // Let the new worker register before the batch.
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let ids = submit(api.addr, n, 8);
        let mut seen = HashSet::new();
        for id in &ids {
            let v = common::wait_done(api.addr, id, T);
            assert_eq!(v["status"], "completed", "{v}");
            seen.insert(id.clone());
        }
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "THROUGHPUT {k} worker(s): {n} jobs in {secs:.1} s = {:.1} jobs/min",
            n as f64 * 60.0 / secs
        );
    }
    let _ = &workers;
    let _ = api.log.lock().unwrap().len();
}

fn spawn_node_on(role: &str, pg: &rig::Postgres, weed: &rig::Weed, data: &Path, port: u16) -> Node {
    spawn_with(node_command(role, &pg.url(), weed, data, port), role)
}

/// Starts a node and waits for its banner.
fn spawn_with(mut cmd: Command, role: &str) -> Node {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .expect("kino-server starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let addr: SocketAddr = loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => panic!(
                "{role} node exited before its banner: {:?}",
                log.lock().unwrap()
            ),
        };
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.strip_prefix("kino serve: http://") {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    let l2 = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            l2.lock().unwrap().push(l);
        }
    });
    Node { child, addr, log }
}

/// The bar: 1 API node, 3 workers, KINO_SDK_JOBS (default 200) videos from 20 clients
/// through the official `openai` SDK; one worker SIGKILLed mid-job, another stopped and
/// restarted, the API node SIGKILLed and restarted (same port) once every video is queued.
/// Every video completes exactly once, with one set of files in the bucket, ffprobe-valid.
/// About two minutes; KINO_SDK_JOBS=N for a shorter (or longer) run.
#[test]
fn sdk_clients_through_kill_stop_and_api_restart() {
    let _g = rig::serial();
    let Some((pg, weed)) = rig::both() else {
        return;
    };
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    kino_server::pg::migrate(&pg.url()).unwrap();
    let jobs: usize = std::env::var("KINO_SDK_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let out = tempfile::tempdir().unwrap();
    let port = rig::free_port();
    let mut api = spawn_node_on("api", &pg, &weed, dirs[0].path(), port);
    let mut ws: Vec<Node> = (1..4)
        .map(|i| spawn_node("worker", &pg, &weed, dirs[i].path()))
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scaleout_sdk.py");
    let t0 = Instant::now();
    let sdk = Command::new(&python)
        .arg(&script)
        .env("KINO_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("KINO_JOBS", jobs.to_string())
        .env("KINO_CLIENTS", "20")
        .env("KINO_OUT", out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the SDK script");
    // The worker running a slow video dies half-way through it.
    let api_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (victim, k, attempt_killed, killed_at) = kill_mid_job(api_addr, &pg, &mut ws);
    // Another is stopped and started again.
    let j = (k + 1) % ws.len();
    ws[j].stop();
    ws[j] = spawn_node("worker", &pg, &weed, dirs[1 + j].path());
    let rerun_after = loop {
        let a: i64 = pg
            .psql(&format!(
                "SELECT attempts FROM videos WHERE id = '{victim}'"
            ))
            .parse()
            .unwrap();
        if a > attempt_killed {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < T, "never re-leased");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Once every video is queued, the API node dies and comes back on its port.
    while pg.psql("SELECT count(*) FROM videos") != (jobs + 1).to_string() {
        assert!(t0.elapsed() < T, "the clients never queued every video");
        std::thread::sleep(Duration::from_millis(50));
    }
    api.sigkill();
    let api = spawn_node_on("api", &pg, &weed, dirs[4].path(), port);
    let res = sdk.wait_with_output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success(),
        "SDK clients failed:\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ids: Vec<String> = report["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), jobs);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), jobs);
    for id in &ids {
        let mp4 = std::fs::read(out.path().join(format!("{id}.mp4"))).unwrap();
        assert!(ffprobe_ok(&mp4), "{id}");
    }
    let mut all = ids.clone();
    common::wait_done(api.addr, &victim, T);
    all.push(victim.clone());
    check_exactly_once(api.addr, &pg, &weed, &all);
    eprintln!(
        "SDK: {jobs} videos, 20 clients, 3 workers (one SIGKILLed, one restarted, API restarted): {secs:.1} s = {:.1} videos/min; killed job re-leased after {:.2} s (lease {LEASE_SECS} s)",
        jobs as f64 * 60.0 / secs,
        rerun_after.as_secs_f64()
    );
    drop(ws);
}

/// One `--role all` node on Postgres + S3 with `--presign-secs`: downloads are redirects to
/// presigned URLs that a client without credentials can fetch.
#[test]
fn all_in_one_node_with_presigned_downloads() {
    let _g = rig::serial();
    let Some((pg, weed)) = rig::both() else {
        return;
    };
    kino_server::pg::migrate(&pg.url()).unwrap();
    weed.set_env();
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config(dir.path());
    c.database = Some(pg.url());
    c.storage = Some(format!("s3://{}/{PREFIX}", rig::BUCKET));
    c.presign = Some(Duration::from_secs(60));
    let srv = kino_server::ServerHandle::start(c).expect("starts");
    let id = submit(srv.addr(), 1, 2).remove(0);
    let v = common::wait_done(srv.addr(), &id, T);
    assert_eq!(v["status"], "completed", "{v}");
    let r = get(srv.addr(), &format!("/v1/videos/{id}/content"));
    assert_eq!(r.status, 302);
    let url = r.header("location").expect("a Location").to_string();
    assert!(
        url.contains(&format!("/{PREFIX}/videos/{id}/a1/video.mp4?")),
        "{url}"
    );
    assert!(url.contains("X-Amz-Signature="), "{url}");
    // Fetched with no credentials at all.
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let resp = common::request(host.parse().unwrap(), "GET", &format!("/{path}"), &[], b"");
    assert_eq!(resp.status, 200);
    assert!(ffprobe_ok(&resp.body));
    // Not completed yet: still a 409, never a URL.
    let slow = submit(srv.addr(), 1, 200).remove(0);
    let r = get(srv.addr(), &format!("/v1/videos/{slow}/content"));
    assert_eq!(r.status, 409);
    srv.stop().unwrap();
}
