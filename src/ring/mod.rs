//! The shared-memory ring: the producer writes whole batches into slots of a sealed memfd,
//! consumers read them in place and release them. `docs/ring-format.md` is the contract.
//!
//! # Brief overview
//!
//! - [`layout`]: the binary layout; [`plan`] lays out a [`RingSpec`], [`validate_header`]
//!   checks a header against a file size (pure, safe, fuzzed by the tests).
//! - `memory`: the memfd and its mappings; the only place turning addresses into references.
//! - `segment`: where the memory lives: the sealed memfd, or a named file in a `--shm-dir`,
//!   both reserved in full at creation; stale named files are detected and replaced.
//! - `sigbus`: a named file truncated under the producer turns into zero pages and a clean
//!   stop, never a SIGBUS death.
//! - `access`: who may attach (same uid, or an allowed group).
//! - `slot`: the slot state machine, each transition with its memory ordering and partner.
//! - `futex`: waiting on shared 32-bit words with timeouts.
//! - [`RuntimeDir`]: where sockets and lock files live, and the checks that make it safe.
//! - `handshake`: the JSON attach request/reply, fd passing, `SO_PEERCRED` checks.
//! - [`Producer`] / [`SlotWriter`]: create the ring, claim and publish slots, serve attaches,
//!   reclaim the slots of dead consumers.
//! - [`Consumer`] / [`Batch`]: attach, take batches in order, release on drop, notice a dead
//!   producer within a second; report per-sample losses back.
//! - [`feedback`]: the frames a consumer sends on its connection (losses, end of epoch).
//! - [`Observer`]: a read-only view of a running ring for operator tools (counters, a
//!   seqlock copy of a published batch), found through the lock file and `/proc`.

mod access;
mod consumer;
pub mod feedback;
mod futex;
mod handshake;
pub mod layout;
mod memory;
mod observer;
mod producer;
pub mod resume;
mod runtime_dir;
mod segment;
mod sigbus;
mod slot;

pub use access::{resolve_group, GroupError};
pub use consumer::{
    AttachError, AttachOptions, Batch, ConsumeError, Consumer, Element, ReportError, TensorError,
};
pub use futex::mono_ns;

/// The running producer's evaluation of reported losses (the `evaluation` request of
/// docs/ring-format.md §3): counters, per-epoch mean loss by augmentation bucket and class,
/// scores and the selection state, as JSON. The producer must run as our uid.
pub fn query_evaluation(dir: &RuntimeDir, name: &str) -> std::io::Result<serde_json::Value> {
    validate_name(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    handshake::query_evaluation(&dir.socket_path(name), None)
}
pub use layout::{
    plan, validate_header, DType, FormatError, Layout, RingSpec, SpecError, TensorLayout,
    TensorSpec,
};
pub use observer::{
    query_info, ConsumerEntry, LanePosition, ObserveError, Observer, PeekError, PeekedBatch,
    RingSnapshot,
};
pub use producer::{
    BatchMeta, Catalog, InfoExtra, LaneStats, Producer, ProducerOptions, ProducerState,
    RingCreateError, RingStats, SeekRequest, SlotWriter,
};
pub use runtime_dir::{validate_name, RuntimeDir, RuntimeDirError};
pub use segment::ShmDirError;
