//! The slot state machine (docs/ring-format.md §6, format 2.0): `FREE → WRITING → READY →
//! (released in the lane page) → WRITING …`, plus the producer's reclaim (consumer gone:
//! released slots `READY → FREE`, taken ones flagged redelivered) and discard (`READY → FREE`,
//! seek). The state word is written by the producer only; a consumer's take and release live
//! in its lane page (`layout::lane_page`). Each transition is one function here, with its
//! ordering and its partner named.

use std::sync::atomic::fence;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use super::layout::lane_page::state as st;
use super::layout::{slot as off, Layout};
use super::memory::Control;

/// Slot is free for the producer.
pub(crate) const FREE: u32 = st::FREE;
/// The producer is writing the slot.
pub(crate) const WRITING: u32 = st::WRITING;
/// The slot holds a published batch (taken or not: the lane page says).
pub(crate) const READY: u32 = st::READY;

/// Slot flag bit 0: the last batch of its epoch for this lane.
pub(crate) const FLAG_LAST_OF_EPOCH: u32 = 1;
/// Slot flag bit 1: redelivered after a consumer died holding it.
pub(crate) const FLAG_REDELIVERED: u32 = 2;

/// The metadata a slot carries with a published batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotMeta {
    pub(crate) seq: u64,
    pub(crate) epoch: u64,
    pub(crate) index: u64,
    pub(crate) count: u32,
    pub(crate) flags: u32,
    pub(crate) published_mono_ns: u64,
}

/// One slot table entry.
#[derive(Clone, Copy)]
pub(crate) struct Slot<'a> {
    c: &'a Control,
    base: u64,
}

impl<'a> Slot<'a> {
    pub(crate) fn new(c: &'a Control, layout: &Layout, lane: u32, slot: u32) -> Slot<'a> {
        Slot {
            c,
            base: layout.slot_entry(lane, slot),
        }
    }

    /// The state word, load-acquire: a `READY` seen here makes the payload and metadata
    /// visible (partner: the release store in [`Slot::publish`]); a `FREE` seen here makes the
    /// consumer's last reads happen-before our writes (partner: [`Slot::release`]).
    pub(crate) fn state(&self) -> u32 {
        self.c.u32(self.base + off::STATE).load(Acquire)
    }

    /// Producer: `from → WRITING` (`from` is `FREE`, or `READY` for a batch the lane's
    /// consumer released). A compare-exchange because several producer threads may race for
    /// the same slot (the producer's per-slot marks serialise them; see `producer::state`).
    pub(crate) fn claim_from(&self, from: u32) -> bool {
        // SYNC POINT with the release store of FREE in `abandon` / `discard` / `free`
        // (acquire). A READY slot's consumer reads are ordered by the lane page's
        // released_seq (load-acquire by the caller).
        let claimed = self
            .c
            .u32(self.base + off::STATE)
            .compare_exchange(from, WRITING, AcqRel, Relaxed)
            .is_ok();
        if claimed {
            // The seqlock's write side: WRITING is ordered before every write into the slot,
            // so an observer whose copy saw one of them sees the state change on its re-check
            // (partners: the acquire fences in `Observer::try_peek` and in the consumer's
            // re-check of a slot it took, `Consumer::try_take`).
            fence(Release);
        }
        claimed
    }

    /// Producer: `WRITING → FREE` without publishing.
    pub(crate) fn abandon(&self) {
        self.c.u32(self.base + off::STATE).store(FREE, Release);
    }

    /// Producer: writes the metadata, then `WRITING → READY` with release ordering.
    pub(crate) fn publish(&self, m: &SlotMeta) {
        self.c.u64(self.base + off::SEQ).store(m.seq, Relaxed);
        self.c.u64(self.base + off::EPOCH).store(m.epoch, Relaxed);
        self.c.u64(self.base + off::INDEX).store(m.index, Relaxed);
        self.c.u32(self.base + off::COUNT).store(m.count, Relaxed);
        self.c.u32(self.base + off::FLAGS).store(m.flags, Relaxed);
        self.c
            .u64(self.base + off::PUBLISHED_MONO_NS)
            .store(m.published_mono_ns, Relaxed);
        // SYNC POINT with the acquire load in `state` by the consumer's scan: payload and the
        // fields above happen-before a consumer seeing READY.
        self.c.u32(self.base + off::STATE).store(READY, Release);
    }

    /// The metadata; meaningful after `state()` returned `READY` to this thread.
    pub(crate) fn meta(&self) -> SlotMeta {
        SlotMeta {
            seq: self.c.u64(self.base + off::SEQ).load(Relaxed),
            epoch: self.c.u64(self.base + off::EPOCH).load(Relaxed),
            index: self.c.u64(self.base + off::INDEX).load(Relaxed),
            count: self.c.u32(self.base + off::COUNT).load(Relaxed),
            flags: self.c.u32(self.base + off::FLAGS).load(Relaxed),
            published_mono_ns: self.c.u64(self.base + off::PUBLISHED_MONO_NS).load(Relaxed),
        }
    }

    /// The `seq` field alone (to pick the oldest ready slot).
    pub(crate) fn seq(&self) -> u64 {
        self.c.u64(self.base + off::SEQ).load(Relaxed)
    }

    /// Producer, after the lane's consumer died holding the batch: sets the redelivered flag;
    /// the slot stays `READY` for the next attach.
    pub(crate) fn mark_redelivered(&self) {
        // SYNC POINT with the consumer's acquire load in `state` (via the publish_seq bump
        // that follows a reclaim): the flag is visible with the slot.
        self.c
            .u32(self.base + off::FLAGS)
            .fetch_or(FLAG_REDELIVERED, Release);
    }

    /// Producer, on a seek while no consumer is attached, or at reclaim for a batch the dead
    /// consumer had released: `READY → FREE`.
    pub(crate) fn discard(&self) -> bool {
        // SYNC POINT with the acquire compare-exchange in `claim_from`.
        self.c
            .u32(self.base + off::STATE)
            .compare_exchange(READY, FREE, Release, Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::layout::{encode_control, plan, DType, RingSpec, TensorSpec};
    use crate::ring::memory::create_memfd;

    fn control() -> (Layout, Control) {
        let spec = RingSpec::new(
            "t",
            1,
            2,
            1,
            vec![TensorSpec {
                name: "x".into(),
                dtype: DType::U8,
                shape: vec![1],
            }],
        );
        let layout = plan(&spec, 1).unwrap();
        let file = create_memfd("slot-test", layout.file_bytes).unwrap();
        let c = Control::map(&file, layout.data_offset).unwrap();
        c.store_bytes(0, &encode_control(&layout, 1, 1));
        (layout, c)
    }

    /// Walks every transition and checks that each one refuses to fire from the wrong state.
    #[test]
    fn transitions_follow_the_state_machine() {
        let (layout, c) = control();
        let s = Slot::new(&c, &layout, 0, 1);
        assert_eq!(s.state(), FREE);
        assert!(!s.discard() && !s.claim_from(READY));
        assert!(s.claim_from(FREE));
        assert!(
            !s.claim_from(FREE),
            "a WRITING slot cannot be claimed twice"
        );
        assert!(!s.discard(), "a WRITING slot is not discarded");
        let meta = SlotMeta {
            seq: 1,
            epoch: 2,
            index: 3,
            count: 4,
            flags: FLAG_LAST_OF_EPOCH,
            published_mono_ns: 5,
        };
        s.publish(&meta);
        assert_eq!((s.state(), s.meta()), (READY, meta));
        assert!(
            !s.claim_from(FREE),
            "claiming a READY slot needs the lane page's release"
        );
        s.mark_redelivered();
        assert_eq!(s.state(), READY);
        assert_eq!(s.meta().flags, FLAG_LAST_OF_EPOCH | FLAG_REDELIVERED);
        assert!(s.claim_from(READY), "a released READY slot is claimed");
        assert_eq!(s.state(), WRITING);
        s.abandon();
        assert!(s.claim_from(FREE));
        s.publish(&meta);
        assert!(s.discard());
        assert_eq!(s.state(), FREE);
        assert_eq!(
            Slot::new(&c, &layout, 0, 0).state(),
            FREE,
            "neighbour untouched"
        );
    }

    /// Two producer threads race to claim the same free slots: each slot is won exactly once.
    #[test]
    fn concurrent_claims_are_exclusive() {
        let (layout, c) = control();
        for _ in 0..200 {
            let wins: usize = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..2)
                    .map(|_| {
                        sc.spawn(|| {
                            (0..2)
                                .filter(|&i| Slot::new(&c, &layout, 0, i).claim_from(FREE))
                                .count()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(wins, 2);
            for i in 0..2 {
                Slot::new(&c, &layout, 0, i).abandon();
            }
        }
    }
}
