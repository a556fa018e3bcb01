//! [`Store`]: the blocking face of `object_store`'s S3 client. It owns a small tokio runtime
//! (two worker threads) so the async client stays inside this file; decode workers call its
//! blocking methods from their own threads.
//!
//! Requests are retried by the client (5xx such as 503 SlowDown, timeouts, refused
//! connections: exponential backoff with jitter, [`RETRIES`] times, within
//! [`RETRY_TIMEOUT`]); a body cut off mid-object is resumed here with a ranged GET pinned to
//! the listed ETag (`If-Match`), after a jittered backoff of its own.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutPayload, RetryConfig,
};
use rand::Rng;

use super::error::RemoteError;
use super::profile::{Profile, ProfileFiles};
use super::url::{ObjectUrl, Scheme};

/// Retries of one request (the client's), and of one object's body (ours).
pub const RETRIES: u32 = 6;
/// Longest a request is retried for.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one request may take (headers and body of one shard) unless
/// `RINGFEED_S3_TIMEOUT_S` says otherwise; slower is a failed attempt, retried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// [`REQUEST_TIMEOUT`], or `RINGFEED_S3_TIMEOUT_S` (seconds, fractions allowed) when set.
fn request_timeout() -> Duration {
    std::env::var("RINGFEED_S3_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(REQUEST_TIMEOUT, Duration::from_secs_f64)
}
/// First backoff before retrying a cut-off body; doubles per attempt, with full jitter.
const BODY_BACKOFF: Duration = Duration::from_millis(100);

/// What a listing or a HEAD says about one object: enough to fetch it and to check that the
/// copy is the object that was indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteObject {
    /// Where it is.
    pub url: ObjectUrl,
    /// Its size in bytes.
    pub size: u64,
    /// Its ETag as the store gives it (quotes included), if any.
    pub etag: Option<String>,
    /// Its last-modified time, ns since the Unix epoch (the cached copy's mtime).
    pub mtime_ns: i64,
}

impl RemoteObject {
    fn from_meta(scheme: Scheme, bucket: &str, meta: ObjectMeta) -> RemoteObject {
        RemoteObject {
            url: ObjectUrl {
                scheme,
                bucket: bucket.to_owned(),
                key: meta.location.to_string(),
            },
            size: meta.size,
            etag: meta.e_tag,
            mtime_ns: meta
                .last_modified
                .timestamp_nanos_opt()
                .unwrap_or_else(|| meta.last_modified.timestamp().saturating_mul(1_000_000_000)),
        }
    }

    /// The object's mtime as a [`std::time::SystemTime`], for the cached copy.
    pub fn modified(&self) -> std::time::SystemTime {
        if self.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(self.mtime_ns as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(self.mtime_ns.unsigned_abs())
        }
    }
}

/// A blocking S3 client over every bucket a dataset names, configured from the standard AWS
/// variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_DEFAULT_REGION`, web identity and instance
/// credentials as `object_store` reads them), then the `AWS_PROFILE` profile of the AWS
/// shared files for what no variable sets ([`super::profile`]).
#[derive(Debug)]
pub struct Store {
    runtime: tokio::runtime::Runtime,
    buckets: Mutex<HashMap<(Scheme, String), Arc<dyn ObjectStore>>>,
    allow_http: bool,
    /// The AWS shared files' profile, read once at start (s3:// only).
    profile: Option<Profile>,
}

impl Store {
    /// A client; `allow_http` (or `AWS_ALLOW_HTTP=true`) permits a plain-HTTP endpoint.
    pub fn new(allow_http: bool) -> Result<Store, RemoteError> {
        // reqwest's rustls is built without a crypto provider (see Cargo.toml): use ring's.
        // An error means one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let env_allows = std::env::var("AWS_ALLOW_HTTP")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let allow_http = allow_http || env_allows;
        let profile = ProfileFiles::from_env().read()?;
        if let Some(endpoint) = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
            .or_else(|| profile.as_ref().and_then(|p| p.endpoint_url.clone()))
        {
            if endpoint.to_ascii_lowercase().starts_with("http://") && !allow_http {
                return Err(RemoteError::HttpNotAllowed { endpoint });
            }
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ringfeed-s3")
            .enable_all()
            .build()
            .map_err(|source| RemoteError::Cache {
                path: "<tokio runtime>".into(),
                source,
            })?;
        Ok(Store {
            runtime,
            buckets: Mutex::new(HashMap::new()),
            allow_http,
            profile,
        })
    }

    fn bucket(&self, url: &ObjectUrl) -> Result<Arc<dyn ObjectStore>, RemoteError> {
        self.bucket_of(url.scheme, &url.bucket)
    }

    fn bucket_of(&self, scheme: Scheme, bucket: &str) -> Result<Arc<dyn ObjectStore>, RemoteError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let id = (scheme, bucket.to_owned());
        if let Some(store) = buckets.get(&id) {
            return Ok(Arc::clone(store));
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: RETRIES as usize,
            retry_timeout: RETRY_TIMEOUT,
        };
        let options = ClientOptions::new()
            .with_allow_http(self.allow_http)
            .with_timeout(request_timeout())
            .with_connect_timeout(Duration::from_secs(10));
        let client_err = |e: object_store::Error| RemoteError::Client {
            bucket: format!("{}{bucket}", scheme.prefix()),
            message: e.to_string(),
        };
        let store: Arc<dyn ObjectStore> = match scheme {
            Scheme::S3 => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(options);
                if let Some(profile) = &self.profile {
                    builder = with_profile(builder, profile);
                }
                // A custom endpoint (MinIO, moto, Ceph) serves buckets by path, not by host
                // name.
                if std::env::var_os("AWS_ENDPOINT_URL").is_some()
                    || std::env::var_os("AWS_ENDPOINT").is_some()
                    || self
                        .profile
                        .as_ref()
                        .is_some_and(|p| p.endpoint_url.is_some())
                {
                    builder = builder.with_virtual_hosted_style_request(false);
                }
                Arc::new(builder.build().map_err(client_err)?)
            }
            // The GOOGLE_* variables (service account, application credentials) as the crate
            // reads them.
            Scheme::Gcs => Arc::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(options)
                    .build()
                    .map_err(client_err)?,
            ),
            // The AZURE_* variables (account, key, SAS, client secret) likewise.
            Scheme::Azure => Arc::new(
                MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_retry(retry)
                    .with_client_options(options)
                    .build()
                    .map_err(client_err)?,
            ),
        };
        buckets.insert(id, Arc::clone(&store));
        Ok(store)
    }

    /// The object at `url` (a HEAD request).
    pub fn head(&self, url: &ObjectUrl) -> Result<RemoteObject, RemoteError> {
        let store = self.bucket(url)?;
        let meta = self
            .runtime
            .block_on(store.head(&ObjectPath::from(url.key.as_str())))
            .map_err(|e| classify(&url.bucket_url(), &url.key, e))?;
        Ok(RemoteObject::from_meta(url.scheme, &url.bucket, meta))
    }

    /// Every object of `bucket` whose key starts with `prefix` (a directory, `/`-terminated,
    /// or empty for the whole bucket).
    pub fn list(
        &self,
        scheme: Scheme,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<RemoteObject>, RemoteError> {
        let store = self.bucket_of(scheme, bucket)?;
        let prefix_path = ObjectPath::from(prefix.trim_end_matches('/'));
        let listed: Vec<ObjectMeta> = self
            .runtime
            .block_on(
                store
                    .list((!prefix.is_empty()).then_some(&prefix_path))
                    .try_collect(),
            )
            .map_err(|e| classify(&format!("{}{bucket}", scheme.prefix()), prefix, e))?;
        Ok(listed
            .into_iter()
            .map(|meta| RemoteObject::from_meta(scheme, bucket, meta))
            .collect())
    }

    /// Writes `object`'s bytes to `out` (from its start). A body cut off mid-way is resumed
    /// where it stopped, pinned to the listed ETag; a changed object, or one whose bytes do
    /// not add up to the listed size, is [`RemoteError::Changed`].
    pub fn fetch(&self, object: &RemoteObject, out: &mut File) -> Result<(), RemoteError> {
        let url = &object.url;
        let store = self.bucket(url)?;
        let path = ObjectPath::from(url.key.as_str());
        let cache_err = |source| RemoteError::Cache {
            path: format!("<copy of {url}>").into(),
            source,
        };
        let mut written = 0u64;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let options = GetOptions {
                if_match: object.etag.clone(),
                range: (written > 0).then_some(GetRange::Offset(written)),
                ..GetOptions::default()
            };
            let result: Result<(), object_store::Error> = self.runtime.block_on(async {
                let got = store.get_opts(&path, options).await?;
                if got.meta.size != object.size {
                    return Err(object_store::Error::Precondition {
                        path: url.key.clone(),
                        source: format!("size {} (listed {})", got.meta.size, object.size).into(),
                    });
                }
                let mut body = got.into_stream();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk?;
                    if written + chunk.len() as u64 > object.size {
                        return Err(object_store::Error::Precondition {
                            path: url.key.clone(),
                            source: "more bytes than its listed size".into(),
                        });
                    }
                    out.write_all(&chunk)
                        .map_err(|e| object_store::Error::Generic {
                            store: "local cache",
                            source: Box::new(e),
                        })?;
                    written += chunk.len() as u64;
                }
                Ok(())
            });
            match result {
                Ok(()) if written == object.size => return out.flush().map_err(cache_err),
                Ok(()) if attempt <= RETRIES => {
                    log::warn!(
                        "{url}: body ended at byte {written} of {}; resuming",
                        object.size
                    );
                }
                Ok(()) => {
                    return Err(RemoteError::Changed {
                        bucket: url.bucket_url(),
                        key: url.key.clone(),
                        what: format!("arrived truncated: {written} of {} bytes", object.size),
                    })
                }
                Err(object_store::Error::Generic {
                    store: "local cache",
                    source,
                }) => {
                    return Err(RemoteError::Cache {
                        path: format!("<copy of {url}>").into(),
                        source: std::io::Error::other(source),
                    })
                }
                Err(e) => {
                    let e = classify(&url.bucket_url(), &url.key, e);
                    let retryable = matches!(e, RemoteError::Request { .. });
                    if !retryable || attempt > RETRIES {
                        return Err(match e {
                            RemoteError::Request {
                                bucket,
                                key,
                                message,
                                ..
                            } => RemoteError::Request {
                                bucket,
                                key,
                                message,
                                attempts: attempt,
                            },
                            other => other,
                        });
                    }
                    log::warn!("{url}: {e}; retrying from byte {written}");
                }
            }
            // Full jitter: a random wait up to the doubled backoff, so daemons retrying
            // together spread out.
            let cap = BODY_BACKOFF.saturating_mul(1 << attempt.min(6));
            let wait = rand::rng().random_range(Duration::ZERO..=cap);
            std::thread::sleep(wait);
        }
    }
}

impl Store {
    /// Reads `buf.len()` bytes of `object` from `offset` with one ranged GET pinned to the
    /// listed ETag (`If-Match`): how a sample is served before its shard's copy is in the
    /// cache. Retried by the client like any request; a short answer is
    /// [`RemoteError::Changed`].
    pub fn read_range(
        &self,
        object: &RemoteObject,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError> {
        let url = &object.url;
        let store = self.bucket(url)?;
        let end = offset + buf.len() as u64;
        let options = GetOptions {
            if_match: object.etag.clone(),
            range: Some(GetRange::Bounded(offset..end)),
            ..GetOptions::default()
        };
        let bytes = self
            .runtime
            .block_on(async {
                store
                    .get_opts(&ObjectPath::from(url.key.as_str()), options)
                    .await?
                    .bytes()
                    .await
            })
            .map_err(|e| classify(&url.bucket_url(), &url.key, e))?;
        if bytes.len() != buf.len() {
            return Err(RemoteError::Changed {
                bucket: url.bucket_url(),
                key: url.key.clone(),
                what: format!("bytes {offset}..{end} arrived as {} bytes", bytes.len()),
            });
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// The whole of a small object (a sidecar index), or `None` when there is no such object;
    /// one larger than `limit` bytes is [`RemoteError::Changed`] (never read into memory).
    pub fn get_small(&self, url: &ObjectUrl, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let store = self.bucket(url)?;
        let path = ObjectPath::from(url.key.as_str());
        let result: Result<Option<Vec<u8>>, object_store::Error> = self.runtime.block_on(async {
            let got = match store.get_opts(&path, GetOptions::default()).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if got.meta.size > limit {
                return Err(object_store::Error::Precondition {
                    path: url.key.clone(),
                    source: format!("{} bytes, over the limit of {limit}", got.meta.size).into(),
                });
            }
            Ok(Some(got.bytes().await?.to_vec()))
        });
        result.map_err(|e| classify(&url.bucket_url(), &url.key, e))
    }

    /// Writes `bytes` as the object at `url` (a sidecar index beside its shard). A bucket this
    /// client may not write is [`RemoteError::Credentials`].
    pub fn put(&self, url: &ObjectUrl, bytes: Vec<u8>) -> Result<(), RemoteError> {
        let store = self.bucket(url)?;
        let path = ObjectPath::from(url.key.as_str());
        self.runtime
            .block_on(store.put(&path, PutPayload::from(bytes)))
            .map(drop)
            .map_err(|e| classify(&url.bucket_url(), &url.key, e))
    }
}

/// Turns a client error into ours, naming the bucket and key.
fn classify(bucket: &str, key: &str, e: object_store::Error) -> RemoteError {
    let (bucket, key) = (bucket.to_owned(), key.to_owned());
    match e {
        object_store::Error::NotFound { .. } => RemoteError::NotFound { bucket, key },
        object_store::Error::PermissionDenied { source, .. }
        | object_store::Error::Unauthenticated { source, .. } => RemoteError::Credentials {
            bucket,
            key,
            message: source.to_string(),
        },
        object_store::Error::Precondition { source, .. } => RemoteError::Changed {
            bucket,
            key,
            what: format!("changed since it was listed ({source})"),
        },
        other => {
            // The client folds 403s it did not classify into its generic error.
            let message = other.to_string();
            if message.contains("403")
                || message.contains("InvalidAccessKeyId")
                || message.contains("SignatureDoesNotMatch")
            {
                RemoteError::Credentials {
                    bucket,
                    key,
                    message,
                }
            } else {
                RemoteError::Request {
                    bucket,
                    key,
                    message,
                    attempts: 1,
                }
            }
        }
    }
}

/// `builder` (configured from the `AWS_*` variables) with what `profile` sets and no variable
/// does: a variable always wins, as in the AWS CLI.
fn with_profile(mut builder: AmazonS3Builder, profile: &Profile) -> AmazonS3Builder {
    let unset = |keys: &[&str]| {
        keys.iter()
            .all(|k| std::env::var(k).map_or(true, |v| v.is_empty()))
    };
    // Keys come as a pair: a variable key id with a file secret would be a mix-up.
    if unset(&["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]) {
        if let (Some(id), Some(secret)) = (&profile.access_key_id, &profile.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = &profile.session_token {
                builder = builder.with_token(token);
            }
        }
    }
    if unset(&["AWS_REGION", "AWS_DEFAULT_REGION"]) {
        if let Some(region) = &profile.region {
            builder = builder.with_region(region);
        }
    }
    if unset(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]) {
        if let Some(endpoint) = &profile.endpoint_url {
            builder = builder.with_endpoint(endpoint);
        }
    }
    builder
}
