//! Where finished videos are kept: the data directory (one machine, as before) or any
//! S3-compatible bucket (`--storage s3://BUCKET/PREFIX`), both behind `object_store`.
//!
//! Keys: `[PREFIX/]videos/<id>/<file>` in the data directory (today's layout,
//! `DATA_DIR/videos/<id>/video.mp4`), and `[PREFIX/]videos/<id>/a<attempt>/<file>` with a shared
//! (Postgres) store. **Upload, then commit**: a worker uploads its outputs under its own
//! attempt's keys, then completes the job conditioned on still holding the lease; the completed
//! row names the attempt (`output_attempt`) and the API serves only a completed row's attempt.
//! Files that a killed or overtaken attempt left behind are therefore never served, and the
//! worker that completes removes other attempts' keys of the video. (A put is atomic in S3 and
//! in `LocalFileSystem`, which writes a temporary file and renames it.)
//!
//! S3 settings come from the standard variables: `AWS_ENDPOINT_URL` (a plain `http://`
//! endpoint is allowed when it says so), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION` (default `us-east-1`). Requests are path-style (`ENDPOINT/BUCKET/KEY`), which
//! every S3-compatible server accepts.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};

use crate::error::ServerError;

/// The output store.
pub struct Outputs {
    store: Arc<dyn ObjectStore>,
    /// The bucket (for presigned URLs); `None` for the data directory.
    s3: Option<Arc<AmazonS3>>,
    /// The data directory when outputs live there.
    local: Option<PathBuf>,
    prefix: String,
    /// `--storage` as given (for messages).
    url: String,
}

fn storage_error(url: &str, why: impl Into<String>) -> ServerError {
    ServerError::Storage {
        url: url.to_string(),
        why: why.into(),
    }
}

/// The endpoint from the environment, if any.
fn endpoint() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
}

fn s3_builder(bucket: &str, probe: bool) -> AmazonS3Builder {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(false);
    let http = endpoint().is_some_and(|e| e.starts_with("http://"));
    if let Some(e) = endpoint() {
        b = b.with_endpoint(e.trim_end_matches('/'));
    }
    if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        b = b.with_region("us-east-1");
    }
    let (retries, timeout) = if probe {
        (0, Duration::from_secs(5))
    } else {
        (4, Duration::from_secs(60))
    };
    b.with_retry(RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: retries,
        retry_timeout: Duration::from_secs(if probe { 5 } else { 30 }),
    })
    .with_client_options(
        // (These replace the builder's client options: allow_http is set here.)
        ClientOptions::new()
            .with_allow_http(http)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(timeout),
    )
}

/// `s3://BUCKET[/PREFIX]` as (bucket, prefix).
fn parse_s3(url: &str) -> Result<(String, String), ServerError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        storage_error(
            url,
            "write s3://BUCKET/PREFIX (an S3-compatible bucket) or leave --storage out to keep \
             outputs in --data-dir",
        )
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(storage_error(
            url,
            "no bucket name; write s3://BUCKET/PREFIX",
        ));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// An object-store error in plain words, with what to check.
fn explain(e: &object_store::Error, bucket: &str) -> String {
    let full = e.to_string();
    // One line: the server's XML body (and anything after it) adds nothing a person can use.
    let text = full
        .split("<?xml")
        .next()
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches([':', ' '])
        .to_string();
    // A 403 is a status (`status code: 403`, `403 Forbidden`), not the digits "403" anywhere:
    // an endpoint on port 403xx would otherwise read as refused credentials.
    let has = |s: &str| full.contains(s);
    if has("NoSuchBucket") || has("bucket does not exist") {
        return format!("the bucket `{bucket}` does not exist; create it first ({text})");
    }
    if has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || has("AccessDenied")
        || has("status code: 403")
        || has("403 Forbidden")
    {
        return format!(
            "the S3 server refused the credentials; check AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY ({text})"
        );
    }
    if has("error sending request")
        || has("Connection refused")
        || has("connect")
        || has("dns error")
        || has("timed out")
    {
        return format!(
            "cannot reach the S3 server at {}; check AWS_ENDPOINT_URL and that the server runs \
             ({text})",
            endpoint().unwrap_or_else(|| "the AWS default endpoint".into())
        );
    }
    if let object_store::Error::NotFound { .. } = e {
        return format!("the bucket `{bucket}` does not exist; create it first ({text})");
    }
    text
}

impl Outputs {
    /// Outputs in the data directory (`DATA_DIR/videos/<id>/…`).
    pub fn local(data_dir: &Path) -> Result<Outputs, ServerError> {
        let store = LocalFileSystem::new_with_prefix(data_dir)
            .map_err(|e| storage_error(&data_dir.display().to_string(), e.to_string()))?;
        Ok(Outputs {
            store: Arc::new(store),
            s3: None,
            local: Some(data_dir.to_path_buf()),
            prefix: String::new(),
            url: data_dir.display().to_string(),
        })
    }

    /// Outputs in an S3-compatible bucket. Checks that it is reachable, exists and takes the
    /// credentials (a small object is written, read back and removed), so that every such
    /// problem is one error at start-up.
    pub fn s3(url: &str) -> Result<Outputs, ServerError> {
        let (bucket, prefix) = parse_s3(url)?;
        let ak = std::env::var("AWS_ACCESS_KEY_ID").is_ok();
        let sk = std::env::var("AWS_SECRET_ACCESS_KEY").is_ok();
        if ak != sk {
            return Err(storage_error(
                url,
                "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (one of them is missing)",
            ));
        }
        if !ak && endpoint().is_some() {
            return Err(storage_error(
                url,
                "AWS_ENDPOINT_URL is set but no credentials: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY",
            ));
        }
        let build = |probe: bool| {
            s3_builder(&bucket, probe)
                .build()
                .map_err(|e| storage_error(url, e.to_string()))
        };
        let probe = Outputs {
            store: Arc::new(build(true)?),
            s3: None,
            local: None,
            prefix: prefix.clone(),
            url: url.to_string(),
        };
        crate::rt::block_on(probe.check(&bucket)).map_err(|why| storage_error(url, why))?;
        let s3 = Arc::new(build(false)?);
        Ok(Outputs {
            store: s3.clone(),
            s3: Some(s3),
            local: None,
            prefix,
            url: url.to_string(),
        })
    }

    /// `--storage` as given, or the data directory.
    pub fn describe(&self) -> &str {
        &self.url
    }

    /// Whether outputs are in the data directory.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    async fn check(&self, bucket: &str) -> Result<(), String> {
        let key = self.key_of(&format!(".kino-check/{:016x}", rand::random::<u64>()));
        let body = Bytes::from_static(b"kino storage check");
        self.store
            .put(&key, PutPayload::from_bytes(body.clone()))
            .await
            .map_err(|e| explain(&e, bucket))?;
        let back = self
            .store
            .get(&key)
            .await
            .map_err(|e| explain(&e, bucket))?
            .bytes()
            .await
            .map_err(|e| explain(&e, bucket))?;
        if back != body {
            return Err("the S3 server returned other bytes than were written".into());
        }
        self.store
            .delete(&key)
            .await
            .map_err(|e| explain(&e, bucket))?;
        Ok(())
    }

    fn key_of(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// The key of one output file of a video (`attempt`: the lease attempt that made it, with
    /// a shared store).
    pub fn key(&self, id: &str, attempt: Option<i64>, file: &str) -> Key {
        match attempt {
            Some(a) => self.key_of(&format!("videos/{id}/a{a}/{file}")),
            None => self.key_of(&format!("videos/{id}/{file}")),
        }
    }

    /// Uploads `files` from the folder `dir` under the video's (attempt's) keys.
    pub async fn publish(
        &self,
        id: &str,
        attempt: Option<i64>,
        dir: &Path,
        files: &[&str],
    ) -> Result<(), String> {
        for f in files {
            let path = dir.join(f);
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let key = self.key(id, attempt, f);
            self.store
                .put(&key, PutPayload::from(bytes))
                .await
                .map_err(|e| format!("cannot store {key} in {}: {e}", self.url))?;
        }
        Ok(())
    }

    /// The size of a stored file.
    pub async fn size(&self, key: &Key) -> Result<u64, String> {
        self.store
            .head(key)
            .await
            .map(|m| m.size)
            .map_err(|e| format!("cannot find {key} in {}: {e}", self.url))
    }

    /// Bytes `range` of a stored file, as a stream.
    pub async fn stream(
        &self,
        key: &Key,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>, String> {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(key, opts)
            .await
            .map_err(|e| format!("cannot read {key} from {}: {e}", self.url))?;
        Ok(got
            .into_stream()
            .map(|r| r.map_err(std::io::Error::other))
            .boxed())
    }

    /// A whole stored file.
    pub async fn read(&self, key: &Key) -> Result<Bytes, String> {
        let got = self
            .store
            .get(key)
            .await
            .map_err(|e| format!("cannot read {key} from {}: {e}", self.url))?;
        got.bytes()
            .await
            .map_err(|e| format!("cannot read {key} from {}: {e}", self.url))
    }

    /// A presigned GET URL for a stored file (S3 only).
    pub async fn presign(&self, key: &Key, expires: Duration) -> Option<Result<String, String>> {
        let s3 = self.s3.as_ref()?;
        Some(
            s3.signed_url(object_store::signer::Method::GET, key, expires)
                .await
                .map(|u| u.to_string())
                .map_err(|e| format!("cannot presign {key}: {e}")),
        )
    }

    /// Every stored key of a video (all attempts), e.g. for tests and clean-up.
    pub async fn list_video(&self, id: &str) -> Result<Vec<Key>, String> {
        let prefix = self.key_of(&format!("videos/{id}"));
        let mut out = Vec::new();
        let mut s = self.store.list(Some(&prefix));
        while let Some(m) = s.next().await {
            out.push(
                m.map_err(|e| format!("cannot list {prefix} in {}: {e}", self.url))?
                    .location,
            );
        }
        Ok(out)
    }

    /// Where a job's input file is kept for workers on other machines (a shared store).
    pub fn input_key(&self, id: &str, file: &str) -> Key {
        self.key_of(&format!("inputs/{id}/{file}"))
    }

    /// Stores bytes under a key.
    pub async fn put_bytes(&self, key: &Key, bytes: Vec<u8>) -> Result<(), String> {
        self.store
            .put(key, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot store {key} in {}: {e}", self.url))
    }

    /// Removes a job's stored inputs (a shared store).
    pub async fn remove_inputs(&self, id: &str) -> Result<(), String> {
        let prefix = self.key_of(&format!("inputs/{id}"));
        let mut keys = Vec::new();
        let mut s = self.store.list(Some(&prefix));
        while let Some(m) = s.next().await {
            keys.push(
                m.map_err(|e| format!("cannot list {prefix} in {}: {e}", self.url))?
                    .location,
            );
        }
        for key in keys {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(format!("cannot remove {key} from {}: {e}", self.url)),
            }
        }
        Ok(())
    }

    /// Removes the files one attempt uploaded (it lost its lease before committing).
    pub async fn remove_attempt(&self, id: &str, attempt: i64) -> Result<(), String> {
        let prefix = self.key_of(&format!("videos/{id}/a{attempt}"));
        for key in self.list_video(id).await? {
            if key.prefix_matches(&prefix) {
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(format!("cannot remove {key} from {}: {e}", self.url)),
                }
            }
        }
        Ok(())
    }

    /// Removes a video's files: all of them, or all but attempt `keep`'s.
    pub async fn remove_video(&self, id: &str, keep: Option<i64>) -> Result<(), String> {
        if let Some(root) = &self.local {
            if keep.is_none() {
                crate::worker::remove_outputs(root, id);
                return Ok(());
            }
        }
        let keep_prefix = keep.map(|a| self.key_of(&format!("videos/{id}/a{a}")));
        for key in self.list_video(id).await? {
            if keep_prefix.as_ref().is_some_and(|p| key.prefix_matches(p)) {
                continue;
            }
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(format!("cannot remove {key} from {}: {e}", self.url)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_s3("s3://b/p/q/").unwrap(),
            ("b".to_string(), "p/q".to_string())
        );
        assert_eq!(parse_s3("s3://b").unwrap(), ("b".into(), String::new()));
        assert!(parse_s3("s3:///x").is_err());
        assert!(parse_s3("http://x/y").is_err());
    }

    #[test]
    fn a_403_is_a_status_not_digits_in_a_port() {
        let err = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        };
        let unreachable = err(
            "Error performing PUT http://127.0.0.1:40347/kino/x in 87us - HTTP error: error sending request",
        );
        assert!(explain(&unreachable, "kino").starts_with("cannot reach the S3 server"));
        let refused = err(
            "Error performing PUT http://127.0.0.1:35921/kino/x in 540us - Server returned non-2xx status code: 403 Forbidden",
        );
        assert!(explain(&refused, "kino").starts_with("the S3 server refused the credentials"));
    }

    #[test]
    fn keys() {
        let d = tempfile::tempdir().unwrap();
        let o = Outputs::local(d.path()).unwrap();
        assert_eq!(
            o.key("video_1", None, "video.mp4").as_ref(),
            "videos/video_1/video.mp4"
        );
        assert_eq!(
            o.key("video_1", Some(3), "video.mp4").as_ref(),
            "videos/video_1/a3/video.mp4"
        );
    }
}
