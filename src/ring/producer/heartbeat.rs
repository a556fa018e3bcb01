//! The heartbeat thread: refreshes `heartbeat_mono_ns`, syncs each attached lane with its
//! lane page (released slots become `FREE`, the page's counters are copied into the lane and
//! consumer tables for `ringfeed stat`), and reclaims lanes whose consumer process is gone.
//!
//! Format 2.0 removed 1.3's repair of producer-owned memory: consumers map the ring
//! read-only and cannot write it.

use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::Arc;

use super::state::{lock, pid_gone, LaneConn, Shared, TICK};
use crate::ring::futex::mono_ns;
use crate::ring::layout::hdr;

/// Refreshes the heartbeat, copies the lane pages' counters, and reclaims lanes whose
/// consumer process no longer exists (a backup for socket EOF, e.g. when a forked child still
/// holds the dead consumer's socket; consumers whose pid we cannot see are judged by their
/// socket only).
pub(super) fn heartbeat_loop(sh: &Arc<Shared>) {
    while !sh.stop.load(Acquire) {
        sh.hdr_u64(hdr::HEARTBEAT_MONO_NS).store(mono_ns(), Release);
        let mut lanes = lock(&sh.lanes);
        for l in 0..sh.layout.lane_count {
            if let LaneConn::Attached {
                pid, attachment, ..
            } = &lanes[l as usize]
            {
                if pid_gone(*pid) {
                    sh.reclaim_locked(&mut lanes, l);
                } else {
                    sh.sync_lane(l, &attachment.page);
                }
            }
        }
        drop(lanes);
        std::thread::park_timeout(TICK);
    }
}
