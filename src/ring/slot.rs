//! The slot state machine (docs/ring-format.md §6): `FREE → WRITING → READY → HELD → FREE`,
//! plus the producer's reclaim (`HELD → READY`, consumer died) and discard (`READY → FREE`,
//! seek). Each transition is one function here, with its ordering and its partner named.

use std::sync::atomic::fence;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use super::layout::{slot as off, Layout};
use super::memory::Control;

/// Slot is free for the producer.
pub(crate) const FREE: u32 = 0;
/// The producer is writing the slot.
pub(crate) const WRITING: u32 = 1;
/// The slot holds a published batch.
pub(crate) const READY: u32 = 2;
/// A consumer holds the slot.
pub(crate) const HELD: u32 = 3;

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

    /// Producer: `FREE → WRITING`. A compare-exchange because several producer threads may
    /// race for the same free slot; consumers never write a `FREE` slot.
    pub(crate) fn claim(&self) -> bool {
        // SYNC POINT with the release store of FREE in `release_if_ours` / `abandon` /
        // `discard` (acquire), and with the producer heartbeat's acquire load in `state`
        // (release: the producer's mark of the slot as its own, stored before, is seen with
        // WRITING).
        let claimed = self
            .c
            .u32(self.base + off::STATE)
            .compare_exchange(FREE, WRITING, AcqRel, Relaxed)
            .is_ok();
        if claimed {
            // The seqlock's write side: WRITING is ordered before every write into the slot,
            // so an observer whose copy saw one of them sees the state change on its re-check
            // (partner: the acquire fence in `Observer::try_peek`).
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

    /// The metadata; meaningful after `state()` returned `READY` or `HELD` to this thread.
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

    /// Consumer: `READY → HELD` (the only writer of a READY slot while a consumer is attached
    /// to the lane), recording the holder and its `token` (one per attach, never 0), which a
    /// later [`release_if_ours`](Slot::release_if_ours) compares.
    pub(crate) fn take(&self, pid: u32, token: u64) {
        self.c.u32(self.base + off::HOLDER_PID).store(pid, Relaxed);
        self.c
            .u64(self.base + off::HOLDER_TOKEN)
            .store(token, Relaxed);
        self.c.u32(self.base + off::STATE).store(HELD, Release);
    }

    /// Whether the slot is `HELD` with `token` and still carries the batch `seq`: the proof
    /// of ownership a release needs. A slot reclaimed from a connection the producer declared
    /// dead is `READY`, or `HELD` by a later attach with another token.
    pub(crate) fn held_by(&self, token: u64, seq: u64) -> bool {
        self.state() == HELD
            && self.c.u64(self.base + off::HOLDER_TOKEN).load(Relaxed) == token
            && self.seq() == seq
    }

    /// Consumer: `HELD → FREE` after its last read of the payload, if the slot is still
    /// ours ([`held_by`](Slot::held_by)); returns whether it released.
    pub(crate) fn release_if_ours(&self, token: u64, seq: u64) -> bool {
        if !self.held_by(token, seq) {
            return false;
        }
        self.c.u64(self.base + off::HOLDER_TOKEN).store(0, Relaxed);
        self.c.u32(self.base + off::HOLDER_PID).store(0, Relaxed);
        // SYNC POINT with the acquire compare-exchange in `claim`: our reads of the payload
        // happen-before the producer's next writes into it.
        self.c.u32(self.base + off::STATE).store(FREE, Release);
        true
    }

    /// Producer, after the holder died: `HELD → READY` with the redelivered flag. Returns
    /// whether the slot was held.
    pub(crate) fn reclaim(&self) -> bool {
        if self.state() != HELD {
            return false;
        }
        self.c
            .u32(self.base + off::FLAGS)
            .fetch_or(FLAG_REDELIVERED, Relaxed);
        self.c.u32(self.base + off::HOLDER_PID).store(0, Relaxed);
        // SYNC POINT with the consumer's acquire load in `state` (the flag is visible).
        self.c.u32(self.base + off::STATE).store(READY, Release);
        true
    }

    /// Producer, on a seek while no consumer is attached: `READY → FREE`.
    pub(crate) fn discard(&self) -> bool {
        if self.state() != READY {
            return false;
        }
        self.c.u32(self.base + off::STATE).store(FREE, Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::layout::{encode_control, plan, DType, RingSpec, TensorSpec};
    use crate::ring::memory::create_memfd;

    fn control() -> (Layout, Control) {
        let spec = RingSpec {
            name: "t".into(),
            lanes: 1,
            slots_per_lane: 2,
            batch_size: 1,
            tensors: vec![TensorSpec {
                name: "x".into(),
                dtype: DType::U8,
                shape: vec![1],
            }],
            drop_last: false,
            nhwc: false,
            selection: false,
            on_demand: false,
            batches_per_epoch: 0,
            epochs: 0,
            seed: 0,
            samples_per_epoch: 0,
            world_size: 0,
            first_rank: 0,
            epoch_samples: 0,
            mean: [0.0; 4],
            std: [0.0; 4],
        };
        let layout = plan(&spec, 1).unwrap();
        let file = create_memfd("slot-test", layout.file_bytes).unwrap();
        let c = Control::map(&file, layout.data_offset).unwrap();
        c.store_bytes(0, &encode_control(&layout, 1, 1));
        (layout, c)
    }

    /// Walks every transition, including the crash paths, and checks that each one refuses
    /// to fire from the wrong state.
    #[test]
    fn transitions_follow_the_state_machine() {
        let (layout, c) = control();
        let s = Slot::new(&c, &layout, 0, 1);
        assert_eq!(s.state(), FREE);
        assert!(!s.reclaim() && !s.discard());
        assert!(s.claim());
        assert!(!s.claim(), "a WRITING slot cannot be claimed twice");
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
        assert!(!s.claim(), "the producer never claims a READY slot");
        s.take(77, 7);
        assert_eq!(s.state(), HELD);
        assert!(s.held_by(7, 1) && !s.held_by(8, 1) && !s.held_by(7, 2));
        assert!(
            !s.claim() && !s.discard(),
            "a HELD slot is neither claimed nor discarded"
        );
        assert!(s.reclaim());
        assert_eq!(s.state(), READY);
        assert_eq!(s.meta().flags, FLAG_LAST_OF_EPOCH | FLAG_REDELIVERED);
        assert!(
            !s.release_if_ours(7, 1),
            "a reclaimed (READY) slot is not released"
        );
        s.take(78, 8);
        assert!(
            !s.release_if_ours(7, 1),
            "the old holder's release leaves the new holder's slot alone"
        );
        assert_eq!(s.state(), HELD);
        assert!(s.release_if_ours(8, 1));
        assert_eq!(s.state(), FREE);
        assert!(s.claim());
        s.abandon();
        assert!(s.claim());
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
                                .filter(|&i| Slot::new(&c, &layout, 0, i).claim())
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
