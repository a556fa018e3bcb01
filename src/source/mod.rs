//! The source stage: shards and folders → raw samples, and the order they are served in.
//!
//! # Brief overview
//!
//! - [`config`]: `[source]` and `[sampling]` configuration (serde data).
//! - [`spec`]: shard specs (paths, globs, brace ranges) → the sorted shard list.
//! - [`tar`]: a small, pure tar header walker (ustar, GNU long names, pax).
//! - [`index`]: the per-shard sidecar index (`<shard>.idx`, binary, checksummed): sample
//!   offsets, sizes, names and labels.
//! - [`crypt`]: encrypted ("sealed") shards: key files, sealed members, opening them in place.
//! - [`imagefolder`]: `<root>/<class>/<file>` trees.
//! - [`dataset`]: [`Dataset`], the fixed, ordered sample list (id = position) with positioned
//!   reads of each sample's encoded bytes.
//! - `table`: the dataset's per-sample columns, compact (about 15 bytes a sample) so that
//!   100 million samples fit in memory.
//! - [`mixture`]: [`Mixture`], the datasets of one ring (one, or several `[[source.streams]]`)
//!   as one id space, with per-stream label rules.
//! - [`sampler`]: [`Sampler`], the deterministic per-epoch, per-rank batch order (also of a
//!   weighted mixture of streams).
//! - [`remote`]: `s3://` shards: object storage through a local shard cache, read as local
//!   tar shards.
//! - [`bundled`]: the sample dataset embedded in the binary (what `serve` runs by default).
//! - [`selection`]: `[selection]` and the InfoBatch epoch plan: which samples an epoch leaves
//!   out (from a snapshot of reported-loss scores) and the weight each kept one carries.
//! - [`error`]: the errors of this stage and the members skipped while indexing.
//! - `file`: opening the files a dataset's author controls (no FIFO, device or planted link
//!   is ever read, and sizes are capped).
#![forbid(unsafe_code)]

pub mod bundled;
pub mod config;
pub mod crypt;
pub mod dataset;
pub mod error;
mod file;
pub mod imagefolder;
pub mod index;
pub mod mixture;
pub mod remote;
pub mod sampler;
pub mod selection;
pub mod spec;
mod table;
pub mod tar;

pub use bundled::{bundled_sample_dir, BundledSampleError};
pub use config::{
    ClassNames, SamplingConfig, ShuffleMode, SourceConfig, SourceKind, StreamConfig,
    DEFAULT_MAX_SAMPLE_BYTES,
};
pub use crypt::{CryptError, KeyError, ShardKey};
pub use dataset::Dataset;
pub use error::{IndexIssue, IssueReason, SampleReadError, SamplerError, SourceError};
pub use index::{build_index, load_or_build_index, write_index, LoadedIndex, ShardIndex};
pub use mixture::{Mixture, Stream};
pub use sampler::{RankFlags, RankLayout, Sampler, StreamShare};
pub use spec::expand_shards;
