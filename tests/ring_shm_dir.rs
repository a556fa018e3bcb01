//! The `--shm-dir` named-file mode and the access rules, with the real daemon where the claim
//! is about `ringfeed serve`: a ring too big for its tmpfs fails at start with the size and the
//! fixes (never a SIGBUS), a named ring serves a consumer end to end and is removed on SIGTERM,
//! a SIGKILLed daemon's file is replaced at the next start, unsafe directories are refused, and
//! `--allow-group` opens the ring to that group only.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use ringfeed::ring::{
    AttachError, AttachOptions, BatchMeta, Consumer, DType, Producer, ProducerOptions, RingSpec,
    RuntimeDir, TensorSpec,
};

/// A dataset and config in `dir`; returns the config path.
fn dataset(dir: &Path, name: &str) -> String {
    let shards = write_dataset(dir, 1, 24);
    small_config(dir, &shards, name).display().to_string()
}

/// A private directory (0700) for ring files.
fn shm_dir(parent: &Path) -> std::path::PathBuf {
    let d = parent.join("shm");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// The daemon's sockets that are TCP or UDP (IPv4 or IPv6): its `socket:[inode]` fds looked up
/// in its network namespace's tables.
fn inet_sockets_of(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    assert!(
        !inodes.is_empty(),
        "the daemon has its Unix socket at least"
    );
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            // Column 10 is the socket's inode.
            if let Some(inode) = line.split_whitespace().nth(9) {
                if inodes.iter().any(|i| i == inode) {
                    found.push(format!("{table}: {line}"));
                }
            }
        }
    }
    found
}

/// The `generation` field (header offset 32) of a ring file.
fn generation_in(file: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut g = [0u8; 8];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut g, 32)
        .unwrap();
    u64::from_le_bytes(g)
}

fn serve_output(runtime: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .arg("serve")
        .args(args)
        .env("RINGFEED_RUNTIME_DIR", runtime)
        .output()
        .unwrap()
}

/// A 1 MiB tmpfs (in a private user + mount namespace, so no root is needed) and a ring of
/// about 6 MiB: `serve` must exit non-zero at start naming the size, the directory, its free
/// space and the fixes, not die of SIGBUS, and leave nothing in the directory.
#[test]
fn ring_bigger_than_its_tmpfs_fails_at_start_with_size_and_fixes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = dataset(tmp.path(), "small");
    let mnt = tmp.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let probe = Command::new("unshare")
        .args([
            "-Urm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m,mode=0700 tmpfs \"$0\"",
        ])
        .arg(&mnt)
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!(
                "skipped: cannot mount a tmpfs in a user+mount namespace here ({other:?}); \
                 the no-space error itself is unit-tested in src/ring/segment.rs"
            );
            return;
        }
    }
    let runtime = RuntimeTmp::new();
    // Mount, run the daemon on the mount, then list what it left there, all in the namespace.
    let script = r#"mount -t tmpfs -o size=1m,mode=0700 tmpfs "$0" || exit 90
"$@"; rc=$?
echo "LEFT:[$(ls -A "$0")]" >&2
exit $rc"#;
    let out = Command::new("unshare")
        .args(["-Urm", "sh", "-c", script])
        .arg(&mnt)
        .arg(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["serve", "--config", &config, "--slots-per-lane", "64"])
        .arg("--shm-dir")
        .arg(&mnt)
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), None, "no signal (SIGBUS): {err}");
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert_ne!(out.status.code(), Some(90), "mount failed: {err}");
    for needle in [
        "needs 6.",
        "MiB",
        &mnt.display().to_string(),
        "free",
        "--slots-per-lane",
        "--batch-size",
        "--shm-dir",
        "docker run --shm-size=",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    assert!(
        err.contains("LEFT:[]"),
        "the ring file was left behind: {err}"
    );
    assert!(!runtime.path().join("small.sock").exists());
    assert!(!runtime.path().join("small.lock").exists());
}

/// The named file is `ringfeed-<name>.ring`, 0600, fully sized while serving; a consumer
/// reads every batch of an epoch from it; `ringfeed stat` finds it; SIGTERM removes it.
#[test]
fn named_file_serves_a_consumer_end_to_end_and_is_removed_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let config = dataset(tmp.path(), "named");
    let shm = shm_dir(tmp.path());
    let runtime = RuntimeTmp::new();
    let daemon = Daemon::start(
        runtime.path(),
        &[
            "--config",
            &config,
            "--epochs",
            "1",
            "--shm-dir",
            shm.to_str().unwrap(),
        ],
    );
    let file = shm.join("ringfeed-named.ring");
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), rustix::process::geteuid().as_raw());

    let mut opts = AttachOptions::new("named", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let c = Consumer::attach_with(&opts).unwrap();
    assert_eq!(meta.len(), c.layout().file_bytes);
    assert!(meta.blocks() * 512 >= meta.len(), "reserved up front");
    let mut batches = 0;
    common::drain(&c, |b| {
        assert_eq!(b.epoch(), 0);
        assert_eq!(b.index(), batches);
        batches += 1;
    });
    assert_eq!(batches, c.layout().batches_per_epoch);

    let stat = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["stat", "named", "--once"])
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    assert!(
        stat.status.success(),
        "stat: {}",
        String::from_utf8_lossy(&stat.stderr)
    );
    assert_eq!(
        inet_sockets_of(daemon.child.id()),
        Vec::<String>::new(),
        "without --metrics the daemon has no TCP/UDP socket at all"
    );
    drop(c);
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!file.exists(), "ring file removed on SIGTERM");
    assert_eq!(std::fs::read_dir(&shm).unwrap().count(), 0);
}

/// A named file can be truncated by anyone with write access to it (a consumer through its
/// descriptor, a member of the `--allow-group` group): the daemon, which faulted with SIGBUS
/// and left its files behind, now stops with an error naming the file and cleans up; the
/// test truncates it while the daemon is busy serving a consumer.
#[test]
fn truncated_ring_file_stops_the_daemon_with_an_error_not_a_sigbus() {
    let tmp = tempfile::tempdir().unwrap();
    let config = dataset(tmp.path(), "trunc");
    let shm = shm_dir(tmp.path());
    let runtime = RuntimeTmp::new();
    let mut daemon = Daemon::start(
        runtime.path(),
        &["--config", &config, "--shm-dir", shm.to_str().unwrap()],
    );
    let file = shm.join("ringfeed-trunc.ring");
    let mut opts = AttachOptions::new("trunc", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let c = Consumer::attach_with(&opts).unwrap();
    let batch = c.next_timeout(Duration::from_secs(60)).unwrap().unwrap();
    // The consumer's own mapping would fault too: it lets go before the truncation.
    drop(batch);
    drop(c);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    let status = daemon.wait(Duration::from_secs(30));
    let log = daemon.log.join("\n");
    assert_eq!(
        status.signal(),
        None,
        "the daemon was killed: {status:?}\n{log}"
    );
    assert!(!status.success(), "{log}");
    assert!(log.contains("was truncated"), "{log}");
    assert!(!file.exists(), "ring file left behind");
    assert!(!runtime.path().join("trunc.sock").exists());
    assert!(!runtime.path().join("trunc.lock").exists());
}

/// A SIGKILLed daemon leaves its file; the next start detects it as stale (its lock is free),
/// says so, and serves from a new file.
#[test]
fn stale_file_of_a_killed_daemon_is_replaced_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let config = dataset(tmp.path(), "stale");
    let shm = shm_dir(tmp.path());
    let runtime = RuntimeTmp::new();
    let args = ["--config", &config, "--shm-dir", shm.to_str().unwrap()];
    let mut first = Daemon::start(runtime.path(), &args);
    let file = shm.join("ringfeed-stale.ring");
    let old_generation = generation_in(&file);
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(file.exists(), "SIGKILL leaves the file");

    let second = Daemon::start(runtime.path(), &args);
    assert!(
        second
            .log
            .iter()
            .any(|l| l.contains("removed stale ring file")
                && l.contains(&first.child.id().to_string())),
        "log names the stale file and its dead producer:\n{}",
        second.log.join("\n")
    );
    // A new file of a new producer (inode numbers may be reused; generations are not).
    assert_ne!(generation_in(&file), old_generation);
    let mut opts = AttachOptions::new("stale", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let c = Consumer::attach_with(&opts).unwrap();
    assert!(c.next_timeout(Duration::from_secs(60)).unwrap().is_some());
    drop(c);
    assert!(second.terminate().success());
    assert!(!file.exists());
}

/// Symlinked, non-directory and world-writable (non-sticky) `--shm-dir`s are refused at start
/// with an error that says which; nothing is created through them.
#[test]
fn unsafe_shm_dirs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = dataset(tmp.path(), "unsafe");
    let real = shm_dir(tmp.path());
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let plain = tmp.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    for (dir, expect) in [
        (&link, "is a symlink"),
        (&plain, "not a directory"),
        (&open, "sticky bit"),
    ] {
        let runtime = RuntimeTmp::new();
        let out = serve_output(
            runtime.path(),
            &["--config", &config, "--shm-dir", dir.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dir:?} accepted");
        assert!(err.contains(expect), "{dir:?}: {err}");
    }
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);
}

fn spec(name: &str) -> RingSpec {
    RingSpec {
        batches_per_epoch: 10,
        epochs: 1,
        seed: 1,
        samples_per_epoch: 20,
        ..RingSpec::new(
            name,
            1,
            2,
            2,
            vec![TensorSpec {
                name: "labels".into(),
                dtype: DType::I64,
                shape: vec![2],
            }],
        )
    }
}

/// Publishes batch 0 of lane 0 with every byte of its labels set to `byte`.
fn publish_first_batch(p: &Producer, byte: u8) {
    let mut w = p.try_claim(0).unwrap();
    w.tensor_bytes_mut(0).copy_from_slice(&[byte; 16]);
    w.publish(BatchMeta {
        epoch: 0,
        index: 0,
        count: 2,
        last_of_epoch: false,
    });
}

/// `--allow-group`: the runtime directory becomes 0750, the socket 0660 and the ring file
/// 0640, all of that group. A thread running as `nobody` with that group as its gid attaches (trusting the
/// producer's uid) and reads a batch; without `trust_uid` its consumer refuses the other
/// user's directory; without the group, the directory keeps it out. (Supplementary groups are
/// read from `/proc/<pid>/status`, which shows the process's main thread, so a thread cannot
/// stand in for a process there: `supplementary_group_member_attaches_as_a_process` covers it.)
#[test]
fn allow_group_admits_members_only() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root to give files to a group and to switch a thread to another uid (the rule is unit-tested in src/ring/access.rs)");
        return;
    }
    const GROUP: u32 = 4242;
    let (_tmp, shm, dir, p) = group_ring("grp", GROUP);
    let mode_gid = |path: &Path| {
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.mode() & 0o777, m.gid())
    };
    assert_eq!(mode_gid(dir.path()), (0o750, GROUP));
    assert_eq!(mode_gid(&dir.socket_path("grp")), (0o660, GROUP));
    // Read only for the group: no member can open it by name to truncate it.
    assert_eq!(mode_gid(&shm.join("ringfeed-grp.ring")), (0o640, GROUP));
    publish_first_batch(&p, 7);

    let attach_as_nobody = |gid: u32, trust: Option<u32>| {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let nobody = rustix::process::Uid::from_raw(65534);
            let gid = rustix::process::Gid::from_raw(gid);
            rustix::thread::set_thread_groups(&[]).unwrap();
            rustix::thread::set_thread_res_gid(gid, gid, gid).unwrap();
            rustix::thread::set_thread_res_uid(nobody, nobody, nobody).unwrap();
            let mut o = AttachOptions::new("grp", 0);
            o.dir = Some(dir);
            o.trust_uid = trust;
            Consumer::attach_with(&o).map(|c| {
                let b = c.next_timeout(Duration::from_secs(5)).unwrap().unwrap();
                b.tensor::<i64>("labels").unwrap().to_vec()
            })
        })
        .join()
        .unwrap()
    };
    let got = attach_as_nobody(GROUP, Some(0)).expect("a group member attaches");
    assert_eq!(got, vec![i64::from_le_bytes([7; 8]); 2]);
    assert!(matches!(
        attach_as_nobody(GROUP, None),
        Err(AttachError::RuntimeDir(_))
    ));
    match attach_as_nobody(65534, Some(0)) {
        Err(AttachError::Connect { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied)
        }
        other => panic!("a non-member must be kept out, got {:?}", other.err()),
    }
    drop(p);
    assert!(!shm.join("ringfeed-grp.ring").exists());
}

/// A `--shm-dir` ring `name` open to `group` (`--allow-group`), in a fresh temp dir others
/// may enter: (the temp dir, the shm dir, the runtime dir, the producer).
fn group_ring(
    name: &str,
    group: u32,
) -> (tempfile::TempDir, std::path::PathBuf, RuntimeDir, Producer) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shm = shm_dir(tmp.path());
    let dir = RuntimeDir::at(tmp.path().join("rt"));
    let options = ProducerOptions {
        shm_dir: Some(shm.clone()),
        allow_group: Some(group),
        fingerprint: None,
    };
    let p = Producer::create_with(&spec(name), &dir, &options).unwrap();
    (tmp, shm, dir, p)
}

/// A group member's descriptors of a `--allow-group --shm-dir` ring (ring format 2.0): the
/// ring is passed read-only, so the member can neither truncate it (issue 24 item 5: it used to
/// crash the daemon with SIGBUS) nor map it writable, and neither reopening the descriptor
/// through `/proc/self/fd` nor opening the file by name gives it write access (mode 0640).
#[test]
fn a_group_member_cannot_truncate_or_write_the_ring_file() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!(
            "skipped: needs root to give files to a group and to switch a thread to another uid"
        );
        return;
    }
    const GROUP: u32 = 4244;
    let (_tmp, shm, dir, p) = group_ring("grw", GROUP);
    publish_first_batch(&p, 9);
    let ring_path = shm.join("ringfeed-grw.ring");
    let size = std::fs::metadata(&ring_path).unwrap().len();
    let socket = dir.socket_path("grw");
    let outcome = std::thread::spawn(move || {
        use std::io::Write as _;
        use std::os::fd::AsRawFd as _;
        let nobody = rustix::process::Uid::from_raw(65534);
        let gid = rustix::process::Gid::from_raw(GROUP);
        rustix::thread::set_thread_groups(&[]).unwrap();
        rustix::thread::set_thread_res_gid(gid, gid, gid).unwrap();
        rustix::thread::set_thread_res_uid(nobody, nobody, nobody).unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        writeln!(s, r#"{{"op":"attach","version":2,"lane":0,"pid":1}}"#).unwrap();
        let mut buf = [0u8; 4096];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        rustix::net::recvmsg(
            &s,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )
        .unwrap();
        let ring = control
            .drain()
            .find_map(|m| match m {
                rustix::net::RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
                _ => None,
            })
            .map(std::fs::File::from)
            .expect("the ring's descriptor");
        let truncate = rustix::fs::ftruncate(&ring, 0);
        // SAFETY: asks the kernel for a new shared writable mapping, which it refuses;
        // nothing is dereferenced.
        let map = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                size as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &ring,
                0,
            )
        };
        let rw = |path: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map(drop)
        };
        let reopen = rw(Path::new(&format!("/proc/self/fd/{}", ring.as_raw_fd())));
        let by_name = rw(&ring_path);
        (
            truncate.err(),
            map.err(),
            reopen.err().map(|e| e.kind()),
            by_name.err().map(|e| e.kind()),
        )
    })
    .join()
    .unwrap();
    let denied = Some(std::io::ErrorKind::PermissionDenied);
    assert!(
        outcome.0.is_some(),
        "ftruncate through the passed descriptor"
    );
    assert_eq!(
        outcome.1,
        Some(rustix::io::Errno::ACCESS),
        "mmap(PROT_WRITE)"
    );
    assert_eq!(
        (outcome.2, outcome.3),
        (denied, denied),
        "reopen / open for writing"
    );
    assert_eq!(
        std::fs::metadata(shm.join("ringfeed-grw.ring"))
            .unwrap()
            .len(),
        size
    );
    assert!(
        p.truncated_file().is_none(),
        "the producer's mappings are intact"
    );
}

/// `--allow-group` admits a member through a supplementary group, checked with real processes:
/// `ringfeed consume --trust-uid 0` run by `setpriv` as `nobody` (primary group `nogroup`) with
/// the group as a supplementary one reads a batch; the same command without the group is kept
/// out at once with a permission error, not left waiting for a daemon.
#[test]
fn supplementary_group_member_attaches_as_a_process() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!(
            "skipped: needs root to give files to a group and to run a process as another user"
        );
        return;
    }
    const GROUP: u32 = 4243;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // nobody may not be able to reach the build directory: run a copy from the open tmp dir.
    let bin = tmp.path().join("ringfeed");
    std::fs::copy(env!("CARGO_BIN_EXE_ringfeed"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shm = shm_dir(tmp.path());
    let dir = RuntimeDir::at(tmp.path().join("rt"));
    let options = ProducerOptions {
        shm_dir: Some(shm),
        allow_group: Some(GROUP),
        fingerprint: None,
    };
    let p = Producer::create_with(&spec("sgrp"), &dir, &options).unwrap();
    publish_first_batch(&p, 9);

    let consume_as_nobody = |groups: &str| {
        let started = std::time::Instant::now();
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                &format!("--groups={groups}"),
            ])
            .arg(&bin)
            .args([
                "consume",
                "sgrp",
                "--batches",
                "1",
                "--quiet",
                "--trust-uid",
                "0",
            ])
            .args(["--wait", "20"])
            .env("RINGFEED_RUNTIME_DIR", dir.path())
            .output()
            .expect("setpriv (util-linux) runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text, started.elapsed())
    };
    let (ok, text, _) = consume_as_nobody(&GROUP.to_string());
    assert!(ok, "a supplementary member reads the ring: {text}");
    assert!(text.contains("consumed 1 batches (2 samples)"), "{text}");

    let (ok, text, took) = consume_as_nobody("65534");
    assert!(!ok, "a non-member must be kept out: {text}");
    assert!(text.contains("Permission denied"), "{text}");
    assert!(
        took < Duration::from_secs(10),
        "a refusal is reported at once, not after --wait: {took:?}"
    );
    drop(p);
}
