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
//! The crate denies `unsafe_code`; six files allow it, each for one reason, each block with a
//! `// SAFETY:` line (clippy's `undocumented_unsafe_blocks` is denied too): in [`ring`], `memory.rs` (mapping the shared memory and viewing it as
//! atomics, bytes and typed tensors), `sigbus.rs` (the `SIGBUS` guard of `--shm-dir` files),
//! `protocol.rs` (`getsockopt(SO_PEERCRED)`), `producer/writer.rs` and `consumer/batch.rs`
//! (slices of a slot the caller owns under the slot protocol); and `decode/turbo.rs` (the
//! libjpeg-turbo FFI). [`source`], [`augment`], [`batch`], [`feedback`], [`pipeline`],
//! [`config`] and the binary (`main.rs`, `cli`) go further and forbid it, so no `allow` can
//! bring it back there.
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod augment;
pub mod batch;
pub mod config;
pub mod decode;
pub mod feedback;
pub mod pipeline;
pub mod ring;
pub mod source;
