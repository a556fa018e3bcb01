//! Remote (`s3://`) shards: object storage → a local shard cache → the tar dataset's
//! positioned reads.
//!
//! # Brief overview
//!
//! - [`url`]: `s3://bucket/key` and shard specs over them (brace ranges, globs matched
//!   against a listing).
//! - [`store`]: [`Store`], a blocking S3 client (`object_store`) with its own small tokio
//!   runtime; retries with backoff and jitter, resumes cut-off bodies.
//! - [`cache`]: [`ShardCache`], whole shards as local files, verified (size, ETag), renamed into
//!   place when complete, evicted least recently used past `cache-limit` unless a daemon has
//!   them open; safe for several daemons on one node.
//! - [`prefetch`]: [`Prefetcher`], fetching shards into the cache ahead of the decode workers
//!   in the epoch's order, a bounded number at once, holding the read window's copies so no
//!   eviction takes them.
//! - [`profile`]: the AWS shared files (`~/.aws/credentials`, `~/.aws/config`) for the
//!   profile `AWS_PROFILE` names, which `object_store` does not read.
//! - [`sidecar`]: each shard's index kept in the bucket beside it when the bucket is
//!   writable, so another node reads the index instead of fetching the shard.
//! - [`error`]: [`RemoteError`], naming the bucket and key.
//!
//! The dataset ([`super::Dataset`]) lists the objects once at start (wrong credentials fail
//! there) and reads each shard's index from the local index directory, else from the bucket,
//! else builds it from a fetched copy (and puts it in the bucket when it may). While serving,
//! the pipeline tells the dataset what each epoch will read; the prefetcher fetches ahead of
//! it, and a sample whose shard is not in the cache yet is read with one ranged GET instead
//! of waiting for the whole shard.

pub mod cache;
pub mod error;
pub mod prefetch;
pub mod profile;
pub mod sidecar;
pub mod store;
pub mod url;

pub use cache::ShardCache;
pub use error::RemoteError;
pub use prefetch::{Prefetcher, ReadPlan, DEFAULT_FETCH_AHEAD};
pub use store::{RemoteObject, Store};
pub use url::{expand_remote, is_remote, ObjectUrl};
