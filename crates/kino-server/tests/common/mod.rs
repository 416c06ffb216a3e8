//! Test helpers: the tiny model, a server on 127.0.0.1:0, and a minimal HTTP/1.1 client (so the
//! tests see exactly what goes over the wire: status, headers, bytes).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kino_engine::device::DeviceChoice;
use kino_server::{ModelSpec, ServerConfig, ServerHandle};
use serde_json::Value;

pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/pipeline-wan21/model")
}

/// The tiny Wan2.2 TI2V-form model (takes a first image).
pub fn ti2v_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/pipeline-wan22/model")
}

/// `tiny` (Wan2.1 form: text, video) first, then `tiny-ti2v` (Wan2.2 TI2V form: text, image,
/// video).
pub fn config_two(data_dir: &Path) -> ServerConfig {
    let mut c = config(data_dir);
    c.models.push(ModelSpec {
        id: "tiny-ti2v".into(),
        path: ti2v_model_dir(),
    });
    c
}

pub fn config(data_dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(
        "127.0.0.1:0",
        data_dir,
        vec![ModelSpec {
            id: "tiny".into(),
            path: model_dir(),
        }],
    );
    c.devices = vec![DeviceChoice::Cpu];
    c.poll_after_ms = 50;
    c
}

pub fn start(data_dir: &Path) -> ServerHandle {
    ServerHandle::start(config(data_dir)).expect("server starts")
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts an OpenAI-shaped error with this status (and `param` when given).
    pub fn assert_error(&self, status: u16, param: Option<&str>) -> Value {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{v}");
        }
        assert!(
            self.header("openai-poll-after-ms").is_some(),
            "errors carry openai-poll-after-ms too"
        );
        v
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    s.write_all(body).expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head: bool) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header block");
    let head_text = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked && !head {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..nl]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        let start = nl + 2;
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
    out
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

pub fn delete(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "DELETE", path, &[], b"")
}

/// A multipart/form-data body: text fields and optional files `(name, filename, bytes)`.
pub fn multipart(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "kinoTestBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    for (k, name, data) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Creates a video from a JSON body; asserts 200 and returns the video object.
pub fn create(addr: SocketAddr, body: Value) -> Value {
    let r = post_json(addr, "/v1/videos", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Polls until the video is completed or failed.
pub fn wait_done(addr: SocketAddr, id: &str, timeout: Duration) -> Value {
    let t = Instant::now();
    loop {
        let r = get(addr, &format!("/v1/videos/{id}"));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let s = v["status"].as_str().unwrap_or_default().to_string();
        if s == "completed" || s == "failed" {
            return v;
        }
        assert!(
            t.elapsed() < timeout,
            "video {id} still {s} after {timeout:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Polls until `pred` holds for the video.
pub fn wait_until(
    addr: SocketAddr,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let v = get(addr, &format!("/v1/videos/{id}")).json();
        if pred(&v) {
            return v;
        }
        assert!(t.elapsed() < timeout, "condition not reached for {id}: {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub const OPENAI_VIDEO_FIELDS: [&str; 13] = [
    "completed_at",
    "created_at",
    "error",
    "expires_at",
    "id",
    "model",
    "object",
    "progress",
    "prompt",
    "remixed_from_video_id",
    "seconds",
    "size",
    "status",
];

pub fn assert_video_object(v: &Value) {
    let obj = v.as_object().expect("video object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, OPENAI_VIDEO_FIELDS, "exactly OpenAI's fields");
    assert_eq!(v["object"], "video");
    assert!(["queued", "in_progress", "completed", "failed"]
        .contains(&v["status"].as_str().unwrap_or_default()));
    let p = v["progress"].as_u64().expect("progress is an integer");
    assert!(p <= 100);
    assert!(v["created_at"].as_i64().is_some_and(|t| t > 1_600_000_000));
    assert!(v["seconds"].is_string(), "seconds is a string");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("video_")));
}
