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
    common::drain(&consumer, |batch| {
        let mut bytes = batch.tensor_bytes(0).to_vec();
        bytes.extend_from_slice(batch.tensor_bytes(2));
        got.insert((batch.epoch(), batch.index()), bytes);
    });
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

/// `ringfeed serve` arguments for one node of a job: `lanes` lanes from global rank `first`
/// of `world` ranks taking batches of `batch`, one epoch.
fn node_args(config: &str, lanes: u32, world: u32, first: u32, batch: u32) -> Vec<String> {
    let mut args: Vec<String> = ["--config", config, "--epochs", "1"]
        .map(str::to_owned)
        .to_vec();
    for (flag, value) in [
        ("--lanes", lanes),
        ("--world-size", world),
        ("--first-rank", first),
        ("--batch-size", batch),
    ] {
        args.push(flag.to_owned());
        args.push(value.to_string());
    }
    args
}

/// Starts one daemon per node (its own runtime directory), each serving `lanes` lanes of a
/// `world`-rank job.
fn start_nodes(
    runtimes: &[RuntimeTmp],
    config: &str,
    lanes: u32,
    world: u32,
    batch: u32,
) -> Vec<Daemon> {
    runtimes
        .iter()
        .enumerate()
        .map(|(node, runtime)| {
            let args = node_args(config, lanes, world, node as u32 * lanes, batch);
            Daemon::start(
                runtime.path(),
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
        .collect()
}

/// The ids every rank of the new world gets after resuming from `states` (global rank `r`
/// loads `states[r % states.len()]`, as a job whose ranks all read one checkpoint would),
/// one list of batches per rank; also the warnings of rank 0's resume. The ranks consume at
/// once, one thread each, as trainers do (a daemon's lanes share its workers).
fn resume_everywhere(
    runtimes: &[RuntimeTmp],
    lanes: u32,
    world: u32,
    states: &[ringfeed::ring::resume::ResumeState],
) -> (Vec<Vec<Vec<i64>>>, Vec<String>) {
    let results: Vec<(Vec<Vec<i64>>, Vec<String>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..world)
            .map(|rank| {
                let (runtime, lane) = (&runtimes[(rank / lanes) as usize], rank % lanes);
                scope.spawn(move || {
                    let mut opts = options(runtime, "elastic", lane);
                    opts.expect_rank = Some((rank, world));
                    opts.resume_state = Some(states[rank as usize % states.len()].clone());
                    let consumer =
                        Consumer::attach_with(&opts).expect("resume at another world size");
                    let warnings = consumer.resume_warnings().to_vec();
                    let batches = ids_of(&consumer, usize::MAX);
                    assert!(
                        batches.iter().all(|(key, _)| key.0 == 0),
                        "rank {rank} went past the one epoch"
                    );
                    (batches.into_iter().map(|(_, ids)| ids).collect(), warnings)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let warnings = results[0].1.clone();
    (results.into_iter().map(|(ids, _)| ids).collect(), warnings)
}

#[test]
fn elastic_resume_at_world_2_and_8_serves_the_rest_of_the_epoch_once() {
    const SAMPLES: i64 = 96; // 2 shards × 48; global batch 16: 6 global batches
    let data = tempfile::tempdir().unwrap();
    let spec = write_dataset(data.path(), 2, 48);
    let config = small_config(data.path(), &spec, "elastic");
    let config = config.to_str().unwrap();

    // World 4 as two nodes of two lanes, batch 4: every rank takes 2 batches, then the job
    // checkpoints (each rank's state) and stops.
    let runtimes4 = [RuntimeTmp::new(), RuntimeTmp::new()];
    let daemons = start_nodes(&runtimes4, config, 2, 4, 4);
    let mut served = Vec::new();
    let mut states = Vec::new();
    for (node, runtime) in runtimes4.iter().enumerate() {
        for lane in 0..2 {
            let mut opts = options(runtime, "elastic", lane);
            opts.expect_rank = Some((node as u32 * 2 + lane, 4));
            let consumer = Consumer::attach_with(&opts).unwrap();
            let got = ids_of(&consumer, 2);
            assert_eq!(got.len(), 2);
            served.extend(got.into_iter().flat_map(|(_, ids)| ids));
            let state = consumer.resume_state(0, 2);
            assert_eq!(state.sample, Some(32), "2 global batches of 16");
            // What a checkpoint holds: JSON, read back.
            states.push(serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap());
        }
    }
    for daemon in daemons {
        assert!(daemon.terminate().success());
    }
    let mut unserved: Vec<i64> = (0..SAMPLES).filter(|id| !served.contains(id)).collect();
    assert_eq!(
        unserved.len(),
        64,
        "32 distinct samples served before the checkpoint"
    );
    unserved.sort_unstable();

    // The same global batch (16) at world 2 (one node, batch 8) and at world 8 (two nodes of
    // four lanes, batch 2).
    for (nodes, lanes, world, batch) in [(1usize, 2u32, 2u32, 8u32), (2, 4, 8, 2)] {
        let runtimes: Vec<RuntimeTmp> = (0..nodes).map(|_| RuntimeTmp::new()).collect();
        let daemons = start_nodes(&runtimes, config, lanes, world, batch);
        let (per_rank, warnings) = resume_everywhere(&runtimes, lanes, world, &states);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(&format!("world_size 4 → {world}"))
                    && !w.contains("mid-batch")),
            "world {world}: {warnings:?}"
        );
        let counts: Vec<usize> = per_rank.iter().map(Vec::len).collect();
        let want = 64 / (world * batch) as usize;
        assert_eq!(
            counts,
            vec![want; world as usize],
            "world {world}: batches per rank"
        );
        let mut rest: Vec<i64> = per_rank.into_iter().flatten().flatten().collect();
        rest.sort_unstable();
        assert_eq!(
            rest, unserved,
            "world {world}: the rest of the epoch, each sample once"
        );
        for daemon in daemons {
            assert!(daemon.terminate().success());
        }
    }

    // An order change still refuses, even together with a world change.
    let runtime = RuntimeTmp::new();
    let mut args = node_args(config, 2, 2, 0, 8);
    args.extend(["--seed".to_owned(), "8".to_owned()]);
    let daemon = Daemon::start(
        runtime.path(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut opts = options(&runtime, "elastic", 0);
    opts.resume_state = Some(states[0].clone());
    let Err(err) = Consumer::attach_with(&opts) else {
        panic!("a state of another seed was accepted at another world size")
    };
    let text = err.to_string();
    assert!(text.contains("seed 7 (saved) vs 8 (this daemon)"), "{text}");
    assert!(!text.contains("world_size"), "{text}");
    drop(opts);
    assert!(daemon.terminate().success());
}
