//! Headless Chromium (Debian's `chromium` package) plays our MP4 from a local HTTP server: the
//! `<video>` element loads metadata with the right duration and size, shows the right
//! colours, and `currentTime` advances under muted autoplay.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kino_media::{encode_mp4, Mp4Options};

const PAGE: &str = r#"<!doctype html>
<html><body>
<video id="v" muted autoplay playsinline src="/video.mp4"></video>
<script>
const v = document.getElementById('v');
const probes = __PROBES__;
const r = {canPlay: v.canPlayType('video/mp4; codecs="avc1.42E01E"')};
let sent = false;
function send() {
  if (sent) return;
  sent = true;
  fetch('/result', {method: 'POST', body: JSON.stringify(r)});
}
v.addEventListener('error', () => {
  r.error = v.error ? (v.error.code + ': ' + v.error.message) : 'unknown';
  send();
});
v.addEventListener('loadedmetadata', () => {
  r.duration = v.duration;
  r.width = v.videoWidth;
  r.height = v.videoHeight;
});
v.addEventListener('loadeddata', () => {
  try {
    const c = document.createElement('canvas');
    c.width = v.videoWidth;
    c.height = v.videoHeight;
    const g = c.getContext('2d');
    g.drawImage(v, 0, 0);
    r.firstFrameTime = v.currentTime;
    r.pixels = probes.map(([x, y]) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3)));
  } catch (e) {
    r.canvasError = String(e);
  }
});
v.addEventListener('timeupdate', () => {
  if (v.currentTime >= 0.5) {
    r.currentTime = v.currentTime;
    r.paused = v.paused;
    send();
  }
});
v.addEventListener('ended', () => { r.ended = true; r.currentTime = v.currentTime; send(); });
setTimeout(() => {
  r.timeout = true;
  r.currentTime = v.currentTime;
  r.readyState = v.readyState;
  r.networkState = v.networkState;
  send();
}, 30000);
</script></body></html>"#;

/// Serves one request on `stream`: the page, the video (with Range support, as Safari and
/// Chromium use), or the result POST.
fn serve(mut stream: TcpStream, page: &str, video: &[u8], results: &mpsc::Sender<String>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range: Option<(usize, Option<usize>)> = None;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let mut it = v.trim().splitn(2, '-');
            let start = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let end = it.next().and_then(|s| s.trim().parse().ok());
            range = Some((start, end));
        } else if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let response: Vec<u8> = match (method, target) {
        ("POST", "/result") => {
            let mut body = vec![0u8; content_length];
            let _ = reader.read_exact(&mut body);
            let _ = results.send(String::from_utf8_lossy(&body).into_owned());
            b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_vec()
        }
        ("GET", "/") | ("GET", "/index.html") => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
            page.len()
        )
        .into_bytes(),
        ("GET", "/video.mp4") => {
            let len = video.len();
            match range {
                Some((start, end)) if start < len => {
                    let end = end.unwrap_or(len - 1).min(len - 1);
                    let mut r = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Type: video/mp4\r\nAccept-Ranges: bytes\r\nContent-Range: bytes {start}-{end}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        end + 1 - start
                    )
                    .into_bytes();
                    r.extend_from_slice(&video[start..=end]);
                    r
                }
                _ => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nAccept-Ranges: bytes\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                    )
                    .into_bytes();
                    r.extend_from_slice(video);
                    r
                }
            }
        }
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
    };
    let _ = stream.write_all(&response);
}

#[test]
fn chromium_plays_the_mp4() {
    let chromium = common::require_tool("chromium", "chromium");
    let (w, h, n, fps) = (640u32, 352u32, 33u32, 16u32);
    let video = common::synthetic_video(w, h, n, fps);
    let bytes = encode_mp4(&video, &Mp4Options::default()).expect("encode");

    // Colour probes in frame 0: the middle of the green disc (a colour that BT.601 and BT.709
    // decode 26 levels apart) and two background points. The
    // browser may show frame 0 or 1 at `loadeddata`, so compare with both.
    let r = (w.min(h) / 8) as f32;
    let disc = ((w as f32 - r) as u32, h / 2);
    let probes = [disc, (100, 300), (300, 100)];
    let expected: Vec<Vec<[u8; 3]>> = probes
        .iter()
        .map(|&(x, y)| {
            (0..2)
                .map(|f| video.frames()[f].pixel(x, y).unwrap())
                .collect()
        })
        .collect();
    let probes_js =
        serde_json::to_string(&probes.iter().map(|&(x, y)| [x, y]).collect::<Vec<_>>()).unwrap();
    let page = PAGE.replace("__PROBES__", &probes_js);

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel::<String>();
    let server = {
        let page = page.clone();
        let bytes = bytes.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (page, bytes, tx) = (page.clone(), bytes.clone(), tx.clone());
                std::thread::spawn(move || serve(stream, &page, &bytes, &tx));
            }
        })
    };
    drop(server);

    let dir = common::temp_dir("chromium");
    let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
    let mut child = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--autoplay-policy=no-user-gesture-required",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start chromium");
    let result = rx.recv_timeout(Duration::from_secs(90));
    let _ = child.kill();
    let _ = child.wait();
    let chromium_log = std::fs::read_to_string(dir.join("chromium.log")).unwrap_or_default();
    let result = result.unwrap_or_else(|_| {
        panic!("no result from Chromium within 90 s; its log:\n{chromium_log}")
    });
    println!("chromium result: {result}");
    let r: serde_json::Value = serde_json::from_str(&result).expect("result JSON");
    assert!(
        r.get("error").is_none(),
        "playback error: {r}\n{chromium_log}"
    );
    assert_ne!(r["canPlay"], "", "Chromium cannot play H.264: {r}");
    assert_eq!(r["width"], w, "{r}");
    assert_eq!(r["height"], h, "{r}");
    let duration = r["duration"].as_f64().expect("duration");
    assert!((duration - 2.0625).abs() < 0.01, "duration {duration}");
    assert!(r.get("timeout").is_none(), "playback did not advance: {r}");
    let t = r["currentTime"].as_f64().unwrap();
    assert!(t >= 0.5, "currentTime {t}");

    let pixels = r["pixels"]
        .as_array()
        .unwrap_or_else(|| panic!("no pixels: {r}"));
    for (k, (got, want)) in pixels.iter().zip(&expected).enumerate() {
        let got: Vec<i64> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let ok = want.iter().any(|wnt| {
            got.iter()
                .zip(wnt.iter())
                .all(|(&g, &e)| (g - i64::from(e)).abs() <= 12)
        });
        assert!(
            ok,
            "probe {k} at {:?}: Chromium shows {got:?}, source {want:?}",
            probes[k]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
