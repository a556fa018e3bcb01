//! Why attaching, taking a batch, reporting or viewing a tensor failed; the machine-readable
//! codes are the ones every client names (§3 "Refusal codes").

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::ring::layout::{DType, FormatError, IoStep};
use crate::ring::runtime_dir::RuntimeDirError;

/// What to do about a failed connect, by its cause.
pub(super) fn connect_hint(err: &io::Error) -> &'static str {
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
    /// The ring's memfd, or the lane page, is not sealed against shrinking.
    #[error("ring {name:?}: {what} is not sealed against shrinking; refusing to map it")]
    NotSealed {
        /// Ring name.
        name: String,
        /// Which descriptor: `"memfd"` (the ring) or `"lane page"`.
        what: &'static str,
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

impl IoStep for AttachError {
    fn io(name: String, what: &'static str, source: io::Error) -> Self {
        AttachError::Io { name, what, source }
    }
}

/// A connect error that means "nobody serves this socket (yet)".
pub(super) fn not_running(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
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
