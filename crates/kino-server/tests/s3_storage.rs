//! The S3 output store against a real S3 server (SeaweedFS `weed mini`, started here):
//! upload, ranged download, attempt-scoped keys and their clean-up, presigned URLs, and the
//! start-up errors (unreachable server, missing bucket, bad credentials).

mod rig;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kino_server::storage::Outputs;
use kino_server::ServerError;

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn upload_download_ranges_attempts_and_presigned_urls() {
    let _g = rig::serial();
    let Some(weed) = rig::Weed::start() else {
        return;
    };
    weed.set_env();
    let out = Outputs::s3(&format!("s3://{}/team/a", rig::BUCKET)).expect("storage");
    assert!(!out.is_local());
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("video.mp4", bytes(3 << 20, 1)),
        ("thumbnail.jpg", bytes(1000, 2)),
        ("spritesheet.jpg", bytes(5000, 3)),
    ];
    for (f, b) in &files {
        std::fs::write(dir.path().join(f), b).unwrap();
    }
    let names: Vec<&str> = files.iter().map(|f| f.0).collect();
    let id = "video_00ff";
    block(out.publish(id, Some(1), dir.path(), &names)).unwrap();
    block(out.publish(id, Some(2), dir.path(), &names)).unwrap();
    for (f, b) in &files {
        let key = out.key(id, Some(2), f);
        assert_eq!(key.as_ref(), format!("team/a/videos/{id}/a2/{f}"));
        assert_eq!(block(out.size(&key)).unwrap(), b.len() as u64);
        assert_eq!(&block(out.read(&key)).unwrap()[..], &b[..], "{f}");
    }
    // A range, streamed.
    let key = out.key(id, Some(2), "video.mp4");
    let got: Vec<u8> = block(async {
        let mut s = out.stream(&key, 1000..1_500_000).await.unwrap();
        let mut v = Vec::new();
        while let Some(c) = s.next().await {
            v.extend_from_slice(&c.unwrap());
        }
        v
    });
    assert_eq!(&got[..], &files[0].1[1000..1_500_000]);
    assert_eq!(block(out.list_video(id)).unwrap().len(), 6);
    // The completing attempt removes the others' files.
    block(out.remove_video(id, Some(2))).unwrap();
    let left: Vec<String> = block(out.list_video(id))
        .unwrap()
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.iter().all(|k| k.contains("/a2/")), "{left:?}");
    // A presigned URL serves the object to a client without credentials.
    let url = block(out.presign(&key, Duration::from_secs(60)))
        .expect("S3 signs")
        .unwrap();
    let (status, body) = http_get(&url);
    assert_eq!(status, 200, "{url}");
    assert_eq!(body.len(), files[0].1.len());
    assert!(body == files[0].1);
    // Without the signature: refused.
    let (status, _) = http_get(url.split('?').next().unwrap());
    assert_eq!(status, 403);
    block(out.remove_attempt(id, 2)).unwrap();
    assert!(block(out.list_video(id)).unwrap().is_empty());
}

/// A plain HTTP/1.1 GET (status, body).
fn http_get(url: &str) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut b = &body[..];
        while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
            let n =
                usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
            b = &b[nl + 4 + n..];
        }
        body = out;
    }
    (status, body)
}

fn expect_error(url: &str, want: &str) {
    let t0 = Instant::now();
    let e = Outputs::s3(url)
        .err()
        .unwrap_or_else(|| panic!("{url}: no error"));
    assert!(matches!(e, ServerError::Storage { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(want), "{url}: want `{want}` in: {msg}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "{url}: took {:?}",
        t0.elapsed()
    );
    eprintln!("{msg}");
}

#[test]
fn startup_errors_are_one_clear_sentence() {
    let _g = rig::serial();
    let Some(weed) = rig::Weed::start() else {
        return;
    };
    let good = format!("s3://{}/x", rig::BUCKET);
    weed.set_env();
    expect_error("http://somewhere/bucket", "write s3://BUCKET/PREFIX");
    expect_error("s3:///prefix", "no bucket name");
    expect_error("s3://no-such-bucket/x", "`no-such-bucket` does not exist");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "wrong");
    expect_error(&good, "refused the credentials");
    std::env::set_var("AWS_ACCESS_KEY_ID", "nobody");
    expect_error(&good, "refused the credentials");
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    expect_error(
        &good,
        "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    );
    weed.set_env();
    std::env::set_var(
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", rig::free_port()),
    );
    expect_error(&good, "cannot reach the S3 server");
    weed.set_env();
    Outputs::s3(&good).expect("the right settings work");
}
