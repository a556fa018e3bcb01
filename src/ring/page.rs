//! A mapped lane page (format 2.0): the one piece of shared memory a consumer writes — its
//! counters and, per slot, the `seq` it took and released last. Its layout is
//! [`layout::lane_page`](super::layout::lane_page)'s; this is the live view both sides use:
//! the consumer maps it read-write and writes it, the producer maps it and only reads it.
//!
//! Every accessor goes through [`Control`]'s checked atomics: a slot number beyond the page is
//! a panic (a bug), never a stray access; values read from the page are only ever compared
//! with the producer's own `seq`, never used as an index.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicU64;

use super::layout::lane_page::{lane_page_bytes, page};
use super::memory::Control;

/// One attach's lane page, mapped read-write and shared.
pub(crate) struct LanePage {
    map: Control,
    slots: u32,
}

impl LanePage {
    /// Maps the lane page `file` of a lane with `slots` slots (its size is checked by the
    /// caller: [`layout::lane_page::validate_lane_page`](super::layout::lane_page::validate_lane_page)
    /// on the consumer's side; the producer made it).
    pub(crate) fn map(file: &File, slots: u32) -> io::Result<LanePage> {
        Ok(LanePage {
            map: Control::map(file, lane_page_bytes(slots))?,
            slots,
        })
    }

    fn slot_entry(&self, s: u32) -> u64 {
        assert!(
            s < self.slots,
            "slot {s} beyond the lane page's {}",
            self.slots
        );
        page::slot(s)
    }

    /// Slot `s`'s `taken_seq`: the `seq` of the batch the consumer took last from it.
    pub(crate) fn taken_seq(&self, s: u32) -> &AtomicU64 {
        self.map.u64(self.slot_entry(s))
    }

    /// Slot `s`'s `released_seq`: the `seq` of the batch the consumer released last from it
    /// (stored with release ordering after the consumer's last read of the batch).
    pub(crate) fn released_seq(&self, s: u32) -> &AtomicU64 {
        self.map.u64(self.slot_entry(s) + page::RELEASED_SEQ)
    }

    /// Batches released since this attach.
    pub(crate) fn released(&self) -> &AtomicU64 {
        self.map.u64(page::RELEASED)
    }

    /// Batches taken since this attach.
    pub(crate) fn taken(&self) -> &AtomicU64 {
        self.map.u64(page::TAKEN)
    }

    /// ns the consumer blocked waiting for a batch since this attach.
    pub(crate) fn consumer_wait_ns(&self) -> &AtomicU64 {
        self.map.u64(page::CONSUMER_WAIT_NS)
    }

    /// `CLOCK_MONOTONIC` of the consumer's last `next` / release.
    pub(crate) fn heartbeat_mono_ns(&self) -> &AtomicU64 {
        self.map.u64(page::HEARTBEAT_MONO_NS)
    }
}
