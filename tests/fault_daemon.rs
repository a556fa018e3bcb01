//! Daemon faults with real processes: SIGKILL in the middle of filling a slot followed by a
//! restart that the consumer resumes from its own position (every sample of every epoch
//! delivered exactly once, by sample id), and SIGTERM/SIGINT at random moments (clean exit,
//! runtime entries removed; a SIGKILLed daemon's stale entries are replaced at the next start).

mod common;
mod fault_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use fault_support::{observe, seed, signal_pid, wait_until, Watchdog};
use rand::{Rng, SeedableRng};
use ringfeed::pipeline::Cursor;
use ringfeed::ring::{AttachOptions, ConsumeError, Consumer, RuntimeDir};
use rustix::process::Signal;

/// One consumed batch: its position and the sample ids it carried.
type Consumed = ((u64, u64), Vec<i64>);

/// Consumes lane 0 from `resume` (or the start), pausing up to `max_pause` between batches,
/// appending every batch to `log` after releasing it. Returns how the stream ended.
fn consume(
    runtime: &Path,
    name: &str,
    resume: Option<(u64, u64)>,
    log: &Mutex<Vec<Consumed>>,
    rng_seed: u64,
) -> Result<(), ConsumeError> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rng_seed);
    let mut opts = AttachOptions::new(name, 0);
    opts.dir = Some(RuntimeDir::at(runtime));
    opts.resume = resume;
    let consumer = Consumer::attach_with(&opts).expect("attach");
    while let Some(batch) = consumer.next_timeout(Duration::from_secs(60))? {
        let ids = batch.tensor::<i64>("sample_ids").unwrap().to_vec();
        let key = (batch.epoch(), batch.index());
        std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
        drop(batch);
        log.lock().unwrap().push((key, ids));
    }
    Ok(())
}

#[test]
fn daemon_killed_mid_fill_and_restarted_loses_and_duplicates_nothing() {
    let dog = Watchdog::arm("daemon kill/resume", Duration::from_secs(300));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed());
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    // Five epochs of 6 batches: after the second kill (at most 2 × 7 batches in) the producer
    // still has more left to write than its 3 slots run ahead, so "mid-fill" always comes.
    let (samples, batch, epochs) = (48u64, 8u64, 5u64);
    let per_epoch = samples / batch;
    let spec = write_dataset(data.path(), 2, samples as u32 / 2);
    let config = small_config(data.path(), &spec, "dkill");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--epochs",
        &epochs.to_string(),
        "--workers",
        "1",
    ];
    let log = Arc::new(Mutex::new(Vec::<Consumed>::new()));
    let mut resume: Option<(u64, u64)> = None;
    let mut generations = Vec::new();

    // Two SIGKILLs at random points while the producer writes a slot, then a run to the end.
    for round in 0..3 {
        let mut daemon = Daemon::start(runtime.path(), &args);
        dog.guard(daemon.child.id());
        let observer = observe(runtime.path(), "dkill");
        generations.push(observer.layout().generation);
        let consumer = {
            let (runtime, log) = (runtime.path().to_owned(), Arc::clone(&log));
            let rng_seed = rng.random();
            std::thread::spawn(move || consume(&runtime, "dkill", resume, &log, rng_seed))
        };
        if round == 2 {
            consumer
                .join()
                .unwrap()
                .expect("the last run ends normally");
            assert!(daemon.terminate().success());
            break;
        }
        let done = log.lock().unwrap().len();
        let kill_after = done + rng.random_range(1..per_epoch as usize + 2);
        wait_until(
            "the consumer takes batches",
            Duration::from_secs(60),
            || log.lock().unwrap().len() >= kill_after,
        );
        // A batch of the test data is written in about a millisecond: poll without sleeping.
        let deadline = Instant::now() + Duration::from_secs(30);
        while observer.snapshot().stats.lanes[0].writing == 0 {
            assert!(Instant::now() < deadline, "the producer never wrote a slot");
            std::thread::yield_now();
        }
        daemon.child.kill().unwrap(); // SIGKILL, mid-fill
        daemon.child.wait().unwrap();
        // The consumer drains what was published, then learns that the producer is gone.
        let ended = consumer.join().unwrap();
        assert!(
            matches!(ended, Err(ConsumeError::ProducerGone { .. })),
            "{ended:?}"
        );
        // The dead daemon's socket and lock are stale; the next start replaces them.
        let dir = RuntimeDir::at(runtime.path());
        assert!(dir.socket_path("dkill").exists() && dir.lock_path("dkill").exists());
        // The consumer's position (what `state_dict` records): the batch after the last one
        // it consumed.
        let last = log.lock().unwrap().last().map(|(k, _)| *k);
        resume = last.map(|(epoch, index)| {
            let next = Cursor { epoch, index }.advance(per_epoch);
            (next.epoch, next.index)
        });
        eprintln!("round {round}: killed mid-fill after {last:?}; resuming at {resume:?}");
    }
    generations.dedup();
    assert_eq!(generations.len(), 3, "each start is a new generation");

    // Every batch position exactly once, and every sample exactly once per epoch.
    let log = log.lock().unwrap();
    let mut per_epoch_ids: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    let mut keys: Vec<(u64, u64)> = Vec::new();
    for ((epoch, index), ids) in log.iter() {
        keys.push((*epoch, *index));
        per_epoch_ids.entry(*epoch).or_default().extend(ids);
    }
    let want_keys: Vec<(u64, u64)> = (0..epochs)
        .flat_map(|e| (0..per_epoch).map(move |i| (e, i)))
        .collect();
    assert_eq!(keys, want_keys, "batches lost, duplicated or out of order");
    for (epoch, mut ids) in per_epoch_ids {
        ids.sort_unstable();
        let want: Vec<i64> = (0..samples as i64).collect();
        assert_eq!(ids, want, "epoch {epoch}: samples lost or duplicated");
    }
}

/// Starts `ringfeed serve`, signals it after a random delay (during start-up or while
/// serving, with or without a consumer attached) and checks the exit.
#[test]
fn sigterm_and_sigint_at_random_moments_exit_cleanly() {
    let dog = Watchdog::arm("SIGTERM/SIGINT", Duration::from_secs(300));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed());
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 24);
    let config = small_config(data.path(), &spec, "dterm");
    let dir = RuntimeDir::at(runtime.path());
    // Builds the sidecar indexes once, so start-up is quick and the delays below land both
    // before and after the ring is announced.
    Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]).terminate();

    for round in 0..8 {
        let signal = if round % 2 == 0 {
            Signal::TERM
        } else {
            Signal::INT
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("RINGFEED_RUNTIME_DIR", runtime.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        dog.guard(child.id());
        let stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        let with_consumer = round % 4 >= 2;
        let exited = Arc::new(AtomicBool::new(false));
        let consumer = with_consumer.then(|| {
            let runtime = runtime.path().to_owned();
            let exited = Arc::clone(&exited);
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut opts = AttachOptions::new("dterm", 0);
                opts.dir = Some(RuntimeDir::at(&runtime));
                let consumer = loop {
                    match Consumer::attach_with(&opts) {
                        Ok(c) => break c,
                        // Signalled before the ring existed: the daemon is gone, nothing to read.
                        Err(_) if exited.load(Ordering::SeqCst) => return Ok(()),
                        Err(_) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => panic!("{e}"),
                    }
                };
                loop {
                    match consumer.next_timeout(Duration::from_secs(30)) {
                        Ok(Some(_)) => {}
                        other => return other.map(|_| ()),
                    }
                }
            })
        });
        // Half the rounds signal during start-up (indexes loaded, ring being created).
        let delay = Duration::from_millis(if round < 4 {
            rng.random_range(0..80)
        } else {
            rng.random_range(80..600)
        });
        std::thread::sleep(delay);
        signal_pid(child.id(), signal);
        let mut status = None;
        wait_until(
            "the daemon exits after the signal",
            Duration::from_secs(30),
            || {
                status = child.try_wait().unwrap();
                status.is_some()
            },
        );
        let status = status.unwrap();
        exited.store(true, Ordering::SeqCst);
        let log = log.join().unwrap();
        let announced = log.contains("serving ring");
        eprintln!(
            "round {round}: {signal:?} after {delay:?} (ring announced: {announced}, consumer: {with_consumer}) → {status}"
        );
        if announced {
            assert!(status.success(), "{status}\n{log}");
            assert!(log.contains("stopped; ring 'dterm' removed"), "{log}");
        } else {
            // Before the ring is created the daemon exits 0 at once (nothing to clean up);
            // in the first instants, before its handler is even installed, the signal's
            // default action ends it, which also leaves nothing behind.
            use std::os::unix::process::ExitStatusExt;
            assert!(
                status.success() || status.signal() == Some(signal.as_raw()),
                "{status}\n{log}"
            );
        }
        if status.success() {
            assert!(!dir.socket_path("dterm").exists(), "socket left\n{log}");
            assert!(!dir.lock_path("dterm").exists(), "lock left\n{log}");
        }
        if let Some(consumer) = consumer {
            let ended = consumer.join().unwrap();
            assert!(
                matches!(ended, Err(ConsumeError::ProducerGone { .. }) | Ok(())),
                "{ended:?}"
            );
        }
    }

    // A SIGKILLed daemon leaves a stale socket and lock: the next start detects and replaces
    // them, and a consumer attaches to the new generation.
    let mut killed = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    let old_generation = observe(runtime.path(), "dterm").layout().generation;
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    assert!(dir.socket_path("dterm").exists() && dir.lock_path("dterm").exists());
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    let lock_pid: u32 = std::fs::read_to_string(dir.lock_path("dterm"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(lock_pid, daemon.child.id());
    let mut opts = AttachOptions::new("dterm", 0);
    opts.dir = Some(dir.clone());
    let consumer = Consumer::attach_with(&opts).unwrap();
    assert_ne!(consumer.generation(), old_generation);
    assert!(consumer
        .next_timeout(Duration::from_secs(30))
        .unwrap()
        .is_some());
    drop(consumer);
    assert!(daemon.terminate().success());
    assert!(!dir.socket_path("dterm").exists() && !dir.lock_path("dterm").exists());
}
