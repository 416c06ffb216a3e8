//! End-to-end tests of the HTTP API against the tiny random-weight model.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

#[test]
fn create_poll_download_with_ranges_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();

    let v = create(
        a,
        json!({"prompt": "a corgi surfing", "model": "sora-2", "seconds": 2, "size": "720x1280"}),
    );
    assert_video_object(&v);
    assert_eq!(v["status"], "queued");
    assert_eq!(v["model"], "sora-2");
    assert_eq!(v["seconds"], "2");
    assert_eq!(v["prompt"], "a corgi surfing");
    // 96x64 budget (6144 px) at 9:16, sides multiples of 16.
    assert_eq!(v["size"], "64x112");
    let id = v["id"].as_str().unwrap().to_string();

    let done = wait_done(a, &id, T);
    assert_video_object(&done);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());
    assert!(done["error"].is_null());

    // The MP4, with its generation parameters inside.
    let r = get(a, &format!("/v1/videos/{id}/content"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert!(r.header("openai-poll-after-ms").is_some());
    assert_eq!(&r.body[4..8], b"ftyp");
    let full = r.body.clone();
    assert_eq!(
        r.header("content-length"),
        Some(full.len().to_string().as_str())
    );
    let mp4 = dir.path().join("videos").join(&id).join("video.mp4");
    assert_eq!(std::fs::read(&mp4).unwrap(), full);
    let meta = kino_media::read_metadata(&mp4).unwrap().expect("metadata");
    assert_eq!(meta["prompt"], "a corgi surfing");
    assert_eq!(meta["width"], 64);
    assert_eq!(meta["height"], 112);
    assert_eq!(meta["frames"], 17, "2 s × 8 fps → 17 frames (4k+1)");
    assert_eq!(meta["video_id"], id.as_str());
    let info = kino_media::probe(&mp4).unwrap();
    assert_eq!((info.width, info.height), (64, 112));

    // Ranges: Safari's probe, an open-ended range, a suffix, and one past the end.
    let r = request(
        a,
        "GET",
        &format!("/v1/videos/{id}/content?variant=video"),
        &[("Range", "bytes=0-1")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &full[..2]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 0-1/{}", full.len()).as_str())
    );
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    let r = request(
        a,
        "GET",
        &format!("/v1/videos/{id}/content"),
        &[("Range", "bytes=100-")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &full[100..]);
    let r = request(
        a,
        "GET",
        &format!("/v1/videos/{id}/content"),
        &[("Range", "bytes=-10")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &full[full.len() - 10..]);
    let r = request(
        a,
        "GET",
        &format!("/v1/videos/{id}/content"),
        &[("Range", &format!("bytes={}-", full.len()))],
        b"",
    );
    r.assert_error(416, None);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{}", full.len()).as_str())
    );
    let r = request(a, "HEAD", &format!("/v1/videos/{id}/content"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(full.len().to_string().as_str())
    );

    // Thumbnail and spritesheet are JPEGs.
    for variant in ["thumbnail", "spritesheet"] {
        let r = get(a, &format!("/v1/videos/{id}/content?variant={variant}"));
        assert_eq!(r.status, 200, "{variant}");
        assert_eq!(r.header("content-type"), Some("image/jpeg"));
        assert_eq!(&r.body[..3], &[0xFF, 0xD8, 0xFF], "{variant} is a JPEG");
        let r = request(
            a,
            "GET",
            &format!("/v1/videos/{id}/content?variant={variant}"),
            &[("Range", "bytes=0-9")],
            b"",
        );
        assert_eq!(r.status, 206);
        assert_eq!(r.body.len(), 10);
    }
    get(a, &format!("/v1/videos/{id}/content?variant=gif")).assert_error(400, Some("variant"));

    // Delete: gone from the API and from the disk.
    let r = delete(a, &format!("/v1/videos/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"id": id, "object": "video.deleted", "deleted": true})
    );
    get(a, &format!("/v1/videos/{id}")).assert_error(404, None);
    get(a, &format!("/v1/videos/{id}/content")).assert_error(404, None);
    delete(a, &format!("/v1/videos/{id}")).assert_error(404, None);
    assert!(!dir.path().join("videos").join(&id).exists());
}

#[test]
fn multipart_create_and_kino_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let (ctype, body) = multipart(
        &[
            ("prompt", "a red fox in snow"),
            ("model", "sora-2-pro-2025-10-06"),
            ("seconds", "1"),
            ("size", "1280x720"),
            ("negative_prompt", "blurry"),
            ("seed", "42"),
            ("steps", "2"),
            ("guidance", "3.5"),
        ],
        &[],
    );
    let r = request(a, "POST", "/v1/videos", &[("Content-Type", &ctype)], &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_video_object(&v);
    assert_eq!(v["model"], "sora-2-pro-2025-10-06");
    assert_eq!(v["size"], "112x64");
    let id = v["id"].as_str().unwrap();
    let done = wait_done(a, id, T);
    assert_eq!(done["status"], "completed", "{done}");
    let meta = kino_media::read_metadata(dir.path().join("videos").join(id).join("video.mp4"))
        .unwrap()
        .unwrap();
    assert_eq!(meta["seed"], 42);
    assert_eq!(meta["steps"], 2);
    assert_eq!(meta["guidance"], 3.5);
    assert_eq!(meta["negative_prompt"], "blurry");
    assert_eq!(meta["model"], "tiny");
    assert_eq!(meta["frames"], 9, "1 s × 8 fps → 9 frames");

    // JSON with numbers as strings and the diffusers names works too.
    let v = create(
        a,
        json!({"prompt": "p", "model": "tiny", "seconds": "1", "seed": "7", "num_inference_steps": 1, "guidance_scale": "1"}),
    );
    let done = wait_done(a, v["id"].as_str().unwrap(), T);
    assert_eq!(done["status"], "completed", "{done}");
}

#[test]
fn errors_have_openai_shape_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    post_json(a, "/v1/videos", &json!({"prompt": "x", "size": "big"}))
        .assert_error(400, Some("size"));
    post_json(a, "/v1/videos", &json!({"prompt": "x", "size": "0x720"}))
        .assert_error(400, Some("size"));
    post_json(a, "/v1/videos", &json!({"prompt": "x", "size": "8000x100"}))
        .assert_error(400, Some("size"));
    let e = post_json(a, "/v1/videos", &json!({"prompt": "x", "model": "sora-9"}))
        .assert_error(400, Some("model"));
    assert!(
        e["error"]["message"].as_str().unwrap().contains("tiny"),
        "{e}"
    );
    post_json(a, "/v1/videos", &json!({"model": "sora-2"})).assert_error(400, Some("prompt"));
    post_json(a, "/v1/videos", &json!({"prompt": "   "})).assert_error(400, Some("prompt"));
    request(a, "POST", "/v1/videos", &[], b"").assert_error(400, Some("prompt"));
    request(
        a,
        "POST",
        "/v1/videos",
        &[("Content-Type", "application/json")],
        b"{nope",
    )
    .assert_error(400, None);
    post_json(a, "/v1/videos", &json!(["prompt"])).assert_error(400, None);
    post_json(a, "/v1/videos", &json!({"prompt": "x", "seconds": "four"}))
        .assert_error(400, Some("seconds"));
    post_json(a, "/v1/videos", &json!({"prompt": "x", "seconds": -1}))
        .assert_error(400, Some("seconds"));
    post_json(a, "/v1/videos", &json!({"prompt": "x", "seconds": 600}))
        .assert_error(400, Some("seconds"));
    post_json(a, "/v1/videos", &json!({"prompt": "x", "steps": 0}))
        .assert_error(400, Some("steps"));
    post_json(a, "/v1/videos", &json!({"prompt": "x", "seed": "abc"}))
        .assert_error(400, Some("seed"));
    post_json(a, "/v1/videos", &json!({"prompt": "x", "guidance": -2}))
        .assert_error(400, Some("guidance"));
    assert_eq!(
        post_json(
            a,
            "/v1/videos",
            &json!({"prompt": 5, "seconds": 1, "steps": 1})
        )
        .status,
        200,
        "numbers are taken as text"
    );
    post_json(a, "/v1/videos", &json!({"prompt": ["x"]})).assert_error(400, Some("prompt"));
    let (ct, body) = multipart(
        &[("prompt", "x")],
        &[("input_reference", "a.png", b"\x89PNG")],
    );
    request(a, "POST", "/v1/videos", &[("Content-Type", &ct)], &body)
        .assert_error(400, Some("input_reference"));
    let long = "x".repeat(5000);
    post_json(a, "/v1/videos", &json!({"prompt": long})).assert_error(400, Some("prompt"));

    let unknown = "video_0123456789abcdef0123456789abcdef";
    get(a, &format!("/v1/videos/{unknown}")).assert_error(404, None);
    get(a, &format!("/v1/videos/{unknown}/content")).assert_error(404, None);
    delete(a, &format!("/v1/videos/{unknown}")).assert_error(404, None);
    post_json(
        a,
        &format!("/v1/videos/{unknown}/remix"),
        &json!({"prompt": "y"}),
    )
    .assert_error(404, None);
    post_json(a, &format!("/v1/videos/{unknown}/cancel"), &json!({})).assert_error(404, None);
    // Path-like and malformed ids never reach the file system.
    for bad in [
        "..%2F..%2Fetc%2Fpasswd",
        "video_..%2F..",
        "video_xyz",
        "kino.sqlite3",
        "video_",
    ] {
        get(a, &format!("/v1/videos/{bad}")).assert_error(400, Some("video_id"));
        get(a, &format!("/v1/videos/{bad}/content")).assert_error(400, Some("video_id"));
    }
    get(a, "/v1/videos?limit=0").assert_error(400, Some("limit"));
    get(a, "/v1/videos?limit=abc").assert_error(400, Some("limit"));
    get(a, "/v1/videos?order=up").assert_error(400, Some("order"));
    get(a, &format!("/v1/videos?after={unknown}")).assert_error(400, Some("after"));
    get(a, "/v1/nothing").assert_error(404, None);
    request(a, "PUT", "/v1/videos", &[], b"").assert_error(405, None);
}

#[test]
fn list_pages_in_both_orders() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let ids: Vec<String> = (0..5)
        .map(|i| {
            create(
                a,
                json!({"prompt": format!("video {i}"), "seconds": "1", "steps": 1}),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let all = get(a, "/v1/videos").json();
    assert_eq!(all["object"], "list");
    let got: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    let mut newest_first: Vec<&str> = ids.iter().map(String::as_str).collect();
    newest_first.reverse();
    assert_eq!(got, newest_first, "default order is newest first");
    assert_eq!(all["has_more"], false);
    assert_eq!(all["first_id"], newest_first[0]);
    assert_eq!(all["last_id"], newest_first[4]);
    for v in all["data"].as_array().unwrap() {
        assert_video_object(v);
    }

    for (order, expected) in [
        ("desc", newest_first.clone()),
        ("asc", ids.iter().map(String::as_str).collect()),
    ] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let q = match &after {
                Some(x) => format!("/v1/videos?limit=2&order={order}&after={x}"),
                None => format!("/v1/videos?limit=2&order={order}"),
            };
            let page = get(a, &q).json();
            let data = page["data"].as_array().unwrap();
            assert!(data.len() <= 2);
            pages += 1;
            for v in data {
                seen.push(v["id"].as_str().unwrap().to_string());
            }
            if data.is_empty() {
                assert!(page["first_id"].is_null() && page["last_id"].is_null());
            } else {
                assert_eq!(page["first_id"], data[0]["id"]);
                assert_eq!(page["last_id"], data[data.len() - 1]["id"]);
            }
            if page["has_more"] == false {
                break;
            }
            after = page["last_id"].as_str().map(String::from);
        }
        assert_eq!(pages, 3, "{order}: 5 videos in pages of 2");
        assert_eq!(seen, expected, "{order}");
    }
    for id in &ids {
        assert_eq!(wait_done(a, id, T)["status"], "completed");
    }
}

#[test]
fn remix_keeps_settings_and_links_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let src = create(
        a,
        json!({"prompt": "a cat", "seconds": "1", "size": "1280x720", "seed": 1234, "steps": 2}),
    );
    let src_id = src["id"].as_str().unwrap();
    assert_eq!(wait_done(a, src_id, T)["status"], "completed");
    let r = post_json(
        a,
        &format!("/v1/videos/{src_id}/remix"),
        &json!({"prompt": "a dog"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rm = r.json();
    assert_video_object(&rm);
    assert_eq!(rm["remixed_from_video_id"], src_id);
    assert_eq!(rm["prompt"], "a dog");
    assert_eq!(rm["size"], src["size"]);
    assert_eq!(rm["seconds"], src["seconds"]);
    assert_ne!(rm["id"], src["id"]);
    let rid = rm["id"].as_str().unwrap();
    assert_eq!(wait_done(a, rid, T)["status"], "completed");
    let meta = kino_media::read_metadata(dir.path().join("videos").join(rid).join("video.mp4"))
        .unwrap()
        .unwrap();
    assert_eq!(meta["seed"], 1234);
    assert_eq!(meta["steps"], 2);
    assert_eq!(meta["prompt"], "a dog");
    assert_eq!(meta["remixed_from_video_id"], src_id);
    post_json(a, &format!("/v1/videos/{src_id}/remix"), &json!({}))
        .assert_error(400, Some("prompt"));
}

#[test]
fn cancel_queued_and_running_videos() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    // A slow first job keeps the others queued.
    let slow = create(a, json!({"prompt": "slow", "seconds": "8", "steps": 200}));
    let slow_id = slow["id"].as_str().unwrap();
    let queued = create(a, json!({"prompt": "queued", "seconds": "1", "steps": 1}));
    let queued_id = queued["id"].as_str().unwrap();
    let after = create(a, json!({"prompt": "after", "seconds": "1", "steps": 1}));

    let r = post_json(a, &format!("/v1/videos/{queued_id}/cancel"), &json!({}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_video_object(&v);
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["code"], "cancelled");

    wait_until(a, slow_id, T, |v| v["status"] == "in_progress");
    let r = post_json(a, &format!("/v1/videos/{slow_id}/cancel"), &json!({}));
    assert_eq!(r.status, 200);
    let v = wait_done(a, slow_id, T);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "cancelled");
    assert!(v["error"]["message"].is_string());
    post_json(a, &format!("/v1/videos/{slow_id}/cancel"), &json!({})).assert_error(409, None);
    get(a, &format!("/v1/videos/{slow_id}/content")).assert_error(409, None);

    // The queue moves on.
    assert_eq!(
        wait_done(a, after["id"].as_str().unwrap(), T)["status"],
        "completed"
    );
}

#[test]
fn delete_a_running_video_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let slow = create(a, json!({"prompt": "slow", "seconds": "8", "steps": 200}));
    let id = slow["id"].as_str().unwrap();
    let next = create(a, json!({"prompt": "next", "seconds": "1", "steps": 1}));
    wait_until(a, id, T, |v| v["status"] == "in_progress");
    assert_eq!(
        delete(a, &format!("/v1/videos/{id}")).json()["deleted"],
        true
    );
    assert_eq!(
        wait_done(a, next["id"].as_str().unwrap(), T)["status"],
        "completed"
    );
    get(a, &format!("/v1/videos/{id}")).assert_error(404, None);
    assert!(!dir.path().join("videos").join(id).exists());
}

#[test]
fn models_health_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let m = get(a, "/v1/models");
    assert_eq!(m.status, 200);
    assert!(m.header("openai-poll-after-ms").is_some());
    let m = m.json();
    assert_eq!(m["object"], "list");
    let ids: HashSet<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, HashSet::from(["tiny", "sora-2", "sora-2-pro"]));
    let page = get(a, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = String::from_utf8(page.body).unwrap();
    assert!(
        html.contains("Kino studio") && html.contains("/v1/videos"),
        "studio page"
    );
    let h = get(a, "/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let v = create(a, json!({"prompt": "x", "seconds": 1, "steps": 1}));
    wait_done(a, v["id"].as_str().unwrap(), T);
    let r = get(a, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    assert!(
        text.contains("kino_videos{status=\"completed\"} 1"),
        "{text}"
    );
    assert!(text.contains("kino_queue_depth 0"), "{text}");
    assert!(text.contains("kino_denoise_steps_total 1"), "{text}");
}

#[test]
fn api_keys_separate_owners() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.api_keys = vec!["key-a".into(), "key-b".into()];
    let srv = kino_server::ServerHandle::start(c).unwrap();
    let a = srv.addr();
    assert_eq!(get(a, "/health").status, 200, "/health needs no key");
    get(a, "/v1/videos").assert_error(401, None);
    request(
        a,
        "GET",
        "/v1/videos",
        &[("Authorization", "Bearer wrong")],
        b"",
    )
    .assert_error(401, None);
    let auth_a = [
        ("Authorization", "Bearer key-a"),
        ("Content-Type", "application/json"),
    ];
    let auth_b = [("Authorization", "Bearer key-b")];
    let r = request(
        a,
        "POST",
        "/v1/videos",
        &auth_a,
        json!({"prompt": "mine", "seconds": 1, "steps": 1})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = request(a, "GET", &format!("/v1/videos/{id}"), &auth_a[..1], b"");
    assert_eq!(r.status, 200);
    request(a, "GET", &format!("/v1/videos/{id}"), &auth_b, b"").assert_error(404, None);
    request(a, "GET", &format!("/v1/videos/{id}/content"), &auth_b, b"").assert_error(404, None);
    request(a, "DELETE", &format!("/v1/videos/{id}"), &auth_b, b"").assert_error(404, None);
    let list_b: Value = request(a, "GET", "/v1/videos", &auth_b, b"").json();
    assert_eq!(list_b["data"].as_array().unwrap().len(), 0);
    let list_a: Value = request(a, "GET", "/v1/videos", &auth_a[..1], b"").json();
    assert_eq!(list_a["data"].as_array().unwrap().len(), 1);
}

#[test]
fn limits_413_and_429() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.max_upload_bytes = 2048;
    c.max_queue = 1;
    let srv = kino_server::ServerHandle::start(c).unwrap();
    let a = srv.addr();
    let big = vec![7u8; 8192];
    let (ct, body) = multipart(&[("prompt", "x")], &[("input_reference", "big.png", &big)]);
    request(a, "POST", "/v1/videos", &[("Content-Type", &ct)], &body).assert_error(413, None);
    let huge = json!({"prompt": "y".repeat(4000)});
    post_json(a, "/v1/videos", &huge).assert_error(413, None);

    // One slow job runs, one waits, the next is refused.
    let first = create(a, json!({"prompt": "slow", "seconds": "8", "steps": 200}));
    wait_until(a, first["id"].as_str().unwrap(), T, |v| {
        v["status"] == "in_progress"
    });
    create(a, json!({"prompt": "waits", "seconds": 1, "steps": 1}));
    let e = post_json(a, "/v1/videos", &json!({"prompt": "refused", "seconds": 1}))
        .assert_error(429, None);
    assert_eq!(e["error"]["code"], "queue_full");
    post_json(
        a,
        &format!("/v1/videos/{}/cancel", first["id"].as_str().unwrap()),
        &json!({}),
    );
}

#[test]
fn events_stream_queue_position_progress_and_end() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let first = create(a, json!({"prompt": "first", "seconds": "8", "steps": 200}));
    // The first is running (so the second is next in line) before the second is queued.
    wait_until(a, first["id"].as_str().unwrap(), T, |v| {
        v["status"] == "in_progress"
    });
    let second = create(a, json!({"prompt": "second", "seconds": "8", "steps": 200}));
    let id = second["id"].as_str().unwrap();
    // Reads until the server ends the stream after the final event.
    let r = get(a, &format!("/v1/videos/{id}/events"));
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let text = String::from_utf8(r.body).unwrap();
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{text}");
    assert_eq!(events[0].1["position"], 0);
    assert!(
        events
            .iter()
            .any(|(n, d)| n == "progress" && d["stage"] == "denoise"),
        "{text}"
    );
    let (last, obj) = events.last().unwrap();
    assert_eq!(last, "completed", "{text}");
    assert_video_object(obj);
    assert_eq!(obj["id"], id);
    let progress: Vec<u64> = events
        .iter()
        .filter(|e| e.0 == "progress")
        .map(|e| e.1["progress"].as_u64().unwrap())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(
        wait_done(a, first["id"].as_str().unwrap(), T)["status"],
        "completed"
    );
    get(a, "/v1/videos/video_0123456789abcdef/events").assert_error(404, None);
}
