//! The producer side: creates the ring, hands out free slots to the pipeline, publishes
//! batches and reclaims the slots of consumers that die.
//!
//! # Brief overview
//!
//! - this file: [`Producer`], the pipeline's handle: creating the ring (lock, memory, header,
//!   socket), claiming slots, announcing epochs, counters, and the clean stop.
//! - `state`: what the handle and its threads share ([`Shared`](state::Shared)): the lane
//!   table with each attach's lane page and doorbell (format 2.0), slot claims (a slot is
//!   claimable when `FREE`, or `READY` and released in the current attach's lane page), the
//!   reclaim of a gone consumer's lane, and [`SeekRequest`], a resume the service hands to
//!   the pipeline.
//! - `writer`: [`SlotWriter`], one claimed slot being filled, then published.
//! - `service`: the *attach service* thread: one `poll` over the listening socket, every
//!   connection still sending its request, and every attached consumer's socket, so a
//!   consumer's death is seen at once and a slow client delays nobody.
//! - `heartbeat`: the *heartbeat* thread: refreshes `heartbeat_mono_ns`, copies the lane
//!   pages' counters into the ring's tables (statistics), and as a backup reclaims lanes whose
//!   consumer pid no longer exists.
//!
//! Every byte of the ring is written by the producer only (format 2.0): consumers receive it
//! through a read-only descriptor, and a memfd is also sealed `F_SEAL_FUTURE_WRITE`. What a
//! consumer writes is its own lane page, which the producer reads only to free that lane's
//! released slots (comparing with its own `seq`), and its doorbell, which only wakes
//! [`Producer::claim_any`].
//!
//! The service, the heartbeat and the writer depend on `state` and on the format
//! ([`super::layout`]), never on this file or on each other; this file starts the two
//! threads and owns them.
//!
//! Who holds a lane is decided in one place, the lane table (`LaneConn` under one mutex):
//! an attached lane's entry holds the consumer's socket itself, so every check of "is the
//! holder gone?" (the service thread's poll, an attach finding the lane taken, the heartbeat)
//! looks at the same socket, whichever thread completed the attach.

mod heartbeat;
mod service;
mod state;
mod writer;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use thiserror::Error;

use super::feedback::Feedback;
use super::futex::{mono_ns, unix_ns};
use super::layout::{
    self, hdr, io_step, lane as lentry, IoStep, Layout, ProducerState, RingSpec, RingStats,
    SpecError,
};
use super::memory::{self, Control, Data};
use super::resume::Fingerprint;
use super::runtime_dir::{validate_name, LockError, ProducerLock, RuntimeDir, RuntimeDirError};
use super::segment::{self, FileAccess, SegmentError, ShmDirError};
use super::sigbus;
use state::{lock, LaneConn, Shared};

pub use state::{Catalog, InfoExtra, SeekRequest};
pub use writer::{BatchMeta, SlotWriter};

/// Longest single wait for a doorbell, so stop requests, timeouts and slots freed by a
/// reclaim or a seek (which ring no doorbell) are noticed.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How long a doorbell that keeps ringing for nothing (no slot of its lane claimable after
/// it, [`MUTE_AFTER`] times in a row) is left out of the wait: a consumer flooding its
/// doorbell costs the producer a few rescans per interval, not a busy loop.
const MUTE: Duration = Duration::from_millis(1);
/// Rings for nothing in a row after which a doorbell is muted. An honest consumer rings for
/// nothing at most once in a row (a ring still pending for a release whose slot an earlier
/// scan already claimed: the wait after draining it sees only new releases), so it is never
/// muted.
const MUTE_AFTER: u32 = 2;

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

impl IoStep for RingCreateError {
    fn io(name: String, what: &'static str, source: io::Error) -> Self {
        RingCreateError::Io { name, what, source }
    }
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
        let io_err = |what| io_step::<RingCreateError>(&name, what);
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
        control.store_bytes(0, &layout::encode_control(&layout, pid, unix_ns()));
        if segment.path().is_none() {
            // Our writable mappings exist; from now on nobody can make another one.
            if let Err(e) = memory::seal_future_write(segment.file()) {
                log::warn!(
                    "ring {name:?}: the kernel refused F_SEAL_FUTURE_WRITE ({e}); consumers still get a read-only descriptor"
                );
            }
        }
        let ring_read_only = memory::reopen_read_only(segment.file())
            .map_err(io_err("reopening the ring read-only for consumers"))?;
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
        let bases = (0..layout.lane_count)
            .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
            .collect();
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
            ring_read_only,
            bases,
            lanes: Mutex::new(lanes),
            publish_locks,
            state: std::sync::atomic::AtomicU32::new(ProducerState::Starting.code()),
            state_lock: Mutex::new(()),
            writing,
            seeks: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            info_extra: Mutex::new(None),
            feedback: Mutex::new(Vec::new()),
            evaluation: Mutex::new(json!({})),
            catalog: Mutex::new(None),
            fingerprint: Mutex::new(options.fingerprint.clone()),
            plan_lock: Mutex::new(()),
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
            .spawn(move || service::service_loop(&sh, listener))
            .map_err(io_err("starting the accept thread"))?;
        producer.threads.push(service);
        let sh = shared;
        let heartbeat = std::thread::Builder::new()
            .name(format!("ring-{name}-heartbeat"))
            .spawn(move || heartbeat::heartbeat_loop(&sh))
            .map_err(io_err("starting the heartbeat thread"))?;
        producer.threads.push(heartbeat);
        Ok(producer)
    }

    /// The ring's layout: tensor offsets and sizes, lanes, slots.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// Non-blocking: a slot of `lane` claimed as `WRITING` (a `FREE` one, or a `READY` one
    /// whose batch the lane's consumer released), or `None` (lane full or out of range).
    pub fn try_claim(&self, lane: u32) -> Option<SlotWriter<'_>> {
        if lane >= self.shared.layout.lane_count {
            return None;
        }
        let attachment = self.shared.attachment(lane);
        self.claim_in(lane, attachment.as_deref())
    }

    fn claim_in(
        &self,
        lane: u32,
        attachment: Option<&state::Attachment>,
    ) -> Option<SlotWriter<'_>> {
        let page = attachment.map(|a| &a.page);
        (0..self.shared.layout.slots_per_lane)
            .find(|&s| self.shared.claim(lane, s, page))
            .map(|slot| SlotWriter::new(&self.shared, lane, slot))
    }

    /// Blocks until some lane in `lanes` has a claimable slot, or `timeout` passes (`None`),
    /// waiting in `poll(2)` on the doorbells of those lanes' attached consumers (at most
    /// 100 ms at a time: slots freed by a reclaim or a seek ring no doorbell). The time waited
    /// is added to `producer_wait_ns` (header, and every lane in `lanes`, since it waited for
    /// each of them).
    pub fn claim_any(&self, lanes: &[u32], timeout: Duration) -> Option<SlotWriter<'_>> {
        let start = Instant::now();
        let lane_count = self.shared.layout.lane_count;
        let mut waited = false;
        // Per lane whose doorbell rang, how many times in a row it rang for nothing: reaching
        // the next wait means the rescan after a ring found nothing.
        let mut for_nothing: Vec<(u32, u32)> = Vec::new();
        let result = loop {
            // The current attaches, taken under the lock once per round; the Arcs keep their
            // pages mapped and doorbells open while we scan and poll, even across a reclaim.
            let attachments: Vec<(u32, Option<Arc<state::Attachment>>)> = {
                let conns = lock(&self.shared.lanes);
                lanes
                    .iter()
                    .filter(|&&l| l < lane_count)
                    .map(|&l| (l, conns[l as usize].attachment().cloned()))
                    .collect()
            };
            // A release after this scan rings its doorbell, whose counter stays non-zero
            // until drained below: the poll then returns at once (no lost wake-up).
            if let Some(w) = attachments
                .iter()
                .find_map(|(l, a)| self.claim_in(*l, a.as_deref()))
            {
                break Some(w);
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout || self.shared.stop.load(Acquire) {
                break None;
            }
            waited = true;
            let muted: Vec<u32> = for_nothing
                .iter()
                .filter(|(_, n)| *n >= MUTE_AFTER)
                .map(|(l, _)| *l)
                .collect();
            let bells: Vec<(u32, &state::Attachment)> = attachments
                .iter()
                .filter(|(l, _)| !muted.contains(l))
                .filter_map(|(l, a)| a.as_deref().map(|a| (*l, a)))
                .collect();
            let mut fds: Vec<rustix::event::PollFd<'_>> = bells
                .iter()
                .map(|(_, a)| rustix::event::PollFd::new(&a.doorbell, rustix::event::PollFlags::IN))
                .collect();
            let mut wait = (timeout - elapsed).min(MAX_WAIT);
            if !muted.is_empty() {
                wait = wait.min(MUTE);
            }
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: wait.as_nanos() as i64,
            };
            let polled = rustix::event::poll(&mut fds, Some(&ts));
            let rang: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            // A muted lane keeps its count (it rings again for nothing: muted again); a lane
            // that was listened to and stayed quiet starts over.
            let mut next: Vec<(u32, u32)> = for_nothing
                .iter()
                .filter(|(l, _)| muted.contains(l))
                .copied()
                .collect();
            if polled.is_ok() {
                for ((l, a), _) in bells.iter().zip(rang).filter(|(_, r)| *r) {
                    a.drain_doorbell();
                    let before = for_nothing.iter().find(|(x, _)| x == l).map_or(0, |e| e.1);
                    next.push((*l, before + 1));
                }
            }
            for_nothing = next;
        };
        if waited {
            let ns = start.elapsed().as_nanos() as u64;
            self.shared
                .hdr_u64(hdr::PRODUCER_WAIT_NS)
                .fetch_add(ns, Relaxed);
            for &l in lanes.iter().filter(|&&l| l < lane_count) {
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
        if lane < sh.layout.lane_count {
            let _plan_lock = lock(&sh.plan_lock);
            sh.store_plan(lane, &[epoch + 1, batches, kept, pruned]);
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

    /// Counters for the status line. The state is the producer's own, not the header's copy;
    /// every attached lane is synced with its lane page first (`sync_lane`), so they are current.
    pub fn stats(&self) -> RingStats {
        {
            let lanes = lock(&self.shared.lanes);
            for (l, conn) in lanes.iter().enumerate() {
                if let Some(attachment) = conn.attachment() {
                    self.shared.sync_lane(l as u32, &attachment.page);
                }
            }
        }
        let mut stats = layout::read_stats(&self.shared.control, &self.shared.layout);
        stats.state = self.shared.state();
        stats
    }

    /// The ring's `last_error`: the last skip or failure reason (empty if none).
    pub fn last_error(&self) -> String {
        layout::decode_last_error(&self.shared.control)
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
