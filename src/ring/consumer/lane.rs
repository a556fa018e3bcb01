//! The consumer's half of the slot protocol on its lane (§4, §6, format 2.0): take the
//! `READY` slot with the smallest `seq` that this attach has neither taken nor released, and
//! release it. Both are written into the lane page only; the ring is read-only to us.

use std::sync::atomic::fence;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::{Batch, ConsumeError, Consumer};
use crate::ring::layout::lane_page;
use crate::ring::layout::FormatError;
use crate::ring::slot::{self, Slot};

impl Consumer {
    /// Takes the lane's oldest `READY` batch not taken yet, if any.
    pub(super) fn try_take(&self) -> Result<Option<Batch<'_>>, ConsumeError> {
        let mut best: Option<(u32, u64)> = None;
        for s in 0..self.layout.slots_per_lane {
            let slot = Slot::new(&self.control, &self.layout, self.lane, s);
            // SYNC POINT with the release store of READY in Slot::publish (acquire in
            // `state`): the batch and its metadata are visible.
            match slot.state() {
                slot::READY => {
                    let seq = slot.seq();
                    let taken = self.page.taken_seq(s).load(Relaxed);
                    let released = self.page.released_seq(s).load(Relaxed);
                    if lane_page::takeable(slot::READY, seq, taken, released)
                        && best.is_none_or(|(_, b)| seq < b)
                    {
                        best = Some((s, seq));
                    }
                }
                slot::FREE | slot::WRITING => {}
                state => {
                    return Err(ConsumeError::Format {
                        name: self.name.clone(),
                        source: FormatError::SlotState {
                            lane: self.lane,
                            slot: s,
                            state,
                        },
                    })
                }
            }
        }
        let Some((s, seq)) = best else {
            return Ok(None);
        };
        self.page.taken_seq(s).store(seq, Relaxed);
        // A slot we released earlier may have been claimed and republished while we scanned
        // it: its state then read as the old READY and its seq as the new one, with the new
        // batch's metadata perhaps still being written. So look again: still READY with the
        // seq we took, or give it back and scan anew. SYNC POINT with the release fence after
        // the producer's claim (`Slot::claim_from`): having read the new seq, we see WRITING or
        // a later state; the acquire load in `state` then pairs with that publish.
        fence(Acquire);
        let slot = Slot::new(&self.control, &self.layout, self.lane, s);
        if slot.state() != slot::READY || slot.seq() != seq {
            self.page.taken_seq(s).store(0, Relaxed);
            return self.try_take();
        }
        // From here the producer leaves the slot alone until we release it.
        self.page.taken().fetch_add(1, Relaxed);
        self.touch_heartbeat();
        let meta = Slot::new(&self.control, &self.layout, self.lane, s).meta();
        if self.layout.on_demand() {
            let (pass, next) = self.pass.get();
            if meta.epoch != pass || Some(meta.index) != next {
                // An earlier pass's batch: give it back unread and look again.
                self.release(s, seq);
                return self.try_take();
            }
            let last = meta.flags & slot::FLAG_LAST_OF_EPOCH != 0;
            self.pass
                .set((pass, if last { None } else { Some(meta.index + 1) }));
        }
        self.last_taken.set(Some((
            meta.epoch,
            meta.flags & slot::FLAG_LAST_OF_EPOCH != 0,
        )));
        Ok(Some(Batch {
            consumer: self,
            slot: s,
            meta,
        }))
    }

    /// Whether slot `s` still carries our batch `seq`, taken and not released by this
    /// attach. False once the producer reclaimed the lane (it declared this consumer gone,
    /// e.g. after a long pause) and rewrote the slot.
    pub(super) fn holds(&self, s: u32, seq: u64) -> bool {
        let slot = Slot::new(&self.control, &self.layout, self.lane, s);
        lane_page::held(
            slot.state(),
            slot.seq(),
            self.page.taken_seq(s).load(Relaxed),
            self.page.released_seq(s).load(Relaxed),
        ) && slot.seq() == seq
    }

    /// Releases batch `seq` of slot `s` after our last read of it, then rings the doorbell.
    /// A consumer the producer declared gone writes into a page nobody reads any more. In a
    /// forked child it does nothing: the child's release would tell the producer that the
    /// attached process has finished reading.
    pub(super) fn release(&self, s: u32, seq: u64) {
        if std::process::id() != self.pid {
            return;
        }
        // SYNC POINT with the producer's load-acquire of released_seq in its claim (and
        // reclaim): our reads of the batch happen-before its next writes into the slot.
        self.page.released_seq(s).store(seq, Release);
        self.page.released().fetch_add(1, Relaxed);
        self.touch_heartbeat();
        // EAGAIN (a saturated counter) already wakes the producer; any other error means the
        // producer is gone, which `next` reports.
        let _ = rustix::io::write(&self.doorbell, &1u64.to_le_bytes());
    }
}
