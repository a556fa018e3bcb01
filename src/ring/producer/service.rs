//! The attach service: one thread accepts connections, reads their request lines, answers
//! them (§3) and watches every attached consumer's socket for feedback frames (§9) and EOF.
//! Nothing here blocks: every socket is non-blocking and one `poll` waits for all.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering::Acquire;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::RecvFlags;
use serde_json::json;

use super::state::{lock, pid_gone, LaneConn, ReplyExtra, SeekRequest, Shared, TICK};
use crate::ring::access;
use crate::ring::feedback::{Feedback, FrameError, FrameReader};
use crate::ring::layout::{self, ProducerState};
use crate::ring::protocol::{self, refuse, Refusal, Request};
use crate::ring::resume;

/// Time a connecting client has, in all, to send its request line; then it is refused.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections still sending their request, at most; further ones wait in the listen backlog
/// until one of these is answered or times out.
const MAX_INCOMING: usize = 64;

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
    line: protocol::LineReader,
    deadline: Instant,
}

/// Accepts connections, reads their requests and watches attached consumers' sockets until
/// stopped. Nothing here blocks: every socket is non-blocking and one `poll` waits for all,
/// so a client that sends its request slowly (or never) delays no other client, and each
/// request has [`REQUEST_TIMEOUT`] in all.
pub(super) fn service_loop(sh: &Arc<Shared>, listener: UnixListener) {
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
                        line: protocol::LineReader::default(),
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                    });
                }
            }
        }
    }
}

/// Answers one request whose line has arrived (or failed to): uid check, request, reply.
fn serve_request(sh: &Arc<Shared>, stream: UnixStream, line: io::Result<Vec<u8>>) {
    let ours = rustix::process::geteuid().as_raw();
    let peer_pid = match protocol::peer_cred(&stream) {
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
            if ids.len() > protocol::MAX_DESCRIBE_IDS {
                return refuse(
                    &stream,
                    Refusal::BadRequest,
                    &format!(
                        "bad request: describe asks about {} ids; at most {} per request",
                        ids.len(),
                        protocol::MAX_DESCRIBE_IDS
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
            let _ = protocol::send_line(&stream, &reply, None);
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
                            let _ = protocol::send_line(&stream, &reply, None);
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
                    if protocol::peer_hung_up(holder) || pid_gone(other) {
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
        let _ = protocol::send_line(stream, reply, None);
    }
}

/// Refuses a resume position the stream can never reach: an epoch past the configured last
/// one (`epochs`, 0 = unbounded; resuming at `epochs` itself means "after the end"), or
/// `u64::MAX`, which has no next epoch.
fn check_resume(r: &protocol::Resume, epochs: u64) -> Result<(), String> {
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
