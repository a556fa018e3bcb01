//! The shared-memory ring: the producer writes whole batches into slots of a sealed memfd,
//! consumers read them in place and release them. `docs/ring-format.md` is the contract
//! (format 2.0: every byte of the ring is the producer's; consumers map it read-only and write
//! only their own lane page).
//!
//! # Brief overview
//!
//! The wire format has one owner, [`layout`], which every role depends on and which depends
//! on none of them. The roles (the producer with its attach service and heartbeat, the
//! [`Consumer`], the [`Observer`]) import the format and the shared helpers below, never one
//! another.
//!
//! - [`layout`] (the format): constants, offsets, state codes ([`ProducerState`]), [`plan`]
//!   lays out a [`RingSpec`], [`validate_header`] checks a header against a file size (pure,
//!   safe, fuzzed by the tests), the readers of the live counters ([`RingStats`]) and of
//!   `last_error`, and the `Io { name, what, source }` error shape the roles share.
//! - `protocol`: the JSON attach request/reply, fd passing (a 2.0 attach reply carries three
//!   descriptors: the ring read-only, the lane page, the doorbell), `SO_PEERCRED` checks (both
//!   sides).
//! - `memory`: the memfd and its mappings, its seals (`F_SEAL_FUTURE_WRITE` once the
//!   producer's own mappings exist), the read-only reopen consumers receive and the lane page
//!   memfds; the only place turning addresses into references (and bytes into typed tensor
//!   views).
//! - `page`: a mapped lane page (format 2.0), one per attach: the consumer's counters and, per
//!   slot, the `seq` it took and released last — the only memory a consumer writes. The
//!   producer reads it only to free that lane's released slots (`layout::lane_page` has the
//!   rules) and copies its counters into the ring's tables for `ringfeed stat`.
//! - `segment`: where the memory lives: the sealed memfd, or a named file in a `--shm-dir`,
//!   both reserved in full at creation; stale named files are detected and replaced.
//! - `sigbus`: a named file truncated under the producer turns into zero pages and a clean
//!   stop, never a SIGBUS death.
//! - `access`: who may attach (same uid, or an allowed group).
//! - `slot`: the slot state machine (`FREE`, `WRITING`, `READY`; written by the producer only),
//!   each transition with its memory ordering and partner.
//! - `futex`: waiting on shared 32-bit words with timeouts.
//! - [`RuntimeDir`]: where sockets and lock files live, and the checks that make it safe.
//! - `producer` ([`Producer`] / [`SlotWriter`]): create the ring, claim and publish slots
//!   (waiting on the attached consumers' doorbells); its `service` room is the attach service
//!   (serves attaches with a new lane page and doorbell each, reads feedback, reclaims the
//!   lanes of dead consumers), its `heartbeat` room the heartbeat thread.
//! - `consumer` ([`Consumer`] / [`Batch`]): attach, take batches in order, release on drop
//!   (in its lane page, then a doorbell write), notice a dead producer within a second;
//!   report per-sample losses back.
//! - [`feedback`]: the frames a consumer sends on its connection (losses, end of epoch).
//! - [`Observer`]: a read-only view of a running ring for operator tools (counters, a
//!   seqlock copy of a published batch), found through the lock file and `/proc`.
//!
//! # The same rooms on both sides
//!
//! A reader of the Python client (`clients/python/src/ringfeed/`) finds the same rooms here:
//!
//! | Python | Rust |
//! |---|---|
//! | `layout.py` (constants, header parsing, state codes, the lane page) | [`layout`] (`layout/mod.rs`, `validate.rs`, `plan.rs`, `stats.rs`, `lane_page.rs`) |
//! | `protocol.py` (the handshake) | `protocol.rs`; the consumer's use of it in `consumer/attach.rs`, the producer's in `producer/service.rs` |
//! | `ring.py` (mapping, `take` / `release`) | `consumer/attach.rs` (checks and mappings), `consumer/lane.rs` (take / release), `slot.rs`, `page.rs` (the lane page), `memory.rs` |
//! | `loader.py` (waiting, liveness, epochs) | `consumer/mod.rs` |
//! | `batch.py` | `consumer/batch.rs` |
//! | `errors.py` | `consumer/error.rs` |
//! | `stats.py` (one loader's lane counters) | `layout/stats.rs` (every lane's counters, as `ringfeed stat` shows them) |
//! | `feedback.py` | [`feedback`] |
//! | `_futex.py` | `futex.rs` |
//! | `runtime.py` | `runtime_dir.rs` |
//!
//! # Where `unsafe` lives
//!
//! The crate denies `unsafe_code`; these files of the ring allow it, each block with a
//! `// SAFETY:` line: `memory.rs` (mapping the memfd, turning offsets into atomics and byte
//! slices, viewing tensor bytes as typed elements), `producer/writer.rs` and
//! `consumer/batch.rs` (slices of a slot the caller owns: `WRITING` by the writer, taken and
//! not released by the batch), `sigbus.rs` (a `SIGBUS` handler that replaces a truncated file's pages with zero
//! pages) and `protocol.rs` (`getsockopt(SO_PEERCRED)`, whose pid 0 rustix cannot represent).
//! Outside the ring, only `src/decode/turbo.rs` (the libjpeg-turbo FFI) allows it.

mod access;
mod consumer;
pub mod feedback;
mod futex;
pub mod layout;
mod memory;
mod observer;
mod page;
mod producer;
mod protocol;
pub mod resume;
mod runtime_dir;
mod segment;
mod sigbus;
mod slot;

pub use access::{resolve_group, GroupError};
pub use consumer::{
    AttachError, AttachOptions, Batch, ConsumeError, Consumer, ReportError, TensorError,
};
pub use futex::mono_ns;

/// The running producer's evaluation of reported losses (the `evaluation` request of
/// docs/ring-format.md §3): counters, per-epoch mean loss by augmentation bucket and class,
/// scores and the selection state, as JSON. The producer must run as our uid.
pub fn query_evaluation(dir: &RuntimeDir, name: &str) -> std::io::Result<serde_json::Value> {
    validate_name(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    protocol::query_evaluation(&dir.socket_path(name), None)
}
pub use layout::{
    plan, validate_header, DType, Element, FormatError, LaneStats, Layout, ProducerState, RingSpec,
    RingStats, SpecError, TensorLayout, TensorSpec,
};
pub use observer::{
    query_info, ConsumerEntry, LanePosition, ObserveError, Observer, PeekError, PeekedBatch,
    RingSnapshot,
};
pub use producer::{
    BatchMeta, Catalog, InfoExtra, Producer, ProducerOptions, RingCreateError, SeekRequest,
    SlotWriter,
};
pub use runtime_dir::{validate_name, RuntimeDir, RuntimeDirError};
pub use segment::ShmDirError;
