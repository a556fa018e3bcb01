//! The consumer's half of the slot protocol on its lane (§4, §6): take the `READY` slot with
//! the smallest `seq`, release it with the token that proves it is ours.

use std::sync::atomic::Ordering::Relaxed;

use super::{Batch, ConsumeError, Consumer};
use crate::ring::futex;
use crate::ring::layout::{consumer as centry, hdr, lane as lentry, FormatError};
use crate::ring::slot::{self, Slot};

impl Consumer {
    /// Takes the lane's `READY` slot with the smallest `seq`, if any.
    pub(super) fn try_take(&self) -> Result<Option<Batch<'_>>, ConsumeError> {
        let mut best: Option<(u32, u64)> = None;
        for s in 0..self.layout.slots_per_lane {
            let slot = Slot::new(&self.control, &self.layout, self.lane, s);
            match slot.state() {
                slot::READY => {
                    let seq = slot.seq();
                    if best.is_none_or(|(_, b)| seq < b) {
                        best = Some((s, seq));
                    }
                }
                slot::FREE | slot::WRITING | slot::HELD => {}
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
        let slot = Slot::new(&self.control, &self.layout, self.lane, s);
        slot.take(self.pid, self.token);
        let meta = slot.meta();
        if self.layout.on_demand() {
            let (pass, next) = self.pass.get();
            if meta.epoch != pass || Some(meta.index) != next {
                // An earlier pass's batch: give it back unread and look again.
                self.release(s, seq);
                return self.try_take();
            }
            let last = meta.flags & 1 != 0;
            self.pass
                .set((pass, if last { None } else { Some(meta.index + 1) }));
        }
        self.last_taken.set(Some((meta.epoch, meta.flags & 1 != 0)));
        self.control
            .u64(self.layout.consumer_entry(self.lane) + centry::TAKEN)
            .fetch_add(1, Relaxed);
        Ok(Some(Batch {
            consumer: self,
            slot: s,
            meta,
        }))
    }

    /// Releases slot `s` if it still holds our batch `seq`. After the producer declared this
    /// consumer gone (a pause longer than its liveness checks allow, then a re-attach), the
    /// slot may be `READY` again or held by the new attach: it is left alone.
    pub(super) fn release(&self, s: u32, seq: u64) {
        if !Slot::new(&self.control, &self.layout, self.lane, s).release_if_ours(self.token, seq) {
            return;
        }
        self.lane_u64(lentry::RELEASED).fetch_add(1, Relaxed);
        futex::bump_and_wake(self.lane_u32(lentry::RELEASE_SEQ));
        // SYNC POINT with the producer's acquire load of release_any in claim_any.
        futex::bump_and_wake(self.control.u32(hdr::RELEASE_ANY as u64));
    }
}
