//! Crash safety with real processes: the test binary re-executes itself (env
//! `RINGFEED_CRASH_ROLE`) to become a consumer or producer child, which the parent SIGKILLs.
//! Every wait has a deadline, and a watchdog ends a hung test instead of letting it hang CI.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringfeed::ring::{
    AttachError, AttachOptions, BatchMeta, ConsumeError, Consumer, DType, Producer,
    RingCreateError, RingSpec, RuntimeDir, TensorSpec,
};

const ROLE: &str = "RINGFEED_CRASH_ROLE";
const NAME: &str = "RINGFEED_CRASH_NAME";

fn spec(name: &str, slots: u32) -> RingSpec {
    RingSpec::new(
        name,
        2,
        slots,
        2,
        vec![TensorSpec {
            name: "ids".into(),
            dtype: DType::I64,
            shape: vec![2],
        }],
    )
}

fn publish(p: &Producer, index: u64) {
    let mut w = p.try_claim(0).expect("a free slot");
    w.tensor_bytes_mut(0)[..8].copy_from_slice(&(index as i64).to_le_bytes());
    w.publish(BatchMeta {
        epoch: 0,
        index,
        count: 2,
        last_of_epoch: false,
    });
}

/// Ends the whole test process if a test runs far past any sane time (a hang), after
/// killing the child; dropping it disarms it.
struct Watchdog(Option<mpsc::Sender<()>>);

impl Watchdog {
    fn arm(what: &'static str, child_pid: Option<u32>) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(120))
            {
                eprintln!("watchdog: {what} hung; aborting");
                if let Some(pid) = child_pid {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                std::process::exit(3);
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A re-executed copy of this test binary playing `role`; killed on drop.
struct Peer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    fn spawn(role: &str, dir: &RuntimeDir, name: &str) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["role_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(NAME, name)
            .env("RINGFEED_RUNTIME_DIR", dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer { child, lines }
    }

    /// The next line the child printed that starts with `prefix`, without the prefix.
    fn expect(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // libtest prints "test role_entry ... " without a newline before the role runs.
                Ok(l) if l.contains(prefix) => {
                    let at = l.find(prefix).unwrap_or(0) + prefix.len();
                    return l[at..].trim().to_owned();
                }
                Ok(_) => {}
                Err(e) => panic!("child never printed {prefix:?}: {e}"),
            }
        }
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Entry point of the child processes; a no-op in the parent run.
#[test]
fn role_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let name = std::env::var(NAME).unwrap();
    let out = |s: String| {
        let mut o = std::io::stdout().lock();
        writeln!(o, "{s}").unwrap();
        o.flush().unwrap();
    };
    match role.as_str() {
        // Takes four batches, releases the first two, holds two, then waits to be killed.
        "consumer-hold" => {
            let c = Consumer::attach(&name, 0).unwrap();
            let mut held = Vec::new();
            for _ in 0..4 {
                held.push(c.next().unwrap().unwrap());
            }
            let kept: Vec<String> = held
                .drain(2..)
                .map(|b| {
                    let s = b.seq().to_string();
                    std::mem::forget(b);
                    s
                })
                .collect();
            drop(held);
            out(format!("HOLDING {}", kept.join(",")));
            std::thread::sleep(Duration::from_secs(600));
        }
        // Serves a ring with one published batch, then waits to be killed.
        "producer" => {
            let p = Producer::create(&spec(&name, 2), &RuntimeDir::from_env().unwrap()).unwrap();
            publish(&p, 0);
            out(format!("SERVING {}", p.stats().generation));
            std::thread::sleep(Duration::from_secs(600));
        }
        other => panic!("unknown role {other}"),
    }
    std::process::exit(0);
}

fn temp_dir() -> (tempfile::TempDir, RuntimeDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RuntimeDir::at(tmp.path().join("rt"));
    (tmp, dir)
}

fn attach_when_free(dir: &RuntimeDir, name: &str, lane: u32) -> Consumer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut o = AttachOptions::new(name, lane);
        o.dir = Some(dir.clone());
        match Consumer::attach_with(&o) {
            Ok(c) => return c,
            Err(AttachError::Refused { .. }) | Err(AttachError::Connect { .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn killed_consumers_unreleased_batches_are_redelivered_once_in_order() {
    let (_t, dir) = temp_dir();
    let p = Producer::create(&spec("c-kill", 6), &dir).unwrap();
    for i in 0..5 {
        publish(&p, i);
    }
    let mut child = Peer::spawn("consumer-hold", &dir, "c-kill");
    let _dog = Watchdog::arm("consumer kill", Some(child.child.id()));
    assert_eq!(child.expect("HOLDING"), "3,4");
    let before = p.stats().lanes[0].clone();
    assert_eq!(
        (before.held, before.released, before.consumer_pid),
        (2, 2, child.child.id())
    );
    child.sigkill();
    // The producer notices the socket EOF and reclaims; a new consumer then gets exactly the
    // un-released batches (flagged) before the never-delivered one.
    let c = attach_when_free(&dir, "c-kill", 0);
    let got: Vec<(u64, u64, bool)> = (0..3)
        .map(|_| {
            let b = c.next_timeout(Duration::from_secs(10)).unwrap().unwrap();
            let id = i64::from_le_bytes(b.tensor_bytes(0)[..8].try_into().unwrap());
            (b.seq(), id as u64, b.redelivered())
        })
        .collect();
    assert_eq!(got, vec![(3, 2, true), (4, 3, true), (5, 4, false)]);
    assert!(
        matches!(
            c.next_timeout(Duration::from_millis(50)),
            Err(ConsumeError::Timeout { .. })
        ),
        "nothing else is duplicated"
    );
}

#[test]
fn killed_producer_is_noticed_within_a_second_and_can_be_replaced() {
    let (_t, dir) = temp_dir();
    let mut child = Peer::spawn("producer", &dir, "p-kill");
    let _dog = Watchdog::arm("producer kill", Some(child.child.id()));
    let old_generation: u64 = child.expect("SERVING").parse().unwrap();
    let c = attach_when_free(&dir, "p-kill", 0);
    assert_eq!(c.generation(), old_generation);
    let first = c.next().unwrap().unwrap();
    assert_eq!(first.seq(), 1);
    drop(first);
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = c.next().map(|b| b.map(|b| b.seq()));
        tx.send(Instant::now()).unwrap();
        r
    });
    // Let the waiter block in its futex wait (the result does not depend on it).
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    child.sigkill();
    let noticed_at = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("consumer hung after the producer died");
    let result = waiter.join().unwrap();
    assert!(
        matches!(result, Err(ConsumeError::ProducerGone { .. })),
        "{result:?}"
    );
    let latency = noticed_at.duration_since(killed_at);
    eprintln!("producer death noticed after {latency:?}");
    assert!(
        latency < Duration::from_secs(1),
        "ProducerGone took {latency:?}"
    );

    // Stale .sock and .lock remain after SIGKILL; a new producer replaces them.
    assert!(dir.socket_path("p-kill").exists() && dir.lock_path("p-kill").exists());
    let p = Producer::create(&spec("p-kill", 2), &dir).unwrap();
    assert_ne!(p.stats().generation, old_generation);
    publish(&p, 0);
    let c = attach_when_free(&dir, "p-kill", 0);
    assert_eq!(c.generation(), p.stats().generation);
    assert_eq!(c.next().unwrap().unwrap().seq(), 1);
}

#[test]
fn second_producer_process_is_refused_and_the_live_ring_is_untouched() {
    let (_t, dir) = temp_dir();
    let child = Peer::spawn("producer", &dir, "dup");
    let _dog = Watchdog::arm("duplicate producer", Some(child.child.id()));
    let generation: u64 = child.expect("SERVING").parse().unwrap();
    match Producer::create(&spec("dup", 2), &dir) {
        Err(RingCreateError::AlreadyRunning { pid, .. }) => assert_eq!(pid, Some(child.child.id())),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    let c = attach_when_free(&dir, "dup", 0);
    assert_eq!(c.generation(), generation);
    assert_eq!(c.next().unwrap().unwrap().seq(), 1);
}

/// The runtime directory (0700, owner-only) is the first wall; to test the producer's own
/// `SO_PEERCRED` check behind it, the socket is hard-linked into a world-traversable directory
/// and opened to everyone. A thread then switches its own credentials to `nobody` (raw
/// per-thread setresuid) and speaks the documented protocol.
#[test]
fn consumer_of_another_uid_is_refused() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root to switch a thread to uid 65534 (uid check is unit-tested in handshake)");
        return;
    }
    let (tmp, dir) = temp_dir();
    let p = Producer::create(&spec("uid", 2), &dir).unwrap();
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = open.join("uid.sock");
    std::fs::hard_link(dir.socket_path("uid"), &link).unwrap();
    std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o777)).unwrap();
    let real = dir.socket_path("uid");
    let reply = std::thread::spawn(move || {
        let nobody = rustix::process::Uid::from_raw(65534);
        let nogroup = rustix::process::Gid::from_raw(65534);
        rustix::thread::set_thread_res_gid(nogroup, nogroup, nogroup).unwrap();
        rustix::thread::set_thread_res_uid(nobody, nobody, nobody).unwrap();
        let blocked = std::os::unix::net::UnixStream::connect(&real).unwrap_err();
        assert_eq!(
            blocked.kind(),
            std::io::ErrorKind::PermissionDenied,
            "the 0700 runtime dir keeps others out"
        );
        let mut s = std::os::unix::net::UnixStream::connect(&link).unwrap();
        let _ = s.write_all(b"{\"op\":\"attach\",\"version\":2,\"lane\":0,\"pid\":1}\n");
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    })
    .join()
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(reply.trim()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap().contains("permission denied"),
        "{reply}"
    );
    assert_eq!(
        p.stats().lanes[0].consumer_pid,
        0,
        "no consumer was registered"
    );
}

/// The lane page a 2.0 producer passes for `lane` of a ring with `slots` slots per lane
/// (docs/ring-format.md: magic, lane, slots, zeros; whole 4 KiB pages of 64 + 16·slots bytes).
fn lane_page(lane: u32, slots: u32) -> Vec<u8> {
    let len = (64 + 16 * slots as usize).div_ceil(4096) * 4096;
    let mut b = vec![0u8; len];
    b[..8].copy_from_slice(b"RFLANE\0\0");
    b[8..12].copy_from_slice(&lane.to_le_bytes());
    b[12..16].copy_from_slice(&slots.to_le_bytes());
    b
}

/// A memfd holding `bytes` (`len` long), sealed against resizing when `seal`.
fn memfd_with(bytes: &[u8], len: u64, seal: bool) -> std::os::fd::OwnedFd {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd =
        rustix::fs::memfd_create("fake", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    let n = bytes.len().min(len as usize);
    rustix::io::pwrite(&fd, &bytes[..n], 0).unwrap();
    if seal {
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
    }
    fd
}

/// `fd` reopened read-only, as a 2.0 producer passes the ring.
fn read_only(fd: &std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::AsRawFd;
    std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .into()
}

/// A fake producer hands out deliberately broken rings, lane pages and replies: the consumer
/// must refuse each with a clear error before making any view.
#[test]
fn attach_refuses_corrupt_or_unsealed_rings() {
    let (_t, dir) = temp_dir();
    dir.ensure().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.socket_path("fake")).unwrap();
    // A valid header to corrupt, from a real ring's layout.
    let good = ringfeed::ring::layout::encode_control(
        &ringfeed::ring::plan(&spec("fake", 2), 5).unwrap(),
        1,
        1,
    );
    let file_len = ringfeed::ring::plan(&spec("fake", 2), 5)
        .unwrap()
        .file_bytes;
    let page_bytes = lane_page(0, 2).len() as u64;
    /// What the fake producer sends: the ring (bytes, length, sealed), the lane page, which
    /// descriptors, and the reply's lane_page_bytes.
    #[derive(Clone)]
    struct Sent {
        ring: Vec<u8>,
        len: u64,
        seal: bool,
        page: Vec<u8>,
        /// The lane page sealed against resizing.
        page_seal: bool,
        /// 0: ring read-only, lane page, doorbell; 1: the ring alone (a 1.x reply);
        /// 2: the ring writable.
        fds: u8,
        page_bytes: u64,
    }
    let base = Sent {
        ring: good.clone(),
        len: file_len,
        seal: true,
        page: lane_page(0, 2),
        page_seal: true,
        fds: 0,
        page_bytes,
    };
    type Case = (&'static str, Sent, &'static str);
    let cases: Vec<Case> = vec![
        (
            "truncated",
            Sent {
                len: 300,
                ..base.clone()
            },
            "truncated",
        ),
        (
            "magic",
            Sent {
                ring: {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                ..base.clone()
            },
            "magic",
        ),
        (
            "major",
            Sent {
                ring: {
                    let mut b = good.clone();
                    b[8] = 9;
                    b
                },
                ..base.clone()
            },
            "version 9",
        ),
        (
            "a 1.x ring",
            Sent {
                ring: {
                    let mut b = good.clone();
                    b[8] = 1;
                    b
                },
                ..base.clone()
            },
            "version 1",
        ),
        (
            "tensor offset",
            Sent {
                ring: {
                    let mut b = good.clone();
                    let t = 512 + 56;
                    b[t..t + 8].copy_from_slice(&u64::MAX.to_le_bytes());
                    b
                },
                ..base.clone()
            },
            "tensor",
        ),
        (
            "short file",
            Sent {
                len: file_len - 4096,
                ..base.clone()
            },
            "file_bytes",
        ),
        (
            "unsealed",
            Sent {
                seal: false,
                ..base.clone()
            },
            "sealed",
        ),
        (
            "one descriptor",
            Sent {
                fds: 1,
                ..base.clone()
            },
            "carried 1 file descriptors",
        ),
        (
            "writable ring",
            Sent {
                fds: 2,
                ..base.clone()
            },
            "ring descriptor is writable",
        ),
        (
            "lane page magic",
            Sent {
                page: {
                    let mut p = lane_page(0, 2);
                    p[0] = b'X';
                    p
                },
                ..base.clone()
            },
            "lane_page.magic",
        ),
        (
            "lane page of another lane",
            Sent {
                page: lane_page(1, 2),
                ..base.clone()
            },
            "lane_page.lane",
        ),
        (
            "lane page too small",
            Sent {
                page: vec![0u8; 64],
                ..base.clone()
            },
            "lane_page_bytes",
        ),
        (
            "reply's lane_page_bytes",
            Sent {
                page_bytes: 2 * page_bytes,
                ..base.clone()
            },
            "lane_page_bytes",
        ),
        (
            "lane page that could shrink",
            Sent {
                page_seal: false,
                ..base.clone()
            },
            "lane page is not sealed",
        ),
    ];
    for (what, sent, expect) in cases {
        let ring = memfd_with(&sent.ring, sent.len, sent.seal);
        let page = memfd_with(&sent.page, sent.page.len() as u64, sent.page_seal);
        let doorbell = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let ring_ro = read_only(&ring);
        let server = {
            let listener = listener.try_clone().unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).unwrap();
                let line = format!(
                    "{{\"ok\":true,\"generation\":5,\"lane\":0,\"file_bytes\":0,\"producer_pid\":1,\"fds\":[\"ring\",\"lane\",\"doorbell\"],\"lane_page_bytes\":{}}}\n",
                    sent.page_bytes
                );
                let fds = match sent.fds {
                    0 => vec![ring_ro.as_fd(), page.as_fd(), doorbell.as_fd()],
                    1 => vec![ring_ro.as_fd()],
                    _ => vec![ring.as_fd(), page.as_fd(), doorbell.as_fd()],
                };
                let mut space =
                    [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
                let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
                control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
                rustix::net::sendmsg(
                    &s,
                    &[std::io::IoSlice::new(line.as_bytes())],
                    &mut control,
                    rustix::net::SendFlags::empty(),
                )
                .unwrap();
                let _ = s.read(&mut buf); // hold the connection until the client closes it
            })
        };
        let mut o = AttachOptions::new("fake", 0);
        o.dir = Some(dir.clone());
        let err = Consumer::attach_with(&o).expect_err(what);
        assert!(
            matches!(
                err,
                AttachError::Format { .. }
                    | AttachError::NotSealed { .. }
                    | AttachError::Protocol { .. }
            ),
            "{what}: {err}"
        );
        assert!(
            err.to_string().contains(expect),
            "{what}: {err} should mention {expect:?}"
        );
        if expect.contains("descriptor") {
            assert_eq!(err.code(), "protocol", "{what}: {err}");
        }
        server.join().unwrap();
    }
    // The same fake producer with nothing broken is accepted: the cases above fail for the
    // reason they name, not for a mistake of the fake.
    let ring = memfd_with(&good, file_len, true);
    let page = memfd_with(&lane_page(0, 2), page_bytes, true);
    let doorbell = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let ring_ro = read_only(&ring);
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).unwrap();
        let line = format!(
            "{{\"ok\":true,\"generation\":5,\"lane\":0,\"file_bytes\":0,\"producer_pid\":1,\"lane_page_bytes\":{page_bytes}}}\n"
        );
        let fds = [ring_ro.as_fd(), page.as_fd(), doorbell.as_fd()];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(
            &s,
            &[std::io::IoSlice::new(line.as_bytes())],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        let _ = s.read(&mut buf);
    });
    let mut o = AttachOptions::new("fake", 0);
    o.dir = Some(dir.clone());
    let c = Consumer::attach_with(&o).expect("the unbroken fake ring is accepted");
    assert_eq!(c.generation(), 5);
    drop(c);
    server.join().unwrap();
}
