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
//! - [`batch`]: the batch schema (which tensors a slot holds) derived from the configuration.
//! - [`ring`]: the shared-memory ring (layout, slots, waiting, handshake), its producer and
//!   its Rust consumer.
//! - [`feedback`]: what trainers report back (per-sample losses): scores, loss statistics by
//!   augmentation bucket and class, and the per-epoch selection decision.
//! - [`pipeline`]: threads and channels that connect the stages; no stage logic.
//! - [`config`]: the TOML configuration, validated once into a checked [`config::Plan`].
//!
//! # Where `unsafe` lives
//!
//! Only in [`ring`] (mapping the shared memory and viewing it as atomics, bytes and typed
//! tensors, a `SIGBUS` guard for `--shm-dir` files, `getsockopt(SO_PEERCRED)`; see its module
//! doc) and in `decode/turbo.rs` (the libjpeg-turbo FFI), each block with a `// SAFETY:` line.
//! [`decode`] denies `unsafe_code` outside that file; [`source`], [`augment`], [`batch`],
//! [`feedback`], [`pipeline`], [`config`] and the binary's `cli` forbid it.
#![deny(missing_docs)]

pub mod augment;
pub mod batch;
pub mod config;
pub mod decode;
pub mod feedback;
pub mod pipeline;
pub mod ring;
pub mod source;
