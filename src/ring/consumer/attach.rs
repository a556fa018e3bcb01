//! Attaching (§3, format 2.0): the handshake, the checks of the reply and its three
//! descriptors (the ring read-only and sealed, the lane page, the doorbell), validation of the
//! control region and of the lane page, then the mappings: the whole ring read-only, the lane
//! page read-write.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{AttachError, Consumer};
use crate::ring::layout::lane_page::{lane_page_bytes, validate_lane_page};
use crate::ring::layout::{io_step, read_layout, FormatError, Layout, VERSION_MAJOR};
use crate::ring::memory::{self, Control, Data};
use crate::ring::page::LanePage;
use crate::ring::protocol::{self, Request, Resume};
use crate::ring::resume::ResumeState;
use crate::ring::runtime_dir::{validate_name, RuntimeDir};

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
    /// (2.0) The size of the lane page descriptor.
    #[serde(default)]
    lane_page_bytes: Option<u64>,
}

#[derive(Deserialize)]
struct ResumedAt {
    epoch: u64,
    index: u64,
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
            protocol::peer_cred(&stream).map_err(|e| protocol(format!("SO_PEERCRED: {e}")))?;
        protocol::check_peer_uid(peer.uid, ours, opts.trust_uid).map_err(|uid| {
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
        let (reply, fds) = protocol::recv_line_with_fds(&stream)
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
        let [ring, lane_fd, doorbell]: [std::os::fd::OwnedFd; 3] =
            fds.try_into().map_err(|fds: Vec<_>| {
                protocol(format!(
                    "the reply carried {} file descriptors; format 2.0 passes 3 (ring, lane, doorbell)",
                    fds.len()
                ))
            })?;
        let file = File::from(ring);
        let lane_file = File::from(lane_fd);
        let io = |what| io_step::<AttachError>(&name, what);
        // A consumer writes nothing in the ring: a writable descriptor is a producer bug (or
        // not a 2.0 producer), and we refuse to hold one.
        if !memory::is_read_only(&file).map_err(io("reading the ring descriptor's flags"))? {
            return Err(protocol("ring descriptor is writable".into()));
        }
        // A named `--shm-dir` file cannot be sealed (only memfds can); the producer says so.
        let named_file = reply.segment.as_deref() == Some("file");
        if !named_file && !memory::is_shrink_sealed(&file).map_err(io("reading the memfd seals"))? {
            return Err(AttachError::NotSealed {
                name,
                what: "memfd",
            });
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
        let page_bytes = lane_page_bytes(layout.slots_per_lane);
        if reply.lane_page_bytes != Some(page_bytes) {
            return Err(format(FormatError::Field {
                field: "lane_page_bytes",
                value: reply.lane_page_bytes.unwrap_or(0),
                reason: format!(
                    "the reply's lane_page_bytes must be {page_bytes} for {} slots per lane",
                    layout.slots_per_lane
                ),
            }));
        }
        let page_len = lane_file
            .metadata()
            .map_err(io("fstat of the lane page"))?
            .len();
        let mut head = [0u8; 16];
        let got = rustix::io::pread(&lane_file, &mut head, 0)
            .map_err(|e| io("reading the lane page")(e.into()))?;
        validate_lane_page(&head[..got], page_len, opts.lane, layout.slots_per_lane)
            .map_err(format)?;
        // The lane page is always a memfd: one that could shrink could SIGBUS our stores.
        if !memory::is_shrink_sealed(&lane_file).map_err(io("reading the lane page seals"))? {
            return Err(AttachError::NotSealed {
                name,
                what: "lane page",
            });
        }
        let page = LanePage::map(&lane_file, layout.slots_per_lane)
            .map_err(io("mapping the lane page"))?;
        let control = Control::map_read_only(&file, layout.data_offset)
            .map_err(io("mapping the control region"))?;
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
            producer_pid: reply.producer_pid,
            layout,
            control,
            data,
            page,
            doorbell,
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
}
