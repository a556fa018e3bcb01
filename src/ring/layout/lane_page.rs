//! Format 2.0: the lane page (the only memory a consumer writes: its counters and, per slot,
//! the `seq` it took and released last) and the slot rules that read it. Pure and safe, like
//! the rest of the format; `ring::page` is the live mapping, the producer's `state` and the
//! consumer's `lane` apply the rules.
//!
//! The rules, each a function of the producer-owned slot `state` and `seq` and the lane page's
//! `taken_seq` / `released_seq` for that slot:
//!
//! - [`claimable`]: the producer may write the slot (`FREE`, or `READY` and released by this
//!   lane's consumer);
//! - [`takeable`] / [`held`]: the consumer's view of a `READY` slot;
//! - [`reclaim`]: what the producer does with a slot when the lane's consumer is gone.
//!
//! Whatever a consumer writes into its lane page, these functions only ever decide about that
//! lane's slots, and only by comparing with the producer's own `seq`: no value from the page
//! is used as an index, an offset or a length.
use super::{FormatError, PAGE};

/// `RFLANE\0\0`: the first eight bytes of every lane page.
pub(crate) const LANE_MAGIC: [u8; 8] = *b"RFLANE\0\0";
/// Bytes before the per-slot entries.
pub(crate) const LANE_HEADER_BYTES: u64 = 64;
/// Bytes of one per-slot entry (`taken_seq`, `released_seq`).
pub(crate) const LANE_SLOT_BYTES: u64 = 16;

/// Byte offsets in a lane page.
pub(crate) mod page {
    pub(super) const MAGIC: usize = 0;
    pub(super) const LANE: usize = 8;
    pub(super) const SLOTS: usize = 12;
    pub(crate) const RELEASED: u64 = 16;
    pub(crate) const CONSUMER_WAIT_NS: u64 = 24;
    pub(crate) const HEARTBEAT_MONO_NS: u64 = 32;
    pub(crate) const TAKEN: u64 = 40;
    /// Offset of slot `s`'s `taken_seq`; its `released_seq` follows at `+ 8`.
    pub(crate) const fn slot(s: u32) -> u64 {
        super::LANE_HEADER_BYTES + s as u64 * super::LANE_SLOT_BYTES
    }
    pub(crate) const RELEASED_SEQ: u64 = 8;
}

/// Size of the lane page of a lane with `slots` slots: whole pages.
pub(crate) fn lane_page_bytes(slots: u32) -> u64 {
    (LANE_HEADER_BYTES + u64::from(slots) * LANE_SLOT_BYTES).div_ceil(PAGE) * PAGE
}

/// The lane page as the producer creates it for an attach to `lane`: magic, lane, slots; every
/// counter and `seq` zero.
pub(crate) fn encode_lane_page(lane: u32, slots: u32) -> Vec<u8> {
    let mut b = vec![0u8; lane_page_bytes(slots) as usize];
    b[page::MAGIC..page::MAGIC + 8].copy_from_slice(&LANE_MAGIC);
    b[page::LANE..page::LANE + 4].copy_from_slice(&lane.to_le_bytes());
    b[page::SLOTS..page::SLOTS + 4].copy_from_slice(&slots.to_le_bytes());
    b
}

/// Checks a lane page before a consumer maps it: its size (`file_len`) is exactly
/// [`lane_page_bytes`] of the ring's `slots_per_lane`, and its first bytes (`head`, at least 16)
/// carry the magic, the lane asked for and that slot count.
pub(crate) fn validate_lane_page(
    head: &[u8],
    file_len: u64,
    lane: u32,
    slots: u32,
) -> Result<(), FormatError> {
    let field = |field: &'static str, value: u64, reason: String| FormatError::Field {
        field,
        value,
        reason,
    };
    let want = lane_page_bytes(slots);
    if file_len != want {
        return Err(field(
            "lane_page_bytes",
            file_len,
            format!("must be {want} for {slots} slots per lane"),
        ));
    }
    if head.len() < 16 {
        return Err(FormatError::Truncated {
            have: head.len() as u64,
            need: 16,
            what: "lane page header",
        });
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if head[page::MAGIC..page::MAGIC + 8] != LANE_MAGIC {
        return Err(field("lane_page.magic", 0, "is not RFLANE".into()));
    }
    if u32_at(page::LANE) != lane {
        return Err(field(
            "lane_page.lane",
            u32_at(page::LANE).into(),
            format!("differs from the lane attached to, {lane}"),
        ));
    }
    if u32_at(page::SLOTS) != slots {
        return Err(field(
            "lane_page.slots",
            u32_at(page::SLOTS).into(),
            format!("differs from slots_per_lane {slots}"),
        ));
    }
    Ok(())
}

/// Producer-owned slot states of 2.0 (no `HELD`: holding is the lane page's business).
pub(crate) mod state {
    /// The producer may claim the slot.
    pub(crate) const FREE: u32 = 0;
    /// The producer is writing the slot.
    pub(crate) const WRITING: u32 = 1;
    /// The slot holds a published batch.
    pub(crate) const READY: u32 = 2;
}

/// Whether the producer may claim a slot: `FREE`, or `READY` with batch `seq` released by
/// the lane's consumer (`released_seq == seq`). A forged `released_seq` can free only a slot of
/// the forger's own lane, and only the batch it names.
pub(crate) fn claimable(state: u32, seq: u64, released_seq: u64) -> bool {
    state == state::FREE || (state == state::READY && seq != 0 && released_seq == seq)
}

/// Whether the consumer may take a slot: `READY` with a batch it has neither taken nor
/// released.
pub(crate) fn takeable(state: u32, seq: u64, taken_seq: u64, released_seq: u64) -> bool {
    state == state::READY && seq != 0 && taken_seq != seq && released_seq != seq
}

/// Whether the consumer holds a slot: `READY`, taken, not yet released.
pub(crate) fn held(state: u32, seq: u64, taken_seq: u64, released_seq: u64) -> bool {
    state == state::READY && seq != 0 && taken_seq == seq && released_seq != seq
}

/// What the producer does with a slot when the lane's consumer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reclaim {
    /// Released: the slot becomes `FREE`.
    Free,
    /// Taken and not released: stays `READY`, flagged redelivered.
    Redeliver,
    /// Anything else (`FREE`, `WRITING`, a `READY` batch never taken): left as it is.
    Keep,
}

/// The reclaim decision for one slot (see [`Reclaim`]).
pub(crate) fn reclaim(state: u32, seq: u64, taken_seq: u64, released_seq: u64) -> Reclaim {
    if state != state::READY || seq == 0 {
        Reclaim::Keep
    } else if released_seq == seq {
        Reclaim::Free
    } else if taken_seq == seq {
        Reclaim::Redeliver
    } else {
        Reclaim::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_pages_are_whole_pages_and_validate_only_as_created() {
        assert_eq!(lane_page_bytes(1), PAGE);
        assert_eq!(lane_page_bytes(252), PAGE);
        assert_eq!(lane_page_bytes(253), 2 * PAGE);
        let page = encode_lane_page(3, 4);
        assert!(validate_lane_page(&page, page.len() as u64, 3, 4).is_ok());
        assert!(validate_lane_page(&page, page.len() as u64, 2, 4).is_err());
        assert!(validate_lane_page(&page, page.len() as u64, 3, 5).is_err());
        assert!(validate_lane_page(&page, 2 * PAGE, 3, 4).is_err());
        assert!(validate_lane_page(&page[..8], page.len() as u64, 3, 4).is_err());
        let mut bad = page.clone();
        bad[0] = b'X';
        assert!(validate_lane_page(&bad, page.len() as u64, 3, 4).is_err());
    }

    /// Every combination over a small domain (states 0–4, with 4 an invalid state a
    /// consumer cannot write anyway; `seq`, `taken_seq`, `released_seq` in 0–3): the rules
    /// never let the producer claim a slot the consumer holds, never let the consumer take a
    /// slot twice or one that is not `READY`, and reclaim frees exactly the released batches
    /// and redelivers exactly the held ones.
    #[test]
    fn the_rules_agree_on_every_small_combination() {
        for st in 0..5 {
            for seq in 0..4 {
                for taken in 0..4 {
                    for released in 0..4 {
                        let h = held(st, seq, taken, released);
                        let t = takeable(st, seq, taken, released);
                        let c = claimable(st, seq, released);
                        assert!(
                            !(h && c),
                            "claimable while held: {st} {seq} {taken} {released}"
                        );
                        assert!(
                            !(h && t),
                            "takeable while held: {st} {seq} {taken} {released}"
                        );
                        if t || h {
                            assert_eq!(st, state::READY);
                        }
                        if st == state::WRITING {
                            assert!(!c && !t && !h);
                        }
                        match reclaim(st, seq, taken, released) {
                            Reclaim::Free => assert!(c && st == state::READY),
                            Reclaim::Redeliver => assert!(h),
                            Reclaim::Keep => {
                                let frees = st == state::READY && c;
                                assert!(!h);
                                assert!(!frees);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A slot's life under 2.0: published, taken, released, claimed again; a second take of
    /// the same batch is refused; a forged release frees only the batch it names.
    #[test]
    fn a_slot_goes_round_and_forgeries_reach_only_their_own_batch() {
        let (seq, mut taken, mut released) = (7, 0, 0);
        assert!(!claimable(state::READY, seq, released));
        assert!(takeable(state::READY, seq, taken, released));
        taken = seq;
        assert!(held(state::READY, seq, taken, released));
        assert!(!takeable(state::READY, seq, taken, released));
        released = seq;
        assert!(claimable(state::READY, seq, released));
        assert!(!held(state::READY, seq, taken, released));
        // A forged released_seq for another batch frees nothing.
        assert!(!claimable(state::READY, 8, 7));
        assert!(!claimable(state::READY, 8, u64::MAX));
        assert!(!claimable(state::READY, 0, 0));
    }
}
