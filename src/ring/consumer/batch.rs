//! A batch held by the consumer: metadata and tensors viewed in place in the shared memory.
//!
//! The crate denies `unsafe_code`; this file allows it to view a held slot's bytes
//! (`memory::Data::bytes`), which only the slot's holder (taken, not yet released in its lane
//! page) may do.
#![allow(unsafe_code)]

use super::{Consumer, TensorError};
use crate::ring::layout::Element;
use crate::ring::memory;
use crate::ring::slot;

/// A batch held by the consumer: its tensors are views into the shared memory (no copy).
/// Dropping it releases the slot to the producer.
pub struct Batch<'a> {
    pub(super) consumer: &'a Consumer,
    pub(super) slot: u32,
    pub(super) meta: slot::SlotMeta,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("slot", &self.slot)
            .field("meta", &self.meta)
            .finish()
    }
}

impl Batch<'_> {
    /// Lane-local sequence number (strictly increasing in publish order).
    pub fn seq(&self) -> u64 {
        self.meta.seq
    }
    /// Epoch.
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }
    /// Batch index within the epoch for this lane.
    pub fn index(&self) -> u64 {
        self.meta.index
    }
    /// Samples in the batch.
    pub fn count(&self) -> u32 {
        self.meta.count
    }
    /// Whether the slot still holds this batch for this consumer. False once the producer
    /// has taken the slot back (it declared this consumer gone, e.g. after a long pause, and
    /// a new attach followed): the bytes may then belong to another batch.
    pub fn still_held(&self) -> bool {
        self.consumer.holds(self.slot, self.meta.seq)
    }
    /// Whether this batch was delivered before to a consumer that died holding it.
    pub fn redelivered(&self) -> bool {
        self.meta.flags & slot::FLAG_REDELIVERED != 0
    }
    /// Whether this is the lane's last batch of its epoch.
    pub fn last_of_epoch(&self) -> bool {
        self.meta.flags & slot::FLAG_LAST_OF_EPOCH != 0
    }
    /// `CLOCK_MONOTONIC` ns at publish (see [`mono_ns`](crate::ring::mono_ns)).
    pub fn published_mono_ns(&self) -> u64 {
        self.meta.published_mono_ns
    }

    /// The `valid` tensor (1.3): 1 for a sample's first occurrence in the epoch, 0 for a
    /// padding row; `None` from a producer before 1.3.
    pub fn valid(&self) -> Option<&[u8]> {
        self.tensor::<u8>("valid").ok()
    }

    /// Rows that are not padding: the number of 1s in `valid`, or [`count`](Self::count)
    /// when the producer writes no `valid` tensor.
    pub fn valid_count(&self) -> u32 {
        match self.valid() {
            Some(v) => v.iter().filter(|&&f| f != 0).count() as u32,
            None => self.count(),
        }
    }

    /// Tensor `index`'s bytes, in place.
    ///
    /// # Panics
    /// If `index` is not below the schema's tensor count.
    pub fn tensor_bytes(&self, index: usize) -> &[u8] {
        let c = self.consumer;
        let t = &c.layout.tensors[index];
        let off = c.layout.slot_data(c.lane, self.slot) + t.offset;
        // SAFETY: we hold this slot (taken in our lane page, not released); the producer
        // never writes a READY slot before its lane page says released, and the slice cannot
        // outlive the batch (whose drop releases the slot).
        unsafe { c.data.bytes(off, t.bytes) }
    }

    /// Tensor `name` as a typed slice (C order, shape in [`Layout::tensors`](crate::ring::Layout::tensors)), in place.
    pub fn tensor<T: Element>(&self, name: &str) -> Result<&[T], TensorError> {
        let c = self.consumer;
        let i = c
            .layout
            .tensor_index(name)
            .ok_or_else(|| TensorError::NoSuchTensor {
                name: name.to_owned(),
            })?;
        let t = &c.layout.tensors[i];
        if t.dtype != T::DTYPE {
            return Err(TensorError::DTypeMismatch {
                name: name.to_owned(),
                stored: t.dtype,
                requested: T::DTYPE,
            });
        }
        Ok(memory::elements(self.tensor_bytes(i)))
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.consumer.release(self.slot, self.meta.seq);
    }
}
