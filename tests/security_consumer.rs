//! A hostile consumer against the real daemon (docs/security.md, ring format 2.0). It attaches
//! with a bare socket and `recvmsg` of the three descriptors, no client library, and tries
//! everything a consumer's descriptors allow:
//!
//! - the ring descriptor is read-only: `mmap(PROT_WRITE, MAP_SHARED)` fails with `EACCES`, so
//!   does `mprotect` of a read-only mapping to writable; `ftruncate` and `write` fail; a memfd
//!   reopened `O_RDWR` through `/proc/self/fd` cannot be mapped writable or written
//!   (`F_SEAL_FUTURE_WRITE`: `EPERM`); a `--shm-dir` ring too is passed read-only and cannot
//!   be truncated through it;
//! - a store into its read-only mapping of `producer_state` or of an epoch plan faults
//!   (`SIGSEGV`, in a child process): 1.3's forged `STOPPED` / `FINISHED` / plans cannot be
//!   written at all;
//! - on lane 1 it writes random bytes over its whole lane page in a loop (forged
//!   `released_seq` for batches it never took, huge counters) and floods its doorbell: lane
//!   0's consumer receives exactly the batches of a clean run, the daemon keeps serving and
//!   stops within 2 s of SIGTERM, and once the hostile process is killed a new consumer on
//!   lane 1 receives that lane's remaining batches in order;
//! - a consumer declared dead (its process gone, a forked-off holder of its socket and lane
//!   page still alive) writes only into its stale page: it cannot free the slots of the
//!   lane's next attach.
//!
//! Children are this test binary re-executed with `RINGFEED_FAULT_ROLE` (see `role_entry`).

mod common;
mod fault_support;

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use fault_support::{observe, role, say, wait_until, Peer, Watchdog};
use ringfeed::ring::{AttachOptions, Batch, Consumer, ProducerState, RuntimeDir};
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

const ENTRY: &str = "role_entry";

// Header and table offsets (docs/ring-format.md §5).
const FILE_BYTES: usize = 24;
const PRODUCER_STATE: usize = 44;
const SLOTS_PER_LANE: usize = 68;
const DATA_OFFSET: usize = 80;
const LANE_TABLE: usize = 96;
const SLOT_TABLE: usize = 100;
const LANE_ENTRY: usize = 128;
const PLAN_EPOCH: usize = 72;
const SLOT_ENTRY: usize = 64;
const SLOT_SEQ: usize = 8;

/// What a bare attach receives: the connection, the reply, and the three descriptors.
struct RawAttach {
    conn: UnixStream,
    reply: serde_json::Value,
    ring: File,
    page: File,
    doorbell: OwnedFd,
}

impl RawAttach {
    fn u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.ring.read_exact_at(&mut b, off as u64).unwrap();
        u32::from_le_bytes(b)
    }
    fn u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        self.ring.read_exact_at(&mut b, off as u64).unwrap();
        u64::from_le_bytes(b)
    }
    /// The `seq` of every slot of `lane`, read through the read-only descriptor.
    fn slot_seqs(&self, lane: u32) -> Vec<u64> {
        let slots = self.u32(SLOTS_PER_LANE) as usize;
        let table = self.u32(SLOT_TABLE) as usize;
        (0..slots)
            .map(|s| self.u64(table + (lane as usize * slots + s) * SLOT_ENTRY + SLOT_SEQ))
            .collect()
    }
    /// A new shared read-only mapping of the ring's first `len` bytes.
    fn map_read_only(&self, len: usize) -> *mut std::ffi::c_void {
        // SAFETY: a fresh mapping at an address the kernel picks, which nothing in this
        // process aliases; callers only read it or change its protection.
        unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &self.ring,
                0,
            )
        }
        .unwrap()
    }
}

/// Attaches to `lane` of `name` with a bare socket (version 2), retrying while the lane is
/// still held by a consumer that just died; returns what the reply carried.
fn raw_attach(runtime: &Path, name: &str, lane: u32) -> RawAttach {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = UnixStream::connect(runtime.join(format!("{name}.sock"))).unwrap();
        writeln!(
            conn,
            r#"{{"op":"attach","version":2,"lane":{lane},"pid":{}}}"#,
            std::process::id()
        )
        .unwrap();
        let mut buf = [0u8; 8192];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &conn,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .unwrap();
        let text = String::from_utf8_lossy(&buf[..got.bytes]).into_owned();
        let reply: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(more) = m {
                fds.extend(more);
            }
        }
        if reply["ok"] != true {
            assert_eq!(reply["code"], "lane_held", "{text}");
            assert!(Instant::now() < deadline, "lane {lane} stays held: {text}");
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert_eq!(fds.len(), 3, "{text}");
        let mut fds = fds.into_iter();
        return RawAttach {
            conn,
            reply,
            ring: File::from(fds.next().unwrap()),
            page: File::from(fds.next().unwrap()),
            doorbell: fds.next().unwrap(),
        };
    }
}

fn options(runtime: &Path, name: &str, lane: u32) -> AttachOptions {
    let mut o = AttachOptions::new(name, lane);
    o.dir = Some(RuntimeDir::at(runtime));
    o.wait = Duration::from_secs(10);
    o
}

/// A batch's identity and bytes, hashed: equal digests mean the same batch, bit for bit.
fn digest(b: &Batch<'_>, tensors: usize) -> (u64, u64, u32, u64) {
    let mut h = DefaultHasher::new();
    for i in 0..tensors {
        b.tensor_bytes(i).hash(&mut h);
    }
    (b.epoch(), b.index(), b.count(), h.finish())
}

/// A small xorshift generator: the hostile consumer's bytes need no quality, only variety.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Entry point of the children; a no-op in the parent run.
#[test]
fn role_entry() {
    let Some(role) = role() else { return };
    let runtime = std::path::PathBuf::from(std::env::var("RINGFEED_RUNTIME_DIR").unwrap());
    let name = std::env::var("FAULT_RING").unwrap();
    let lane: u32 = std::env::var("FAULT_LANE").unwrap().parse().unwrap();
    match role.as_str() {
        // Maps the ring read-only, as every consumer does, and stores into it.
        "store" => {
            let offset: usize = std::env::var("FAULT_OFFSET").unwrap().parse().unwrap();
            let a = raw_attach(&runtime, &name, lane);
            let len = a.u64(DATA_OFFSET) as usize;
            let map = a.map_read_only(len); // the control region
            say("MAPPED");
            assert!(offset + 4 <= len);
            // SAFETY: in bounds and aligned (a u32 field of the header or lane table). The
            // page is mapped read-only: this store faults, which is what is tested.
            unsafe { std::ptr::write_volatile(map.cast::<u8>().add(offset).cast::<u32>(), 3) };
            say("STORED");
            std::process::exit(0);
        }
        // Writes noise over its lane page, forges releases of batches it never took and
        // floods its doorbell, until killed.
        "hostile" => {
            let a = raw_attach(&runtime, &name, lane);
            let page_len = a.page.metadata().unwrap().len() as usize;
            let mut noise = Noise(fault_support::seed() | 1);
            let mut buf = vec![0u8; page_len];
            let mut round = 0u64;
            loop {
                noise.fill(&mut buf);
                if round.is_multiple_of(2) {
                    // Forged releases (and takes) of every batch in the lane's slots.
                    for (s, seq) in a.slot_seqs(lane).into_iter().enumerate() {
                        let at = 64 + 16 * s;
                        if at + 16 <= buf.len() {
                            buf[at..at + 8].copy_from_slice(&noise.next().to_le_bytes());
                            buf[at + 8..at + 16].copy_from_slice(&seq.to_le_bytes());
                        }
                    }
                    // Huge counters.
                    buf[16..48].fill(0xff);
                }
                a.page.write_all_at(&buf, 0).unwrap();
                for _ in 0..64 {
                    let _ = rustix::io::write(&a.doorbell, &1u64.to_le_bytes());
                    let _ = rustix::io::write(&a.doorbell, &u64::MAX.to_le_bytes());
                }
                if round == 0 {
                    say("HOSTILE");
                }
                round += 1;
                std::thread::yield_now();
            }
        }
        // Attaches, hands its socket and lane page to the parent, and exits: the producer
        // sees its pid gone while the socket stays open.
        "connector" => {
            let to_parent: i32 = std::env::var("FAULT_FD").unwrap().parse().unwrap();
            // SAFETY: the parent passed this end of a socket pair, open across exec.
            let back = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(to_parent) };
            let a = raw_attach(&runtime, &name, lane);
            let fds = [a.conn.as_fd(), a.ring.as_fd(), a.page.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
            let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
            assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
            rustix::net::sendmsg(
                &back,
                &[std::io::IoSlice::new(b"x")],
                &mut control,
                rustix::net::SendFlags::empty(),
            )
            .unwrap();
            std::process::exit(0);
        }
        other => panic!("unknown role {other}"),
    }
}

fn role_env(name: &str, lane: u32, more: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("FAULT_RING", name.to_owned()),
        ("FAULT_LANE", lane.to_string()),
    ];
    env.extend(more.iter().cloned());
    env
}

fn dataset(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let data = tempfile::tempdir().unwrap();
    let spec = write_dataset(data.path(), 2, 24);
    let config = small_config(data.path(), &spec, name);
    (data, config)
}

/// Checks what every consumer's ring descriptor refuses; `memfd` adds the reopen through
/// `/proc/self/fd`, which for a named file is the file's own mode.
fn assert_ring_descriptor_is_read_only(a: &RawAttach, memfd: bool) {
    use rustix::io::Errno;
    let fds = a.reply["fds"].as_array().unwrap();
    assert_eq!(fds, &["ring", "lane", "doorbell"]);
    assert_eq!(
        a.reply["lane_page_bytes"].as_u64().unwrap(),
        a.page.metadata().unwrap().len()
    );
    let flags = rustix::fs::fcntl_getfl(&a.ring).unwrap();
    assert!(
        !flags.intersects(rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::RDWR),
        "the ring descriptor is read-only: {flags:?}"
    );
    let len = a.u64(FILE_BYTES) as usize;
    // SAFETY: asks the kernel for a new mapping (it refuses); nothing is dereferenced.
    let writable = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            &a.ring,
            0,
        )
    };
    assert_eq!(writable.err(), Some(Errno::ACCESS), "mmap(PROT_WRITE)");
    let map = a.map_read_only(len); // only its protection is changed, nothing is accessed
                                    // SAFETY: `map` is the mapping made just above, `len` long.
    let upgraded =
        unsafe { rustix::mm::mprotect(map, len, MprotectFlags::READ | MprotectFlags::WRITE) };
    assert_eq!(upgraded.err(), Some(Errno::ACCESS), "mprotect to writable");
    // SAFETY: unmaps the mapping made above; no reference into it exists.
    unsafe { rustix::mm::munmap(map, len) }.unwrap();
    assert!(rustix::fs::ftruncate(&a.ring, 0).is_err(), "ftruncate");
    assert!(
        rustix::fs::ftruncate(&a.ring, 1 << 40).is_err(),
        "ftruncate"
    );
    assert_eq!(rustix::io::write(&a.ring, b"x").err(), Some(Errno::BADF));
    assert!(a
        .ring
        .write_all_at(&[3, 0, 0, 0], PRODUCER_STATE as u64)
        .is_err());
    assert_eq!(
        a.ring.metadata().unwrap().len(),
        len as u64,
        "size unchanged"
    );
    if memfd {
        // Same uid: /proc/self/fd/<n> opens the memfd read-write, but F_SEAL_FUTURE_WRITE
        // refuses every new writable mapping and every write.
        let path = format!("/proc/self/fd/{}", a.ring.as_raw_fd());
        if let Ok(rw) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            // SAFETY: asks the kernel for a new mapping (it refuses); nothing is dereferenced.
            let writable = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED,
                    &rw,
                    0,
                )
            };
            assert_eq!(
                writable.err(),
                Some(Errno::PERM),
                "mmap of an O_RDWR reopen"
            );
            assert_eq!(
                rustix::io::pwrite(&rw, &[3, 0, 0, 0], PRODUCER_STATE as u64).err(),
                Some(Errno::PERM),
                "pwrite through an O_RDWR reopen"
            );
            assert!(
                rustix::fs::ftruncate(&rw, 0).is_err(),
                "sealed against shrinking"
            );
        }
        // The lane page is a memfd of its own, named so that observers never take it for
        // the ring, and sealed against resizing.
        let link = std::fs::read_link(format!("/proc/self/fd/{}", a.page.as_raw_fd())).unwrap();
        let link = link.to_string_lossy().into_owned();
        assert!(link.starts_with("/memfd:ringfeed-lane:"), "{link}");
        let seals = rustix::fs::fcntl_get_seals(&a.page).unwrap();
        use rustix::fs::SealFlags;
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        assert!(rustix::fs::ftruncate(&a.page, 0).is_err());
    }
}

/// Every descriptor check above, on a memfd ring and on a `--shm-dir` file, and a store into
/// the read-only mapping of `producer_state` and of an epoch plan dies of SIGSEGV; the daemon
/// keeps serving, its state untouched, and stops within 2 s of SIGTERM.
#[test]
fn a_consumer_cannot_write_the_ring_through_its_descriptors() {
    let _dog = Watchdog::arm("descriptor checks", Duration::from_secs(240));
    for shm in [false, true] {
        let name = if shm { "ro-file" } else { "ro-memfd" };
        let runtime = RuntimeTmp::new();
        let (data, config) = dataset(name);
        let shm_dir = data.path().join("shm");
        std::fs::create_dir(&shm_dir).unwrap();
        let mut args = vec![
            "--config".to_owned(),
            config.to_str().unwrap().to_owned(),
            "--lanes".to_owned(),
            "2".to_owned(),
        ];
        if shm {
            args.extend(["--shm-dir".to_owned(), shm_dir.to_str().unwrap().to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start(runtime.path(), &args);
        // A 1.x client (which would map the ring read-write) is refused by version.
        let mut old = UnixStream::connect(runtime.path().join(format!("{name}.sock"))).unwrap();
        writeln!(old, r#"{{"op":"attach","version":1,"lane":0,"pid":1}}"#).unwrap();
        let mut reply = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&old), &mut reply).unwrap();
        let reply: serde_json::Value = serde_json::from_str(reply.trim()).unwrap();
        assert_eq!(
            (&reply["ok"], &reply["code"]),
            (&false.into(), &"version".into())
        );
        drop(old);
        let a = raw_attach(runtime.path(), name, 0);
        assert_eq!(a.reply["segment"], if shm { "file" } else { "memfd" });
        assert_ring_descriptor_is_read_only(&a, !shm);
        let plan_epoch = a.u32(LANE_TABLE) as usize + LANE_ENTRY + PLAN_EPOCH;
        drop(a);
        // 1.3's forged STOPPED (header) and forged epoch plan (lane 1's entry): the store
        // itself faults.
        for offset in [PRODUCER_STATE, plan_epoch] {
            let env = role_env(name, 0, &[("FAULT_OFFSET", offset.to_string())]);
            let mut child = Peer::spawn(ENTRY, "store", runtime.path(), &env);
            child.expect("MAPPED");
            let status = child.child.wait().unwrap();
            assert_eq!(
                status.signal(),
                Some(libc_sigsegv()),
                "a store at {offset} into the read-only mapping: {status}"
            );
        }
        let observer = observe(runtime.path(), name);
        assert_eq!(
            observer.snapshot().stats.state,
            Some(ProducerState::Serving),
            "producer_state is the producer's"
        );
        // A consumer on lane 1 is served as ever.
        let c = Consumer::attach_with(&options(runtime.path(), name, 1)).unwrap();
        for _ in 0..3 {
            drop(c.next_timeout(Duration::from_secs(60)).unwrap().unwrap());
        }
        drop(c);
        let (status, took) = daemon.terminate_timed();
        assert!(status.success(), "{status}");
        assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    }
}

/// SIGSEGV's number (the same on every Linux architecture we build for).
fn libc_sigsegv() -> i32 {
    rustix::process::Signal::SEGV.as_raw()
}

/// Lane 0's first `n` batches as digests, from a consumer attached to `name`.
fn lane0_digests(runtime: &Path, name: &str, n: usize) -> Vec<(u64, u64, u32, u64)> {
    let c = Consumer::attach_with(&options(runtime, name, 0)).unwrap();
    let tensors = c.layout().tensors.len();
    (0..n)
        .map(|_| {
            let b = c.next_timeout(Duration::from_secs(60)).unwrap().unwrap();
            digest(&b, tensors)
        })
        .collect()
}

#[test]
fn a_hostile_consumer_on_lane_1_hurts_only_lane_1() {
    let dog = Watchdog::arm("hostile lane page", Duration::from_secs(300));
    let n = 24;
    let (_data, config) = dataset("hostile");
    let args = ["--config", config.to_str().unwrap(), "--lanes", "2"];
    // The clean run: lane 0's batches with nobody on lane 1.
    let clean = {
        let runtime = RuntimeTmp::new();
        let daemon = Daemon::start(runtime.path(), &args);
        let digests = lane0_digests(runtime.path(), "hostile", n);
        daemon.terminate();
        digests
    };

    let runtime = RuntimeTmp::new();
    let mut daemon = Daemon::start(runtime.path(), &args);
    dog.guard(daemon.child.id());
    let mut hostile = Peer::spawn(
        ENTRY,
        "hostile",
        runtime.path(),
        &role_env("hostile", 1, &[]),
    );
    dog.guard(hostile.pid());
    hostile.expect("HOSTILE");
    let observer = observe(runtime.path(), "hostile");
    let published_before = observer.snapshot().stats.lanes[1].published;
    let under_attack = lane0_digests(runtime.path(), "hostile", n);
    assert_eq!(
        under_attack, clean,
        "lane 0's batches under attack on lane 1 are those of a clean run"
    );
    // The forged releases free lane 1's slots for its own batches only: the producer keeps
    // publishing there, and the statistics copied from the page (huge counters) do not
    // matter to anyone.
    wait_until(
        "lane 1 keeps being published while the hostile consumer forges releases",
        Duration::from_secs(30),
        || observer.snapshot().stats.lanes[1].published > published_before,
    );
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon keeps serving"
    );

    // The hostile process dies; its lane is reclaimed and a new consumer gets the lane's
    // batches in order: redelivered ones (none expected: it took nothing) first, all in
    // increasing seq. The batches still in the lane's slots when it attached were published
    // while the hostile consumer forged releases, which freed some of them unread (its own
    // lane's loss), so they may have gaps; from the first batch published after the attach on
    // (past the lane's slots), seq and (epoch, index) are consecutive.
    hostile.sigkill();
    wait_until(
        "lane 1 reclaimed after the hostile consumer's death",
        Duration::from_secs(10),
        || observer.snapshot().stats.lanes[1].consumer_pid == 0,
    );
    let c = Consumer::attach_with(&options(runtime.path(), "hostile", 1)).unwrap();
    let batches_per_epoch = c.layout().batches_per_epoch;
    let slots = c.layout().slots_per_lane as usize;
    let mut seen: Vec<(u64, u64, u64, bool)> = Vec::new();
    for _ in 0..12 {
        let b = c.next_timeout(Duration::from_secs(60)).unwrap().unwrap();
        seen.push((b.seq(), b.epoch(), b.index(), b.redelivered()));
    }
    let fresh: Vec<_> = seen.iter().skip_while(|b| b.3).collect();
    assert!(
        fresh.iter().all(|b| !b.3),
        "redelivered batches come first: {seen:?}"
    );
    for w in seen.windows(2) {
        assert!(w[0].0 < w[1].0, "seq strictly increasing: {seen:?}");
    }
    for w in fresh.windows(2).skip(slots) {
        assert_eq!(w[1].0, w[0].0 + 1, "consecutive seqs: {seen:?}");
        let (e0, i0) = (w[0].1, w[0].2);
        let next = if batches_per_epoch > 0 && i0 + 1 == batches_per_epoch {
            (e0 + 1, 0)
        } else {
            (e0, i0 + 1)
        };
        assert_eq!((w[1].1, w[1].2), next, "consecutive batches: {seen:?}");
    }
    drop(c);
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
}

/// A consumer whose process is gone while a holder of its socket and lane page lives on (the
/// producer reclaims the lane by pid): what the holder writes into the stale page — releases
/// of every batch in the lane's slots — frees nothing of the lane's next attach.
#[test]
fn a_consumer_declared_dead_writes_only_into_its_stale_page() {
    let _dog = Watchdog::arm("stale lane page", Duration::from_secs(240));
    let (_data, config) = dataset("stale");
    let runtime = RuntimeTmp::new();
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    let (ours, theirs) = UnixStream::pair().unwrap();
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty()).unwrap();
    let env = role_env("stale", 0, &[("FAULT_FD", theirs.as_raw_fd().to_string())]);
    let mut connector = Peer::spawn(ENTRY, "connector", runtime.path(), &env);
    drop(theirs);
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        &ours,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(more) = m {
            fds.extend(more);
        }
    }
    assert_eq!(fds.len(), 3);
    let mut fds = fds.into_iter();
    let (_stale_conn, ring, stale_page) = (
        UnixStream::from(fds.next().unwrap()),
        File::from(fds.next().unwrap()),
        File::from(fds.next().unwrap()),
    );
    assert!(connector.child.wait().unwrap().success());
    let observer = observe(runtime.path(), "stale");
    wait_until(
        "the producer reclaims the lane of the exited consumer",
        Duration::from_secs(10),
        || observer.snapshot().stats.lanes[0].consumer_pid == 0,
    );
    // The lane's next consumer takes every slot's batch and holds them all.
    let c = Consumer::attach_with(&options(runtime.path(), "stale", 0)).unwrap();
    let slots = c.layout().slots_per_lane as usize;
    let tensors = c.layout().tensors.len();
    let held: Vec<_> = (0..slots)
        .map(|_| c.next_timeout(Duration::from_secs(60)).unwrap().unwrap())
        .collect();
    let before: Vec<_> = held.iter().map(|b| digest(b, tensors)).collect();
    let published = observer.snapshot().stats.lanes[0].published;
    // The stale holder releases every batch now in the lane's slots, in its old page.
    let a = RawAttach {
        conn: _stale_conn,
        reply: serde_json::Value::Null,
        ring,
        page: stale_page,
        doorbell: rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap(),
    };
    let seqs = a.slot_seqs(0);
    for (s, seq) in seqs.iter().enumerate() {
        let at = (64 + 16 * s) as u64;
        a.page.write_all_at(&seq.to_le_bytes(), at).unwrap();
        a.page.write_all_at(&seq.to_le_bytes(), at + 8).unwrap();
    }
    // Three heartbeats of the producer (each frees released slots and copies counters):
    // nothing of the new attach is freed, rewritten or republished.
    let beat = || observer.snapshot().heartbeat_mono_ns;
    for _ in 0..3 {
        let b0 = beat();
        wait_until("a heartbeat", Duration::from_secs(5), || beat() > b0);
    }
    for (b, d) in held.iter().zip(&before) {
        assert!(
            b.still_held(),
            "batch {} was taken from its holder",
            b.seq()
        );
        assert_eq!(&digest(b, tensors), d, "batch {} was rewritten", b.seq());
    }
    assert_eq!(
        observer.snapshot().stats.lanes[0].published,
        published,
        "no slot of the new attach was freed for a new batch"
    );
    drop(held);
    drop(c);
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
}
