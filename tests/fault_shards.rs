//! Shard files that change under a running daemon: deleted, truncated while being read, or
//! replaced by a directory, mid-epoch and between epochs. Each is skipped with a log line
//! naming the shard and member, counted in `samples_skipped`, and serving goes on.
//!
//! The order is `shuffle = "none"` and the consumer takes nothing until the files are
//! changed, so which shards the daemon has already opened (and read) is known exactly: with 3
//! slots of 8 it has written samples 0–23 and waits.

mod common;
mod fault_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{write_dataset, Daemon, RuntimeTmp};
use fault_support::{lane_state, observe, signal_pid, wait_until, Watchdog};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};
use rustix::process::Signal;

fn sequential_config(dir: &Path, spec: &str, name: &str, batch: u32, epochs: u32) -> PathBuf {
    let text = format!(
        r#"
[source]
kind = "tar"
shards = ["{spec}"]

[sampling]
seed = 3
shuffle = "none"
drop-last = true
epochs = {epochs}

[batch]
size = {batch}

[augment]
random-resized-crop = {{ size = 16 }}
normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }}

[ring]
name = "{name}"
slots-per-lane = 3

[workers]
threads = 1
status-interval-s = 0.5
max-skip-fraction = 0.9
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn shard(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("shard-{n:06}.tar"))
}

/// Starts the daemon, attaches a consumer and waits until the lane is full (3 batches
/// written, the producer waiting); returns both.
fn start_and_fill(runtime: &RuntimeTmp, config: &Path, name: &str) -> (Daemon, Consumer) {
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    let mut opts = AttachOptions::new(name, 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let consumer = Consumer::attach_with(&opts).unwrap();
    let observer = observe(runtime.path(), name);
    wait_until("three batches written", Duration::from_secs(60), || {
        let (ready, held, free, writing, _) = lane_state(&observer.snapshot(), 0);
        ready + held == 3 && free == 0 && writing == 0
    });
    (daemon, consumer)
}

/// Takes every batch to the end of the stream: per epoch, the sample ids served.
fn drain(consumer: &Consumer, epochs: u64) -> Vec<Vec<i64>> {
    let mut per_epoch = vec![Vec::new(); epochs as usize];
    common::drain(consumer, |b| {
        per_epoch[b.epoch() as usize].extend(b.tensor::<i64>("sample_ids").unwrap());
    });
    per_epoch
}

fn ids_in(ids: &[i64], range: std::ops::Range<i64>) -> BTreeSet<i64> {
    ids.iter().copied().filter(|i| range.contains(i)).collect()
}

#[test]
fn shards_deleted_truncated_or_replaced_mid_epoch_are_skipped_and_serving_continues() {
    let dog = Watchdog::arm("shard faults mid-epoch", Duration::from_secs(180));
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    // 4 shards × 16: shard 0 = ids 0–15, 1 = 16–31, 2 = 32–47, 3 = 48–63.
    let spec = write_dataset(data.path(), 4, 16);
    let config = sequential_config(data.path(), &spec, "midepoch", 8, 2);
    let (mut daemon, consumer) = start_and_fill(&runtime, &config, "midepoch");
    dog.guard(daemon.child.id());

    // Shard 1 is open and half read: truncate it under the reader. Shards 2 and 3 are not
    // open yet: delete one, replace the other by a directory.
    let one = std::fs::OpenOptions::new()
        .write(true)
        .open(shard(data.path(), 1))
        .unwrap();
    let len = one.metadata().unwrap().len();
    one.set_len(len * 2 / 5).unwrap();
    drop(one);
    std::fs::remove_file(shard(data.path(), 2)).unwrap();
    std::fs::remove_file(shard(data.path(), 3)).unwrap();
    std::fs::create_dir(shard(data.path(), 3)).unwrap();

    let served = drain(&consumer, 2);
    let observer = observe(runtime.path(), "midepoch");
    let skipped = observer.snapshot().stats.samples_skipped;
    drop(consumer);
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon stopped");
    signal_pid(daemon.child.id(), Signal::TERM);
    assert!(daemon.wait(Duration::from_secs(30)).success());
    let log = daemon.log.join("\n");

    // Every batch was still served: 2 epochs × 8 batches × 8 rows.
    assert_eq!(served.iter().map(Vec::len).collect::<Vec<_>>(), [64, 64]);
    // Shard 0 whole in both epochs; shard 1 only up to where it had been read before the
    // cut; shards 2 and 3 never (their rows hold fallback samples of shard 0 or 1).
    assert_eq!(ids_in(&served[0], 0..16).len(), 16);
    assert_eq!(ids_in(&served[1], 0..16).len(), 16);
    assert_eq!(ids_in(&served[0], 16..64), (16..24).collect());
    assert!(ids_in(&served[1], 16..64).is_empty(), "{:?}", served[1]);
    // Counted: at least every first choice that failed (ids 24–63, then 16–63).
    assert!(skipped >= 40 + 48, "skipped {skipped}\n{log}");
    // Named: shard and member, and why.
    for needle in [
        "shard-000001.tar:s1_0008.jpg",
        "shard-000002.tar:s2_0000.jpg",
        "shard-000003.tar:s3_0000.jpg",
        "not a regular file",
        "No such file or directory",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    assert!(
        log.contains("cannot read") || log.contains("changed since it was indexed"),
        "{log}"
    );
}

#[test]
fn shards_deleted_or_replaced_after_opening_are_dropped_at_the_next_epoch() {
    let dog = Watchdog::arm("shard faults between epochs", Duration::from_secs(180));
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    // 3 shards × 14, batches of 7: shard 0 = ids 0–13, 1 = 14–27, 2 = 28–41.
    let spec = write_dataset(data.path(), 3, 14);
    let config = sequential_config(data.path(), &spec, "nextepoch", 7, 3);
    let (mut daemon, consumer) = start_and_fill(&runtime, &config, "nextepoch");
    dog.guard(daemon.child.id());

    // Both are open (ids 0–20 written). The kernel keeps serving an open file's old bytes, so
    // the rest of this epoch still reads shard 1; the next epoch's recheck drops both.
    std::fs::remove_file(shard(data.path(), 0)).unwrap();
    std::fs::create_dir(shard(data.path(), 0)).unwrap();
    std::fs::remove_file(shard(data.path(), 1)).unwrap();

    let served = drain(&consumer, 3);
    let skipped = observe(runtime.path(), "nextepoch")
        .snapshot()
        .stats
        .samples_skipped;
    drop(consumer);
    signal_pid(daemon.child.id(), Signal::TERM);
    assert!(daemon.wait(Duration::from_secs(30)).success());
    let log = daemon.log.join("\n");

    let mut epoch0 = served[0].clone();
    epoch0.sort_unstable();
    assert_eq!(epoch0, (0..42).collect::<Vec<_>>(), "epoch 0 is whole");
    for (epoch, ids) in served.iter().enumerate().skip(1) {
        assert_eq!(ids.len(), 42, "epoch {epoch} still has every batch");
        assert!(ids_in(ids, 0..28).is_empty(), "epoch {epoch}: {ids:?}");
        assert_eq!(ids_in(ids, 28..42).len(), 14, "epoch {epoch}");
    }
    assert!(skipped >= 2 * 28, "skipped {skipped}\n{log}");
    for needle in [
        "epoch 1: shard-000000.tar: ",
        "the path is no longer a regular file",
        "epoch 1: shard-000001.tar: cannot open",
        "its samples are skipped from now on",
        "shard-000001.tar:s1_0000.jpg",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
}
