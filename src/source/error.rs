//! Errors of the source stage: opening a dataset, reading a sample, and the members that
//! indexing skipped.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::tar::TarError;

/// Opening a dataset failed: its configuration, its shard specs, or indexing a shard.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source configuration is inconsistent (e.g. `kind = "tar"` without shards).
    #[error("invalid source configuration: {0}")]
    Config(String),
    /// A shard spec could not be parsed (unbalanced braces, a huge range, a bad glob).
    #[error("bad shard spec {spec:?}: {reason}")]
    BadShardSpec {
        /// The spec as written in the configuration.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A shard spec (a glob, or every path of its brace expansion) matched no file.
    #[error("shard spec {spec:?} matches no file")]
    NoMatch {
        /// The spec as written in the configuration.
        spec: String,
    },
    /// A spec names an exact path (after brace expansion) that is not a file.
    #[error("shard spec {spec:?}: {path} does not exist or is not a file")]
    ShardMissing {
        /// The spec as written in the configuration.
        spec: String,
        /// The missing path.
        path: PathBuf,
    },
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The sidecar index of a shard could be written neither beside it nor in the cache
    /// directory.
    #[error("cannot write the index of {shard}: tried {tried}: {source}")]
    IndexWrite {
        /// The shard whose index was built.
        shard: PathBuf,
        /// The index paths tried, in order.
        tried: String,
        /// The last error.
        source: io::Error,
    },
    /// A shard holds more samples, or larger ones, than the in-memory index can address.
    #[error("{path}: {reason}")]
    TooLarge {
        /// The shard or folder.
        path: PathBuf,
        /// Which limit was exceeded.
        reason: String,
    },
    /// An encrypted dataset cannot be opened with the key given (or without one).
    #[error(transparent)]
    Crypt(#[from] super::crypt::CryptError),
    /// Remote (`s3://`) shards could not be listed, reached or cached.
    #[error(transparent)]
    Remote(#[from] super::remote::RemoteError),
    /// The dataset has no usable sample.
    #[error("{what} holds no usable sample ({skipped} members skipped while indexing{first})")]
    Empty {
        /// The shard specs or folder that were opened.
        what: String,
        /// How many members were skipped.
        skipped: usize,
        /// The first skipped member and its reason, prefixed with "; first: ", or empty.
        first: String,
    },
}

/// Reading one sample's bytes at serve time failed. Always names the shard and member.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SampleReadError {
    /// The sample id is not below the dataset's length.
    #[error("sample id {id} is out of range (dataset has {len} samples)")]
    OutOfRange {
        /// The id asked for.
        id: u64,
        /// The dataset's length.
        len: u64,
    },
    /// The shard or file could not be opened, or is no longer a regular file.
    #[error("{location}: cannot open {path}: {source}")]
    Open {
        /// `shard:member` (or the image file path) of the sample.
        location: String,
        /// The file that was opened.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The shard differs from the one that was indexed (size or modification time).
    #[error("{location}: {path} changed since it was indexed ({what}); rebuild its index")]
    Changed {
        /// `shard:member` of the sample.
        location: String,
        /// The shard.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// A sealed member failed authentication: altered, truncated, moved from another name or
    /// shard, or sealed with another key. Skipped and counted like any corrupt sample.
    #[error(
        "{location}: sealed member failed authentication (altered, swapped or truncated) in {path}"
    )]
    Unauthentic {
        /// `shard:member` of the sample.
        location: String,
        /// The shard.
        path: PathBuf,
    },
    /// The image file grew past `source.max-sample-bytes` after the dataset was opened.
    #[error(
        "{location}: {path} is {size} bytes, over the limit of {limit} (source.max-sample-bytes)"
    )]
    TooLarge {
        /// The image file path of the sample.
        location: String,
        /// The file.
        path: PathBuf,
        /// Its size (at least; reading stops past the limit).
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// Reading the bytes failed (short read after truncation, I/O error).
    #[error("{location}: cannot read {size} bytes at offset {offset} of {path}: {source}")]
    Read {
        /// `shard:member` (or the image file path) of the sample.
        location: String,
        /// The file read.
        path: PathBuf,
        /// Where the sample's bytes start.
        offset: u64,
        /// How many bytes were wanted.
        size: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The sample's remote shard could not be fetched into the cache (after retries).
    #[error("{location}: cannot fetch its shard: {source}")]
    Fetch {
        /// `shard:member` of the sample.
        location: String,
        /// Why (names the bucket and key, or the cache file).
        source: super::remote::RemoteError,
    },
}

/// A member (or file) that indexing skipped, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexIssue {
    /// The shard (tar) or class directory (ImageFolder) the member belongs to.
    pub shard: PathBuf,
    /// The member's name inside the shard, or the file's path relative to the root.
    pub member: String,
    /// Why it was skipped.
    pub reason: IssueReason,
}

impl fmt::Display for IndexIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}",
            self.shard.display(),
            self.member,
            self.reason
        )
    }
}

/// Why a member was skipped while indexing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum IssueReason {
    /// Absolute path or a `..` component: it would leave the shard.
    #[error("path leaves the shard (absolute or containing '..')")]
    UnsafePath,
    /// The member name is not UTF-8.
    #[error("member name is not UTF-8")]
    NonUtf8Name,
    /// A hidden file (name starting with '.', e.g. macOS `._x.jpg`).
    #[error("hidden file")]
    Hidden,
    /// The sample has an image but no `.cls` member.
    #[error("sample has no .cls label member")]
    MissingLabel,
    /// The `.cls` member is not an integer.
    #[error("label {text:?} is not an integer")]
    BadLabel {
        /// The label text (truncated to 32 bytes).
        text: String,
    },
    /// The label is negative: no class has it.
    #[error("label {label} is negative")]
    NegativeLabel {
        /// The label.
        label: i64,
    },
    /// The label is not below `[source] num-classes`.
    #[error("label {label} is not below num-classes = {num_classes}")]
    LabelOutOfRange {
        /// The label.
        label: i64,
        /// The configured number of classes.
        num_classes: u64,
    },
    /// The sample has no member with a known image extension (jpg, jpeg, png, webp).
    #[error("no image member with a known extension (found: {exts})")]
    UnknownExt {
        /// The extensions that were found, comma-separated.
        exts: String,
    },
    /// The sample has a label but no other member.
    #[error("sample has a label but no image member")]
    MissingImage,
    /// The image member is larger than 4 GiB.
    #[error("image member is {size} bytes, larger than 4 GiB")]
    TooLarge {
        /// The member's size.
        size: u64,
    },
    /// A second member of the same name in an encrypted shard.
    #[error("duplicate member name in an encrypted shard")]
    DuplicateMember,
    /// An encrypted shard's sealed manifest lists this member, but the shard lacks it
    /// (removed, renamed, or the shard was cut).
    #[error("listed in the shard's sealed manifest but missing from the shard")]
    MissingMember,
    /// A member of an encrypted shard that its sealed manifest does not list (added or renamed).
    #[error("not listed in the shard's sealed manifest (added or renamed member)")]
    NotInManifest,
    /// An encrypted shard's sealed manifest is missing or failed authentication, so none of
    /// its samples can be trusted (or labelled).
    #[error("{message}")]
    ManifestUnusable {
        /// What is wrong with the manifest.
        message: String,
    },
    /// The image is larger than `source.max-sample-bytes`.
    #[error("image is {size} bytes, over the limit of {limit} (source.max-sample-bytes)")]
    OverLimit {
        /// The image's size.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// An ImageFolder entry that is not a regular file (a FIFO, a device, a socket).
    #[error("not a regular file")]
    NotRegularFile,
    /// A file outside any class directory of an ImageFolder root.
    #[error("file is not inside a class directory")]
    OutsideClass,
    /// The tar walk stopped here (truncated archive or bad header): later members are lost.
    #[error("{message}")]
    Tar {
        /// The parser's error, rendered.
        message: String,
    },
}

impl From<&TarError> for IssueReason {
    fn from(e: &TarError) -> Self {
        IssueReason::Tar {
            message: e.to_string(),
        }
    }
}

/// A sampler could not be built, or was asked for a batch that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplerError {
    /// Batch size or world size is zero, or a shuffle parameter is zero.
    #[error("invalid sampler setting: {0}")]
    Invalid(String),
    /// With `drop-last`, the dataset is smaller than one global batch.
    #[error(
        "{n_samples} samples cannot fill one batch of {batch_size} on each of {world_size} ranks \
         with drop-last; lower the batch size or disable drop-last"
    )]
    TooFewSamples {
        /// Samples in the dataset.
        n_samples: u64,
        /// Per-rank batch size.
        batch_size: u32,
        /// Number of ranks.
        world_size: u32,
    },
    /// A rank at or beyond the world size.
    #[error("rank {rank} is out of range (world size {world_size})")]
    RankOutOfRange {
        /// The rank asked for.
        rank: u32,
        /// The world size.
        world_size: u32,
    },
    /// A batch index at or beyond the number of batches per epoch.
    #[error("batch {index} is out of range ({batches} batches per epoch)")]
    BatchOutOfRange {
        /// The index asked for.
        index: u64,
        /// Batches per epoch and rank.
        batches: u64,
    },
}
