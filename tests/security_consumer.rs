//! A consumer that writes where it should not (docs/security.md): attached to lane 1 through
//! the real handshake, it writes through the descriptor it was passed (what its read-write
//! mapping of the control region reaches) and overwrites the producer's state, the header's `lane_count`, lane 0's `next_seq` and every
//! slot's state, the header's `world_size` and lane 1's `rank`. The daemon takes no decision from what it wrote: it restores the header,
//! frees the forged `WRITING` slots, accepts resume-attaches, numbers batches from its own
//! counter, and an `--exit-when-done` daemon does not exit early.
//!
//! What this does not cover (issue 24 item 4, a ring format change): while the forged values
//! stand (up to one heartbeat, 50 ms), other lanes' consumers read them, and the data region
//! can be mapped writable through the descriptor.

mod common;

use std::io::{IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

const STATE: usize = 44;
const LANE_COUNT: usize = 64;
const SLOT_TABLE: usize = 100;
const LANE_TABLE: usize = 96;
const SLOTS_PER_LANE: usize = 68;
const WORLD_SIZE: usize = 156;
const LANE_ENTRY: usize = 128;
const LANE_RANK: usize = 104;
const WRITING: u32 = 1;
const SERVING: u32 = 1;
const FINISHED: u32 = 2;
const STOPPED: u32 = 3;

/// Attaches to `lane` with a bare socket and returns the connection and the ring's fd.
fn raw_attach(runtime: &Path, name: &str, lane: u32) -> (UnixStream, OwnedFd) {
    let mut s = UnixStream::connect(runtime.join(format!("{name}.sock"))).unwrap();
    writeln!(
        s,
        r#"{{"op":"attach","version":1,"lane":{lane},"pid":{}}}"#,
        std::process::id()
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &s,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    let reply = String::from_utf8_lossy(&buf[..got.bytes]).into_owned();
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let fd = control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("the ring's fd");
    (s, fd)
}

/// The ring's memory through the descriptor an attach passed: the bytes a consumer's
/// read-write mapping of the control region reaches (written here with `pwrite`, which keeps
/// the test free of raw pointers).
struct Raw {
    file: std::fs::File,
}

impl Raw {
    fn new(fd: OwnedFd) -> Raw {
        Raw {
            file: std::fs::File::from(fd),
        }
    }
    fn u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.file.read_exact_at(&mut b, off as u64).unwrap();
        u32::from_le_bytes(b)
    }
    fn set_u32(&self, off: usize, v: u32) {
        self.file
            .write_all_at(&v.to_le_bytes(), off as u64)
            .unwrap();
    }
    fn set_u64(&self, off: usize, v: u64) {
        self.file
            .write_all_at(&v.to_le_bytes(), off as u64)
            .unwrap();
    }
}

/// Waits (with a deadline) until `cond` holds.
fn await_cond(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        std::thread::yield_now();
    }
}

#[test]
fn a_consumer_writing_producer_state_cannot_stop_resume_or_end_the_daemon() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 16);
    let config = small_config(data.path(), &spec, "forge");
    let daemon = Daemon::start(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--lanes",
            "2",
            "--epochs",
            "1000",
            "--exit-when-done",
        ],
    );
    let (_conn, fd) = raw_attach(runtime.path(), "forge", 1);
    let raw = Raw::new(fd);
    let lanes = raw.u32(LANE_COUNT) as usize;
    let slots = raw.u32(SLOTS_PER_LANE) as usize;
    let slot_table = raw.u32(SLOT_TABLE) as usize;
    let lane0 = raw.u32(LANE_TABLE) as usize;
    let lane1 = lane0 + LANE_ENTRY;

    // STOPPED, no lanes, a wild next_seq for lane 0; (1.3) another world size and lane 1
    // claiming another rank.
    let (world, rank1) = (raw.u32(WORLD_SIZE), raw.u32(lane1 + LANE_RANK));
    assert_eq!((world, rank1), (2, 1));
    raw.set_u32(STATE, STOPPED);
    raw.set_u32(LANE_COUNT, 0);
    raw.set_u64(lane0 + 16, 1 << 60);
    raw.set_u32(WORLD_SIZE, 9);
    raw.set_u32(lane1 + LANE_RANK, 7);
    await_cond("the header's restore", || {
        raw.u32(LANE_COUNT) == lanes as u32
            && raw.u32(STATE) == SERVING
            && raw.u32(WORLD_SIZE) == world
            && raw.u32(lane1 + LANE_RANK) == rank1
    });
    let mut opts = AttachOptions::new("forge", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    opts.resume = Some((0, 0));
    let consumer = Consumer::attach_with(&opts).expect("a resume-attach after a forged STOPPED");
    let first = consumer
        .next_timeout(Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert!(
        first.seq() < 1000,
        "seq {} came from the forged next_seq",
        first.seq()
    );
    drop(first);

    // FINISHED, and every slot of both lanes WRITING: the daemon neither exits nor starves.
    raw.set_u32(STATE, FINISHED);
    for s in 0..lanes * slots {
        raw.set_u32(slot_table + s * 64, WRITING);
    }
    await_cond("the forged state's restore", || raw.u32(STATE) == SERVING);
    let mut last_seq = 0;
    for _ in 0..20 {
        let batch = consumer
            .next_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("lane 0 keeps being served");
        assert!(batch.seq() > last_seq && batch.seq() < 1000);
        last_seq = batch.seq();
    }
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
}
