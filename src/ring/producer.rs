//! The producer side: creates the ring, serves attach requests, hands out free slots to the
//! pipeline, publishes batches and reclaims the slots of consumers that die.
//!
//! Two threads run beside the pipeline: the *service* thread (one `poll` over the listening
//! socket, every connection still sending its request, and every attached consumer's socket,
//! so a consumer's death is seen at once and a slow client delays nobody) and the *heartbeat*
//! thread (refreshes `heartbeat_mono_ns`, and as a backup reclaims lanes whose consumer pid no
//! longer exists).
//!
//! Who holds a lane is decided in one place, the lane table ([`LaneConn`] under one mutex):
//! an attached lane's entry holds the consumer's socket itself, so every check of "is the
//! holder gone?" (the service thread's poll, an attach finding the lane taken, the heartbeat)
//! looks at the same socket, whichever thread completed the attach.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::RecvFlags;
use serde_json::json;
use thiserror::Error;

use super::access;
use super::feedback::{Feedback, FrameError, FrameReader};
use super::futex::{self, mono_ns, unix_ns};
use super::handshake::{self, Refusal, Request};
use super::layout::{self, consumer as centry, hdr, lane as lentry, Layout, RingSpec, SpecError};
use super::memory::{Control, Data};
use super::resume::{self, Fingerprint};
use super::runtime_dir::{validate_name, LockError, ProducerLock, RuntimeDir, RuntimeDirError};
use super::segment::{self, FileAccess, Segment, SegmentError, ShmDirError};
use super::sigbus;
use super::slot::{self, Slot, SlotMeta};

/// How often the service thread re-checks its stop flag and the heartbeat is refreshed.
const TICK: Duration = Duration::from_millis(50);
/// Longest single futex wait, so stop requests and timeouts are noticed.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// Time a connecting client has, in all, to send its request line; then it is refused.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections still sending their request, at most; further ones wait in the listen backlog
/// until one of these is answered or times out.
const MAX_INCOMING: usize = 64;

/// `producer_state` values (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerState {
    /// Setting up; not yet accepting consumers.
    Starting,
    /// Serving batches.
    Serving,
    /// Every epoch produced; ready slots remain valid.
    Finished,
    /// Clean shutdown.
    Stopped,
    /// Failed; see `last_error`.
    Failed,
}

impl ProducerState {
    /// The header code.
    pub fn code(self) -> u32 {
        match self {
            ProducerState::Starting => 0,
            ProducerState::Serving => 1,
            ProducerState::Finished => 2,
            ProducerState::Stopped => 3,
            ProducerState::Failed => 4,
        }
    }

    /// The state with this header code.
    pub fn from_code(code: u32) -> Option<ProducerState> {
        Some(match code {
            0 => ProducerState::Starting,
            1 => ProducerState::Serving,
            2 => ProducerState::Finished,
            3 => ProducerState::Stopped,
            4 => ProducerState::Failed,
            _ => return None,
        })
    }
}

/// Why a ring could not be created.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RingCreateError {
    /// The spec cannot be laid out.
    #[error("ring {name:?}: {source}")]
    Spec {
        /// Ring name.
        name: String,
        /// What is wrong.
        source: SpecError,
    },
    /// Bad name or unsafe runtime directory.
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    /// A live producer already serves this name.
    #[error("ring {name:?} is already served by a live producer (pid {}); stop it or pick another name", pid.map_or("unknown".to_owned(), |p| p.to_string()))]
    AlreadyRunning {
        /// Ring name.
        name: String,
        /// The live producer's pid, as written in the lock file.
        pid: Option<u32>,
    },
    /// The lock file could not be used.
    #[error("ring {name:?}: lock file {path}: {source}")]
    Lock {
        /// Ring name.
        name: String,
        /// Lock file path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Not enough memory for the ring's memfd. A memfd is charged to RAM and to the memory
    /// cgroup (a container's `--memory` limit), not to `/dev/shm`.
    #[error("ring {name:?} needs {} of shared memory ({lanes} lanes × {slots} slots × {} per batch + control) and it could not be reserved. The ring is a memfd, charged to RAM and the container's memory limit (cgroup memory.max, docker --memory), not to /dev/shm. Fix: fewer slots (--slots-per-lane) or lanes, a smaller batch (--batch-size) or image size, or a higher memory limit", mib(*bytes), mib(*slot_bytes))]
    OutOfMemory {
        /// Ring name.
        name: String,
        /// Bytes needed.
        bytes: u64,
        /// Lanes.
        lanes: u32,
        /// Slots per lane.
        slots: u32,
        /// Bytes per slot.
        slot_bytes: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The `--shm-dir` filesystem has too little space for the ring.
    #[error("ring {name:?} needs {} ({lanes} lanes × {slots} slots × {} per batch + control) but {dir} has only {} free. Fix: fewer slots (--slots-per-lane) or lanes, a smaller batch (--batch-size) or image size; another --shm-dir on a larger tmpfs; a larger /dev/shm (docker run --shm-size={}m); or no --shm-dir (the default memfd is not limited by /dev/shm)", mib(*bytes), mib(*slot_bytes), free_bytes.map_or("an unknown amount".to_owned(), mib), shm_size_hint(*bytes))]
    ShmDirFull {
        /// Ring name.
        name: String,
        /// Bytes needed.
        bytes: u64,
        /// Lanes.
        lanes: u32,
        /// Slots per lane.
        slots: u32,
        /// Bytes per slot.
        slot_bytes: u64,
        /// The `--shm-dir`.
        dir: PathBuf,
        /// Free bytes there (`statvfs`), if known.
        free_bytes: Option<u64>,
        /// The OS error.
        source: io::Error,
    },
    /// The `--shm-dir` or the ring file in it was refused.
    #[error("ring {name:?}: {source}")]
    ShmDir {
        /// Ring name.
        name: String,
        /// What is wrong.
        source: ShmDirError,
    },
    /// memfd creation, mapping, socket or thread setup failed.
    #[error("ring {name:?}: {what}: {source}")]
    Io {
        /// Ring name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// `bytes` in MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// A `--shm-size` in MiB that fits the ring with room for the rest of /dev/shm's users.
fn shm_size_hint(bytes: u64) -> u64 {
    (bytes.div_ceil(1 << 20) + 64).next_multiple_of(64)
}

/// How the producer creates its ring beyond the [`RingSpec`]: where the memory lives and
/// who besides its own user may attach. The default is a sealed memfd, owner only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerOptions {
    /// `None` (default): a sealed memfd. `Some(dir)`: the named file
    /// `dir/ringfeed-<name>.ring`, mode 0600 (0640 with `allow_group`), removed on exit.
    pub shm_dir: Option<PathBuf>,
    /// A gid whose members may attach too: the runtime directory becomes 0750, the socket
    /// 0660 and the named file 0640, all given to this group.
    pub allow_group: Option<u32>,
    /// What defines the epoch order and batches (1.3), in place before the socket is bound,
    /// so that no `resume` is ever served unchecked; see [`Producer::set_fingerprint`].
    pub fingerprint: Option<Fingerprint>,
}

/// What a batch's slot records besides its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    /// Epoch of the batch.
    pub epoch: u64,
    /// Batch index within the epoch for this lane.
    pub index: u64,
    /// Samples in the batch.
    pub count: u32,
    /// Whether this is the lane's last batch of the epoch.
    pub last_of_epoch: bool,
}

/// Slot counts and counters of one lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Lane number.
    pub lane: u32,
    /// Slots `READY`.
    pub ready: u32,
    /// Slots `HELD` by the consumer.
    pub held: u32,
    /// Slots `FREE`.
    pub free: u32,
    /// Slots being written.
    pub writing: u32,
    /// Attached consumer's pid, 0 if none.
    pub consumer_pid: u32,
    /// ns the consumer blocked waiting for a batch.
    pub consumer_wait_ns: u64,
    /// ns the producer waited for a free slot of this lane.
    pub producer_wait_ns: u64,
    /// Batches published.
    pub published: u64,
    /// Batches released.
    pub released: u64,
    /// Seeks applied.
    pub stream: u32,
}

/// Counters for the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingStats {
    /// Producer generation.
    pub generation: u64,
    /// Producer state.
    pub state: Option<ProducerState>,
    /// Samples decoded and written.
    pub samples_ok: u64,
    /// Samples skipped.
    pub samples_skipped: u64,
    /// Total ns the producer waited for free slots.
    pub producer_wait_ns: u64,
    /// Batches published, all lanes.
    pub batches_published: u64,
    /// Per-lane figures.
    pub lanes: Vec<LaneStats>,
}

/// Who a lane belongs to, as the producer tracks it: the one record of a lane's ownership.
#[derive(Debug, Clone)]
enum LaneConn {
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
    fn is_pending_for(&self, pid: u32) -> bool {
        matches!(self, LaneConn::Pending { pid: p } if *p == pid)
    }
}

/// Most socket reads of 16 KiB one consumer's feedback gets per service-loop round.
const PUMP_READS: usize = 256;

/// What reading an attached consumer's socket found.
enum Pumped {
    /// Still connected (any complete frames were queued).
    Open,
    /// The consumer hung up (frames sent before its EOF were queued first).
    Closed,
    /// It sent a malformed frame.
    Malformed(FrameError),
}

/// Reads what an attached consumer's socket holds without blocking (at most [`PUMP_READS`]
/// reads, so one flooding consumer cannot keep the service thread from the others), cuts it
/// into feedback frames (§9) with `frames`, and queues the complete ones for the pipeline.
fn pump(
    stream: &UnixStream,
    lane: u32,
    frames: &mut FrameReader,
    queue: &Mutex<Vec<(u32, Feedback)>>,
) -> Pumped {
    let mut buf = [0u8; 16 * 1024];
    let mut closed = false;
    for _ in 0..PUMP_READS {
        match rustix::net::recv(stream, &mut buf, RecvFlags::DONTWAIT) {
            Ok((0, _)) => {
                closed = true;
                break;
            }
            Ok((n, _)) => frames.push(&buf[..n]),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => break,
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let mut got = Vec::new();
    let outcome = loop {
        match frames.next_frame() {
            Ok(Some(f)) => got.push((lane, f)),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    if !got.is_empty() {
        lock(queue).append(&mut got);
    }
    match outcome {
        Some(e) => Pumped::Malformed(e),
        None if closed => Pumped::Closed,
        None => Pumped::Open,
    }
}

/// A connection still sending its request line, with its deadline.
struct Incoming {
    stream: UnixStream,
    line: handshake::LineReader,
    deadline: Instant,
}

/// State shared by the producer handle, its threads and pending seek requests.
struct Shared {
    layout: Layout,
    pid: u32,
    /// A named file's mappings, guarded against truncation (empty for a sealed memfd);
    /// declared before the mappings so the guards drop first.
    guards: Vec<sigbus::Guard>,
    segment: Segment,
    allow_group: Option<u32>,
    control: Control,
    data: Data,
    lanes: Mutex<Vec<LaneConn>>,
    /// Per lane, the next `seq` to publish, under a lock that serialises publishes so `seq`
    /// is published in increasing order. Kept here, not read back from the lane table, which
    /// consumers can write.
    publish_locks: Vec<Mutex<u64>>,
    /// The producer's own state; the header's `producer_state` is a copy for consumers,
    /// which can write it, so no decision of the producer reads it back.
    state: std::sync::atomic::AtomicU32,
    /// Held while the state and its header copy are changed or compared, so the heartbeat's
    /// repair never writes back a state that was just replaced.
    state_lock: Mutex<()>,
    /// Per slot (`lane × slots_per_lane + slot`): this producer has it `WRITING`. A
    /// `WRITING` slot not marked here was forged (consumers can write the slot table) and
    /// is freed by the heartbeat.
    writing: Vec<AtomicBool>,
    /// The header's and tensor table's bytes as created: the fields that never change,
    /// restored by the heartbeat if a consumer overwrote them.
    image: Vec<u8>,
    seeks: Mutex<Vec<SeekRequest>>,
    next_conn: AtomicU64,
    stop: AtomicBool,
    /// Extra members of the `info` reply, supplied by the pipeline (e.g. per-stream counts).
    info_extra: Mutex<Option<InfoExtra>>,
    /// Feedback frames received, oldest first, with the lane that sent them.
    feedback: Mutex<Vec<(u32, Feedback)>>,
    /// The reply to an `evaluation` request, kept current by the pipeline.
    evaluation: Mutex<serde_json::Value>,
    /// Answers `classes` and `describe` (set by the daemon; absent: "unknown").
    catalog: Mutex<Option<Arc<Catalog>>>,
    /// Per lane, the announced plan (`plan_epoch`, `plan_batches`, `plan_kept`,
    /// `plan_pruned`): the producer's own copy of fields consumers can write, restored by the
    /// heartbeat.
    plans: Mutex<Vec<[u64; 4]>>,
    /// What defines the epoch order and batches (1.3), published in the `attach` and `info`
    /// replies and checked against a `resume`'s; `None` until the pipeline sets it.
    fingerprint: Mutex<Option<Fingerprint>>,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked pipeline thread must not take the ring down with a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn hdr_u32(&self, off: usize) -> &std::sync::atomic::AtomicU32 {
        self.control.u32(off as u64)
    }
    fn hdr_u64(&self, off: usize) -> &AtomicU64 {
        self.control.u64(off as u64)
    }
    fn lane_u32(&self, lane: u32, off: u64) -> &std::sync::atomic::AtomicU32 {
        self.control.u32(self.layout.lane_entry(lane) + off)
    }
    fn lane_u64(&self, lane: u32, off: u64) -> &AtomicU64 {
        self.control.u64(self.layout.lane_entry(lane) + off)
    }
    fn slot(&self, lane: u32, s: u32) -> Slot<'_> {
        Slot::new(&self.control, &self.layout, lane, s)
    }

    fn state(&self) -> Option<ProducerState> {
        ProducerState::from_code(self.state.load(Acquire))
    }

    /// Sets `producer_state` and wakes every waiter on every lane (they re-read the state).
    fn set_state(&self, state: ProducerState) {
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

    fn set_last_error(&self, msg: &str) {
        let mut end = msg.len().min(layout::LAST_ERROR_BYTES - 1);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = [0u8; layout::LAST_ERROR_BYTES];
        buf[..end].copy_from_slice(&msg.as_bytes()[..end]);
        self.control.store_bytes(hdr::LAST_ERROR as u64, &buf);
    }

    /// Records `pid`, connected on `stream`, as lane `lane`'s consumer (lane table and
    /// consumer table).
    fn register(
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
    fn reclaim_locked(&self, lanes: &mut [LaneConn], lane: u32) {
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
    fn reclaim_conn(&self, lane: u32, conn: u64) {
        let mut lanes = lock(&self.lanes);
        if matches!(lanes[lane as usize], LaneConn::Attached { conn: c, .. } if c == conn) {
            self.reclaim_locked(&mut lanes, lane);
        }
    }

    fn writing_mark(&self, lane: u32, slot: u32) -> &AtomicBool {
        &self.writing[(lane * self.layout.slots_per_lane + slot) as usize]
    }

    /// `FREE → WRITING` for this producer, marked as its own before the claim so the
    /// heartbeat never takes a slot being claimed for a forged one.
    fn claim(&self, lane: u32, slot: u32) -> bool {
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

    /// The lane table's `plan_*` fields of `lane`, tag first.
    fn load_plan(&self, lane: u32) -> [u64; 4] {
        [
            self.lane_u64(lane, lentry::PLAN_EPOCH).load(Acquire),
            self.lane_u64(lane, lentry::PLAN_BATCHES).load(Relaxed),
            self.lane_u64(lane, lentry::PLAN_KEPT).load(Relaxed),
            self.lane_u64(lane, lentry::PLAN_PRUNED).load(Relaxed),
        ]
    }

    /// Writes `plan` into the lane table's `plan_*` fields of `lane` (the tag last) and wakes
    /// the lane's waiters. Call with `plans` locked, so the copy and the table agree.
    fn store_plan(&self, lane: u32, plan: &[u64; 4]) {
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
    fn attached(&self) -> Vec<(u32, u64, Arc<UnixStream>)> {
        lock(&self.lanes)
            .iter()
            .enumerate()
            .filter_map(|(l, c)| match c {
                LaneConn::Attached { conn, stream, .. } => Some((l as u32, *conn, stream.clone())),
                _ => None,
            })
            .collect()
    }

    fn attach_reply(&self, lane: u32, extra: ReplyExtra) -> serde_json::Value {
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
    fn complete_attach(&self, lane: u32, pid: u32, stream: UnixStream, extra: ReplyExtra) {
        let stream = Arc::new(stream);
        let conn = self.register(&mut lock(&self.lanes), lane, pid, stream.clone());
        let sent = handshake::send_line(
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
type ReplyExtra = serde_json::Map<String, serde_json::Value>;

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
    pid: u32,
    stream: Option<UnixStream>,
    shared: Arc<Shared>,
    extra: ReplyExtra,
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

/// The ring's producer. `Send + Sync`: pipeline threads share it by reference or `Arc`.
pub struct Producer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    socket_path: PathBuf,
    finished_path: PathBuf,
    allow_group: Option<u32>,
    _lock: ProducerLock,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("name", &self.shared.layout.name)
            .field("generation", &self.shared.layout.generation)
            .finish()
    }
}

fn new_generation() -> u64 {
    loop {
        let g: u64 = rand::random::<u64>() ^ unix_ns();
        if g != 0 {
            return g;
        }
    }
}

impl Producer {
    /// Creates the ring `spec.name` in `dir`: takes the name's lock (refusing if a live
    /// producer holds it), allocates and seals the memfd, writes the header, binds the socket
    /// (replacing a stale one) and starts the service and heartbeat threads.
    pub fn create(spec: &RingSpec, dir: &RuntimeDir) -> Result<Producer, RingCreateError> {
        Producer::create_with(spec, dir, &ProducerOptions::default())
    }

    /// Like [`create`](Self::create), with the memory and access that `options` name.
    pub fn create_with(
        spec: &RingSpec,
        dir: &RuntimeDir,
        options: &ProducerOptions,
    ) -> Result<Producer, RingCreateError> {
        let name = spec.name.clone();
        validate_name(&name)?;
        let layout =
            layout::plan(spec, new_generation()).map_err(|source| RingCreateError::Spec {
                name: name.clone(),
                source,
            })?;
        dir.ensure_for(options.allow_group)?;
        let lock_path = dir.lock_path(&name);
        let lock = ProducerLock::acquire(&lock_path).map_err(|e| match e {
            LockError::Held(pid) => RingCreateError::AlreadyRunning {
                name: name.clone(),
                pid,
            },
            LockError::Io(source) => RingCreateError::Lock {
                name: name.clone(),
                path: lock_path.clone(),
                source,
            },
        })?;
        let io_err = |what: &'static str| {
            let name = name.clone();
            move |source: io::Error| RingCreateError::Io { name, what, source }
        };
        let segment = match &options.shm_dir {
            None => segment::create_memfd(&name, layout.file_bytes),
            Some(shm_dir) => segment::create_named(
                shm_dir,
                &name,
                layout.file_bytes,
                FileAccess {
                    group: options.allow_group,
                },
            ),
        }
        .map_err(|e| match e {
            SegmentError::NoSpace {
                dir: None, source, ..
            } => RingCreateError::OutOfMemory {
                name: name.clone(),
                bytes: layout.file_bytes,
                lanes: layout.lane_count,
                slots: layout.slots_per_lane,
                slot_bytes: layout.slot_stride,
                source,
            },
            SegmentError::NoSpace {
                dir: Some(dir),
                free_bytes,
                source,
            } => RingCreateError::ShmDirFull {
                name: name.clone(),
                bytes: layout.file_bytes,
                lanes: layout.lane_count,
                slots: layout.slots_per_lane,
                slot_bytes: layout.slot_stride,
                dir,
                free_bytes,
                source,
            },
            SegmentError::Dir(source) => RingCreateError::ShmDir {
                name: name.clone(),
                source,
            },
            SegmentError::Io(what, source) => io_err(what)(source),
        })?;
        if let Some(path) = segment.path() {
            log::info!("ring {name:?}: memory in {}", path.display());
        }
        let control = Control::map(segment.file(), layout.data_offset)
            .map_err(io_err("mapping the control region"))?;
        let data = Data::map(
            segment.file(),
            layout.data_offset,
            layout.file_bytes - layout.data_offset,
            true,
        )
        .map_err(io_err("mapping the data region"))?;
        // A named file can be truncated by whoever can write it; a memfd is sealed.
        let guards = if segment.path().is_some() {
            [control.mapping(), data.mapping()]
                .into_iter()
                .map(|(start, len)| sigbus::guard(start, len))
                .collect::<io::Result<Vec<_>>>()
                .map_err(io_err("guarding the ring file's mappings"))?
        } else {
            Vec::new()
        };
        let pid = std::process::id();
        let mut image = layout::encode_control(&layout, pid, unix_ns());
        control.store_bytes(0, &image);
        image.truncate(
            layout.tensor_table_offset as usize
                + layout.tensors.len() * layout::TENSOR_ENTRY_BYTES as usize,
        );
        control
            .u64(hdr::HEARTBEAT_MONO_NS as u64)
            .store(mono_ns(), Release);

        let socket_path = dir.socket_path(&name);
        // We hold the lock, so any socket file here is a dead producer's, and a finished
        // marker belongs to an earlier run.
        match std::fs::remove_file(&socket_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing the stale socket")(e)),
        }
        let finished_path = dir.finished_path(&name);
        match std::fs::remove_file(&finished_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing an earlier run's finished marker")(e)),
        }
        let listener = UnixListener::bind(&socket_path).map_err(io_err("binding the socket"))?;
        restrict_socket(&socket_path, options.allow_group)
            .map_err(io_err("setting the socket's owner group and mode"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the socket"))?;

        let lanes = vec![LaneConn::Vacant; layout.lane_count as usize];
        // Every lane's first batch has seq 1 (§5.4), as `encode_control` wrote.
        let publish_locks = (0..layout.lane_count).map(|_| Mutex::new(1)).collect();
        let plans = Mutex::new(vec![[0; 4]; layout.lane_count as usize]);
        let writing = (0..layout.lane_count * layout.slots_per_lane)
            .map(|_| AtomicBool::new(false))
            .collect();
        let shared = Arc::new(Shared {
            layout,
            pid,
            guards,
            segment,
            allow_group: options.allow_group,
            control,
            data,
            lanes: Mutex::new(lanes),
            publish_locks,
            state: std::sync::atomic::AtomicU32::new(ProducerState::Starting.code()),
            state_lock: Mutex::new(()),
            writing,
            image,
            seeks: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            info_extra: Mutex::new(None),
            feedback: Mutex::new(Vec::new()),
            evaluation: Mutex::new(json!({})),
            catalog: Mutex::new(None),
            fingerprint: Mutex::new(options.fingerprint.clone()),
            plans,
        });
        shared.set_state(ProducerState::Serving);
        let mut producer = Producer {
            shared: shared.clone(),
            threads: Vec::new(),
            socket_path,
            finished_path,
            allow_group: options.allow_group,
            _lock: lock,
        };
        let sh = shared.clone();
        let service = std::thread::Builder::new()
            .name(format!("ring-{name}-accept"))
            .spawn(move || service_loop(&sh, listener))
            .map_err(io_err("starting the accept thread"))?;
        producer.threads.push(service);
        let sh = shared;
        let heartbeat = std::thread::Builder::new()
            .name(format!("ring-{name}-heartbeat"))
            .spawn(move || heartbeat_loop(&sh))
            .map_err(io_err("starting the heartbeat thread"))?;
        producer.threads.push(heartbeat);
        Ok(producer)
    }

    /// The ring's layout: tensor offsets and sizes, lanes, slots.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// Non-blocking: a `FREE` slot of `lane` claimed as `WRITING`, or `None` (lane full or
    /// out of range).
    pub fn try_claim(&self, lane: u32) -> Option<SlotWriter<'_>> {
        if lane >= self.shared.layout.lane_count {
            return None;
        }
        (0..self.shared.layout.slots_per_lane)
            .find(|&s| self.shared.claim(lane, s))
            .map(|slot| SlotWriter {
                shared: &self.shared,
                lane,
                slot,
                done: false,
            })
    }

    /// Blocks until some lane in `lanes` has a free slot, or `timeout` passes (`None`),
    /// waiting on `release_any`; the time waited is added to `producer_wait_ns` (header, and
    /// every lane in `lanes`, since it waited for each of them).
    pub fn claim_any(&self, lanes: &[u32], timeout: Duration) -> Option<SlotWriter<'_>> {
        let start = Instant::now();
        let release_any = self.shared.hdr_u32(hdr::RELEASE_ANY);
        let mut waited = false;
        let result = loop {
            // Read the word before scanning, so a release after the scan changes it and the
            // wait returns at once (partner: the consumer's bump after its FREE store).
            let v = release_any.load(Acquire);
            if let Some(w) = lanes.iter().find_map(|&l| self.try_claim(l)) {
                break Some(w);
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout || self.shared.stop.load(Acquire) {
                break None;
            }
            waited = true;
            futex::wait(release_any, v, (timeout - elapsed).min(MAX_WAIT));
        };
        if waited {
            let ns = start.elapsed().as_nanos() as u64;
            self.shared
                .hdr_u64(hdr::PRODUCER_WAIT_NS)
                .fetch_add(ns, Relaxed);
            for &l in lanes.iter().filter(|&&l| l < self.shared.layout.lane_count) {
                self.shared
                    .lane_u64(l, lentry::PRODUCER_WAIT_NS)
                    .fetch_add(ns, Relaxed);
            }
        }
        result
    }

    /// Adds what `extra` returns (a JSON object) to every `info` reply (§3), e.g. the served
    /// counts of each stream of a mixture. Keys the reply already has are kept.
    pub fn set_info_extra(&self, extra: InfoExtra) {
        *lock(&self.shared.info_extra) = Some(extra);
    }

    /// Sets what `classes` and `describe` requests are answered with (§3, 1.3).
    pub fn set_catalog(&self, catalog: Catalog) {
        *lock(&self.shared.catalog) = Some(Arc::new(catalog));
    }

    /// Takes back what [`set_info_extra`](Self::set_info_extra) set (to wrap it).
    pub fn take_info_extra(&self) -> Option<InfoExtra> {
        lock(&self.shared.info_extra).take()
    }

    /// Feedback frames (§9) received since the last call, oldest first, each with the lane
    /// whose consumer sent it. Frames of one connection keep their order.
    pub fn take_feedback(&self) -> Vec<(u32, Feedback)> {
        std::mem::take(&mut *lock(&self.shared.feedback))
    }

    /// Sets what an `evaluation` request is answered with (a JSON object, see
    /// docs/ring-format.md §3).
    pub fn set_evaluation(&self, value: serde_json::Value) {
        *lock(&self.shared.evaluation) = value;
    }

    /// The current `evaluation` reply (what [`set_evaluation`](Self::set_evaluation) set).
    pub fn evaluation(&self) -> serde_json::Value {
        lock(&self.shared.evaluation).clone()
    }

    /// Publishes lane `lane`'s plan for `epoch` (§5.3 `plan_*` fields): its batches, and the
    /// samples kept and pruned over all ranks. Wakes the lane's waiters, so a consumer that
    /// waits for the epoch's length sees it at once.
    pub fn announce_epoch(&self, lane: u32, epoch: u64, batches: u64, kept: u64, pruned: u64) {
        let sh = &self.shared;
        let mut plans = lock(&sh.plans);
        if let Some(plan) = plans.get_mut(lane as usize) {
            *plan = [epoch + 1, batches, kept, pruned];
            sh.store_plan(lane, plan);
        }
    }

    /// Whether a consumer is attached to `lane` now (an on-demand ring serves a lane's pass
    /// only while its consumer is there).
    pub fn lane_attached(&self, lane: u32) -> bool {
        matches!(
            lock(&self.shared.lanes).get(lane as usize),
            Some(LaneConn::Attached { .. })
        )
    }

    /// Publishes what defines the epoch order and batches (1.3): sent in the `attach` and
    /// `info` replies, and the reference a `resume`'s saved fingerprint is checked against.
    pub fn set_fingerprint(&self, fingerprint: Fingerprint) {
        *lock(&self.shared.fingerprint) = Some(fingerprint);
    }

    /// Resume requests that arrived with attach. See [`SeekRequest::apply`].
    pub fn take_seek_requests(&self) -> Vec<SeekRequest> {
        std::mem::take(&mut *lock(&self.shared.seeks))
    }

    /// Adds to the `samples_ok` / `samples_skipped` counters.
    pub fn add_samples(&self, ok: u64, skipped: u64) {
        self.shared.hdr_u64(hdr::SAMPLES_OK).fetch_add(ok, Relaxed);
        self.shared
            .hdr_u64(hdr::SAMPLES_SKIPPED)
            .fetch_add(skipped, Relaxed);
    }

    /// Stores `msg` (truncated to 255 bytes) as `last_error`.
    pub fn record_error(&self, msg: &str) {
        self.shared.set_last_error(msg);
    }

    /// Marks the stream complete (`FINISHED`) and wakes every consumer.
    pub fn finish(&self) {
        self.shared.set_state(ProducerState::Finished);
    }

    /// Marks the producer `FAILED` with `msg` as `last_error` and wakes every consumer.
    pub fn fail(&self, msg: &str) {
        self.shared.set_last_error(msg);
        self.shared.set_state(ProducerState::Failed);
    }

    /// The ring file, if it was truncated under the producer (a `--shm-dir` file shrunk by a
    /// process with write access to it). Its mappings then hold anonymous zero pages: nothing
    /// faults, but no consumer can be served any more, so the caller should stop.
    pub fn truncated_file(&self) -> Option<&std::path::Path> {
        if self.shared.guards.iter().any(sigbus::Guard::lost) {
            self.shared.segment.path()
        } else {
            None
        }
    }

    /// Counters for the status line. The state is the producer's own, not the header's copy.
    pub fn stats(&self) -> RingStats {
        let mut stats = super::observer::read_stats(&self.shared.control, &self.shared.layout);
        stats.state = self.shared.state();
        stats
    }

    /// The ring's `last_error`: the last skip or failure reason (empty if none).
    pub fn last_error(&self) -> String {
        let raw = self
            .shared
            .control
            .load_bytes(hdr::LAST_ERROR as u64, layout::LAST_ERROR_BYTES);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }
}

impl Producer {
    /// Consumers attached now (a pending resume counts: its reply is about to go out).
    pub fn consumers_attached(&self) -> usize {
        lock(&self.shared.lanes)
            .iter()
            .filter(|c| !matches!(c, LaneConn::Vacant))
            .count()
    }

    /// Writes `<name>.finished` (§7, 1.3): one JSON line naming this generation, for consumers
    /// that look for the ring after this process is gone. Same mode and group as the socket.
    fn write_finished_marker(&self) -> io::Result<()> {
        let line = json!({"name": self.shared.layout.name,
            "generation_str": self.shared.layout.generation.to_string(),
            "producer_pid": self.shared.pid, "finished_unix_ns": unix_ns()});
        let tmp = self.finished_path.with_extension("finished.tmp");
        std::fs::write(&tmp, format!("{line}\n"))?;
        restrict_socket(&tmp, self.allow_group)?;
        std::fs::rename(&tmp, &self.finished_path)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // A finished stream stays FINISHED: its consumers take what is still ready and then
        // see the end of the stream, not a crash (§7 "The end of a finite run"). Anything else
        // is a stop.
        let finished = self.shared.state() == Some(ProducerState::Finished);
        if !finished {
            self.shared.set_state(ProducerState::Stopped);
        }
        self.shared.stop.store(true, Release);
        for t in self.threads.drain(..) {
            t.thread().unpark();
            let _ = t.join();
        }
        // Unapplied seeks get their refusal now rather than when the pipeline lets go.
        drop(self.take_seek_requests());
        if finished {
            if let Err(e) = self.write_finished_marker() {
                log::warn!(
                    "cannot write {}: {e}; consumers that look for the ring later are told it is not running",
                    self.finished_path.display()
                );
            }
        }
        let _ = std::fs::remove_file(&self.socket_path);
        // Consumers still mapping a named file keep its memory until they detach.
        self.shared.segment.remove_name();
        // `_lock` drops after this body: the lock file goes last.
    }
}

/// A slot of one lane, claimed as `WRITING`. Publish it, or drop it to return it to `FREE`.
pub struct SlotWriter<'a> {
    shared: &'a Shared,
    lane: u32,
    slot: u32,
    done: bool,
}

impl SlotWriter<'_> {
    /// The slot's lane.
    pub fn lane(&self) -> u32 {
        self.lane
    }

    /// Tensor `index`'s bytes in the slot (zero copy).
    ///
    /// # Panics
    /// If `index` is not below the schema's tensor count.
    pub fn tensor_bytes_mut(&mut self, index: usize) -> &mut [u8] {
        let t = &self.shared.layout.tensors[index];
        let off = self.shared.layout.slot_data(self.lane, self.slot) + t.offset;
        // SAFETY: the slot is WRITING and owned by this writer; `&mut self` keeps any other
        // slice of it from this writer alive at the same time.
        unsafe { self.shared.data.bytes_mut(off, t.bytes) }
    }

    /// Every tensor's bytes at once (disjoint: the layout never overlaps tensors).
    pub fn tensors_mut(&mut self) -> Vec<&mut [u8]> {
        let base = self.shared.layout.slot_data(self.lane, self.slot);
        self.shared
            .layout
            .tensors
            .iter()
            // SAFETY: the slot is WRITING and owned by this writer; the tensors' byte ranges
            // are pairwise disjoint (checked by `plan`), so the slices do not alias, and
            // `&mut self` is borrowed for as long as they live.
            .map(|t| unsafe { self.shared.data.bytes_mut(base + t.offset, t.bytes) })
            .collect()
    }

    /// Publishes the batch: metadata, `READY` (release), then the lane counters and a wake-up
    /// of the lane's consumer.
    pub fn publish(mut self, meta: BatchMeta) {
        let sh = self.shared;
        let lane = self.lane;
        let mut next_seq = lock(&sh.publish_locks[lane as usize]);
        let seq = *next_seq;
        sh.slot(lane, self.slot).publish(&SlotMeta {
            seq,
            epoch: meta.epoch,
            index: meta.index,
            count: meta.count,
            flags: if meta.last_of_epoch {
                slot::FLAG_LAST_OF_EPOCH
            } else {
                0
            },
            published_mono_ns: mono_ns(),
        });
        self.done = true;
        sh.writing_mark(lane, self.slot).store(false, Relaxed);
        *next_seq = seq + 1;
        sh.lane_u64(lane, lentry::NEXT_SEQ).store(seq + 1, Relaxed);
        sh.lane_u64(lane, lentry::PUBLISHED).fetch_add(1, Relaxed);
        sh.lane_u64(lane, lentry::EPOCH).store(meta.epoch, Relaxed);
        sh.lane_u64(lane, lentry::INDEX).store(meta.index, Relaxed);
        sh.hdr_u64(hdr::BATCHES_PUBLISHED).fetch_add(1, Relaxed);
        // SYNC POINT with the consumer's acquire load of publish_seq before its scan.
        futex::bump_and_wake(sh.lane_u32(lane, lentry::PUBLISH_SEQ));
    }
}

/// The slot's tensors by name, as the batch side writes them ([`crate::batch::BatchTensors`]):
/// a tensor is found by its name in the ring's tensor table, never by its position.
impl SlotWriter<'_> {
    /// Tensor `t`'s bytes in the slot (zero copy); `None` when this ring's batches do not
    /// carry it.
    pub fn tensor_mut(&mut self, t: crate::batch::TensorIndex) -> Option<&mut [u8]> {
        let at = self.shared.layout.tensor_index(t.name())?;
        Some(self.tensor_bytes_mut(at))
    }

    /// Every tensor of the slot at once, by name, with typed row writers.
    pub fn batch_tensors(&mut self) -> crate::batch::BatchTensors<'_> {
        let shared = self.shared;
        let names = shared.layout.tensors.iter().map(|t| t.name.as_str());
        crate::batch::BatchTensors::from_named(names.zip(self.tensors_mut()))
    }
}

impl Drop for SlotWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.slot(self.lane, self.slot).abandon();
            self.shared
                .writing_mark(self.lane, self.slot)
                .store(false, Relaxed);
        }
    }
}

/// Accepts connections, reads their requests and watches attached consumers' sockets until
/// stopped. Nothing here blocks: every socket is non-blocking and one `poll` waits for all,
/// so a client that sends its request slowly (or never) delays no other client, and each
/// request has [`REQUEST_TIMEOUT`] in all.
fn service_loop(sh: &Arc<Shared>, listener: UnixListener) {
    let mut incoming: Vec<Incoming> = Vec::new();
    // Each attached connection's partly received feedback frame, by connection number.
    let mut frames: std::collections::HashMap<u64, FrameReader> = std::collections::HashMap::new();
    while !sh.stop.load(Acquire) {
        let now = Instant::now();
        incoming.retain(|c| {
            let late = now >= c.deadline;
            if late {
                refuse(
                    &c.stream,
                    Refusal::RequestTimeout,
                    "request timed out: send the whole request line within 2 s of connecting",
                );
            }
            !late
        });
        let attached = sh.attached();
        let wait = incoming
            .iter()
            .map(|c| c.deadline - now)
            .fold(TICK, Duration::min);
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos() as i64,
        };
        // A full set of pending requests leaves new connections in the listen backlog.
        let listening = incoming.len() < MAX_INCOMING;
        let mut fds = Vec::with_capacity(1 + incoming.len() + attached.len());
        fds.push(PollFd::new(
            &listener,
            if listening {
                PollFlags::IN
            } else {
                PollFlags::empty()
            },
        ));
        fds.extend(
            incoming
                .iter()
                .map(|c| PollFd::new(&c.stream, PollFlags::IN)),
        );
        fds.extend(
            attached
                .iter()
                .map(|(_, _, s)| PollFd::new(&**s, PollFlags::IN)),
        );
        if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        let (listener_ready, rest) = ready.split_first().unwrap_or((&false, &[]));
        let (incoming_ready, attached_ready) = rest.split_at(incoming.len());
        frames.retain(|conn, _| attached.iter().any(|(_, c, _)| c == conn));
        for ((lane, conn, stream), _) in attached.iter().zip(attached_ready).filter(|(_, &r)| r) {
            let reader = frames.entry(*conn).or_default();
            match pump(stream, *lane, reader, &sh.feedback) {
                Pumped::Open => {}
                Pumped::Closed => sh.reclaim_conn(*lane, *conn),
                Pumped::Malformed(e) => {
                    log::warn!("lane {lane}: {e}; dropping that consumer's connection");
                    sh.reclaim_conn(*lane, *conn);
                }
            }
        }
        let mut i = 0;
        let mut complete = Vec::new();
        incoming.retain_mut(|c| {
            i += 1;
            if !incoming_ready[i - 1] {
                return true;
            }
            match c.line.poll_line(&c.stream) {
                Ok(None) => true,
                Ok(Some(line)) => {
                    complete.push((c.stream.try_clone(), Ok(line)));
                    false
                }
                Err(e) => {
                    complete.push((c.stream.try_clone(), Err(e)));
                    false
                }
            }
        });
        for (stream, line) in complete {
            if let Ok(stream) = stream {
                serve_request(sh, stream, line);
            }
        }
        if *listener_ready && listening {
            while incoming.len() < MAX_INCOMING {
                let Ok((stream, _)) = listener.accept() else {
                    break;
                };
                if stream.set_nonblocking(true).is_ok() {
                    incoming.push(Incoming {
                        stream,
                        line: handshake::LineReader::default(),
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                    });
                }
            }
        }
    }
}

/// Sends a failure reply with its code (§3 "Refusal codes").
fn refuse(stream: &UnixStream, why: Refusal, error: &str) {
    let _ = handshake::send_line(stream, &why.reply(error), None);
}

/// Answers one request whose line has arrived (or failed to): uid check, request, reply.
fn serve_request(sh: &Arc<Shared>, stream: UnixStream, line: io::Result<Vec<u8>>) {
    let ours = rustix::process::geteuid().as_raw();
    let peer_pid = match handshake::peer_cred(&stream) {
        Ok(peer) => {
            if access::peer_allowed(peer, ours, sh.allow_group) {
                peer.pid
            } else {
                let msg = match sh.allow_group {
                    None => format!("permission denied: consumer uid {} differs from the producer's uid {ours}", peer.uid),
                    Some(g) => format!("permission denied: consumer uid {} differs from the producer's uid {ours} and is not in the allowed group {g}", peer.uid),
                };
                return refuse(&stream, Refusal::Permission, &msg);
            }
        }
        Err(e) => {
            return refuse(
                &stream,
                Refusal::Permission,
                &format!("permission denied: cannot read peer credentials: {e}"),
            )
        }
    };
    let request = match line
        .map_err(|e| e.to_string())
        .and_then(|line| serde_json::from_slice::<Request>(&line).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => return refuse(&stream, Refusal::BadRequest, &format!("bad request: {e}")),
    };
    match request {
        Request::Evaluation => {
            let mut reply = lock(&sh.evaluation).clone();
            if let Some(obj) = reply.as_object_mut() {
                obj.insert("ok".to_owned(), json!(true));
            }
            send_long_reply(stream, reply);
        }
        Request::Classes => {
            let catalog = lock(&sh.catalog).clone();
            let mut reply = catalog.map_or_else(
                || json!({"classes": null, "source": "unknown"}),
                |c| c.classes.clone(),
            );
            reply["ok"] = json!(true);
            send_long_reply(stream, reply);
        }
        Request::Describe { ids } => {
            if ids.len() > handshake::MAX_DESCRIBE_IDS {
                return refuse(
                    &stream,
                    Refusal::BadRequest,
                    &format!(
                        "bad request: describe asks about {} ids; at most {} per request",
                        ids.len(),
                        handshake::MAX_DESCRIBE_IDS
                    ),
                );
            }
            let Some(catalog) = lock(&sh.catalog).clone() else {
                return refuse(
                    &stream,
                    Refusal::Unsupported,
                    "this producer does not describe its samples",
                );
            };
            // Looking samples up and writing the reply happen off the service thread.
            let _ = std::thread::Builder::new()
                .name("ringfeed-describe".into())
                .spawn(move || {
                    let samples: Vec<_> = ids.iter().map(|&id| (catalog.describe)(id)).collect();
                    write_long_reply(&stream, &json!({"ok": true, "samples": samples}));
                });
        }
        Request::Info => {
            let lanes = lock(&sh.lanes);
            let list: Vec<_> = (0..sh.layout.lane_count)
                .map(|l| json!({"lane": l, "consumer_pid": match lanes[l as usize] { LaneConn::Attached { pid, .. } => pid, _ => 0 }}))
                .collect();
            drop(lanes);
            let mut reply = json!({"ok": true, "generation": sh.layout.generation,
                "generation_str": sh.layout.generation.to_string(), "producer_pid": sh.pid,
                "name": sh.layout.name, "lane_count": sh.layout.lane_count, "lanes": list,
                "world_size": sh.layout.world_size, "first_rank": sh.layout.first_rank});
            if let (Some(fp), Some(fields)) = (&*lock(&sh.fingerprint), reply.as_object_mut()) {
                fields.insert("fingerprint".to_owned(), json!(fp));
            }
            if let (Some(extra), Some(fields)) = (&*lock(&sh.info_extra), reply.as_object_mut()) {
                if let serde_json::Value::Object(more) = extra() {
                    for (key, value) in more {
                        fields.entry(key).or_insert(value);
                    }
                }
            }
            let _ = handshake::send_line(&stream, &reply, None);
        }
        Request::Attach {
            version,
            lane,
            pid: _,
            resume,
        } => {
            // The registry records the SO_PEERCRED pid: it is what liveness checks can trust.
            let pid = peer_pid;
            if version != u32::from(layout::VERSION_MAJOR) {
                return refuse(
                    &stream,
                    Refusal::Version,
                    &format!(
                        "version mismatch: client implements {version}, producer {}",
                        layout::VERSION_MAJOR
                    ),
                );
            }
            if lane >= sh.layout.lane_count {
                return refuse(
                    &stream,
                    Refusal::LaneRange,
                    &format!(
                        "lane {lane} out of range (lane_count {})",
                        sh.layout.lane_count
                    ),
                );
            }
            let mut extra = ReplyExtra::new();
            let mut resume = resume;
            if let Some(r) = &mut resume {
                if let Err(why) = check_resume(r, sh.layout.epochs) {
                    return refuse(&stream, Refusal::ResumeRange, &why);
                }
                if let (Some(saved), Some(ours)) = (&r.fingerprint, &*lock(&sh.fingerprint)) {
                    match resume::plan_resume(ours, saved, r.sample, r.index) {
                        Ok(plan) => {
                            r.index = plan.index;
                            extra.insert(
                                "resumed_at".to_owned(),
                                json!({"epoch": r.epoch, "index": plan.index, "sample": plan.sample}),
                            );
                            if !plan.warnings.is_empty() {
                                for w in &plan.warnings {
                                    log::warn!("lane {lane} resume: {w}");
                                }
                                extra.insert("warnings".to_owned(), json!(plan.warnings));
                            }
                        }
                        Err(mismatch) => {
                            let fields: Vec<_> = mismatch
                                .fields
                                .iter()
                                .map(|(f, saved, serving)| {
                                    json!({"field": f, "saved": saved, "serving": serving})
                                })
                                .collect();
                            let mut reply = Refusal::ResumeMismatch.reply(&mismatch.message);
                            if let Some(members) = reply.as_object_mut() {
                                members.insert("mismatch".to_owned(), json!(fields));
                            }
                            let _ = handshake::send_line(&stream, &reply, None);
                            return;
                        }
                    }
                }
            }
            let mut lanes = lock(&sh.lanes);
            match &lanes[lane as usize] {
                LaneConn::Vacant => {}
                LaneConn::Pending { pid: other } => {
                    return refuse(
                        &stream,
                        Refusal::LaneHeld,
                        &format!("lane {lane} has an attach pending from pid {other}"),
                    );
                }
                LaneConn::Attached {
                    pid: other,
                    stream: holder,
                    ..
                } => {
                    // The holder may have died a moment ago; look before refusing. Its
                    // connection is in the lane table however its attach completed.
                    let other = *other;
                    // Peek only: unread feedback frames stay for the service loop to read. A pid
                    // of 0 (outside our PID namespace) is judged by its socket alone.
                    if handshake::peer_hung_up(holder) || pid_gone(other) {
                        sh.reclaim_locked(&mut lanes, lane);
                    } else {
                        return refuse(
                            &stream,
                            Refusal::LaneHeld,
                            &format!("lane {lane} is held by live consumer pid {other}"),
                        );
                    }
                }
            }
            if let Some(r) = resume {
                // A finished ring can still be rewound: the pipeline keeps taking seeks until
                // it is stopped.
                if !matches!(
                    sh.state(),
                    Some(ProducerState::Serving | ProducerState::Finished)
                ) {
                    return refuse(
                        &stream,
                        Refusal::Stopping,
                        "cannot resume: the producer is stopping or has failed",
                    );
                }
                lanes[lane as usize] = LaneConn::Pending { pid };
                drop(lanes);
                lock(&sh.seeks).push(SeekRequest {
                    lane,
                    epoch: r.epoch,
                    index: r.index,
                    pid,
                    stream: Some(stream),
                    shared: sh.clone(),
                    extra,
                });
                return;
            }
            drop(lanes);
            sh.complete_attach(lane, pid, stream, extra);
        }
    }
}

/// Sends a reply that may exceed a socket buffer (up to 4 MiB, §3) from a short-lived
/// thread, so a client that reads slowly never holds up the service thread.
fn send_long_reply(stream: UnixStream, reply: serde_json::Value) {
    let _ = std::thread::Builder::new()
        .name("ringfeed-reply".into())
        .spawn(move || write_long_reply(&stream, &reply));
}

/// Writes `reply` with blocking sends under the request timeout (off the service thread).
fn write_long_reply(stream: &UnixStream, reply: &serde_json::Value) {
    if stream.set_nonblocking(false).is_ok()
        && stream.set_write_timeout(Some(REQUEST_TIMEOUT)).is_ok()
    {
        let _ = handshake::send_line(stream, reply, None);
    }
}

/// Refuses a resume position the stream can never reach: an epoch past the configured last
/// one (`epochs`, 0 = unbounded; resuming at `epochs` itself means "after the end"), or
/// `u64::MAX`, which has no next epoch.
fn check_resume(r: &handshake::Resume, epochs: u64) -> Result<(), String> {
    if r.epoch == u64::MAX || (epochs > 0 && r.epoch > epochs) {
        let last = if epochs > 0 {
            format!("the ring serves epochs 0 to {}", epochs - 1)
        } else {
            format!("epochs up to {}", u64::MAX - 1)
        };
        return Err(format!("cannot resume at epoch {}: {last}", r.epoch));
    }
    Ok(())
}

/// The socket file: 0600, or 0660 and the allowed group (connecting needs write access).
fn restrict_socket(path: &std::path::Path, group: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = group {
        rustix::fs::chownat(
            rustix::fs::CWD,
            path,
            None,
            Some(rustix::process::Gid::from_raw(gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Whether the consumer process `pid` is known to have exited. Pid 0 means the consumer lives
/// in a pid namespace we cannot see into (`SO_PEERCRED` reported no pid): its liveness is its
/// socket alone (EOF when the process dies), never a pid check, which would declare it dead.
fn pid_gone(pid: u32) -> bool {
    match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) => rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH),
        None => false,
    }
}

/// Refreshes the heartbeat and reclaims lanes whose consumer process no longer exists (a
/// backup for socket EOF, e.g. when a forked child still holds the dead consumer's socket;
/// consumers whose pid we cannot see are judged by their socket only).
fn heartbeat_loop(sh: &Arc<Shared>) {
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
