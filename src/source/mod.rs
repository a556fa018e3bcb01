//! The source stage: shards and folders → raw samples, and the order they are served in.
//!
//! # Brief overview
//!
//! - [`config`]: `[source]` and `[sampling]` configuration (serde data).
//! - [`spec`]: shard specs (paths, globs, brace ranges) → the sorted shard list.
//! - [`tar`]: a small, pure tar header walker (ustar, GNU long names, pax).
//! - [`index`]: the per-shard sidecar index (`<shard>.idx.json`): sample offsets and labels.
//! - [`imagefolder`]: `<root>/<class>/<file>` trees.
//! - [`dataset`]: [`Dataset`], the fixed, ordered sample list (id = position) with positioned
//!   reads of each sample's encoded bytes.
//! - [`sampler`]: [`Sampler`], the deterministic per-epoch, per-rank batch order.
//! - [`error`]: the errors of this stage and the members skipped while indexing.
//! - `file`: opening the files a dataset's author controls (no FIFO, device or planted link
//!   is ever read, and sizes are capped).

pub mod config;
pub mod dataset;
pub mod error;
mod file;
pub mod imagefolder;
pub mod index;
pub mod sampler;
pub mod spec;
pub mod tar;

pub use config::{
    ClassNames, SamplingConfig, ShuffleMode, SourceConfig, SourceKind, DEFAULT_MAX_SAMPLE_BYTES,
};
pub use dataset::Dataset;
pub use error::{IndexIssue, IssueReason, SampleReadError, SamplerError, SourceError};
pub use index::{build_index, load_or_build_index, write_index, LoadedIndex, ShardIndex};
pub use sampler::{RankFlags, RankLayout, Sampler};
pub use spec::expand_shards;
