//! Errors of remote (`s3://`, `gs://`, `az://`) shards: each names the bucket and key, or
//! the cache file. A `bucket` field holds the bucket as a URL (`s3://bucket`).

use std::io;
use std::path::PathBuf;

/// Listing, fetching or caching a remote shard failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// An `s3://` URL or pattern is malformed.
    #[error("bad object URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as written.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint is plain HTTP and nothing allowed it.
    #[error(
        "the S3 endpoint {endpoint} is plain HTTP: set `[source] allow-http = true` or \
         AWS_ALLOW_HTTP=true to allow it"
    )]
    HttpNotAllowed {
        /// `AWS_ENDPOINT_URL` as set.
        endpoint: String,
    },
    /// The client for a bucket could not be built (bad region, endpoint, …).
    #[error("{bucket}: cannot configure the object store client: {message}")]
    Client {
        /// The bucket, as a URL (`s3://bucket`).
        bucket: String,
        /// The client's explanation.
        message: String,
    },
    /// The store refused the credentials (or has none): checked once at start.
    #[error(
        "{bucket}/{key}: access denied ({message}); check AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_REGION and AWS_ENDPOINT_URL (or \
         the AWS_PROFILE profile in ~/.aws/credentials and ~/.aws/config) for s3://, \
         GOOGLE_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS for gs://, \
         AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY for az://"
    )]
    Credentials {
        /// The bucket, as a URL (`s3://bucket`).
        bucket: String,
        /// The key (or prefix) of the request that was refused.
        key: String,
        /// The store's answer.
        message: String,
    },
    /// The AWS profile the environment names cannot be used (missing, or run-time credentials).
    #[error("AWS profile {profile:?}: {message}")]
    Profile {
        /// The profile's name.
        profile: String,
        /// What is wrong, naming the file and key.
        message: String,
    },
    /// The object does not exist.
    #[error("{bucket}/{key}: no such object")]
    NotFound {
        /// The bucket, as a URL (`s3://bucket`).
        bucket: String,
        /// The key.
        key: String,
    },
    /// A pattern matched no object.
    #[error("shard spec {spec:?} matches no object")]
    NoMatch {
        /// The spec as written.
        spec: String,
    },
    /// The object changed since it was listed (another ETag or size), or arrived short.
    #[error("{bucket}/{key}: {what}")]
    Changed {
        /// The bucket, as a URL (`s3://bucket`).
        bucket: String,
        /// The key.
        key: String,
        /// What differs.
        what: String,
    },
    /// A request failed after every retry.
    #[error("{bucket}/{key}: {message} (after {attempts} attempts)")]
    Request {
        /// The bucket, as a URL (`s3://bucket`).
        bucket: String,
        /// The key (or listing prefix).
        key: String,
        /// The last error.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The local cache directory or one of its files failed.
    #[error("shard cache {path}: {source}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}
