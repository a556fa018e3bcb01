//! ringfeed: a node-local data-loading daemon that decodes and augments image batches
//! straight into a shared-memory ring, from which training processes read without copies.
//!
//! # Brief overview
//!
//! The folders follow a sample's path:
//!
//! - [`source`]: shards and folders → raw samples (tar shards with a sidecar index,
//!   ImageFolder trees) and the deterministic sampler that orders them per epoch and rank.
//! - [`decode`]: encoded bytes → pixels (libjpeg-turbo with region-of-interest and DCT-scaled
//!   decoding, PNG, WebP), with EXIF orientation and decompression-bomb limits.
//! - [`augment`]: pixels → the final tensor values (fused crop/resize/flip/normalise and the
//!   colour operations), randomness keyed by (seed, epoch, sample id).
//! - [`batch`]: the batch schema (which tensors a slot holds) derived from the configuration,
//!   the tensors named and written through typed views ([`batch::BatchTensors`]), batch
//!   mixing, and the [`batch::BatchReport`] a filled batch returns.
//! - [`ring`]: the shared-memory ring (layout, slots, waiting, handshake), its producer and
//!   its Rust consumer. The only module with `unsafe` code.
//! - [`feedback`]: what trainers report back (per-sample losses): scores, loss statistics by
//!   augmentation bucket and class, and the per-epoch selection decision.
//! - [`pipeline`]: threads and channels that connect the stages; no stage logic.
//!   [`pipeline::Pipeline::from_plan`] builds everything from a plan.
//! - [`config`]: the TOML configuration, validated once into a checked [`config::Plan`] that
//!   owns the built stages (augmenters, mixer) and typed sub-plans.
//!
//! `ringfeed serve`, `bench` and `peek` take the path an embedder takes: configuration →
//! [`config::Plan::resolve`] → [`pipeline::Pipeline::from_plan`] → batches (into a ring with
//! [`pipeline::Pipeline::serve`], or into memory with [`pipeline::Pipeline::fill_batch`]).
#![deny(missing_docs)]

pub mod augment;
pub mod batch;
pub mod config;
pub mod decode;
pub mod feedback;
pub mod pipeline;
pub mod ring;
pub mod source;
