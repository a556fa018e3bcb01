//! The live fields of a mapped control region that every role reads the same way: the
//! counters of the status line ([`RingStats`], [`LaneStats`]), `producer_state` and
//! `last_error` (§5.1, §5.3).

use std::sync::atomic::Ordering::{Acquire, Relaxed};

use super::{consumer as centry, hdr, lane as lentry, Layout, ProducerState, LAST_ERROR_BYTES};
use crate::ring::memory::Control;
use crate::ring::slot::{self, Slot};

/// Slot counts and counters of one lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Lane number.
    pub lane: u32,
    /// Slots `READY` and not held by the consumer.
    pub ready: u32,
    /// Slots `READY` and held by the consumer (taken, not yet released): the producer's
    /// copies of the attach's `taken − released` (format 2.0), at most the `READY` slots.
    pub held: u32,
    /// Slots `FREE`.
    pub free: u32,
    /// Slots being written.
    pub writing: u32,
    /// Attached consumer's pid, 0 if none.
    pub consumer_pid: u32,
    /// ns the consumer blocked waiting for a batch.
    pub consumer_wait_ns: u64,
    /// ns the producer waited for a free slot of this lane.
    pub producer_wait_ns: u64,
    /// Batches published.
    pub published: u64,
    /// Batches released.
    pub released: u64,
    /// Seeks applied.
    pub stream: u32,
}

/// Counters for the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingStats {
    /// Producer generation.
    pub generation: u64,
    /// Producer state.
    pub state: Option<ProducerState>,
    /// Samples decoded and written.
    pub samples_ok: u64,
    /// Samples skipped.
    pub samples_skipped: u64,
    /// Total ns the producer waited for free slots.
    pub producer_wait_ns: u64,
    /// Batches published, all lanes.
    pub batches_published: u64,
    /// Per-lane figures.
    pub lanes: Vec<LaneStats>,
}

/// The header's `producer_state` (acquire: every publish before a `FINISHED` store is
/// visible once it is seen); `None` for an unknown code.
pub(crate) fn read_state(c: &Control) -> Option<ProducerState> {
    ProducerState::from_code(c.u32(hdr::PRODUCER_STATE as u64).load(Acquire))
}

/// The header's `last_error`: the bytes up to the first NUL, as UTF-8 (lossy).
pub(crate) fn decode_last_error(c: &Control) -> String {
    let raw = c.load_bytes(hdr::LAST_ERROR as u64, LAST_ERROR_BYTES);
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// `msg` as the `last_error` field: truncated to 255 bytes at a character boundary and
/// NUL-padded.
pub(crate) fn encode_last_error(msg: &str) -> [u8; LAST_ERROR_BYTES] {
    let mut end = msg.len().min(LAST_ERROR_BYTES - 1);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = [0u8; LAST_ERROR_BYTES];
    buf[..end].copy_from_slice(&msg.as_bytes()[..end]);
    buf
}

/// The counters of the status line, read from a control region (the producer's own mapping
/// or an observer's read-only one).
pub(crate) fn read_stats(c: &Control, layout: &Layout) -> RingStats {
    let lanes = (0..layout.lane_count)
        .map(|l| {
            let mut st = LaneStats {
                lane: l,
                ..LaneStats::default()
            };
            for s in 0..layout.slots_per_lane {
                match Slot::new(c, layout, l, s).state() {
                    slot::FREE => st.free += 1,
                    slot::WRITING => st.writing += 1,
                    _ => st.ready += 1,
                }
            }
            let e = layout.lane_entry(l);
            st.consumer_pid = c.u32(e + lentry::CONSUMER_PID).load(Relaxed);
            if st.consumer_pid != 0 {
                // Held = taken − released by the current attach, as the producer copied them
                // from its lane page (statistics a heartbeat behind).
                let ce = layout.consumer_entry(l);
                let taken = c.u64(ce + centry::TAKEN).load(Relaxed);
                let released = c.u64(ce + centry::RELEASED).load(Relaxed);
                let held = taken.saturating_sub(released).min(u64::from(st.ready)) as u32;
                st.held = held;
                st.ready -= held;
            }
            st.consumer_wait_ns = c.u64(e + lentry::CONSUMER_WAIT_NS).load(Relaxed);
            st.producer_wait_ns = c.u64(e + lentry::PRODUCER_WAIT_NS).load(Relaxed);
            st.published = c.u64(e + lentry::PUBLISHED).load(Relaxed);
            st.released = c.u64(e + lentry::RELEASED).load(Relaxed);
            st.stream = c.u32(e + lentry::STREAM).load(Relaxed);
            st
        })
        .collect();
    RingStats {
        generation: layout.generation,
        state: read_state(c),
        samples_ok: c.u64(hdr::SAMPLES_OK as u64).load(Relaxed),
        samples_skipped: c.u64(hdr::SAMPLES_SKIPPED as u64).load(Relaxed),
        producer_wait_ns: c.u64(hdr::PRODUCER_WAIT_NS as u64).load(Relaxed),
        batches_published: c.u64(hdr::BATCHES_PUBLISHED as u64).load(Relaxed),
        lanes,
    }
}
