//! The attach protocol (docs/ring-format.md §3), both sides of it: one JSON request line, one
//! JSON reply line sent in a single `sendmsg` (with the memfd in `SCM_RIGHTS` on success), peer
//! uid checks with `SO_PEERCRED`. The Python client's `protocol.py` is the same room.
//!
//! The crate denies `unsafe_code`; this file allows it for one `getsockopt(SO_PEERCRED)`.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use super::access::Peer;

/// Longest request or reply line, newline included.
pub(crate) const MAX_LINE: usize = 4096;

/// The `resume` object of an attach request: the next batch the consumer wants and (1.3)
/// what that position is a position in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Resume {
    pub(crate) epoch: u64,
    pub(crate) index: u64,
    /// Samples of the epoch's global order consumed before that batch (1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sample: Option<u64>,
    /// The producer fingerprint the position was saved under (1.3); kept as raw JSON, since a
    /// saved state may come from anywhere ([`super::resume::plan_resume`] checks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fingerprint: Option<serde_json::Value>,
}

/// Why the producer refused a request: the machine-readable `code` of a failure reply (1.3,
/// docs/ring-format.md §3 "Refusal codes"), which says whether asking again later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer's uid/group may not attach.
    Permission,
    /// The request line is not a request of this format.
    BadRequest,
    /// The request line did not arrive within 2 s.
    RequestTimeout,
    /// The client implements another major version.
    Version,
    /// `lane ≥ lane_count`.
    LaneRange,
    /// Another live consumer holds the lane, or its attach is pending.
    LaneHeld,
    /// A resume position the stream can never reach.
    ResumeRange,
    /// A resume whose saved fingerprint names an order this producer does not serve.
    ResumeMismatch,
    /// The producer is stopping or has failed; a new producer of the name may come.
    Stopping,
    /// A request this producer cannot answer (`describe` without a sample catalogue).
    Unsupported,
}

impl Refusal {
    /// The `code` string.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Refusal::Permission => "permission",
            Refusal::BadRequest => "bad_request",
            Refusal::RequestTimeout => "request_timeout",
            Refusal::Version => "version",
            Refusal::LaneRange => "lane_range",
            Refusal::LaneHeld => "lane_held",
            Refusal::ResumeRange => "resume_range",
            Refusal::ResumeMismatch => "resume_mismatch",
            Refusal::Stopping => "stopping",
            Refusal::Unsupported => "unsupported",
        }
    }

    /// Whether the same request may succeed later (`retry` in the reply).
    pub(crate) fn retryable(self) -> bool {
        matches!(
            self,
            Refusal::RequestTimeout | Refusal::LaneHeld | Refusal::Stopping
        )
    }

    /// The failure reply: `{"ok": false, "error", "code", "retry"}`.
    pub(crate) fn reply(self, error: &str) -> serde_json::Value {
        serde_json::json!({"ok": false, "error": error, "code": self.code(),
                           "retry": self.retryable()})
    }
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Request {
    /// Attach to a lane.
    Attach {
        version: u32,
        lane: u32,
        pid: u32,
        #[serde(default)]
        resume: Option<Resume>,
    },
    /// Describe the ring.
    Info,
    /// The daemon's evaluation of reported losses (`ringfeed stat`); the reply may be longer
    /// than [`MAX_LINE`].
    Evaluation,
    /// The class names (1.3); the reply may be longer than [`MAX_LINE`].
    Classes,
    /// Where samples come from (1.3): shard, member and original path of each id.
    Describe {
        /// Sample ids (as in `sample_ids`), at most [`MAX_DESCRIBE_IDS`].
        ids: Vec<u64>,
    },
}

/// Most ids one `describe` request may ask about: 128 ids of 20 digits keep the request line
/// under [`MAX_LINE`].
pub(crate) const MAX_DESCRIBE_IDS: usize = 128;

/// The consumer's uid check: `Err(peer)` when the producer runs as neither this user nor the
/// one it was told to trust.
pub(crate) fn check_peer_uid(peer: u32, ours: u32, trusted: Option<u32>) -> Result<(), u32> {
    if peer == ours || Some(peer) == trusted {
        Ok(())
    } else {
        Err(peer)
    }
}

/// The peer's effective uid, gid and pid at connect time (`SO_PEERCRED`; the pid is
/// translated into our pid namespace, unlike the one a client writes in its request, and is 0
/// when the peer lives in a pid namespace we cannot see into: a container with its own pid
/// namespace, `unshare --pid`). Read with `getsockopt` directly, because rustix's `UCred`
/// cannot represent pid 0.
pub(crate) fn peer_cred(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable `ucred` of `len` bytes that outlives the call; the
    // kernel writes at most `len` bytes into it and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("short SO_PEERCRED reply"));
    }
    Ok(Peer {
        uid: cred.uid,
        gid: cred.gid,
        pid: u32::try_from(cred.pid).unwrap_or(0),
    })
}

/// A request line arriving in pieces on a non-blocking socket: the producer's service thread
/// keeps one per connection still sending its request, so a slow sender holds only its own
/// reader, never the thread.
#[derive(Debug, Default)]
pub(crate) struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    /// Reads what has arrived: the line (up to [`MAX_LINE`] bytes, without the newline) once
    /// its newline came, `None` while more is needed. End of file, an error or an overlong
    /// line is an error. The peer sends nothing after the line, so reading in chunks cannot
    /// swallow a following message.
    pub(crate) fn poll_line(&mut self, mut stream: &UnixStream) -> io::Result<Option<Vec<u8>>> {
        let mut chunk = [0u8; 512];
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before a full line",
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line = std::mem::take(&mut self.buf);
                line.truncate(end);
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "line longer than 4096 bytes",
                ));
            }
        }
    }
}

/// Most descriptors one reply carries (2.0: the ring, the lane page and the doorbell).
pub(crate) const MAX_FDS: usize = 3;

/// Sends `reply` + `\n` in one `sendmsg`, with `fd` attached when given.
pub(crate) fn send_line(
    stream: &UnixStream,
    reply: &serde_json::Value,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    send_line_with_fds(stream, reply, &fds)
}

/// Sends `reply` + `\n` in one `sendmsg`, with `fds` (at most [`MAX_FDS`], in this order)
/// attached.
pub(crate) fn send_line_with_fds(
    stream: &UnixStream,
    reply: &serde_json::Value,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} descriptors in one reply; at most {MAX_FDS}",
            fds.len()
        )));
    }
    let mut line = reply.to_string().into_bytes();
    line.push(b'\n');
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "control buffer too small for the descriptors",
        ));
    }
    let mut sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(&line)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // A short send of a < 4 KiB line does not happen on a Unix stream socket in practice;
    // finish it without the fds (already delivered with the first bytes) if it does.
    while sent < line.len() {
        let mut none = SendAncillaryBuffer::new(&mut []);
        sent += rustix::net::sendmsg(
            stream,
            &[IoSlice::new(&line[sent..])],
            &mut none,
            SendFlags::NOSIGNAL,
        )?;
    }
    Ok(())
}

/// Sends a failure reply with its code (§3 "Refusal codes"); a client that is gone is not an
/// error.
pub(crate) fn refuse(stream: &UnixStream, why: Refusal, error: &str) {
    let _ = send_line(stream, &why.reply(error), None);
}

/// Receives one reply line and every descriptor that came with it, in the order sent (up to
/// one more than [`MAX_FDS`], so a caller sees that there were too many; a reply with even
/// more is an error).
pub(crate) fn recv_line_with_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut kept = Vec::new();
    let mut buf = [0u8; MAX_LINE];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            stream.as_fd(),
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                kept.extend(fds);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the reply carried more than {} file descriptors",
                    MAX_FDS + 1
                ),
            ));
        }
        if got.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "producer closed the connection without a reply",
            ));
        }
        line.extend_from_slice(&buf[..got.bytes]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Ok((line, kept));
        }
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply longer than 4096 bytes",
            ));
        }
    }
}

/// Longest `evaluation` reply a client reads (per-class statistics can exceed a line).
pub(crate) const MAX_EVALUATION_REPLY: usize = 4 << 20;

/// Asks the producer at `path` for its `evaluation` reply (§3): connects, checks that the
/// peer runs as our uid (or `trusted`), sends the request, reads one line of at most
/// [`MAX_EVALUATION_REPLY`] bytes.
pub(crate) fn query_evaluation(
    path: &std::path::Path,
    trusted: Option<u32>,
) -> io::Result<serde_json::Value> {
    use std::io::Write as _;
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let peer = peer_cred(&stream)?;
    let ours = rustix::process::getuid().as_raw();
    if let Err(uid) = check_peer_uid(peer.uid, ours, trusted) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("producer at {} runs as uid {uid}, not ours", path.display()),
        ));
    }
    stream.write_all(b"{\"op\":\"evaluation\"}\n")?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "producer closed the connection without a full reply",
            ));
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.last() == Some(&b'\n') {
            break;
        }
        if reply.len() > MAX_EVALUATION_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "evaluation reply longer than 4 MiB",
            ));
        }
    }
    serde_json::from_slice(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Whether the peer has closed `stream` (EOF with nothing left to read, or an error), checked
/// without blocking and without consuming anything: bytes still unread (feedback frames, §9)
/// mean the peer may still be there.
pub(crate) fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    match rustix::net::recv(stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => true,
        Ok(_) => false,
        Err(e) => e != rustix::io::Errno::AGAIN && e != rustix::io::Errno::INTR,
    }
}

/// Whether the peer has closed `stream` (EOF or an error), checked without blocking and
/// without consuming data. Stray bytes the peer sent are read and dropped.
pub(crate) fn peer_closed(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 64];
    match rustix::net::recv(stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => true,
        Ok(_) => {
            let _ = rustix::net::recv(stream, &mut byte, RecvFlags::DONTWAIT);
            false
        }
        Err(e) => e != rustix::io::Errno::AGAIN && e != rustix::io::Errno::INTR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn requests_parse_per_the_document() {
        let r: Request = serde_json::from_str(
            r#"{"op": "attach", "version": 1, "lane": 0, "pid": 1234, "resume": {"epoch": 2, "index": 17}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Attach {
                version: 1,
                lane: 0,
                pid: 1234,
                resume: Some(Resume {
                    epoch: 2,
                    index: 17,
                    sample: None,
                    fingerprint: None,
                })
            }
        );
        // 1.3: the position in samples and the fingerprint it was saved under.
        let r: Request = serde_json::from_str(
            r#"{"op": "attach", "version": 1, "lane": 0, "pid": 1, "resume": {"epoch": 1, "index": 9, "sample": 576, "fingerprint": {"seed": 3}}}"#,
        )
        .unwrap();
        let Request::Attach {
            resume: Some(resume),
            ..
        } = r
        else {
            panic!("not an attach with resume: {r:?}");
        };
        assert_eq!(resume.sample, Some(576));
        assert_eq!(resume.fingerprint, Some(serde_json::json!({"seed": 3})));
        let r: Request =
            serde_json::from_str(r#"{"op":"attach","version":1,"lane":3,"pid":9,"resume":null}"#)
                .unwrap();
        assert!(matches!(
            r,
            Request::Attach {
                lane: 3,
                resume: None,
                ..
            }
        ));
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"info"}"#).unwrap(),
            Request::Info
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"detach"}"#).is_err());
    }

    #[test]
    fn refusals_say_their_code_and_whether_to_retry() {
        let all = [
            Refusal::Permission,
            Refusal::BadRequest,
            Refusal::RequestTimeout,
            Refusal::Version,
            Refusal::LaneRange,
            Refusal::LaneHeld,
            Refusal::ResumeRange,
            Refusal::ResumeMismatch,
            Refusal::Stopping,
            Refusal::Unsupported,
        ];
        let codes: std::collections::BTreeSet<_> = all.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), all.len(), "codes are distinct");
        let retried: Vec<_> = all
            .iter()
            .filter(|r| r.retryable())
            .map(|r| r.code())
            .collect();
        assert_eq!(retried, ["request_timeout", "lane_held", "stopping"]);
        let reply = Refusal::LaneHeld.reply("lane 0 is held by live consumer pid 7");
        assert_eq!(
            reply,
            serde_json::json!({"ok": false, "error": "lane 0 is held by live consumer pid 7",
                               "code": "lane_held", "retry": true})
        );
    }

    #[test]
    fn uid_check() {
        assert_eq!(check_peer_uid(1000, 1000, None), Ok(()));
        assert_eq!(check_peer_uid(65534, 0, None), Err(65534));
        assert_eq!(check_peer_uid(0, 1000, Some(0)), Ok(()));
        assert_eq!(check_peer_uid(5, 1000, Some(0)), Err(5));
    }

    #[test]
    fn line_with_fd_round_trips_and_eof_is_seen() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let peer = peer_cred(&a).unwrap();
        assert_eq!(
            (peer.uid, peer.gid, peer.pid),
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
                std::process::id()
            )
        );
        let memfd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        send_line(&a, &serde_json::json!({"ok": true}), Some(memfd.as_fd())).unwrap();
        let (line, fds) = recv_line_with_fds(&b).unwrap();
        assert_eq!(line, br#"{"ok":true}"#);
        assert_eq!(fds.len(), 1);
        a.set_nonblocking(true).unwrap();
        let mut reader = LineReader::default();
        assert_eq!(reader.poll_line(&a).unwrap(), None);
        b.write_all(b"{\"op\":").unwrap();
        assert_eq!(reader.poll_line(&a).unwrap(), None);
        b.write_all(b"\"info\"}\n").unwrap();
        assert_eq!(reader.poll_line(&a).unwrap().unwrap(), br#"{"op":"info"}"#);
        assert!(!peer_closed(&a));
        drop(b);
        assert!(peer_closed(&a));
    }

    /// 2.0 replies carry three descriptors (ring, lane page, doorbell): they arrive in the
    /// order sent; a fourth is refused by the sender.
    #[test]
    fn several_descriptors_arrive_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let memfds: Vec<OwnedFd> = (1..=3u64)
            .map(|i| {
                let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
                rustix::fs::ftruncate(&fd, i * 4096).unwrap();
                fd
            })
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = memfds.iter().map(|f| f.as_fd()).collect();
        send_line_with_fds(&a, &serde_json::json!({"ok": true}), &borrowed).unwrap();
        let (line, fds) = recv_line_with_fds(&b).unwrap();
        assert_eq!(line, br#"{"ok":true}"#);
        let sizes: Vec<u64> = fds
            .iter()
            .map(|f| rustix::fs::fstat(f).unwrap().st_size as u64)
            .collect();
        assert_eq!(sizes, [4096, 8192, 12288]);
        let four = [borrowed[0], borrowed[1], borrowed[2], borrowed[0]];
        assert!(send_line_with_fds(&a, &serde_json::json!({}), &four).is_err());
        // A (hostile or broken) producer sending more: the receiver sees all of them, or an
        // error once they do not fit its buffer, never a silently shortened set.
        let raw_send = |n: usize| {
            let fds: Vec<BorrowedFd<'_>> = (0..n).map(|i| borrowed[i % 3]).collect();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(64))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
            rustix::net::sendmsg(
                &a,
                &[IoSlice::new(b"{}\n")],
                &mut control,
                rustix::net::SendFlags::empty(),
            )
            .unwrap();
        };
        raw_send(4);
        assert_eq!(recv_line_with_fds(&b).unwrap().1.len(), 4);
        raw_send(64);
        match recv_line_with_fds(&b) {
            Ok((_, fds)) => assert_eq!(fds.len(), 64, "all received, or an error"),
            Err(e) => assert!(e.to_string().contains("descriptors"), "{e}"),
        }
    }

    #[test]
    fn overlong_and_unfinished_lines_are_errors() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut reader = LineReader::default();
        b.write_all(&[b'x'; MAX_LINE + 1]).unwrap();
        let err = reader.poll_line(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut reader = LineReader::default();
        b.write_all(b"{\"op\"").unwrap();
        drop(b);
        let err = reader.poll_line(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
