//! Webhooks: `video.completed` and `video.failed` are POSTed, signed (Standard Webhooks), and
//! retried with the same `webhook-id` when the receiver fails.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kino_server::webhooks::{secret_key, signature, WebhookConfig};
use serde_json::{json, Value};

type Received = Arc<Mutex<Vec<(HashMap<String, String>, String)>>>;

/// A receiver that answers 500 to its first request and 204 after.
fn receiver() -> (String, Received) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/kino", l.local_addr().unwrap());
    let got: Received = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for (n, stream) in l.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with("POST /hooks/kino "), "{line}");
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
            let len: usize = headers["content-length"].parse().unwrap();
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).unwrap();
            g.lock()
                .unwrap()
                .push((headers, String::from_utf8(body).unwrap()));
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "204 No Content"
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

#[test]
fn completed_and_failed_are_signed_and_retried() {
    let (url, got) = receiver();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.webhook = Some(WebhookConfig {
        url,
        secret: secret.into(),
        retry_base: Duration::from_millis(50),
    });
    let srv = kino_server::ServerHandle::start(c).unwrap();
    let a = srv.addr();
    let done = create(a, json!({"prompt": "ok", "seconds": 1, "steps": 1}));
    let done_id = done["id"].as_str().unwrap().to_string();
    assert_eq!(
        wait_done(a, &done_id, Duration::from_secs(60))["status"],
        "completed"
    );
    let slow = create(a, json!({"prompt": "slow", "seconds": 8, "steps": 200}));
    let queued = create(a, json!({"prompt": "cancel me", "seconds": 1, "steps": 1}));
    let queued_id = queued["id"].as_str().unwrap().to_string();
    let r = post_json(a, &format!("/v1/videos/{queued_id}/cancel"), &json!({}));
    assert_eq!(r.json()["status"], "failed");
    post_json(
        a,
        &format!("/v1/videos/{}/cancel", slow["id"].as_str().unwrap()),
        &json!({}),
    );

    // completed (refused once, then delivered), failed (queued cancel), failed (running cancel).
    let t = Instant::now();
    while got.lock().unwrap().len() < 4 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "webhooks: {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = got.lock().unwrap().clone();
    let key = secret_key(secret).unwrap();
    let mut by_video: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (h, body) in &got {
        let ev: Value = serde_json::from_str(body).unwrap();
        assert_eq!(ev["object"], "event");
        assert_eq!(h["webhook-id"], ev["id"].as_str().unwrap());
        assert!(h["webhook-id"].starts_with("evt_"));
        let ts: i64 = h["webhook-timestamp"].parse().unwrap();
        assert!((ts - kino_server::now_unix()).abs() < 60);
        assert_eq!(
            h["webhook-signature"],
            signature(&key, &h["webhook-id"], ts, body)
        );
        assert_eq!(h["content-type"], "application/json");
        by_video
            .entry(ev["data"]["id"].as_str().unwrap().to_string())
            .or_default()
            .push((
                ev["type"].as_str().unwrap().to_string(),
                h["webhook-id"].clone(),
            ));
    }
    let d = &by_video[&done_id];
    assert_eq!(d.len(), 2, "refused once, retried: {d:?}");
    assert!(d.iter().all(|(t, _)| t == "video.completed"));
    assert_eq!(d[0].1, d[1].1, "a retry keeps its webhook-id");
    assert_eq!(
        by_video[&queued_id],
        vec![(
            "video.failed".to_string(),
            by_video[&queued_id][0].1.clone()
        )]
    );
    assert_eq!(by_video[slow["id"].as_str().unwrap()][0].0, "video.failed");
}
