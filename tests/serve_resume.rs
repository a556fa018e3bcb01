//! Resume is O(1) and exact: a consumer that asks for `(epoch, index)` gets the very bytes it
//! would have had, from the same daemon after the stream finished and from a restarted daemon.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

type Batches = BTreeMap<(u64, u64), Vec<u8>>;

fn take_all(runtime: &RuntimeTmp, resume: Option<(u64, u64)>) -> Batches {
    let mut opts = AttachOptions::new("resume", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    opts.resume = resume;
    let consumer = Consumer::attach_with(&opts).expect("attach");
    let mut got = Batches::new();
    while let Some(batch) = consumer.next_timeout(Duration::from_secs(60)).unwrap() {
        let mut bytes = batch.tensor_bytes(0).to_vec();
        bytes.extend_from_slice(batch.tensor_bytes(2));
        got.insert((batch.epoch(), batch.index()), bytes);
    }
    got
}

#[test]
fn resume_gives_the_same_bytes_from_a_finished_or_restarted_daemon() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 20);
    let config = small_config(data.path(), &spec, "resume");
    let args = ["--config", config.to_str().unwrap(), "--epochs", "2"];

    let daemon = Daemon::start(runtime.path(), &args);
    let full = take_all(&runtime, None);
    assert_eq!(full.len(), 10, "2 epochs × 5 batches");

    // The ring is FINISHED; rewinding it serves the tail again, identically.
    let tail = take_all(&runtime, Some((1, 2)));
    let keys: Vec<_> = tail.keys().copied().collect();
    assert_eq!(keys, [(1, 2), (1, 3), (1, 4)]);
    for (key, bytes) in &tail {
        assert!(full[key] == *bytes, "batch {key:?} differs after a rewind");
    }
    assert!(daemon.terminate().success());

    // A new daemon (new generation) resumes mid-epoch with the same bytes.
    let daemon = Daemon::start(runtime.path(), &args);
    let resumed = take_all(&runtime, Some((0, 3)));
    let keys: Vec<_> = resumed.keys().copied().collect();
    assert_eq!(keys[..3], [(0, 3), (0, 4), (1, 0)]);
    assert_eq!(resumed.len(), 7);
    for (key, bytes) in &resumed {
        assert!(full[key] == *bytes, "batch {key:?} differs after a restart");
    }
    assert!(daemon.terminate().success());
}
