//! What the producer handle, its attach service, its heartbeat and pending seek requests
//! share: the lane table (who holds each lane, with the attach's lane page and doorbell), the
//! slot claims and the per-lane counter bases.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;

use crate::ring::feedback::Feedback;
use crate::ring::futex::{self, mono_ns, unix_ns};
use crate::ring::layout::lane_page::{self, encode_lane_page, lane_page_bytes, Reclaim};
use crate::ring::layout::{self, consumer as centry, hdr, lane as lentry, Layout, ProducerState};
use crate::ring::memory::{self, Control, Data};
use crate::ring::page::LanePage;
use crate::ring::protocol::{self, refuse, Refusal};
use crate::ring::resume::Fingerprint;
use crate::ring::segment::Segment;
use crate::ring::sigbus;
use crate::ring::slot::{self, Slot};

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
    /// A consumer holds the lane; `stream` is its connection, watched for EOF; `attachment`
    /// its lane page and doorbell.
    Attached {
        pid: u32,
        conn: u64,
        stream: Arc<UnixStream>,
        attachment: Arc<Attachment>,
    },
}

/// What one accepted attach gets (format 2.0): its own lane page and doorbell. Shared by
/// `Arc`, so a reclaim never unmaps a page or closes a doorbell another thread is reading or
/// polling: the last holder drops them.
pub(super) struct Attachment {
    /// The lane page memfd (sent to the consumer).
    pub(super) file: File,
    /// The producer's mapping of it; the producer only reads it.
    pub(super) page: LanePage,
    /// The eventfd the consumer writes after each release (`EFD_NONBLOCK | EFD_CLOEXEC`).
    pub(super) doorbell: OwnedFd,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment").finish_non_exhaustive()
    }
}

impl Attachment {
    /// A new lane page for `lane` (zero but for magic, lane and slot count; sealed against
    /// resizing) and a new doorbell.
    pub(super) fn create(layout: &Layout, lane: u32) -> std::io::Result<Attachment> {
        let slots = layout.slots_per_lane;
        let file = memory::create_lane_memfd(&layout.name, lane, &encode_lane_page(lane, slots))?;
        let page = LanePage::map(&file, slots)?;
        let doorbell = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
        )?;
        Ok(Attachment {
            file,
            page,
            doorbell,
        })
    }

    /// Reads (resets) the doorbell's counter; nothing to read is fine.
    pub(super) fn drain_doorbell(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.doorbell, &mut buf);
    }
}

impl LaneConn {
    pub(super) fn is_pending_for(&self, pid: u32) -> bool {
        matches!(self, LaneConn::Pending { pid: p } if *p == pid)
    }

    /// The lane page and doorbell of an attached consumer.
    pub(super) fn attachment(&self) -> Option<&Arc<Attachment>> {
        match self {
            LaneConn::Attached { attachment, .. } => Some(attachment),
            _ => None,
        }
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
    /// The ring reopened read-only (format 2.0): the descriptor every attach reply carries.
    pub(super) ring_read_only: File,
    /// Per lane, the counters of finished attaches (`released`, `consumer_wait_ns`), folded
    /// in at reclaim; the lane table shows base + the current page's values.
    pub(super) bases: Vec<[AtomicU64; 2]>,
    pub(super) lanes: Mutex<Vec<LaneConn>>,
    /// Per lane, the next `seq` to publish, under a lock that serialises publishes so `seq`
    /// is published in increasing order.
    pub(super) publish_locks: Vec<Mutex<u64>>,
    /// The producer's own state; the header's `producer_state` is its copy for consumers.
    pub(super) state: std::sync::atomic::AtomicU32,
    /// Held while the state and its header copy are changed, so the two always agree.
    pub(super) state_lock: Mutex<()>,
    /// Per slot (`lane × slots_per_lane + slot`): a producer thread owns the slot's state
    /// word now (claiming, writing, discarding or reclaiming it). Taken before any change of
    /// the state, so a slot's `seq` cannot change between a check and a compare-exchange
    /// (a `READY` slot released for batch 5 is never claimed after it was republished).
    pub(super) writing: Vec<AtomicBool>,
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
    /// Serialises writers of the lane table's `plan_*` fields (an announce and a seek's reset).
    pub(super) plan_lock: Mutex<()>,
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
    }

    pub(super) fn set_last_error(&self, msg: &str) {
        self.control
            .store_bytes(hdr::LAST_ERROR as u64, &layout::encode_last_error(msg));
    }

    /// Records `pid`, connected on `stream` with `attachment`, as lane `lane`'s consumer
    /// (lane table and consumer table).
    pub(super) fn register(
        &self,
        lanes: &mut [LaneConn],
        lane: u32,
        pid: u32,
        stream: Arc<UnixStream>,
        attachment: Arc<Attachment>,
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
        self.control.u64(e + centry::RELEASED).store(0, Relaxed);
        self.control.u32(e + centry::PID).store(pid, Release);
        self.lane_u32(lane, lentry::CONSUMER_PID)
            .store(pid, Release);
        lanes[lane as usize] = LaneConn::Attached {
            pid,
            conn,
            stream,
            attachment,
        };
        conn
    }

    /// Runs `f` on slot `(lane, s)` while owning its mark (see [`Shared::writing`]); `None`
    /// when a producer thread is writing the slot (nothing to do with a `WRITING` slot).
    fn with_slot_owned<T>(&self, lane: u32, s: u32, f: impl FnOnce(Slot<'_>) -> T) -> Option<T> {
        let mark = self.writing_mark(lane, s);
        loop {
            // SYNC POINT with the release store of `false` by the previous owner.
            if mark.compare_exchange(false, true, Acquire, Relaxed).is_ok() {
                break;
            }
            if self.slot(lane, s).state() == slot::WRITING {
                return None;
            }
            // A claimer checking the slot holds the mark for a moment.
            std::thread::yield_now();
        }
        let out = f(self.slot(lane, s));
        mark.store(false, Release);
        Some(out)
    }

    /// Brings the ring's tables up to date with the attach's lane page: `READY` slots whose
    /// batch the page says released become `FREE` (so the slot table's `READY` means "not
    /// released yet", as `ringfeed stat` and the end of a run count it; a claim would take
    /// them anyway), then the page's counters are copied into the lane table (plus the lane's
    /// base: totals over all attaches) and the consumer table (this attach's values).
    /// The counters are statistics only: nothing the producer decides reads them.
    pub(super) fn sync_lane(&self, lane: u32, page: &LanePage) {
        for s in 0..self.layout.slots_per_lane {
            let slot = self.slot(lane, s);
            if slot.state() != slot::READY || page.released_seq(s).load(Relaxed) != slot.seq() {
                continue;
            }
            self.with_slot_owned(lane, s, |slot| {
                // SYNC POINT with the consumer's store-release of released_seq after its
                // last read of the batch (as in `claim`).
                let released = page.released_seq(s).load(Acquire);
                if lane_page::claimable(slot.state(), slot.seq(), released)
                    && slot.state() == slot::READY
                {
                    slot.discard();
                }
            });
        }
        self.copy_counters(lane, page);
    }

    /// Copies the attach's lane page counters into the lane table and consumer table (see
    /// [`sync_lane`](Self::sync_lane)).
    fn copy_counters(&self, lane: u32, page: &LanePage) {
        let [released, wait] = &self.bases[lane as usize];
        let page_released = page.released().load(Relaxed);
        self.lane_u64(lane, lentry::RELEASED)
            .store(released.load(Relaxed).wrapping_add(page_released), Relaxed);
        self.lane_u64(lane, lentry::CONSUMER_WAIT_NS).store(
            wait.load(Relaxed)
                .wrapping_add(page.consumer_wait_ns().load(Relaxed)),
            Relaxed,
        );
        let e = self.layout.consumer_entry(lane);
        let beat = page.heartbeat_mono_ns().load(Relaxed);
        if beat != 0 {
            self.control
                .u64(e + centry::HEARTBEAT_MONO_NS)
                .store(beat, Relaxed);
        }
        self.control
            .u64(e + centry::TAKEN)
            .store(page.taken().load(Relaxed), Relaxed);
        self.control
            .u64(e + centry::RELEASED)
            .store(page_released, Relaxed);
    }

    /// The lane's consumer is gone: its lane page is read one last time (released batches
    /// become `FREE`, taken ones stay `READY` flagged redelivered), its counters fold into
    /// the lane's base, the page and doorbell are let go, the lane and consumer entries are
    /// cleared, and waiters are woken.
    pub(super) fn reclaim_locked(&self, lanes: &mut [LaneConn], lane: u32) {
        if let Some(attachment) = lanes[lane as usize].attachment() {
            let page = &attachment.page;
            for s in 0..self.layout.slots_per_lane {
                self.with_slot_owned(lane, s, |slot| {
                    // SYNC POINT with the consumer's store-release of released_seq after its
                    // last read: the slot is freed only after those reads.
                    let released = page.released_seq(s).load(Acquire);
                    let taken = page.taken_seq(s).load(Relaxed);
                    match lane_page::reclaim(slot.state(), slot.seq(), taken, released) {
                        Reclaim::Free => {
                            slot.discard();
                        }
                        Reclaim::Redeliver => slot.mark_redelivered(),
                        Reclaim::Keep => {}
                    }
                });
            }
            self.copy_counters(lane, page);
            let [released, wait] = &self.bases[lane as usize];
            released.fetch_add(page.released().load(Relaxed), Relaxed);
            wait.fetch_add(page.consumer_wait_ns().load(Relaxed), Relaxed);
        }
        let e = self.layout.consumer_entry(lane);
        for field in [centry::TAKEN, centry::RELEASED, centry::HEARTBEAT_MONO_NS] {
            self.control.u64(e + field).store(0, Relaxed);
        }
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

    /// The current attach of `lane`, if a consumer is attached.
    pub(super) fn attachment(&self, lane: u32) -> Option<Arc<Attachment>> {
        lock(&self.lanes)
            .get(lane as usize)
            .and_then(LaneConn::attachment)
            .cloned()
    }

    /// Claims slot `(lane, slot)` as `WRITING` for this producer: a `FREE` slot, or a `READY`
    /// one whose batch the current attach's lane page (`page`) says was released. Any other
    /// page value is ignored: a consumer can free only its own lane's released batches.
    pub(super) fn claim(&self, lane: u32, slot: u32, page: Option<&LanePage>) -> bool {
        let mark = self.writing_mark(lane, slot);
        // Another producer thread owns this slot now: its mark is not ours to clear.
        // SYNC POINT with the release store of `false` by the slot's previous owner.
        if mark
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            return false;
        }
        let s = self.slot(lane, slot);
        let claimed = match s.state() {
            slot::FREE => s.claim_from(slot::FREE),
            slot::READY => {
                // SYNC POINT with the consumer's store-release of released_seq after its last
                // read of the batch: those reads happen-before our writes into the slot.
                page.is_some_and(|p| {
                    lane_page::claimable(slot::READY, s.seq(), p.released_seq(slot).load(Acquire))
                }) && s.claim_from(slot::READY)
            }
            _ => false,
        };
        if !claimed {
            mark.store(false, Release);
        }
        claimed
    }

    /// Writes `plan` into the lane table's `plan_*` fields of `lane` (the tag last) and wakes
    /// the lane's waiters. Call with `plan_lock` held.
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
               "segment": self.segment.kind(), "fds": ["ring", "lane", "doorbell"],
               "lane_page_bytes": lane_page_bytes(self.layout.slots_per_lane)});
        if let Some(fields) = reply.as_object_mut() {
            if let Some(fp) = &*lock(&self.fingerprint) {
                fields.insert("fingerprint".to_owned(), json!(fp));
            }
            fields.extend(extra);
        }
        reply
    }

    /// Makes the attach's lane page and doorbell, registers the consumer and sends the
    /// attach reply (with `extra` members) and the three descriptors (ring read-only, lane
    /// page, doorbell); on failure the lane is left vacant again. From the registration on,
    /// the lane table holds the connection, and the service thread watches it.
    pub(super) fn complete_attach(
        &self,
        lane: u32,
        pid: u32,
        stream: UnixStream,
        extra: ReplyExtra,
    ) {
        let attachment = match Attachment::create(&self.layout, lane) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                log::warn!("lane {lane}: cannot make the attach's lane page or doorbell: {e}");
                let mut lanes = lock(&self.lanes);
                if lanes[lane as usize].is_pending_for(pid) {
                    lanes[lane as usize] = LaneConn::Vacant;
                }
                drop(lanes);
                return refuse(
                    &stream,
                    Refusal::Stopping,
                    &format!("the producer cannot make a lane page: {e}"),
                );
            }
        };
        let stream = Arc::new(stream);
        let conn = self.register(
            &mut lock(&self.lanes),
            lane,
            pid,
            stream.clone(),
            attachment.clone(),
        );
        let sent = protocol::send_line_with_fds(
            &stream,
            &self.attach_reply(lane, extra),
            &[
                self.ring_read_only.as_fd(),
                attachment.file.as_fd(),
                attachment.doorbell.as_fd(),
            ],
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
                sh.with_slot_owned(self.lane, s, |slot| slot.discard());
            }
            sh.lane_u32(self.lane, lentry::STREAM).fetch_add(1, Release);
            // The announced epoch plan belonged to the old position; the pipeline announces
            // the new one once it is decided.
            let plan_lock = lock(&sh.plan_lock);
            sh.store_plan(self.lane, &[0; 4]);
            drop(plan_lock);
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
