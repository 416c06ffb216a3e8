//! Webhooks (optional, one URL per server): `video.completed` and `video.failed`, signed as
//! Standard Webhooks (what the `openai` SDK's `client.webhooks.unwrap` / `verify_signature`
//! check): headers `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>` with
//! HMAC-SHA256 over `"{id}.{timestamp}.{body}"`, keyed by the base64 secret after `whsec_`.
//!
//! The body is OpenAI's event shape:
//! `{"id": "evt_…", "object": "event", "type": "video.completed", "created_at": …, "data": {"id": "video_…"}}`.
//! Non-2xx answers and network errors are retried with exponential backoff (1 s, 2 s, 4 s, …,
//! `ATTEMPTS` tries), each try with the same `webhook-id` so receivers can deduplicate.
//! Deliveries live in memory: a webhook pending when the server stops is not sent. Only
//! `http://` URLs are supported (put a TLS-terminating proxy in front for `https://`).

use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Tries per event.
pub const ATTEMPTS: u32 = 6;

/// Where and how to send webhooks.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `http://host[:port]/path`
    pub url: String,
    /// `whsec_<base64>`
    pub secret: String,
    /// First retry delay (doubles each time).
    pub retry_base: Duration,
}

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses `http://host[:port][/path]`.
pub fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "webhook URL `{url}` must start with http:// (for https, put a TLS proxy in front)"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("webhook URL `{url}` has a bad port `{p}`"))?,
        ),
        _ => (authority.to_string(), 80),
    };
    if host.is_empty() {
        return Err(format!("webhook URL `{url}` has no host"));
    }
    Ok(HttpUrl { host, port, path })
}

/// The key bytes of a `whsec_…` secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| {
            "the webhook secret must be `whsec_` followed by base64 (e.g. from `openssl rand -base64 32`)"
                .to_string()
        })
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The `webhook-signature` header value.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mac = hmac_sha256(key, format!("{id}.{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    )
}

/// One event to deliver.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: &'static str,
    pub video_id: String,
}

/// Receives events and delivers each (with retries) on its own task.
pub async fn dispatch(config: WebhookConfig, mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) {
    let (url, key) = match (parse_url(&config.url), secret_key(&config.secret)) {
        (Ok(u), Ok(k)) => (u, k),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("webhooks off: {e}");
            return;
        }
    };
    while let Some(ev) = rx.recv().await {
        let url = url.clone();
        let key = key.clone();
        let base = config.retry_base;
        tokio::spawn(async move { deliver(&url, &key, ev, base).await });
    }
}

async fn deliver(url: &HttpUrl, key: &[u8], ev: Event, retry_base: Duration) {
    let id = format!("evt_{:032x}", rand::random::<u128>());
    let created = crate::now_unix();
    let body = serde_json::json!({
        "id": id,
        "object": "event",
        "type": ev.kind,
        "created_at": created,
        "data": {"id": ev.video_id},
    })
    .to_string();
    let mut delay = retry_base;
    for attempt in 1..=ATTEMPTS {
        let ts = crate::now_unix();
        let sig = signature(key, &id, ts, &body);
        match tokio::time::timeout(Duration::from_secs(10), post(url, &id, ts, &sig, &body)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                tracing::info!(
                    event = ev.kind,
                    video = ev.video_id,
                    attempt,
                    "webhook delivered"
                );
                return;
            }
            Ok(Ok(status)) => tracing::warn!(attempt, status, "webhook refused"),
            Ok(Err(e)) => tracing::warn!(attempt, "webhook failed: {e}"),
            Err(_) => tracing::warn!(attempt, "webhook timed out"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    tracing::error!(
        event = ev.kind,
        video = ev.video_id,
        "webhook given up after {ATTEMPTS} tries"
    );
}

/// Sends one POST; returns the HTTP status.
async fn post(url: &HttpUrl, id: &str, ts: i64, sig: &str, body: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kino/{v}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nwebhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\nConnection: close\r\n\r\n{body}",
        path = url.path,
        host = url.host,
        port = url.port,
        v = env!("CARGO_PKG_VERSION"),
        len = body.len(),
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.trim().parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:.60}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231() {
        // RFC 4231 test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn urls_and_secrets() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000/hook").unwrap(),
            HttpUrl {
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/hook".into()
            }
        );
        assert_eq!(parse_url("http://example.com").unwrap().port, 80);
        assert!(parse_url("https://example.com").is_err());
        assert!(parse_url("http://:80/").is_err());
        assert_eq!(secret_key("whsec_AAEC").unwrap(), vec![0, 1, 2]);
        assert!(secret_key("whsec_***").is_err());
    }
}
