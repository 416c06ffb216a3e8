//! Jobs survive the server: stopped mid-queue (in process) and killed with SIGKILL (a child
//! process), a new server on the same data directory completes every job exactly once.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(180);

fn submit(a: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            // The first is slow so that the rest are still queued when the server goes away.
            let steps = if i == 0 { 200 } else { 2 };
            create(
                a,
                json!({"prompt": format!("job {i}"), "seconds": "1", "steps": steps}),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn statuses(a: SocketAddr) -> Vec<Value> {
    get(a, "/v1/videos?limit=100&order=asc").json()["data"]
        .as_array()
        .unwrap()
        .clone()
}

fn check_all_complete_once(a: SocketAddr, ids: &[String], data_dir: &std::path::Path) {
    for id in ids {
        let v = wait_done(a, id, T);
        assert_eq!(v["status"], "completed", "{v}");
        assert!(data_dir.join("videos").join(id).join("video.mp4").is_file());
    }
    let listed: Vec<String> = statuses(a)
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ids, "every job once, in arrival order");
    assert_eq!(listed.iter().collect::<HashSet<_>>().len(), ids.len());
}

#[test]
fn stopped_server_resumes_queue_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let ids = submit(a, 5);
    wait_until(a, &ids[0], T, |v| {
        v["status"] == "in_progress" && v["progress"].as_u64() > Some(12)
    });
    let before = statuses(a);
    assert_eq!(before[0]["status"], "in_progress");
    assert!(
        before[1..].iter().all(|v| v["status"] == "queued"),
        "{before:?}"
    );
    drop(srv);

    let srv = start(dir.path());
    let a = srv.addr();
    check_all_complete_once(a, &ids, dir.path());
}

#[test]
fn sigkilled_server_resumes_queue_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spawn = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kino-server"))
            .args(["--port", "0", "--cpu", "--poll-after-ms", "50", "--model"])
            .arg(model_dir())
            .arg("--data-dir")
            .arg(dir.path())
            .env("KINO_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .expect("kino-server starts");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr: SocketAddr = loop {
            let line = lines.next().expect("a banner line").expect("stderr");
            if let Some(rest) = line.strip_prefix("kino serve: http://") {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (child, addr)
    };
    let (mut child, a) = spawn();
    let ids = submit(a, 4);
    wait_until(a, &ids[0], T, |v| v["status"] == "in_progress");
    child.kill().expect("SIGKILL");
    child.wait().unwrap();

    let (mut child, a) = spawn();
    check_all_complete_once(a, &ids, dir.path());
    child.kill().ok();
    child.wait().ok();
}
