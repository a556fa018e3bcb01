//! One claimed slot being filled by the pipeline, then published to its lane's consumer.
//!
//! The crate denies `unsafe_code`; this file allows it to hand out the claimed slot's bytes
//! (`memory::Data::bytes_mut`), which only the `WRITING` owner may do.
#![allow(unsafe_code)]

use std::sync::atomic::Ordering::{Relaxed, Release};

use super::state::{lock, Shared};
use crate::ring::futex::{self, mono_ns};
use crate::ring::layout::{hdr, lane as lentry};
use crate::ring::slot::{self, SlotMeta};

/// What a batch's slot records besides its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    /// Epoch of the batch.
    pub epoch: u64,
    /// Batch index within the epoch for this lane.
    pub index: u64,
    /// Samples in the batch.
    pub count: u32,
    /// Whether this is the lane's last batch of the epoch.
    pub last_of_epoch: bool,
}

/// A slot of one lane, claimed as `WRITING` (and marked as this writer's, see
/// `state::Shared::writing`). Publish it, or drop it to return it to `FREE`.
pub struct SlotWriter<'a> {
    shared: &'a Shared,
    lane: u32,
    pub(super) slot: u32,
    done: bool,
}

impl<'a> SlotWriter<'a> {
    /// The writer of `(lane, slot)`, which the caller has just claimed (`WRITING`).
    pub(super) fn new(shared: &'a Shared, lane: u32, slot: u32) -> SlotWriter<'a> {
        SlotWriter {
            shared,
            lane,
            slot,
            done: false,
        }
    }

    /// The slot's lane.
    pub fn lane(&self) -> u32 {
        self.lane
    }

    /// Tensor `index`'s bytes in the slot (zero copy).
    ///
    /// # Panics
    /// If `index` is not below the schema's tensor count.
    pub fn tensor_bytes_mut(&mut self, index: usize) -> &mut [u8] {
        let t = &self.shared.layout.tensors[index];
        let off = self.shared.layout.slot_data(self.lane, self.slot) + t.offset;
        // SAFETY: the slot is WRITING and owned by this writer; `&mut self` keeps any other
        // slice of it from this writer alive at the same time.
        unsafe { self.shared.data.bytes_mut(off, t.bytes) }
    }

    /// Every tensor's bytes at once (disjoint: the layout never overlaps tensors).
    pub fn tensors_mut(&mut self) -> Vec<&mut [u8]> {
        let base = self.shared.layout.slot_data(self.lane, self.slot);
        self.shared
            .layout
            .tensors
            .iter()
            // SAFETY: the slot is WRITING and owned by this writer; the tensors' byte ranges
            // are pairwise disjoint (checked by `plan`), so the slices do not alias, and
            // `&mut self` is borrowed for as long as they live.
            .map(|t| unsafe { self.shared.data.bytes_mut(base + t.offset, t.bytes) })
            .collect()
    }

    /// Publishes the batch: metadata, `READY` (release), then the lane counters and a wake-up
    /// of the lane's consumer.
    pub fn publish(mut self, meta: BatchMeta) {
        let sh = self.shared;
        let lane = self.lane;
        let mut next_seq = lock(&sh.publish_locks[lane as usize]);
        let seq = *next_seq;
        sh.slot(lane, self.slot).publish(&SlotMeta {
            seq,
            epoch: meta.epoch,
            index: meta.index,
            count: meta.count,
            flags: if meta.last_of_epoch {
                slot::FLAG_LAST_OF_EPOCH
            } else {
                0
            },
            published_mono_ns: mono_ns(),
        });
        self.done = true;
        // SYNC POINT with the acquire compare-exchange of the mark by the slot's next owner.
        sh.writing_mark(lane, self.slot).store(false, Release);
        *next_seq = seq + 1;
        sh.lane_u64(lane, lentry::NEXT_SEQ).store(seq + 1, Relaxed);
        sh.lane_u64(lane, lentry::PUBLISHED).fetch_add(1, Relaxed);
        sh.lane_u64(lane, lentry::EPOCH).store(meta.epoch, Relaxed);
        sh.lane_u64(lane, lentry::INDEX).store(meta.index, Relaxed);
        sh.hdr_u64(hdr::BATCHES_PUBLISHED).fetch_add(1, Relaxed);
        // SYNC POINT with the consumer's acquire load of publish_seq before its scan.
        futex::bump_and_wake(sh.lane_u32(lane, lentry::PUBLISH_SEQ));
    }
}

/// The slot's tensors by name, as the batch side writes them ([`crate::batch::BatchTensors`]):
/// a tensor is found by its name in the ring's tensor table, never by its position. No
/// `unsafe` here: both go through the checked accessors above.
impl SlotWriter<'_> {
    /// Tensor `t`'s bytes in the slot (zero copy); `None` when this ring's batches do not
    /// carry it.
    pub fn tensor_mut(&mut self, t: crate::batch::TensorIndex) -> Option<&mut [u8]> {
        let at = self.shared.layout.tensor_index(t.name())?;
        Some(self.tensor_bytes_mut(at))
    }

    /// Every tensor of the slot at once, by name, with typed row writers.
    pub fn batch_tensors(&mut self) -> crate::batch::BatchTensors<'_> {
        let shared = self.shared;
        let names = shared.layout.tensors.iter().map(|t| t.name.as_str());
        crate::batch::BatchTensors::from_named(names.zip(self.tensors_mut()))
    }
}

impl Drop for SlotWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.slot(self.lane, self.slot).abandon();
            self.shared
                .writing_mark(self.lane, self.slot)
                .store(false, Release);
        }
    }
}
