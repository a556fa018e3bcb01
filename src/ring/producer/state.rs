//! What the producer handle, its attach service, its heartbeat and pending seek requests
//! share: the lane table (who holds each lane), the producer's own copies of the fields
//! consumers can write, and the slot claims.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;

use crate::ring::feedback::Feedback;
use crate::ring::futex::{self, mono_ns, unix_ns};
use crate::ring::layout::{self, consumer as centry, hdr, lane as lentry, Layout, ProducerState};
use crate::ring::memory::{Control, Data};
use crate::ring::protocol::{self, refuse, Refusal};
use crate::ring::resume::Fingerprint;
use crate::ring::segment::Segment;
use crate::ring::sigbus;
use crate::ring::slot::Slot;

/// How often the service thread re-checks its stop flag and the heartbeat is refreshed.
pub(super) const TICK: Duration = Duration::from_millis(50);

/// Who a lane belongs to, as the producer tracks it: the one record of a lane's ownership.
#[derive(Debug, Clone)]
pub(super) enum LaneConn {
    Vacant,
    /// An attach with `resume` waits for the pipeline to apply its seek.
    Pending {
        pid: u32,
    },
    /// A consumer holds the lane; `stream` is its connection, watched for EOF.
    Attached {
        pid: u32,
        conn: u64,
        stream: Arc<UnixStream>,
    },
}

impl LaneConn {
    pub(super) fn is_pending_for(&self, pid: u32) -> bool {
        matches!(self, LaneConn::Pending { pid: p } if *p == pid)
    }
}

/// State shared by the producer handle, its threads and pending seek requests.
pub(super) struct Shared {
    pub(super) layout: Layout,
    pub(super) pid: u32,
    /// A named file's mappings, guarded against truncation (empty for a sealed memfd);
    /// declared before the mappings so the guards drop first.
    pub(super) guards: Vec<sigbus::Guard>,
    pub(super) segment: Segment,
    pub(super) allow_group: Option<u32>,
    pub(super) control: Control,
    pub(super) data: Data,
    pub(super) lanes: Mutex<Vec<LaneConn>>,
    /// Per lane, the next `seq` to publish, under a lock that serialises publishes so `seq`
    /// is published in increasing order. Kept here, not read back from the lane table, which
    /// consumers can write.
    pub(super) publish_locks: Vec<Mutex<u64>>,
    /// The producer's own state; the header's `producer_state` is a copy for consumers,
    /// which can write it, so no decision of the producer reads it back.
    pub(super) state: std::sync::atomic::AtomicU32,
    /// Held while the state and its header copy are changed or compared, so the heartbeat's
    /// repair never writes back a state that was just replaced.
    pub(super) state_lock: Mutex<()>,
    /// Per slot (`lane × slots_per_lane + slot`): this producer has it `WRITING`. A
    /// `WRITING` slot not marked here was forged (consumers can write the slot table) and
    /// is freed by the heartbeat.
    pub(super) writing: Vec<AtomicBool>,
    /// The header's and tensor table's bytes as created: the fields that never change,
    /// restored by the heartbeat if a consumer overwrote them.
    pub(super) image: Vec<u8>,
    pub(super) seeks: Mutex<Vec<SeekRequest>>,
    pub(super) next_conn: AtomicU64,
    pub(super) stop: AtomicBool,
    /// Extra members of the `info` reply, supplied by the pipeline (e.g. per-stream counts).
    pub(super) info_extra: Mutex<Option<InfoExtra>>,
    /// Feedback frames received, oldest first, with the lane that sent them.
    pub(super) feedback: Mutex<Vec<(u32, Feedback)>>,
    /// The reply to an `evaluation` request, kept current by the pipeline.
    pub(super) evaluation: Mutex<serde_json::Value>,
    /// Answers `classes` and `describe` (set by the daemon; absent: "unknown").
    pub(super) catalog: Mutex<Option<Arc<Catalog>>>,
    /// Per lane, the announced plan (`plan_epoch`, `plan_batches`, `plan_kept`,
    /// `plan_pruned`): the producer's own copy of fields consumers can write, restored by the
    /// heartbeat.
    pub(super) plans: Mutex<Vec<[u64; 4]>>,
    /// What defines the epoch order and batches (1.3), published in the `attach` and `info`
    /// replies and checked against a `resume`'s; `None` until the pipeline sets it.
    pub(super) fingerprint: Mutex<Option<Fingerprint>>,
}

/// What a daemon knows about its samples, for the `classes` and `describe` requests (1.3).
pub struct Catalog {
    /// The `classes` reply's members: `classes` (a list of names, or null when unknown) and
    /// `source` (where they were found).
    pub classes: serde_json::Value,
    /// One `describe` entry: `{"id", "shard", "member", "path"}` (and `stream` in a mixture),
    /// or `{"id", "error"}` for an id outside the dataset.
    pub describe: Box<dyn Fn(u64) -> serde_json::Value + Send + Sync>,
}

/// Produces extra members for the `info` reply: a JSON object whose keys are added to it.
pub type InfoExtra = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked pipeline thread must not take the ring down with a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn hdr_u32(&self, off: usize) -> &std::sync::atomic::AtomicU32 {
        self.control.u32(off as u64)
    }
    pub(super) fn hdr_u64(&self, off: usize) -> &AtomicU64 {
        self.control.u64(off as u64)
    }
    pub(super) fn lane_u32(&self, lane: u32, off: u64) -> &std::sync::atomic::AtomicU32 {
        self.control.u32(self.layout.lane_entry(lane) + off)
    }
    pub(super) fn lane_u64(&self, lane: u32, off: u64) -> &AtomicU64 {
        self.control.u64(self.layout.lane_entry(lane) + off)
    }
    pub(super) fn slot(&self, lane: u32, s: u32) -> Slot<'_> {
        Slot::new(&self.control, &self.layout, lane, s)
    }

    pub(super) fn state(&self) -> Option<ProducerState> {
        ProducerState::from_code(self.state.load(Acquire))
    }

    /// Sets `producer_state` and wakes every waiter on every lane (they re-read the state).
    pub(super) fn set_state(&self, state: ProducerState) {
        let guard = lock(&self.state_lock);
        self.state.store(state.code(), Release);
        // SYNC POINT with the consumer's acquire load of producer_state after its scan:
        // every publish before this store is visible once FINISHED is seen.
        self.hdr_u32(hdr::PRODUCER_STATE)
            .store(state.code(), Release);
        drop(guard);
        for l in 0..self.layout.lane_count {
            futex::bump_and_wake(self.lane_u32(l, lentry::PUBLISH_SEQ));
        }
        futex::wake_all(self.hdr_u32(hdr::RELEASE_ANY));
    }

    pub(super) fn set_last_error(&self, msg: &str) {
        self.control
            .store_bytes(hdr::LAST_ERROR as u64, &layout::encode_last_error(msg));
    }

    /// Records `pid`, connected on `stream`, as lane `lane`'s consumer (lane table and
    /// consumer table).
    pub(super) fn register(
        &self,
        lanes: &mut [LaneConn],
        lane: u32,
        pid: u32,
        stream: Arc<UnixStream>,
    ) -> u64 {
        let conn = self.next_conn.fetch_add(1, Relaxed);
        let e = self.layout.consumer_entry(lane);
        self.control.u32(e + centry::LANE).store(lane, Relaxed);
        self.control
            .u64(e + centry::ATTACH_UNIX_NS)
            .store(unix_ns(), Relaxed);
        self.control
            .u64(e + centry::HEARTBEAT_MONO_NS)
            .store(mono_ns(), Relaxed);
        self.control.u64(e + centry::TAKEN).store(0, Relaxed);
        self.control.u32(e + centry::PID).store(pid, Release);
        self.lane_u32(lane, lentry::CONSUMER_PID)
            .store(pid, Release);
        lanes[lane as usize] = LaneConn::Attached { pid, conn, stream };
        conn
    }

    /// The lane's consumer is gone: its `HELD` slots become `READY` (redelivered), the lane
    /// and consumer entries are cleared, and waiters are woken.
    pub(super) fn reclaim_locked(&self, lanes: &mut [LaneConn], lane: u32) {
        for s in 0..self.layout.slots_per_lane {
            self.slot(lane, s).reclaim();
        }
        let e = self.layout.consumer_entry(lane);
        self.control.u32(e + centry::PID).store(0, Release);
        self.lane_u32(lane, lentry::CONSUMER_PID).store(0, Release);
        lanes[lane as usize] = LaneConn::Vacant;
        futex::bump_and_wake(self.lane_u32(lane, lentry::PUBLISH_SEQ));
    }

    /// Reclaims `lane` if connection `conn` is still the one attached there.
    pub(super) fn reclaim_conn(&self, lane: u32, conn: u64) {
        let mut lanes = lock(&self.lanes);
        if matches!(lanes[lane as usize], LaneConn::Attached { conn: c, .. } if c == conn) {
            self.reclaim_locked(&mut lanes, lane);
        }
    }

    pub(super) fn writing_mark(&self, lane: u32, slot: u32) -> &AtomicBool {
        &self.writing[(lane * self.layout.slots_per_lane + slot) as usize]
    }

    /// `FREE → WRITING` for this producer, marked as its own before the claim so the
    /// heartbeat never takes a slot being claimed for a forged one.
    pub(super) fn claim(&self, lane: u32, slot: u32) -> bool {
        let mark = self.writing_mark(lane, slot);
        // Another producer thread is claiming or writing this slot: its mark is not ours to
        // clear.
        if mark
            .compare_exchange(false, true, Relaxed, Relaxed)
            .is_err()
        {
            return false;
        }
        // SYNC POINT with the heartbeat's acquire load of the state in `repair`: the mark is
        // visible to whoever sees our WRITING.
        let claimed = self.slot(lane, slot).claim();
        if !claimed {
            mark.store(false, Relaxed);
        }
        claimed
    }

    /// The lane table's `plan_*` fields of `lane`, tag first.
    pub(super) fn load_plan(&self, lane: u32) -> [u64; 4] {
        [
            self.lane_u64(lane, lentry::PLAN_EPOCH).load(Acquire),
            self.lane_u64(lane, lentry::PLAN_BATCHES).load(Relaxed),
            self.lane_u64(lane, lentry::PLAN_KEPT).load(Relaxed),
            self.lane_u64(lane, lentry::PLAN_PRUNED).load(Relaxed),
        ]
    }

    /// Writes `plan` into the lane table's `plan_*` fields of `lane` (the tag last) and wakes
    /// the lane's waiters. Call with `plans` locked, so the copy and the table agree.
    pub(super) fn store_plan(&self, lane: u32, plan: &[u64; 4]) {
        self.lane_u64(lane, lentry::PLAN_BATCHES)
            .store(plan[1], Relaxed);
        self.lane_u64(lane, lentry::PLAN_KEPT)
            .store(plan[2], Relaxed);
        self.lane_u64(lane, lentry::PLAN_PRUNED)
            .store(plan[3], Relaxed);
        // SYNC POINT with the consumer's acquire load of plan_epoch before it reads the
        // three fields above.
        self.lane_u64(lane, lentry::PLAN_EPOCH)
            .store(plan[0], Release);
        futex::bump_and_wake(self.lane_u32(lane, lentry::PUBLISH_SEQ));
    }

    /// Every attached lane's connection, for the service thread's poll.
    pub(super) fn attached(&self) -> Vec<(u32, u64, Arc<UnixStream>)> {
        lock(&self.lanes)
            .iter()
            .enumerate()
            .filter_map(|(l, c)| match c {
                LaneConn::Attached { conn, stream, .. } => Some((l as u32, *conn, stream.clone())),
                _ => None,
            })
            .collect()
    }

    pub(super) fn attach_reply(&self, lane: u32, extra: ReplyExtra) -> serde_json::Value {
        let mut reply = json!({"ok": true, "generation": self.layout.generation,
               "generation_str": self.layout.generation.to_string(), "lane": lane,
               "file_bytes": self.layout.file_bytes, "producer_pid": self.pid,
               "segment": self.segment.kind()});
        if let Some(fields) = reply.as_object_mut() {
            if let Some(fp) = &*lock(&self.fingerprint) {
                fields.insert("fingerprint".to_owned(), json!(fp));
            }
            fields.extend(extra);
        }
        reply
    }

    /// Registers the consumer and sends the attach reply (with `extra` members) and the
    /// memfd; on failure the lane is left vacant again. From the registration on, the lane
    /// table holds the connection, and the service thread watches it.
    pub(super) fn complete_attach(
        &self,
        lane: u32,
        pid: u32,
        stream: UnixStream,
        extra: ReplyExtra,
    ) {
        let stream = Arc::new(stream);
        let conn = self.register(&mut lock(&self.lanes), lane, pid, stream.clone());
        let sent = protocol::send_line(
            &stream,
            &self.attach_reply(lane, extra),
            Some(self.segment.file().as_fd()),
        );
        if sent.is_err() {
            self.reclaim_conn(lane, conn);
        }
    }
}

/// Members added to an attach reply (a resume's `resumed_at` and `warnings`).
pub(super) type ReplyExtra = serde_json::Map<String, serde_json::Value>;

/// Whether the consumer process `pid` is known to have exited. Pid 0 means the consumer lives
/// in a pid namespace we cannot see into (`SO_PEERCRED` reported no pid): its liveness is its
/// socket alone (EOF when the process dies), never a pid check, which would declare it dead.
pub(super) fn pid_gone(pid: u32) -> bool {
    match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) => rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH),
        None => false,
    }
}

/// A consumer asked to resume lane `lane` at `(epoch, index)`. The pipeline repositions the
/// lane's stream there and calls [`apply`](SeekRequest::apply) between batches; dropping the
/// request unapplied refuses the attach.
pub struct SeekRequest {
    /// Lane to reposition.
    pub lane: u32,
    /// Epoch of the next batch the consumer wants.
    pub epoch: u64,
    /// Index (within the epoch, for this lane) of the next batch the consumer wants.
    pub index: u64,
    pub(super) pid: u32,
    pub(super) stream: Option<UnixStream>,
    pub(super) shared: Arc<Shared>,
    pub(super) extra: ReplyExtra,
}

impl std::fmt::Debug for SeekRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeekRequest")
            .field("lane", &self.lane)
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("pid", &self.pid)
            .finish()
    }
}

impl SeekRequest {
    /// Discards the lane's `READY` slots (they belong to the old position), bumps the lane's
    /// `stream`, and lets the attach reply go out. Call it between batches: a slot of this
    /// lane still being written would be published at the old position.
    pub fn apply(mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        let sh = &self.shared;
        {
            let lanes = lock(&sh.lanes);
            if !lanes[self.lane as usize].is_pending_for(self.pid) {
                return;
            }
            for s in 0..sh.layout.slots_per_lane {
                sh.slot(self.lane, s).discard();
            }
            sh.lane_u32(self.lane, lentry::STREAM).fetch_add(1, Release);
            // The announced epoch plan belonged to the old position; the pipeline announces
            // the new one once it is decided.
            let mut plans = lock(&sh.plans);
            if let Some(plan) = plans.get_mut(self.lane as usize) {
                *plan = [0; 4];
                sh.store_plan(self.lane, plan);
            }
            drop(plans);
            // Rewinding a finished ring makes it serve again; the pipeline finishes it anew
            // when the lane reaches the last epoch once more.
            if sh.state() == Some(ProducerState::Finished) {
                sh.set_state(ProducerState::Serving);
            }
        }
        sh.complete_attach(self.lane, self.pid, stream, std::mem::take(&mut self.extra));
    }
}

impl Drop for SeekRequest {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            let mut lanes = lock(&self.shared.lanes);
            if lanes[self.lane as usize].is_pending_for(self.pid) {
                lanes[self.lane as usize] = LaneConn::Vacant;
            }
            // Only at shutdown: the pipeline applies every seek while it runs.
            refuse(
                &stream,
                Refusal::Stopping,
                "seek request was dropped by the producer (it is stopping)",
            );
        }
    }
}
