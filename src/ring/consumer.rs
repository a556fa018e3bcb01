//! The Rust consumer: attaches to one lane, validates the ring before making any view, and
//! hands out batches that are read in place and released when dropped.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Write};
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::{Duration, Instant};

use serde::Deserialize;
use thiserror::Error;

use super::feedback;
use super::futex::{self, mono_ns};
use super::handshake::{self, Request, Resume};
use super::layout::{
    consumer as centry, hdr, lane as lentry, validate_header, DType, FormatError, Layout,
    VERSION_MAJOR,
};
use super::memory::{self, Control, Data};
use super::producer::ProducerState;
use super::resume::{Fingerprint, ResumeState};
use super::runtime_dir::{validate_name, RuntimeDir, RuntimeDirError};
use super::slot::{self, Slot};

/// Longest single futex wait: the socket and producer state are re-checked at least this
/// often, which bounds how long a producer's death goes unnoticed.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// A heartbeat older than this means the producer is frozen.
const HEARTBEAT_STALE_NS: u64 = 3_000_000_000;
/// Largest control region a consumer will read before validating it.
const MAX_CONTROL_BYTES: u64 = 64 << 20;

/// How to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Runtime directory; `None` resolves it with [`RuntimeDir::from_env`].
    pub dir: Option<RuntimeDir>,
    /// Ring name.
    pub name: String,
    /// Lane to attach to.
    pub lane: u32,
    /// `(epoch, index)` of the next batch wanted; `None` takes whatever is ready next.
    /// [`resume_state`](Self::resume_state), when set, replaces it.
    pub resume: Option<(u64, u64)>,
    /// A saved [`ResumeState`] (1.3): the producer refuses it ([`AttachError::Refused`]
    /// naming the fields) when its sample order differs, and maps it by sample position when
    /// only the batch size differs ([`Consumer::resumed_at`], [`Consumer::resume_warnings`]).
    pub resume_state: Option<ResumeState>,
    /// How long to wait for the producer's reply (a resume waits for the pipeline to seek).
    /// Default 30 s.
    pub reply_timeout: Duration,
    /// A producer uid to accept besides our own (a daemon that serves this user through
    /// `--allow-group`). Its runtime directory must then be owned by that uid and may grant its
    /// group read/search (0750). Default `None`: only a producer of our own uid.
    pub trust_uid: Option<u32>,
    /// How long to keep trying while the attach can succeed later (§3 "Waiting for the
    /// daemon"): no runtime directory or socket yet, nobody listening, or a refusal whose
    /// code is retryable (`lane_held`, `stopping`, `request_timeout`), every 100 ms. Default 0:
    /// one try.
    pub wait: Duration,
    /// `(rank, world_size)` this trainer is (1.3): the attach is refused
    /// ([`AttachError::RankMismatch`]) unless the producer serves exactly that global rank on
    /// the lane and that world size. Default `None`: no check;
    /// [`with_torchrun_env`](Self::with_torchrun_env) fills it from `RANK` / `WORLD_SIZE`.
    pub expect_rank: Option<(u32, u32)>,
}

impl AttachOptions {
    /// Options for `name`, lane `lane`, default directory, no resume.
    pub fn new(name: &str, lane: u32) -> AttachOptions {
        AttachOptions {
            dir: None,
            name: name.to_owned(),
            lane,
            resume: None,
            resume_state: None,
            reply_timeout: Duration::from_secs(30),
            trust_uid: None,
            wait: Duration::ZERO,
            expect_rank: None,
        }
    }

    /// Sets [`expect_rank`](Self::expect_rank) from torchrun's `RANK` and `WORLD_SIZE` when
    /// both are set to integers (otherwise leaves it as it is).
    pub fn with_torchrun_env(mut self) -> AttachOptions {
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        if let (Some(rank), Some(world)) = (var("RANK"), var("WORLD_SIZE")) {
            self.expect_rank = Some((rank, world));
        }
        self
    }
}

/// The refusal of a trainer whose rank or world size differs from what the lane serves,
/// with how to start the daemon instead.
fn rank_mismatch(layout: &Layout, lane: u32, rank: u32, world: u32) -> Option<String> {
    let served = layout.lane_rank(lane)?;
    if served == rank && layout.world_size == world {
        return None;
    }
    let first = rank.saturating_sub(lane);
    Some(format!(
        "this trainer is rank {rank} of world size {world} (RANK / WORLD_SIZE), but lane {lane} \
         serves rank {served} of world size {}: start the daemon with `--world-size {world} \
         --first-rank {first}` (the global rank of this node's lane 0), or call \
         ringfeed.serve() under torchrun, which reads them from the environment",
        layout.world_size
    ))
}

/// What to do about a failed connect, by its cause.
fn connect_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            " (no daemon serves this ring: start `ringfeed serve --name NAME`, or check the name and the runtime directory)"
        }
        io::ErrorKind::PermissionDenied => {
            " (the daemon runs as another user: only its user may attach, and members of the group it was started with --allow-group GROUP, who pass trust_uid=<its uid> in Python or --trust-uid to ringfeed consume)"
        }
        _ => "",
    }
}

/// Why attaching failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AttachError {
    /// Bad name or unsafe runtime directory.
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    /// The socket could not be reached (no producer of that name?).
    #[error("ring {name:?}: cannot connect to {path}: {source}{}", connect_hint(.source))]
    Connect {
        /// Ring name.
        name: String,
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The producer runs as another user.
    #[error(
        "ring {name:?}: the producer runs as uid {uid}, not as this user (uid {ours}); refusing it"
    )]
    ForeignProducer {
        /// Ring name.
        name: String,
        /// Producer's uid.
        uid: u32,
        /// Ours.
        ours: u32,
    },
    /// The producer refused the attach.
    #[error("ring {name:?} lane {lane}: producer refused ({code}): {reason}")]
    Refused {
        /// Ring name.
        name: String,
        /// Lane asked for.
        lane: u32,
        /// The producer's reason.
        reason: String,
        /// The reply's refusal `code` (§3); `"unknown"` from a producer before 1.3, which is
        /// retryable.
        code: String,
        /// The reply's `retry`: asking again later may succeed.
        retry: bool,
    },
    /// No producer serves the ring any more because its run ended: it finished its last epoch
    /// and exited, leaving `<name>.finished` (§7). Not an error for a consumer that was
    /// reading that run: its stream has ended.
    #[error("ring {name:?}: the run has finished (generation {generation}); its producer exited after the last epoch")]
    Finished {
        /// Ring name.
        name: String,
        /// The finished run's generation, from the marker (0 if unreadable).
        generation: u64,
    },
    /// The lane serves another global rank or world size than this trainer is (1.3).
    #[error("ring {name:?}: {detail}")]
    RankMismatch {
        /// Ring name.
        name: String,
        /// What differs and how to start the daemon instead.
        detail: String,
    },
    /// The handshake broke (I/O error, timeout, malformed reply, missing fd).
    #[error("ring {name:?}: handshake failed: {detail}")]
    Protocol {
        /// Ring name.
        name: String,
        /// What went wrong.
        detail: String,
    },
    /// The ring's memory is unsafe to map or its header is invalid.
    #[error("ring {name:?}: {source}")]
    Format {
        /// Ring name.
        name: String,
        /// What is wrong.
        source: FormatError,
    },
    /// The memfd is not sealed against shrinking.
    #[error("ring {name:?}: memfd is not sealed against shrinking; refusing to map it")]
    NotSealed {
        /// Ring name.
        name: String,
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

impl AttachError {
    /// The machine-readable code (§3 "Refusal codes"): the producer's for a refusal, else the
    /// client's own (`not_running`, `finished`, `foreign_producer`, `runtime_dir`, `connect`,
    /// `rank_mismatch`, `protocol`, `format`, `not_sealed`, `io`).
    pub fn code(&self) -> &str {
        match self {
            AttachError::RuntimeDir(RuntimeDirError::Missing { .. }) => "not_running",
            AttachError::RuntimeDir(_) => "runtime_dir",
            AttachError::Connect { source, .. } if not_running(source) => "not_running",
            AttachError::Connect { .. } => "connect",
            AttachError::ForeignProducer { .. } => "foreign_producer",
            AttachError::Refused { code, .. } => code,
            AttachError::Finished { .. } => "finished",
            AttachError::RankMismatch { .. } => "rank_mismatch",
            AttachError::Protocol { .. } => "protocol",
            AttachError::Format { .. } => "format",
            AttachError::NotSealed { .. } => "not_sealed",
            AttachError::Io { .. } => "io",
        }
    }

    /// Whether attaching again later may succeed: no daemon yet, or a retryable refusal.
    pub fn retryable(&self) -> bool {
        match self {
            AttachError::Refused { retry, .. } => *retry,
            _ => self.code() == "not_running",
        }
    }
}

/// A connect error that means "nobody serves this socket (yet)".
fn not_running(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// The generation named by `<name>.finished` (§7), if the marker exists; 0 when it exists
/// but cannot be read.
fn finished_marker(dir: &RuntimeDir, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.finished_path(name)).ok()?;
    let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
    Some(
        value
            .get("generation_str")
            .and_then(|g| g.as_str())
            .and_then(|g| g.parse().ok())
            .unwrap_or(0),
    )
}

/// Why `next` returned no batch.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The producer died, stopped, failed or froze.
    #[error("ring {name:?}: producer (pid {pid}) gone: {reason}")]
    ProducerGone {
        /// Ring name.
        name: String,
        /// Producer pid.
        pid: u32,
        /// How it was noticed.
        reason: String,
    },
    /// No batch arrived within the timeout.
    #[error("ring {name:?} lane {lane}: no batch within {waited:?}")]
    Timeout {
        /// Ring name.
        name: String,
        /// Lane.
        lane: u32,
        /// The timeout.
        waited: Duration,
    },
    /// A slot holds an impossible value.
    #[error("ring {name:?}: {source}")]
    Format {
        /// Ring name.
        name: String,
        /// What is wrong.
        source: FormatError,
    },
}

impl ConsumeError {
    /// The machine-readable code, as every client names it (`producer_gone`, `timeout`,
    /// `format`; docs/ring-format.md §3 "Refusal codes").
    pub fn code(&self) -> &'static str {
        match self {
            ConsumeError::ProducerGone { .. } => "producer_gone",
            ConsumeError::Timeout { .. } => "timeout",
            ConsumeError::Format { .. } => "format",
        }
    }
}

/// A loss report was refused before anything was sent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReportError {
    /// `ids` and `losses` differ in length.
    #[error("report: {ids} sample ids but {losses} losses")]
    Length {
        /// Ids given.
        ids: usize,
        /// Losses given.
        losses: usize,
    },
    /// Some ids are not in the dataset.
    #[error("report: sample ids outside the dataset (0..{n}): {ids:?}")]
    OutOfRange {
        /// The offending ids.
        ids: Vec<u64>,
        /// Dataset size.
        n: u64,
    },
}

/// A typed tensor view was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorError {
    /// The schema has no tensor of that name.
    #[error("no tensor named {name:?} in the batch schema")]
    NoSuchTensor {
        /// Requested name.
        name: String,
    },
    /// The tensor's dtype is not the requested element type.
    #[error("tensor {name:?} holds {stored:?}, not {requested:?}")]
    DTypeMismatch {
        /// Tensor name.
        name: String,
        /// Its dtype.
        stored: DType,
        /// The requested one.
        requested: DType,
    },
}

mod sealed {
    pub trait Sealed {}
}

/// Element types a tensor can be viewed as: plain data valid for every bit pattern.
pub trait Element: Copy + sealed::Sealed {
    /// The dtype this element type reads.
    const DTYPE: DType;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    };
}
element!(u8, U8);
element!(i32, I32);
element!(i64, I64);
element!(half::f16, F16);
element!(half::bf16, BF16);
element!(f32, F32);

#[derive(Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    generation: u64,
    /// (1.3) `generation` as a decimal string: exact for every JSON parser.
    #[serde(default)]
    generation_str: Option<String>,
    #[serde(default)]
    producer_pid: u32,
    /// (1.3) refusal code and whether to retry.
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    retry: Option<bool>,
    /// `"memfd"` (absent in older producers) or `"file"` (a `--shm-dir` ring file).
    #[serde(default)]
    segment: Option<String>,
    /// What defines the epoch order (1.3; absent from older producers, ignored if malformed).
    #[serde(default)]
    fingerprint: Option<serde_json::Value>,
    /// Where a resume with a fingerprint started (1.3).
    #[serde(default)]
    resumed_at: Option<ResumedAt>,
    /// What the producer wants the consumer to know about its resume (1.3).
    #[serde(default)]
    warnings: Vec<String>,
}

#[derive(Deserialize)]
struct ResumedAt {
    epoch: u64,
    index: u64,
}

/// A consumer attached to one lane. Not `Sync`: one thread takes batches (it may hold
/// several at once).
pub struct Consumer {
    name: String,
    lane: u32,
    pid: u32,
    /// Written into every slot this consumer takes; a release proves ownership with it.
    token: u64,
    producer_pid: u32,
    layout: Layout,
    control: Control,
    data: Data,
    stream: UnixStream,
    /// Feedback frames (§9) not yet accepted by the socket (the producer was busy).
    outbox: RefCell<Vec<u8>>,
    /// Epoch and last-of-epoch flag of the last batch taken.
    last_taken: Cell<Option<(u64, bool)>>,
    /// The last epoch an `EPOCH_DONE` frame was queued for.
    epoch_done_sent: Cell<Option<u64>>,
    /// On an on-demand ring: the number of the last pass asked for, and the index of the
    /// next batch of the pass under way (`None` between passes).
    pass: Cell<(u64, Option<u64>)>,
    /// The producer's fingerprint from the attach reply (1.3).
    fingerprint: Option<Fingerprint>,
    /// Where a checked resume started, and the producer's warnings about it.
    resumed_at: Option<(u64, u64)>,
    resume_warnings: Vec<String>,
    _not_sync: PhantomData<Cell<()>>,
}

impl Drop for Consumer {
    /// Sends what the outbox still holds (waiting up to 10 s for a busy producer, not at all
    /// for a dead one), so reports made just before detaching are not lost.
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.outbox.get_mut().is_empty() && Instant::now() < deadline {
            if !self.flush_outbox() {
                break;
            }
            if !self.outbox.get_mut().is_empty() {
                let _ = rustix::event::poll(
                    &mut [rustix::event::PollFd::new(
                        &self.stream,
                        rustix::event::PollFlags::OUT,
                    )],
                    Some(&rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: 10_000_000,
                    }),
                );
            }
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("lane", &self.lane)
            .field("generation", &self.layout.generation)
            .finish()
    }
}

/// Reads and validates the control region of `file` (size `file_len`) without mapping it.
pub(super) fn read_layout(file: &File, file_len: u64) -> Result<Layout, FormatError> {
    let mut head = vec![0u8; 512.min(file_len) as usize];
    let _ = rustix::io::pread(file, &mut head, 0);
    let data_offset = head
        .get(hdr::DATA_OFFSET..hdr::DATA_OFFSET + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let want = data_offset
        .min(file_len)
        .min(MAX_CONTROL_BYTES)
        .max(head.len() as u64);
    let mut control = vec![0u8; want as usize];
    let mut got = 0;
    while got < control.len() {
        match rustix::io::pread(file, &mut control[got..], got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    control.truncate(got);
    validate_header(&control, file_len)
}

impl Consumer {
    /// Attaches to lane `lane` of ring `name` in the runtime directory from the environment.
    pub fn attach(name: &str, lane: u32) -> Result<Consumer, AttachError> {
        Consumer::attach_with(&AttachOptions::new(name, lane))
    }

    /// Attaches as `opts` says: handshake, checks, validation, then the two mappings. While
    /// the error is [`retryable`](AttachError::retryable) it tries again every 100 ms for
    /// `opts.wait`. A ring whose run has finished and whose producer has exited is
    /// [`AttachError::Finished`] (with a `wait`, only once the wait is over: a new run of the
    /// same name may be starting).
    pub fn attach_with(opts: &AttachOptions) -> Result<Consumer, AttachError> {
        let deadline = Instant::now() + opts.wait;
        loop {
            match Consumer::attach_once(opts) {
                Err(e) if e.retryable() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) if e.code() == "not_running" => {
                    let dir = match &opts.dir {
                        Some(d) => d.clone(),
                        None => RuntimeDir::from_env_for(opts.trust_uid)?,
                    };
                    return match finished_marker(&dir, &opts.name) {
                        Some(generation) => Err(AttachError::Finished {
                            name: opts.name.clone(),
                            generation,
                        }),
                        None => Err(e),
                    };
                }
                other => return other,
            }
        }
    }

    fn attach_once(opts: &AttachOptions) -> Result<Consumer, AttachError> {
        let name = opts.name.clone();
        validate_name(&name)?;
        let dir = match &opts.dir {
            Some(d) => d.clone(),
            None => RuntimeDir::from_env_for(opts.trust_uid)?,
        };
        match opts.trust_uid {
            Some(owner) => dir.check_trusting(owner)?,
            None => dir.check()?,
        }
        let path = dir.socket_path(&name);
        let protocol = |detail: String| AttachError::Protocol {
            name: name.clone(),
            detail,
        };
        let mut stream = UnixStream::connect(&path).map_err(|source| AttachError::Connect {
            name: name.clone(),
            path: path.clone(),
            source,
        })?;
        let ours = rustix::process::geteuid().as_raw();
        let peer =
            handshake::peer_cred(&stream).map_err(|e| protocol(format!("SO_PEERCRED: {e}")))?;
        handshake::check_peer_uid(peer.uid, ours, opts.trust_uid).map_err(|uid| {
            AttachError::ForeignProducer {
                name: name.clone(),
                uid,
                ours,
            }
        })?;
        let pid = std::process::id();
        let request = Request::Attach {
            version: u32::from(VERSION_MAJOR),
            lane: opts.lane,
            pid,
            resume: match &opts.resume_state {
                Some(state) => Some(Resume {
                    epoch: state.epoch,
                    index: state.index,
                    sample: state.sample,
                    fingerprint: state.fingerprint.clone(),
                }),
                None => opts.resume.map(|(epoch, index)| Resume {
                    epoch,
                    index,
                    sample: None,
                    fingerprint: None,
                }),
            },
        };
        let mut line = serde_json::to_vec(&request).map_err(|e| protocol(e.to_string()))?;
        line.push(b'\n');
        stream
            .write_all(&line)
            .map_err(|e| protocol(format!("sending the request: {e}")))?;
        stream
            .set_read_timeout(Some(opts.reply_timeout.max(Duration::from_millis(1))))
            .map_err(|e| protocol(e.to_string()))?;
        let (reply, fd) = handshake::recv_line_with_fd(&stream)
            .map_err(|e| protocol(format!("reading the reply: {e}")))?;
        let reply: Reply = serde_json::from_slice(&reply)
            .map_err(|e| protocol(format!("malformed reply: {e}")))?;
        if !reply.ok {
            return Err(AttachError::Refused {
                name,
                lane: opts.lane,
                reason: reply.error.unwrap_or_else(|| "no reason given".into()),
                // A producer before 1.3 gives neither: retried within the wait, as before (§3).
                retry: reply.retry.unwrap_or(reply.code.is_none()),
                code: reply.code.unwrap_or_else(|| "unknown".into()),
            });
        }
        let file =
            File::from(fd.ok_or_else(|| protocol("the reply carried no file descriptor".into()))?);
        let io = |what| {
            let name = name.clone();
            move |source| AttachError::Io { name, what, source }
        };
        // A named `--shm-dir` file cannot be sealed (only memfds can); the producer says so.
        let named_file = reply.segment.as_deref() == Some("file");
        if !named_file && !memory::is_shrink_sealed(&file).map_err(io("reading the memfd seals"))? {
            return Err(AttachError::NotSealed { name });
        }
        let file_len = file.metadata().map_err(io("fstat of the memfd"))?.len();
        let format = |source| AttachError::Format {
            name: name.clone(),
            source,
        };
        let layout = read_layout(&file, file_len).map_err(format)?;
        // 1.3 producers send the exact decimal string; older ones only the number.
        let replied = match reply.generation_str.as_deref().map(str::parse::<u64>) {
            Some(Ok(g)) => g,
            Some(Err(e)) => return Err(protocol(format!("malformed generation_str: {e}"))),
            None => reply.generation,
        };
        if layout.generation != replied {
            return Err(format(FormatError::Field {
                field: "generation",
                value: layout.generation,
                reason: format!("differs from the attach reply's generation {}", replied),
            }));
        }
        if opts.lane >= layout.lane_count {
            return Err(protocol(format!(
                "lane {} is beyond the header's lane_count {}",
                opts.lane, layout.lane_count
            )));
        }
        if let Some((rank, world)) = opts.expect_rank {
            if let Some(detail) = rank_mismatch(&layout, opts.lane, rank, world) {
                return Err(AttachError::RankMismatch { name, detail });
            }
        }
        let control =
            Control::map(&file, layout.data_offset).map_err(io("mapping the control region"))?;
        let data = Data::map(
            &file,
            layout.data_offset,
            layout.file_bytes - layout.data_offset,
            false,
        )
        .map_err(io("mapping the data region"))?;
        stream
            .set_read_timeout(None)
            .map_err(|e| protocol(e.to_string()))?;
        Ok(Consumer {
            name,
            lane: opts.lane,
            pid,
            token: rand::random::<u64>().max(1),
            producer_pid: reply.producer_pid,
            layout,
            control,
            data,
            stream,
            outbox: RefCell::new(Vec::new()),
            last_taken: Cell::new(None),
            epoch_done_sent: Cell::new(None),
            pass: Cell::new((0, None)),
            fingerprint: reply
                .fingerprint
                .and_then(|v| serde_json::from_value(v).ok()),
            resumed_at: reply.resumed_at.map(|r| (r.epoch, r.index)),
            resume_warnings: reply.warnings,
            _not_sync: PhantomData,
        })
    }

    /// Reports per-sample losses to the producer (§9): `ids` as in the `sample_ids` tensor,
    /// one loss per id, attributed to the epoch of the last batch taken. Never blocks: what
    /// the socket does not accept now is kept and sent at the next call (or on drop). Ids at
    /// or past the dataset size are refused, naming them; NaN, infinite and negative losses
    /// are sent and counted (then ignored) by the producer.
    pub fn report(&self, ids: &[u64], losses: &[f32]) -> Result<(), ReportError> {
        if ids.len() != losses.len() {
            return Err(ReportError::Length {
                ids: ids.len(),
                losses: losses.len(),
            });
        }
        let n = self.layout.samples_per_epoch;
        let bad: Vec<u64> = ids.iter().copied().filter(|&id| id >= n).collect();
        if !bad.is_empty() {
            return Err(ReportError::OutOfRange { ids: bad, n });
        }
        let epoch = self.last_taken.get().map_or(0, |(e, _)| e);
        {
            let mut outbox = self.outbox.borrow_mut();
            let step = feedback::MAX_REPORT_SAMPLES as usize;
            for (i, l) in ids.chunks(step).zip(losses.chunks(step)) {
                feedback::encode_report(&mut outbox, epoch, i, l);
            }
        }
        let _ = self.flush_outbox();
        Ok(())
    }

    /// Tells the producer that every report of `epoch` has been sent. [`next`](Self::next)
    /// does this by itself when the batch it takes follows a last-of-epoch batch; call it
    /// earlier to let a selecting producer (`[selection]`) decide the next epoch sooner.
    pub fn end_epoch(&self, epoch: u64) {
        if self.epoch_done_sent.get().is_some_and(|e| e >= epoch) {
            return;
        }
        self.epoch_done_sent.set(Some(epoch));
        feedback::encode_epoch_done(&mut self.outbox.borrow_mut(), epoch);
        let _ = self.flush_outbox();
    }

    /// Sends as much of the outbox as the socket takes without blocking. `false` when the
    /// connection is broken (the producer is gone, which `next` reports).
    fn flush_outbox(&self) -> bool {
        let mut outbox = self.outbox.borrow_mut();
        while !outbox.is_empty() {
            match rustix::net::send(
                &self.stream,
                &outbox,
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            ) {
                Ok(n) => {
                    outbox.drain(..n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return true, // the producer is busy
                Err(_) => return false,
            }
        }
        true
    }

    /// On an on-demand ring (header flag bit 3): asks the producer for one complete pass
    /// over this lane's share of the data, from its first batch, in the same order as every
    /// other pass (a `PASS` frame, §9). [`next`](Self::next) then returns the pass's batches
    /// and `Ok(None)` after its last one; batches of an earlier pass still in the ring are
    /// given back unread. Asking again during a pass abandons it. Returns the pass's number
    /// (the `epoch` of its batches). On another ring it does nothing and returns 0.
    pub fn start_pass(&self) -> u64 {
        if !self.layout.on_demand() {
            return 0;
        }
        let published = self.lane_u64(lentry::EPOCH).load(Acquire);
        let pass = self.pass.get().0.max(published) + 1;
        self.pass.set((pass, Some(0)));
        feedback::encode_pass(&mut self.outbox.borrow_mut(), pass, 0);
        let _ = self.flush_outbox();
        pass
    }

    /// The producer's fingerprint (1.3): what defines its epoch order and batches; `None`
    /// from an older producer.
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        self.fingerprint.as_ref()
    }

    /// The state to save so that a later attach resumes at batch `(epoch, index)` of this
    /// lane (the next batch wanted), checked against the producer's configuration then.
    pub fn resume_state(&self, epoch: u64, index: u64) -> ResumeState {
        ResumeState::at(epoch, index, self.fingerprint.as_ref())
    }

    /// `(epoch, index)` where a resume with a fingerprint started (the batch holding the
    /// saved sample when the batch size changed); `None` without one.
    pub fn resumed_at(&self) -> Option<(u64, u64)> {
        self.resumed_at
    }

    /// What the producer said about this attach's resume (a remapped batch size, a changed
    /// augmentation); empty when nothing differed.
    pub fn resume_warnings(&self) -> &[String] {
        &self.resume_warnings
    }

    /// The ring's validated layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The producer generation this consumer attached to.
    pub fn generation(&self) -> u64 {
        self.layout.generation
    }

    /// The attached lane.
    pub fn lane(&self) -> u32 {
        self.lane
    }

    /// Addresses of the read-only data mapping (every batch view lies inside it).
    pub fn data_address_range(&self) -> std::ops::Range<usize> {
        self.data.address_range()
    }

    /// The next batch of the lane in `seq` order, blocking until one is ready. `Ok(None)`: the
    /// stream has ended (producer `FINISHED`, nothing left), or, on an on-demand ring, the
    /// pass asked for with [`start_pass`](Self::start_pass) is complete (or none was asked
    /// for). A dead producer is reported as [`ConsumeError::ProducerGone`] within about
    /// 100 ms.
    pub fn next(&self) -> Result<Option<Batch<'_>>, ConsumeError> {
        self.next_until(None)
    }

    /// Like [`next`](Self::next), giving up with [`ConsumeError::Timeout`] after `t`.
    pub fn next_timeout(&self, t: Duration) -> Result<Option<Batch<'_>>, ConsumeError> {
        self.next_until(Some((Instant::now() + t, t)))
    }

    fn lane_u32(&self, off: u64) -> &std::sync::atomic::AtomicU32 {
        self.control.u32(self.layout.lane_entry(self.lane) + off)
    }
    fn lane_u64(&self, off: u64) -> &std::sync::atomic::AtomicU64 {
        self.control.u64(self.layout.lane_entry(self.lane) + off)
    }
    fn touch_heartbeat(&self) {
        let e = self.layout.consumer_entry(self.lane);
        self.control
            .u64(e + centry::HEARTBEAT_MONO_NS)
            .store(mono_ns(), Relaxed);
    }

    fn gone(&self, reason: String) -> ConsumeError {
        ConsumeError::ProducerGone {
            name: self.name.clone(),
            pid: self.producer_pid,
            reason,
        }
    }

    fn next_until(
        &self,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Option<Batch<'_>>, ConsumeError> {
        if let Some((epoch, true)) = self.last_taken.get() {
            self.end_epoch(epoch);
        }
        let _ = self.flush_outbox();
        if self.layout.on_demand() && self.pass.get().1.is_none() {
            return Ok(None);
        }
        let publish_seq = self.lane_u32(lentry::PUBLISH_SEQ);
        let mut wait_started: Option<Instant> = None;
        let result = loop {
            // Read the word before scanning, so a publish after the scan changes it and the
            // futex wait returns at once (partner: the bump in SlotWriter::publish).
            let v = publish_seq.load(Acquire);
            if let Some(b) = self.try_take()? {
                break Ok(Some(b));
            }
            let state = self.control.u32(hdr::PRODUCER_STATE as u64).load(Acquire);
            match ProducerState::from_code(state) {
                Some(ProducerState::Finished) => {
                    // Publishes happen-before FINISHED: one more scan sees them all.
                    break self.try_take();
                }
                Some(ProducerState::Stopped) => break Err(self.gone("it stopped".into())),
                Some(ProducerState::Failed) => {
                    break Err(self.gone(format!("it failed: {}", self.last_error())))
                }
                _ => {}
            }
            if handshake::peer_closed(&self.stream) {
                break Err(self.gone("its socket closed (process exited or was killed)".into()));
            }
            let beat = self
                .control
                .u64(hdr::HEARTBEAT_MONO_NS as u64)
                .load(Acquire);
            if mono_ns().saturating_sub(beat) > HEARTBEAT_STALE_NS {
                break Err(self.gone("its heartbeat is older than 3 s (frozen)".into()));
            }
            let mut wait = MAX_WAIT;
            if let Some((until, t)) = deadline {
                let now = Instant::now();
                if now >= until {
                    break Err(ConsumeError::Timeout {
                        name: self.name.clone(),
                        lane: self.lane,
                        waited: t,
                    });
                }
                wait = wait.min(until - now);
            }
            wait_started.get_or_insert_with(Instant::now);
            futex::wait(publish_seq, v, wait);
        };
        if let Some(t) = wait_started {
            self.lane_u64(lentry::CONSUMER_WAIT_NS)
                .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        }
        self.touch_heartbeat();
        result
    }

    /// Takes the lane's `READY` slot with the smallest `seq`, if any.
    fn try_take(&self) -> Result<Option<Batch<'_>>, ConsumeError> {
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

    fn last_error(&self) -> String {
        let raw = self
            .control
            .load_bytes(hdr::LAST_ERROR as u64, super::layout::LAST_ERROR_BYTES);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }

    /// Releases slot `s` if it still holds our batch `seq`. After the producer declared this
    /// consumer gone (a pause longer than its liveness checks allow, then a re-attach), the
    /// slot may be `READY` again or held by the new attach: it is left alone.
    fn release(&self, s: u32, seq: u64) {
        if !Slot::new(&self.control, &self.layout, self.lane, s).release_if_ours(self.token, seq) {
            return;
        }
        self.lane_u64(lentry::RELEASED).fetch_add(1, Relaxed);
        futex::bump_and_wake(self.lane_u32(lentry::RELEASE_SEQ));
        // SYNC POINT with the producer's acquire load of release_any in claim_any.
        futex::bump_and_wake(self.control.u32(hdr::RELEASE_ANY as u64));
    }
}

/// A batch held by the consumer: its tensors are views into the shared memory (no copy).
/// Dropping it releases the slot to the producer.
pub struct Batch<'a> {
    consumer: &'a Consumer,
    slot: u32,
    meta: slot::SlotMeta,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("slot", &self.slot)
            .field("meta", &self.meta)
            .finish()
    }
}

impl Batch<'_> {
    /// Lane-local sequence number (strictly increasing in publish order).
    pub fn seq(&self) -> u64 {
        self.meta.seq
    }
    /// Epoch.
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }
    /// Batch index within the epoch for this lane.
    pub fn index(&self) -> u64 {
        self.meta.index
    }
    /// Samples in the batch.
    pub fn count(&self) -> u32 {
        self.meta.count
    }
    /// Whether the slot still holds this batch for this consumer. False once the producer
    /// has taken the slot back (it declared this consumer gone, e.g. after a long pause, and
    /// a new attach followed): the bytes may then belong to another batch.
    pub fn still_held(&self) -> bool {
        let c = self.consumer;
        Slot::new(&c.control, &c.layout, c.lane, self.slot).held_by(c.token, self.meta.seq)
    }
    /// Whether this batch was delivered before to a consumer that died holding it.
    pub fn redelivered(&self) -> bool {
        self.meta.flags & slot::FLAG_REDELIVERED != 0
    }
    /// Whether this is the lane's last batch of its epoch.
    pub fn last_of_epoch(&self) -> bool {
        self.meta.flags & slot::FLAG_LAST_OF_EPOCH != 0
    }
    /// `CLOCK_MONOTONIC` ns at publish (see [`mono_ns`](super::mono_ns)).
    pub fn published_mono_ns(&self) -> u64 {
        self.meta.published_mono_ns
    }

    /// The `valid` tensor (1.3): 1 for a sample's first occurrence in the epoch, 0 for a
    /// padding row; `None` from a producer before 1.3.
    pub fn valid(&self) -> Option<&[u8]> {
        self.tensor::<u8>("valid").ok()
    }

    /// Rows that are not padding: the number of 1s in `valid`, or [`count`](Self::count)
    /// when the producer writes no `valid` tensor.
    pub fn valid_count(&self) -> u32 {
        match self.valid() {
            Some(v) => v.iter().filter(|&&f| f != 0).count() as u32,
            None => self.count(),
        }
    }

    /// Tensor `index`'s bytes, in place.
    ///
    /// # Panics
    /// If `index` is not below the schema's tensor count.
    pub fn tensor_bytes(&self, index: usize) -> &[u8] {
        let c = self.consumer;
        let t = &c.layout.tensors[index];
        let off = c.layout.slot_data(c.lane, self.slot) + t.offset;
        // SAFETY: this slot is HELD by us; the producer never writes a HELD slot, and the
        // slice cannot outlive the batch (whose drop releases the slot).
        unsafe { c.data.bytes(off, t.bytes) }
    }

    /// Tensor `name` as a typed slice (C order, shape in [`Layout::tensors`]), in place.
    pub fn tensor<T: Element>(&self, name: &str) -> Result<&[T], TensorError> {
        let c = self.consumer;
        let i = c
            .layout
            .tensor_index(name)
            .ok_or_else(|| TensorError::NoSuchTensor {
                name: name.to_owned(),
            })?;
        let t = &c.layout.tensors[i];
        if t.dtype != T::DTYPE {
            return Err(TensorError::DTypeMismatch {
                name: name.to_owned(),
                stored: t.dtype,
                requested: T::DTYPE,
            });
        }
        let bytes = self.tensor_bytes(i);
        // SAFETY: `T` is a sealed plain-data type valid for every bit pattern whose size is
        // `t.dtype.size()`; the tensor starts 64-byte aligned inside a page-aligned slot, so
        // the pointer is aligned for `T`; the length is a whole number of elements.
        Ok(unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / t.dtype.size())
        })
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.consumer.release(self.slot, self.meta.seq);
        self.consumer.touch_heartbeat();
    }
}
