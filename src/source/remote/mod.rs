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
//! - [`error`]: [`RemoteError`], naming the bucket and key.
//!
//! The dataset ([`super::Dataset`]) lists the objects once at start (wrong credentials fail
//! there), reads or builds each shard's index in the local index directory (the index of
//! an unchanged object is reused without fetching it), and fetches a shard into the cache when
//! a sample of it is first read.

pub mod cache;
pub mod error;
pub mod store;
pub mod url;

pub use cache::ShardCache;
pub use error::RemoteError;
pub use store::{RemoteObject, Store};
pub use url::{expand_remote, is_remote, ObjectUrl};
