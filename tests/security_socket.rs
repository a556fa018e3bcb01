//! Clients of the daemon's socket are not all well behaved (docs/security.md): a client that
//! sends its request one byte at a time, a second attach racing a resume-attach for the same
//! lane, absurd resume positions, and a runtime directory planted by another user. Each is run
//! against the real daemon, which keeps serving the others and exits at once on SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

/// The daemon's total time for one request line (src/ring/producer/service.rs `REQUEST_TIMEOUT`).
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// What "SIGTERM exits at once" means here.
const EXIT_WITHIN: Duration = Duration::from_secs(2);

fn options(runtime: &Path, name: &str, lane: u32) -> AttachOptions {
    let mut opts = AttachOptions::new(name, lane);
    opts.dir = Some(RuntimeDir::at(runtime));
    opts
}

/// Connects and starts a request it never finishes: one byte every 200 ms for `bytes` bytes.
fn trickler(runtime: &Path, name: &str, bytes: usize) -> (UnixStream, std::thread::JoinHandle<()>) {
    let mut slow = UnixStream::connect(runtime.join(format!("{name}.sock"))).unwrap();
    slow.write_all(b"{").unwrap();
    let mut writer = slow.try_clone().unwrap();
    let thread = std::thread::spawn(move || {
        for _ in 0..bytes {
            std::thread::sleep(Duration::from_millis(200));
            if writer.write_all(b" ").is_err() {
                break;
            }
        }
    });
    (slow, thread)
}

fn start(runtime: &RuntimeTmp, data: &Path, name: &str, extra: &[&str]) -> Daemon {
    let spec = write_dataset(data, 2, 16);
    let config = small_config(data, &spec, name);
    let mut args = vec!["--config", config.to_str().unwrap(), "--lanes", "2"];
    args.extend_from_slice(extra);
    Daemon::start(runtime.path(), &args)
}

#[test]
fn a_slow_client_delays_no_attach_and_is_cut_off_at_its_deadline() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let daemon = start(&runtime, data.path(), "slow", &[]);
    // 50 bytes at 200 ms: 10 s of request, far past the deadline.
    let (slow, trickle) = trickler(runtime.path(), "slow", 50);

    let began = Instant::now();
    let consumer = Consumer::attach_with(&options(runtime.path(), "slow", 0)).unwrap();
    let took = began.elapsed();
    assert!(
        took < REQUEST_DEADLINE,
        "an attach waited {took:?} behind a slow client"
    );
    assert!(consumer
        .next_timeout(Duration::from_secs(60))
        .unwrap()
        .is_some());

    // The slow client is answered with a refusal once its whole request is overdue.
    slow.set_read_timeout(Some(REQUEST_DEADLINE * 3)).unwrap();
    let mut reply = String::new();
    BufReader::new(&slow).read_line(&mut reply).unwrap();
    assert!(reply.contains("timed out"), "{reply:?}");
    assert!(began.elapsed() < REQUEST_DEADLINE * 3);
    drop(slow);
    trickle.join().unwrap();

    // The other lane attaches too, and SIGTERM ends the daemon while a new slow client is
    // in the middle of its request.
    let other = Consumer::attach_with(&options(runtime.path(), "slow", 1)).unwrap();
    assert!(other
        .next_timeout(Duration::from_secs(60))
        .unwrap()
        .is_some());
    let (_slow, _trickle) = trickler(runtime.path(), "slow", 50);
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}");
    assert!(took < EXIT_WITHIN, "SIGTERM took {took:?}");
}

#[test]
fn an_attach_racing_a_resume_attach_is_refused_and_the_holder_keeps_its_lane() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let daemon = start(&runtime, data.path(), "race", &[]);
    for round in 0..5u64 {
        let mut resume = options(runtime.path(), "race", 0);
        resume.resume = Some((round, 0));
        let holder = Consumer::attach_with(&resume).unwrap();
        // At once, while the daemon is still finishing the resume-attach.
        let err = Consumer::attach_with(&options(runtime.path(), "race", 0))
            .expect_err("a second consumer was given a live lane");
        assert!(
            err.to_string().contains("held by live consumer")
                || err.to_string().contains("attach pending"),
            "{err}"
        );
        let batch = holder
            .next_timeout(Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert_eq!((batch.epoch(), batch.index()), (round, 0));
        assert!(!batch.redelivered());
        let held = batch.tensor_bytes(0).to_vec();
        // Still refused while the holder holds a slot, and the slot stays the holder's.
        assert!(Consumer::attach_with(&options(runtime.path(), "race", 0)).is_err());
        assert_eq!(batch.tensor_bytes(0), &held[..]);
        let next = holder
            .next_timeout(Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert_eq!((next.epoch(), next.index()), (round, 1));
        assert!(!next.redelivered());
    }
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}");
    assert!(took < EXIT_WITHIN, "SIGTERM took {took:?}");
}

#[test]
fn absurd_resume_positions_are_refused_and_serving_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let daemon = start(&runtime, data.path(), "absurd", &["--epochs", "3"]);
    for epoch in [u64::MAX, 4, 1 << 40] {
        let mut opts = options(runtime.path(), "absurd", 0);
        opts.resume = Some((epoch, 0));
        let err = Consumer::attach_with(&opts).expect_err("an absurd resume was accepted");
        assert!(
            err.to_string()
                .contains(&format!("cannot resume at epoch {epoch}")),
            "{err}"
        );
    }
    // The last epoch, and "just after the end", are positions.
    let mut opts = options(runtime.path(), "absurd", 0);
    opts.resume = Some((2, 1));
    let consumer = Consumer::attach_with(&opts).unwrap();
    let batch = consumer
        .next_timeout(Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert_eq!((batch.epoch(), batch.index()), (2, 1));
    drop(batch);
    drop(consumer);
    let mut opts = options(runtime.path(), "absurd", 1);
    opts.resume = Some((3, 0));
    let consumer = Consumer::attach_with(&opts).unwrap();
    assert!(consumer
        .next_timeout(Duration::from_secs(60))
        .unwrap()
        .is_none());
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}");
    assert!(took < EXIT_WITHIN, "SIGTERM took {took:?}");
}

#[test]
fn a_runtime_dir_or_ring_file_planted_by_another_user_is_refused_with_the_fix() {
    let data = tempfile::tempdir().unwrap();
    let spec = write_dataset(data.path(), 1, 8);
    let config = small_config(data.path(), &spec, "planted");
    let nobody = rustix::process::Uid::from_raw(65534);
    // Another user created the runtime directory first (as /tmp/ringfeed-<uid> can be).
    let planted = data.path().join("run");
    std::fs::create_dir(&planted).unwrap();
    rustix::fs::chown(&planted, Some(nobody), None).unwrap();
    let mut daemon = Daemon::spawn(&planted, &["--config", config.to_str().unwrap()]);
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(!status.success(), "{log}");
    for needle in [
        "owned by uid 65534",
        "RINGFEED_RUNTIME_DIR",
        "XDG_RUNTIME_DIR",
    ] {
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
    }

    // Another user's file where the ring file goes in a shared --shm-dir.
    let shm = tempfile::tempdir().unwrap();
    let ring_file = shm.path().join("ringfeed-planted.ring");
    std::fs::write(&ring_file, b"").unwrap();
    rustix::fs::chown(&ring_file, Some(nobody), None).unwrap();
    let runtime = RuntimeTmp::new();
    let mut daemon = Daemon::spawn(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--shm-dir",
            shm.path().to_str().unwrap(),
        ],
    );
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(!status.success(), "{log}");
    for needle in ["ringfeed-planted.ring", "Another user", "--shm-dir"] {
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
    }
}
