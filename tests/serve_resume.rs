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

/// The sample ids of every batch a consumer gets until the end of the stream (or `limit`).
fn ids_of(consumer: &Consumer, limit: usize) -> Vec<((u64, u64), Vec<i64>)> {
    let mut got = Vec::new();
    while got.len() < limit {
        let Some(batch) = consumer.next_timeout(Duration::from_secs(60)).unwrap() else {
            break;
        };
        let ids = batch.tensor::<i64>("sample_ids").unwrap().to_vec();
        got.push(((batch.epoch(), batch.index()), ids));
    }
    got
}

fn options(runtime: &RuntimeTmp, name: &str, lane: u32) -> AttachOptions {
    let mut opts = AttachOptions::new(name, lane);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    opts
}

#[test]
fn a_batch_size_change_resumes_at_the_same_sample_position() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 24);
    let config = small_config(data.path(), &spec, "bsz");
    let at = |batch: &str| {
        [
            "--config".to_owned(),
            config.to_str().unwrap().to_owned(),
            "--epochs".to_owned(),
            "1".to_owned(),
            "--batch-size".to_owned(),
            batch.to_owned(),
        ]
    };
    let args8 = at("8");
    let daemon = Daemon::start(runtime.path(), &args8.each_ref().map(String::as_str));
    let consumer = Consumer::attach_with(&options(&runtime, "bsz", 0)).unwrap();
    let first = ids_of(&consumer, 3);
    let state = consumer.resume_state(0, 3);
    assert_eq!(state.sample, Some(24));
    let saved = serde_json::to_string(&state).unwrap(); // what a checkpoint holds
    drop(consumer);
    assert!(daemon.terminate().success());

    let args4 = at("4");
    let daemon = Daemon::start(runtime.path(), &args4.each_ref().map(String::as_str));
    let reference: Vec<i64> = ids_of(
        &Consumer::attach_with(&options(&runtime, "bsz", 0)).unwrap(),
        usize::MAX,
    )
    .into_iter()
    .flat_map(|(_, ids)| ids)
    .collect();
    let mut opts = options(&runtime, "bsz", 0);
    opts.resume_state = Some(serde_json::from_str(&saved).unwrap());
    let resumed = Consumer::attach_with(&opts).unwrap();
    assert_eq!(resumed.resumed_at(), Some((0, 6)));
    assert!(
        resumed.resume_warnings()[0].contains("batch_size 8 → 4"),
        "{:?}",
        resumed.resume_warnings()
    );
    let rest = ids_of(&resumed, usize::MAX);
    assert_eq!(rest[0].0, (0, 6));
    let mut served: Vec<i64> = first.into_iter().flat_map(|(_, ids)| ids).collect();
    served.extend(rest.into_iter().flat_map(|(_, ids)| ids));
    assert_eq!(
        served, reference,
        "the epoch, once, in the uninterrupted order"
    );
    drop(resumed);
    assert!(daemon.terminate().success());
}

#[test]
fn a_seed_change_is_refused_naming_the_field() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 1, 16);
    let config = small_config(data.path(), &spec, "seed");
    let config = config.to_str().unwrap();
    let daemon = Daemon::start(runtime.path(), &["--config", config, "--epochs", "1"]);
    let consumer = Consumer::attach_with(&options(&runtime, "seed", 0)).unwrap();
    let state = consumer.resume_state(0, 1);
    drop(consumer);
    assert!(daemon.terminate().success());

    let daemon = Daemon::start(
        runtime.path(),
        &["--config", config, "--epochs", "1", "--seed", "8"],
    );
    let mut opts = options(&runtime, "seed", 0);
    opts.resume_state = Some(state.clone());
    let Err(err) = Consumer::attach_with(&opts) else {
        panic!("a state of another seed was accepted")
    };
    let text = err.to_string();
    assert!(text.contains("seed 7 (saved) vs 8 (this daemon)"), "{text}");
    assert!(!text.contains("dataset"), "{text}");
    // A state from before 1.3 (no fingerprint) still resumes, unchecked, at its index.
    opts.resume_state = Some(ringfeed::ring::resume::ResumeState {
        sample: None,
        fingerprint: None,
        ..state
    });
    let old = Consumer::attach_with(&opts).unwrap();
    assert_eq!(old.resumed_at(), None);
    assert_eq!(ids_of(&old, 1)[0].0, (0, 1));
    drop(old);
    assert!(daemon.terminate().success());
}

#[test]
fn a_rank_or_world_mismatch_is_refused_and_the_padded_tail_is_marked() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 1, 21);
    let config = small_config(data.path(), &spec, "ranks");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("drop-last = true", "drop-last = false");
    std::fs::write(&config, text).unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--epochs",
        "1",
        "--lanes",
        "2",
        "--world-size",
        "2",
        "--batch-size",
        "4",
    ];
    let daemon = Daemon::start(runtime.path(), &args);
    let banner = daemon
        .log
        .iter()
        .find(|l| l.contains("serving ring"))
        .unwrap();
    assert!(banner.contains("ranks 0-1 of world size 2"), "{banner}");
    assert!(!daemon.log.iter().any(|l| l.contains("WORLD SIZE ASSUMED")));

    let mut wrong = options(&runtime, "ranks", 1);
    wrong.expect_rank = Some((1, 4));
    let Err(err) = Consumer::attach_with(&wrong) else {
        panic!("rank 1 of 4 was accepted on a lane serving rank 1 of 2")
    };
    let text = err.to_string();
    assert!(text.contains("world size 4"), "{text}");
    assert!(text.contains("--world-size 4 --first-rank 0"), "{text}");
    wrong.expect_rank = Some((0, 2));
    assert!(Consumer::attach_with(&wrong).is_err(), "rank 0 on lane 1");

    // 21 samples, 2 ranks × 4: 3 global batches, the last with 5 of 8 new.
    let mut valid_ids = Vec::new();
    let mut padding = 0;
    for lane in 0..2 {
        let mut opts = options(&runtime, "ranks", lane);
        opts.expect_rank = Some((lane, 2));
        let consumer = Consumer::attach_with(&opts).unwrap();
        assert_eq!(consumer.layout().lane_rank(lane), Some(lane));
        while let Some(batch) = consumer.next_timeout(Duration::from_secs(60)).unwrap() {
            let ids = batch.tensor::<i64>("sample_ids").unwrap();
            let valid = batch.valid().expect("a 1.3 producer writes valid");
            for (id, flag) in ids.iter().zip(valid) {
                if *flag == 1 {
                    valid_ids.push(*id);
                }
            }
            padding += batch.count() - batch.valid_count();
        }
    }
    valid_ids.sort_unstable();
    assert_eq!(valid_ids, (0..21).collect::<Vec<i64>>());
    assert_eq!(padding, 3);
    assert!(daemon.terminate().success());
}
