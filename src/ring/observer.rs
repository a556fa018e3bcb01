//! A read-only observer of a running ring, for operator tools (`ringfeed stat`, `ringfeed
//! peek`): no daemon round-trip, no lane taken, nothing written into the ring.
//!
//! # Brief overview
//!
//! [`Observer::open`] reads the producer pid from `<name>.lock`, finds the producer's memfd
//! among `/proc/<pid>/fd/*` (its link reads exactly `/memfd:ringfeed:<name> (deleted)`, or
//! ends in `ringfeed-<name>.ring` for a `--shm-dir` ring file; never an attach's lane page,
//! `/memfd:ringfeed-lane:<name>:<lane>`, whose counters the producer copies into the ring's
//! tables for us), opens it
//! read-only, validates the control region exactly as a consumer does, and maps the control
//! region **read-only**. [`Observer::snapshot`] then reads the counters; [`Observer::peek`]
//! copies one published batch out of a slot without taking it (a seqlock on the slot's
//! `state`/`seq`, see there). Opening `/proc/<pid>/fd/<n>` needs the same rights as
//! `ptrace`-reading the producer: in practice, the same user.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::futex::{self, mono_ns};
use super::layout::{
    consumer as centry, decode_last_error, hdr, io_step, lane as lentry, read_layout, read_state,
    read_stats, FormatError, IoStep, Layout, ProducerState, RingStats,
};
use super::memory::{self, Control};
use super::runtime_dir::{validate_name, RuntimeDir, RuntimeDirError};
use super::slot::{self, Slot, SlotMeta};

/// Why a ring could not be observed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ObserveError {
    /// Bad name or unsafe runtime directory.
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    /// No lock file: no producer of that name has run here.
    #[error("ring {name:?}: no producer is running ({path}: {source})")]
    NotRunning {
        /// Ring name.
        name: String,
        /// Lock file path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The lock file does not hold a pid.
    #[error("ring {name:?}: lock file {path} holds {content:?}, not a producer pid")]
    BadLockFile {
        /// Ring name.
        name: String,
        /// Lock file path.
        path: PathBuf,
        /// What it holds (truncated).
        content: String,
    },
    /// The producer process is gone or holds no memfd of that ring.
    #[error("ring {name:?}: producer pid {pid}: {reason}")]
    NoRing {
        /// Ring name.
        name: String,
        /// The pid from the lock file.
        pid: u32,
        /// Why no ring was found.
        reason: String,
    },
    /// The memfd is not sealed against shrinking.
    #[error("ring {name:?}: memfd is not sealed against shrinking; refusing to map it")]
    NotSealed {
        /// Ring name.
        name: String,
    },
    /// The ring's header is invalid.
    #[error("ring {name:?}: {source}")]
    Format {
        /// Ring name.
        name: String,
        /// What is wrong.
        source: FormatError,
    },
    /// Reading or mapping the memfd failed.
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

impl IoStep for ObserveError {
    fn io(name: String, what: &'static str, source: io::Error) -> Self {
        ObserveError::Io { name, what, source }
    }
}

/// Why [`Observer::peek`] returned no batch.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PeekError {
    /// The lane number is not below the ring's lane count.
    #[error("ring {name:?}: lane {lane} out of range (lane_count {lane_count})")]
    NoSuchLane {
        /// Ring name.
        name: String,
        /// Requested lane.
        lane: u32,
        /// Lanes in the ring.
        lane_count: u32,
    },
    /// No published batch could be copied consistently within the timeout.
    #[error("ring {name:?} lane {lane}: no published batch could be copied within {waited:?} (is the lane drained as fast as it is filled?)")]
    Timeout {
        /// Ring name.
        name: String,
        /// Lane.
        lane: u32,
        /// The timeout.
        waited: Duration,
    },
    /// Reading the slot's data failed.
    #[error("ring {name:?}: reading slot data: {source}")]
    Io {
        /// Ring name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Position of a lane's last published batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanePosition {
    /// Epoch of the last published batch.
    pub epoch: u64,
    /// Its index within the epoch for this lane.
    pub index: u64,
}

/// One consumer table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerEntry {
    /// Consumer pid.
    pub pid: u32,
    /// Its lane.
    pub lane: u32,
    /// Wall-clock attach time, ns since the Unix epoch.
    pub attach_unix_ns: u64,
    /// `CLOCK_MONOTONIC` ns of its last `next`/`release`.
    pub heartbeat_mono_ns: u64,
    /// Batches taken since attach.
    pub taken: u64,
}

/// Everything [`Observer::snapshot`] reads at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct RingSnapshot {
    /// `CLOCK_MONOTONIC` ns when the snapshot was taken.
    pub taken_mono_ns: u64,
    /// The counters the producer's status line uses.
    pub stats: RingStats,
    /// Producer start, ns since the Unix epoch.
    pub producer_start_unix_ns: u64,
    /// The producer's last heartbeat, `CLOCK_MONOTONIC` ns.
    pub heartbeat_mono_ns: u64,
    /// The last skip or failure reason (empty if none).
    pub last_error: String,
    /// Per lane, the last published batch (`None` before the first publish).
    pub positions: Vec<Option<LanePosition>>,
    /// Attached consumers (non-empty entries of the consumer table).
    pub consumers: Vec<ConsumerEntry>,
}

/// One batch copied out of a slot by [`Observer::peek`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedBatch {
    /// Lane.
    pub lane: u32,
    /// Lane-local sequence number.
    pub seq: u64,
    /// Epoch.
    pub epoch: u64,
    /// Batch index within the epoch.
    pub index: u64,
    /// Samples in the batch.
    pub count: u32,
    /// Each tensor's bytes, in the order of [`Layout::tensors`].
    pub tensors: Vec<Vec<u8>>,
}

/// A read-only view of a running producer's ring.
pub struct Observer {
    name: String,
    producer_pid: u32,
    layout: Layout,
    file: File,
    control: Control,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("name", &self.name)
            .field("producer_pid", &self.producer_pid)
            .field("generation", &self.layout.generation)
            .finish()
    }
}

/// The link target of a ring's memfd in `/proc/<pid>/fd` (the name given to `memfd_create`
/// in `memory::create_memfd`, which the kernel prefixes with `memfd:`).
fn memfd_link(name: &str) -> String {
    format!("/memfd:ringfeed:{name} (deleted)")
}

/// The seqlock's verdict: a copy made after reading `before` (from a published slot) is
/// consistent if the slot is still published with exactly the same metadata afterwards.
fn copy_is_consistent(before: &SlotMeta, state_after: u32, after: &SlotMeta) -> bool {
    state_after == slot::READY && before == after
}

impl Observer {
    /// Finds ring `name`'s producer through `dir`'s lock file and opens its memory read-only.
    pub fn open(dir: &RuntimeDir, name: &str) -> Result<Observer, ObserveError> {
        validate_name(name)?;
        dir.check()?;
        let name = name.to_owned();
        let lock_path = dir.lock_path(&name);
        let text =
            std::fs::read_to_string(&lock_path).map_err(|source| ObserveError::NotRunning {
                name: name.clone(),
                path: lock_path.clone(),
                source,
            })?;
        let pid: u32 = text.trim().parse().map_err(|_| ObserveError::BadLockFile {
            name: name.clone(),
            path: lock_path.clone(),
            content: text.chars().take(40).collect(),
        })?;
        let no_ring = |reason: String| ObserveError::NoRing {
            name: name.clone(),
            pid,
            reason,
        };
        let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let entries = std::fs::read_dir(&fd_dir).map_err(|e| {
            no_ring(format!(
                "cannot list {} ({e}): the producer has exited (stale lock file) or runs as another user",
                fd_dir.display()
            ))
        })?;
        let want = memfd_link(&name);
        let named = super::segment::file_name(&name);
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Ok(link) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if link.as_os_str() == want.as_str() {
                found.push((entry.path(), true));
            } else if link.file_name().is_some_and(|f| f == named.as_str()) {
                // A `--shm-dir` ring file (named files cannot be sealed).
                found.push((entry.path(), false));
            }
        }
        let io = |what| io_step::<ObserveError>(&name, what);
        let mut last_err = None;
        for (path, memfd) in &found {
            let file = File::open(path).map_err(io("opening the memfd read-only"))?;
            if *memfd && !memory::is_shrink_sealed(&file).map_err(io("reading the memfd seals"))? {
                return Err(ObserveError::NotSealed { name });
            }
            let file_len = file.metadata().map_err(io("fstat of the memfd"))?.len();
            let layout = match read_layout(&file, file_len) {
                Ok(l) => l,
                Err(source) => {
                    last_err = Some(source);
                    continue;
                }
            };
            if layout.name != name {
                continue;
            }
            let control = Control::map_read_only(&file, layout.data_offset)
                .map_err(io("mapping the control region"))?;
            return Ok(Observer {
                name,
                producer_pid: pid,
                layout,
                file,
                control,
            });
        }
        Err(match last_err {
            Some(source) => ObserveError::Format { name, source },
            None => no_ring(format!(
                "holds no memfd whose link reads {want:?} and no ring file named {named:?}"
            )),
        })
    }

    /// The ring's validated layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The producer pid (from the lock file).
    pub fn producer_pid(&self) -> u32 {
        self.producer_pid
    }

    /// Whether the producer process still exists.
    pub fn producer_alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.producer_pid)).exists()
            && self
                .snapshot_state()
                .is_some_and(|s| !matches!(s, ProducerState::Stopped | ProducerState::Failed))
    }

    fn snapshot_state(&self) -> Option<ProducerState> {
        read_state(&self.control)
    }

    /// Reads every counter, the lane positions and the consumer table.
    pub fn snapshot(&self) -> RingSnapshot {
        let c = &self.control;
        let l = &self.layout;
        let positions = (0..l.lane_count)
            .map(|lane| {
                let e = l.lane_entry(lane);
                (c.u64(e + lentry::PUBLISHED).load(Relaxed) > 0).then(|| LanePosition {
                    epoch: c.u64(e + lentry::EPOCH).load(Relaxed),
                    index: c.u64(e + lentry::INDEX).load(Relaxed),
                })
            })
            .collect();
        let consumers = (0..l.consumer_capacity.min(l.lane_count))
            .filter_map(|i| {
                let e = l.consumer_entry(i);
                let pid = c.u32(e + centry::PID).load(Acquire);
                (pid != 0).then(|| ConsumerEntry {
                    pid,
                    lane: c.u32(e + centry::LANE).load(Relaxed),
                    attach_unix_ns: c.u64(e + centry::ATTACH_UNIX_NS).load(Relaxed),
                    heartbeat_mono_ns: c.u64(e + centry::HEARTBEAT_MONO_NS).load(Relaxed),
                    taken: c.u64(e + centry::TAKEN).load(Relaxed),
                })
            })
            .collect();
        RingSnapshot {
            taken_mono_ns: mono_ns(),
            stats: read_stats(c, l),
            producer_start_unix_ns: c.u64(hdr::START_UNIX_NS as u64).load(Relaxed),
            heartbeat_mono_ns: c.u64(hdr::HEARTBEAT_MONO_NS as u64).load(Acquire),
            last_error: decode_last_error(c),
            positions,
            consumers,
        }
    }

    /// Copies the newest published batch of `lane` without taking it, waiting up to
    /// `timeout` for one.
    ///
    /// The copy is a seqlock read: load the slot's `state` (acquire; `READY`) and
    /// its metadata (`seq`, `epoch`, `index`, `count`, `flags`, publish time), copy the tensors
    /// with `pread` from the memfd, then, after an acquire fence, load `state` and the whole
    /// metadata again. The producer marks a slot `WRITING` (followed by a release fence) before
    /// it writes into it, and every publish gives it a larger `seq`; so if the second load
    /// still sees `READY` with the same metadata, no write into the slot overlapped the
    /// copy and the metadata is not torn between two publishes. Otherwise the copy is thrown
    /// away and tried again. The consumer's batch is never touched: the observer maps nothing
    /// writable and writes nothing.
    pub fn peek(&self, lane: u32, timeout: Duration) -> Result<PeekedBatch, PeekError> {
        let l = &self.layout;
        if lane >= l.lane_count {
            return Err(PeekError::NoSuchLane {
                name: self.name.clone(),
                lane,
                lane_count: l.lane_count,
            });
        }
        let deadline = Instant::now() + timeout;
        let publish_seq = self.control.u32(l.lane_entry(lane) + lentry::PUBLISH_SEQ);
        loop {
            let v = publish_seq.load(Acquire);
            if let Some(batch) = self.try_peek(lane)? {
                return Ok(batch);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PeekError::Timeout {
                    name: self.name.clone(),
                    lane,
                    waited: timeout,
                });
            }
            // FUTEX_WAIT only reads the word, so it works on the read-only mapping.
            futex::wait(
                publish_seq,
                v,
                (deadline - now).min(Duration::from_millis(100)),
            );
        }
    }

    fn try_peek(&self, lane: u32) -> Result<Option<PeekedBatch>, PeekError> {
        let l = &self.layout;
        let published = |state| state == slot::READY;
        // Newest first: it stays in the ring longest, so the copy is least likely to race.
        let mut candidates: Vec<(u64, u32)> = (0..l.slots_per_lane)
            .filter_map(|s| {
                let slot = Slot::new(&self.control, l, lane, s);
                published(slot.state()).then(|| (slot.seq(), s))
            })
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (_, s) in candidates {
            let slot = Slot::new(&self.control, l, lane, s);
            // SYNC POINT with the release store of READY in Slot::publish: the payload and
            // metadata of this publish are visible to the copy below.
            if !published(slot.state()) {
                continue;
            }
            let meta = slot.meta();
            // The metadata may belong to a publish that completed after the load above: load
            // the state again (acquire) so that a READY seen now orders that publish's payload
            // before the copy, whichever publish the metadata came from.
            if !published(slot.state()) {
                continue;
            }
            let base = l.data_offset + l.slot_data(lane, s);
            let mut tensors = Vec::with_capacity(l.tensors.len());
            for t in &l.tensors {
                let mut buf = vec![0u8; t.bytes as usize];
                self.read_exact_at(&mut buf, base + t.offset)?;
                tensors.push(buf);
            }
            // Orders the copy's loads before the re-check (the seqlock's read side; partner:
            // the release fence after the claim in Slot::claim).
            std::sync::atomic::fence(Acquire);
            if copy_is_consistent(&meta, slot.state(), &slot.meta()) {
                return Ok(Some(PeekedBatch {
                    lane,
                    seq: meta.seq,
                    epoch: meta.epoch,
                    index: meta.index,
                    count: meta.count,
                    tensors,
                }));
            }
        }
        Ok(None)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PeekError> {
        let mut got = 0;
        while got < buf.len() {
            match rustix::io::pread(&self.file, &mut buf[got..], offset + got as u64) {
                Ok(0) => {
                    return Err(PeekError::Io {
                        name: self.name.clone(),
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => got += n,
                Err(e) => {
                    return Err(PeekError::Io {
                        name: self.name.clone(),
                        source: e.into(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// Asks the producer of ring `name` to describe itself: the `info` reply of §3 (lanes and
/// their consumers, and, for a mixture, the `streams` with their served counts). Waits at most
/// `timeout` for the answer.
pub fn query_info(
    dir: &RuntimeDir,
    name: &str,
    timeout: Duration,
) -> io::Result<serde_json::Value> {
    use std::io::Write as _;
    let mut stream = std::os::unix::net::UnixStream::connect(dir.socket_path(name))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"{\"op\":\"info\"}\n")?;
    let mut line = Vec::new();
    let mut chunk = [0u8; 1024];
    while !line.contains(&b'\n') {
        if line.len() > super::protocol::MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "info reply longer than 4096 bytes",
            ));
        }
        let got = std::io::Read::read(&mut stream, &mut chunk)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the producer closed the connection before replying",
            ));
        }
        line.extend_from_slice(&chunk[..got]);
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    serde_json::from_slice(&line[..end]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(seq: u64, epoch: u64, index: u64) -> SlotMeta {
        SlotMeta {
            seq,
            epoch,
            index,
            count: 8,
            flags: 0,
            published_mono_ns: 1,
        }
    }

    /// The re-check compares every metadata field, not `seq` alone: metadata read while a
    /// publish was half written (new `seq`, old `epoch`/`index`) is refused even though the
    /// slot is READY with that `seq` afterwards.
    #[test]
    fn torn_metadata_or_a_rewritten_slot_fails_the_recheck() {
        let m = meta(5, 1, 2);
        assert!(copy_is_consistent(&m, slot::READY, &m));
        assert!(!copy_is_consistent(&m, slot::WRITING, &m));
        assert!(!copy_is_consistent(&m, slot::FREE, &m));
        assert!(!copy_is_consistent(
            &meta(6, 1, 2),
            slot::READY,
            &meta(6, 1, 3)
        ));
        assert!(!copy_is_consistent(
            &meta(6, 0, 2),
            slot::READY,
            &meta(6, 1, 2)
        ));
        let recounted = SlotMeta { count: 7, ..m };
        assert!(!copy_is_consistent(&m, slot::READY, &recounted));
        assert!(!copy_is_consistent(&m, slot::READY, &meta(9, 1, 2)));
    }

    /// The producer, a consumer and the observer all in this process: `/proc/self/fd` holds
    /// the ring memfd, its read-only reopen, the attach's lane page
    /// (`ringfeed-lane:<name>:0`) and the doorbells. The observer opens the ring, never a lane
    /// page, and shows the consumer's held batch from the producer's copies.
    #[test]
    fn the_observer_opens_the_ring_never_a_lane_page() {
        use crate::ring::layout::{DType, RingSpec, TensorSpec};
        use crate::ring::{AttachOptions, BatchMeta, Consumer, Producer};
        let tmp = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::at(tmp.path().join("rt"));
        let spec = RingSpec::new(
            "obs",
            1,
            2,
            1,
            vec![TensorSpec {
                name: "x".into(),
                dtype: DType::U8,
                shape: vec![1],
            }],
        );
        let p = Producer::create(&spec, &dir).unwrap();
        let mut o = AttachOptions::new("obs", 0);
        o.dir = Some(dir.clone());
        let c = Consumer::attach_with(&o).unwrap();
        p.try_claim(0).unwrap().publish(BatchMeta {
            epoch: 0,
            index: 0,
            count: 1,
            last_of_epoch: false,
        });
        let b = c.next().unwrap().unwrap();
        let lane_links = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|l| {
                l.to_string_lossy()
                    .starts_with("/memfd:ringfeed-lane:obs:0")
            })
            .count();
        assert!(lane_links >= 1, "the attach's lane page memfd is open");
        let observer = Observer::open(&dir, "obs").unwrap();
        assert_eq!(observer.layout().name, "obs");
        let held = || observer.snapshot().stats.lanes[0].held;
        let deadline = Instant::now() + Duration::from_secs(5);
        while held() != 1 {
            assert!(Instant::now() < deadline, "the held batch never showed");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(b);
        let deadline = Instant::now() + Duration::from_secs(5);
        while held() != 0 {
            assert!(Instant::now() < deadline, "the release never showed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(observer.snapshot().stats.lanes[0].released, 1);
        assert_ne!(memfd_link("obs"), "/memfd:ringfeed-lane:obs:0 (deleted)");
    }
}
