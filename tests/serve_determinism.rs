//! `ringfeed serve` end to end: the bytes of every batch are the same whatever the number of
//! worker threads, a sample's augmentation does not depend on the world size, every sample is
//! served exactly once per epoch, and the daemon exits cleanly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{small_config, write_dataset, Daemon};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

/// One received batch: (epoch, index) → (images bytes, labels, sample ids).
type Received = BTreeMap<(u64, u64), (Vec<u8>, Vec<i64>, Vec<i64>)>;

fn consume_all(runtime: &Path, name: &str, lane: u32) -> Received {
    let mut opts = AttachOptions::new(name, lane);
    opts.dir = Some(RuntimeDir::at(runtime));
    let consumer = Consumer::attach_with(&opts).expect("attach");
    let mut got = Received::new();
    while let Some(batch) = consumer
        .next_timeout(Duration::from_secs(60))
        .expect("next batch")
    {
        let images = batch.tensor_bytes(0).to_vec();
        let labels = batch.tensor::<i64>("labels").unwrap().to_vec();
        let ids = batch.tensor::<i64>("sample_ids").unwrap().to_vec();
        let previous = got.insert((batch.epoch(), batch.index()), (images, labels, ids));
        assert!(previous.is_none(), "batch delivered twice");
    }
    got
}

fn serve_and_consume(data: &Path, runtime: &Path, extra: &[&str], lanes: u32) -> Vec<Received> {
    let spec = write_dataset(data, 2, 20);
    let name = format!("det{}", extra.join("").replace(['-', ' '], ""));
    let config = small_config(data, &spec, &name);

    let lanes_arg = lanes.to_string();
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--epochs",
        "2",
        "--exit-when-done",
        "--lanes",
        &lanes_arg,
    ];
    args.extend_from_slice(extra);
    let mut daemon = Daemon::start(runtime, &args);
    let ring = name_of(&args);
    let received: Vec<Received> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|lane| {
                let ring = &ring;
                s.spawn(move || consume_all(runtime, ring, lane))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "daemon failed: {status}\n{}",
        daemon.log.join("\n")
    );
    assert!(
        !runtime.join(format!("{ring}.sock")).exists(),
        "socket left behind"
    );
    received
}

fn name_of(args: &[&str]) -> String {
    let config = args[1];
    Path::new(config)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn batches_are_identical_with_1_2_and_8_workers() {
    let mut runs = Vec::new();
    for workers in ["1", "2", "8"] {
        let data = tempfile::tempdir().unwrap();
        let runtime = common::RuntimeTmp::new();
        let mut got = serve_and_consume(data.path(), runtime.path(), &["--workers", workers], 1);
        runs.push((workers, got.remove(0)));
    }
    let (_, reference) = &runs[0];
    assert_eq!(reference.len(), 10, "2 epochs × 5 batches");
    for (workers, run) in &runs[1..] {
        assert_eq!(run.len(), reference.len());
        for (key, batch) in reference {
            assert!(
                run[key] == *batch,
                "batch {key:?} differs between 1 and {workers} workers"
            );
        }
    }
    // Every sample exactly once per epoch; labels match the shards (label = id % 10).
    for epoch in 0..2 {
        let ids: Vec<i64> = reference
            .iter()
            .filter(|((e, _), _)| *e == epoch)
            .flat_map(|(_, (_, _, ids))| ids.clone())
            .collect();
        let unique: BTreeSet<i64> = ids.iter().copied().collect();
        assert_eq!(ids.len(), 40);
        assert_eq!(unique, (0..40).collect());
    }
    for (_, labels, ids) in reference.values() {
        for (label, id) in labels.iter().zip(ids) {
            assert_eq!(*label, id % 10);
        }
        let _ = labels;
    }
    // Normalised values in a plausible range, and not all equal.
    let floats: Vec<f32> = reference
        .values()
        .next()
        .unwrap()
        .0
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(floats
        .iter()
        .all(|v| v.is_finite() && (-3.0..=3.0).contains(v)));
    assert!(floats.iter().any(|v| *v != floats[0]));
    // The epochs differ (new order, new augmentation).
    assert_ne!(reference[&(0, 0)].2, reference[&(1, 0)].2);
}

#[test]
fn a_samples_augmentation_does_not_depend_on_the_world_size() {
    let images_by_sample = |runs: Vec<Received>| {
        let mut map = BTreeMap::new();
        for run in runs {
            for ((epoch, _), (images, _, ids)) in run {
                let per_sample = images.len() / ids.len();
                for (row, id) in ids.iter().enumerate() {
                    let bytes = images[row * per_sample..(row + 1) * per_sample].to_vec();
                    map.insert((epoch, *id), bytes);
                }
            }
        }
        map
    };
    let (d1, r1) = (tempfile::tempdir().unwrap(), common::RuntimeTmp::new());
    let one = images_by_sample(serve_and_consume(d1.path(), r1.path(), &[], 1));
    let (d2, r2) = (tempfile::tempdir().unwrap(), common::RuntimeTmp::new());
    let two_lanes = serve_and_consume(d2.path(), r2.path(), &[], 2);
    // Lanes get disjoint samples that together make the epoch.
    let ids_of = |r: &Received, epoch: u64| -> BTreeSet<i64> {
        r.iter()
            .filter(|((e, _), _)| *e == epoch)
            .flat_map(|(_, (_, _, ids))| ids.iter().copied())
            .collect()
    };
    let (a, b) = (ids_of(&two_lanes[0], 0), ids_of(&two_lanes[1], 0));
    assert!(a.is_disjoint(&b));
    // 40 samples, global batches of 2 × 8: two full global batches, the tail is dropped.
    assert_eq!((a.len(), b.len()), (16, 16));
    let two = images_by_sample(two_lanes);
    assert_eq!(two.len(), 2 * 32);
    for (key, bytes) in &two {
        // With one rank every sample is served each epoch, so each has a counterpart.
        assert!(
            one[key] == *bytes,
            "sample {key:?} differs between world size 1 and 2"
        );
    }
}
