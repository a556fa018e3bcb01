//! The heartbeat thread: refreshes `heartbeat_mono_ns`, restores what consumers wrote over
//! producer-owned memory, and reclaims lanes whose consumer process is gone.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;

use super::state::{lock, pid_gone, LaneConn, Shared, TICK};
use crate::ring::futex::mono_ns;
use crate::ring::layout::{self, hdr, lane as lentry};
use crate::ring::slot;

/// Refreshes the heartbeat and reclaims lanes whose consumer process no longer exists (a
/// backup for socket EOF, e.g. when a forked child still holds the dead consumer's socket;
/// consumers whose pid we cannot see are judged by their socket only).
pub(super) fn heartbeat_loop(sh: &Arc<Shared>) {
    let mut warned = false;
    while !sh.stop.load(Acquire) {
        sh.hdr_u64(hdr::HEARTBEAT_MONO_NS).store(mono_ns(), Release);
        let repaired = sh.repair();
        if !repaired.is_empty() && !warned {
            log::warn!(
                "ring {:?}: a consumer wrote producer-owned memory ({}); restored (further repairs are not logged)",
                sh.layout.name,
                repaired.join(", ")
            );
            warned = true;
        }
        let mut lanes = lock(&sh.lanes);
        for l in 0..sh.layout.lane_count {
            if let LaneConn::Attached { pid, .. } = lanes[l as usize] {
                if pid_gone(pid) {
                    sh.reclaim_locked(&mut lanes, l);
                }
            }
        }
        drop(lanes);
        std::thread::park_timeout(TICK);
    }
}

impl Shared {
    /// Undoes what consumers may have written over producer-owned state: the header's and
    /// tensor table's constant bytes, `producer_state`, each lane's announced epoch plan, and
    /// slots left `WRITING` that this producer is not writing (they would never be freed).
    /// Returns what was repaired.
    fn repair(&self) -> Vec<String> {
        let mut repaired = Vec::new();
        let constant = [
            (0, hdr::PRODUCER_STATE),
            (hdr::START_UNIX_NS, hdr::HEARTBEAT_MONO_NS),
            (hdr::LANE_COUNT, hdr::RELEASE_ANY),
            (hdr::WORLD_SIZE, hdr::WORLD_SIZE + 4),
            (hdr::MEAN, layout::HEADER_BYTES as usize),
            (self.layout.tensor_table_offset as usize, self.image.len()),
        ];
        for (start, end) in constant {
            let now = self.control.load_bytes(start as u64, end - start);
            if now != self.image[start..end] {
                self.control
                    .store_bytes(start as u64, &self.image[start..end]);
                repaired.push(format!("header bytes {start}..{end}"));
            }
        }
        let guard = lock(&self.state_lock);
        let state = self.state.load(Acquire);
        if self.hdr_u32(hdr::PRODUCER_STATE).load(Acquire) != state {
            self.hdr_u32(hdr::PRODUCER_STATE).store(state, Release);
            repaired.push("producer_state".to_owned());
        }
        drop(guard);
        let plans = lock(&self.plans);
        for (l, plan) in plans.iter().enumerate() {
            if self.load_plan(l as u32) != *plan {
                self.store_plan(l as u32, plan);
                repaired.push(format!("lane {l} epoch plan"));
            }
        }
        drop(plans);
        for l in 0..self.layout.lane_count {
            // The lane's rank and share (1.3) never change either. Relaxed: no other field is
            // published with them; consumers read them once, at attach.
            let rank = self.layout.lane_rank(l).unwrap_or(0);
            let share = self
                .layout
                .lane_samples
                .get(l as usize)
                .copied()
                .unwrap_or(0);
            if self.lane_u32(l, lentry::RANK).load(Relaxed) != rank
                || self.lane_u64(l, lentry::RANK_SAMPLES).load(Relaxed) != share
            {
                self.lane_u32(l, lentry::RANK).store(rank, Relaxed);
                self.lane_u64(l, lentry::RANK_SAMPLES).store(share, Relaxed);
                repaired.push(format!("lane {l} rank"));
            }
        }
        for l in 0..self.layout.lane_count {
            for s in 0..self.layout.slots_per_lane {
                let slot = self.slot(l, s);
                if slot.state() == slot::WRITING && !self.writing_mark(l, s).load(Relaxed) {
                    slot.abandon();
                    repaired.push(format!("lane {l} slot {s} forged WRITING"));
                }
            }
        }
        repaired
    }
}
