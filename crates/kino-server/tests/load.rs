//! 200 jobs from 20 concurrent clients: all complete, none lost, none duplicated.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn two_hundred_jobs_from_twenty_clients() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let clients: Vec<_> = (0..20)
        .map(|c| {
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| {
                        let v = create(
                            a,
                            json!({"prompt": format!("client {c} job {i}"), "seconds": "0.5", "steps": 1, "guidance": 1}),
                        );
                        v["id"].as_str().unwrap().to_string()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let submitted: Vec<String> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    assert_eq!(submitted.len(), 200);
    let unique: HashSet<&String> = submitted.iter().collect();
    assert_eq!(unique.len(), 200, "ids are unique");

    let t = Instant::now();
    loop {
        let h = get(a, "/health").json();
        if h["jobs"]["completed"] == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "not all jobs completed: {h}"
        );
        assert_eq!(h["jobs"]["failed"], 0, "{h}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Page through everything: each id exactly once, in arrival order.
    let mut listed = Vec::new();
    let mut finished = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(x) => format!("/v1/videos?limit=100&order=asc&after={x}"),
            None => "/v1/videos?limit=100&order=asc".to_string(),
        };
        let page = get(a, &q).json();
        for v in page["data"].as_array().unwrap() {
            assert_eq!(v["status"], "completed");
            listed.push(v["id"].as_str().unwrap().to_string());
            finished.push(v["completed_at"].as_i64().unwrap());
        }
        if page["has_more"] == false {
            break;
        }
        after = page["last_id"].as_str().map(String::from);
    }
    assert_eq!(listed.len(), 200);
    assert!(
        finished.windows(2).all(|w| w[0] <= w[1]),
        "jobs finish in arrival order"
    );
    assert_eq!(listed.iter().collect::<HashSet<_>>(), unique);
    for id in &listed {
        assert!(dir
            .path()
            .join("videos")
            .join(id)
            .join("video.mp4")
            .is_file());
    }
}
