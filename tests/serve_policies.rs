//! `ringfeed serve` with the automatic policies, random erasing, repeated augmentation and batch
//! mixing: every batch's bytes — images, labels, ids and `targets` — are the same with 1, 2 and 8
//! worker threads, the `targets` rows are soft labels summing to 1, and each sample's
//! per-sample augmentation (policy, erasing) is the same at world size 1, 2 and 4.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{write_dataset, Daemon};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

/// (epoch, index) → (images bytes, labels, sample ids, targets).
type Received = BTreeMap<(u64, u64), (Vec<u8>, Vec<i64>, Vec<i64>, Vec<f32>)>;

fn config(dir: &Path, spec: &str, name: &str, policy: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[source]
kind = "tar"
shards = ["{spec}"]
num-classes = 10

[sampling]
seed = 3
drop-last = true

[batch]
size = 8

[augment]
random-resized-crop = {{ size = 32 }}
horizontal-flip = {{ p = 0.5 }}
{policy}
normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }}
random-erasing = {{ p = 0.5, value = "random" }}
repeated-augment = {{ count = 2 }}
mixup = {{ alpha = 0.8 }}
cutmix = {{ alpha = 1.0 }}

[ring]
name = "{name}"
slots-per-lane = 3
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A daemon serving the 40-sample dataset under `policy` (with `tweak` applied to the config
/// text) for two epochs with `args`; the directories live as long as it runs.
fn start(
    name: &str,
    policy: &str,
    tweak: impl Fn(String) -> String,
    args: &[&str],
) -> (tempfile::TempDir, common::RuntimeTmp, Daemon) {
    let data = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 20);
    let cfg = config(data.path(), &spec, name, policy);
    let text = tweak(std::fs::read_to_string(&cfg).unwrap());
    std::fs::write(&cfg, text).unwrap();
    let mut all = vec![
        "--config",
        cfg.to_str().unwrap(),
        "--epochs",
        "2",
        "--exit-when-done",
    ];
    all.extend_from_slice(args);
    let daemon = Daemon::start(runtime.path(), &all);
    (data, runtime, daemon)
}

fn serve(policy: &str, workers: &str) -> Received {
    let name = "policies";
    let (_data, runtime, mut daemon) = start(name, policy, |text| text, &["--workers", workers]);
    let mut opts = AttachOptions::new(name, 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let consumer = Consumer::attach_with(&opts).expect("attach");
    let mut got = Received::new();
    while let Some(batch) = consumer
        .next_timeout(Duration::from_secs(60))
        .expect("next batch")
    {
        let entry = (
            batch.tensor_bytes(0).to_vec(),
            batch.tensor::<i64>("labels").unwrap().to_vec(),
            batch.tensor::<i64>("sample_ids").unwrap().to_vec(),
            batch.tensor::<f32>("targets").unwrap().to_vec(),
        );
        assert!(got.insert((batch.epoch(), batch.index()), entry).is_none());
    }
    drop(consumer);
    let status = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "daemon failed: {}", daemon.log.join("\n"));
    got
}

#[test]
fn policies_and_mixing_are_identical_with_1_2_and_8_workers() {
    for policy in [
        "rand-augment = { n = 2, m = 9, m-std = 0.5, bins = 11 }",
        "trivial-augment = {}",
        "auto-augment = { policy = \"imagenet\" }",
    ] {
        let reference = serve(policy, "1");
        // 40 samples × 2 views / 8 per batch, 2 epochs.
        assert_eq!(reference.len(), 20, "{policy}");
        for workers in ["2", "8"] {
            assert!(
                serve(policy, workers) == reference,
                "{policy}: batches differ between 1 and {workers} workers"
            );
        }
        for (key, (_, labels, ids, targets)) in &reference {
            assert_eq!(targets.len(), 8 * 10);
            for (row, t) in targets.chunks_exact(10).enumerate() {
                let sum: f32 = t.iter().sum();
                assert!((sum - 1.0).abs() < 1e-4, "{key:?} row {row}: {sum}");
                // The heaviest class is the row's own or its partner's label.
                let top = (0..10).max_by(|&a, &b| t[a].total_cmp(&t[b])).unwrap() as i64;
                assert!(
                    top == labels[row] || top == labels[7 - row],
                    "{key:?} row {row}"
                );
            }
            for (label, id) in labels.iter().zip(ids) {
                assert_eq!(*label, id % 10);
            }
        }
        // Each sample twice per epoch (repeated augmentation, count 2).
        for epoch in 0..2 {
            let mut counts = BTreeMap::<i64, usize>::new();
            for (_, (_, _, ids, _)) in reference.range((epoch, 0)..(epoch + 1, 0)) {
                for id in ids {
                    *counts.entry(*id).or_default() += 1;
                }
            }
            assert_eq!(counts.len(), 40, "{policy} epoch {epoch}");
            assert!(counts.values().all(|&n| n == 2), "{policy} epoch {epoch}");
        }
    }
}

/// (epoch, sample id) → the sample's image bytes, over every lane of a daemon with `lanes`
/// lanes (one rank each).
fn serve_per_sample(policy: &str, lanes: u32) -> BTreeMap<(u64, i64), Vec<u8>> {
    let name = "worlds";
    // Per-sample augmentation only: mixing pairs rows of one rank's batch and repeated
    // augmentation deals views per rank, so both depend on the world size by design.
    let per_sample = |text: String| -> String {
        text.lines()
            .filter(|l| {
                !["mixup", "cutmix", "repeated-augment"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let lanes_arg = lanes.to_string();
    let (_data, runtime, mut daemon) = start(name, policy, per_sample, &["--lanes", &lanes_arg]);
    let handles: Vec<_> = (0..lanes)
        .map(|lane| {
            let mut opts = AttachOptions::new(name, lane);
            opts.dir = Some(RuntimeDir::at(runtime.path()));
            std::thread::spawn(move || {
                let consumer = Consumer::attach_with(&opts).expect("attach");
                let mut got = Vec::new();
                while let Some(batch) = consumer
                    .next_timeout(Duration::from_secs(60))
                    .expect("next batch")
                {
                    let images = batch.tensor_bytes(0);
                    let ids = batch.tensor::<i64>("sample_ids").unwrap().to_vec();
                    let row = images.len() / ids.len();
                    for (i, id) in ids.iter().enumerate() {
                        got.push((
                            (batch.epoch(), *id),
                            images[i * row..(i + 1) * row].to_vec(),
                        ));
                    }
                }
                got
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for handle in handles {
        for (key, bytes) in handle.join().unwrap() {
            assert!(all.insert(key, bytes).is_none(), "{key:?} served twice");
        }
    }
    let status = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "daemon failed: {}", daemon.log.join("\n"));
    all
}

#[test]
fn each_samples_policy_augmentation_is_the_same_at_world_size_1_2_and_4() {
    let policy = "rand-augment = { n = 2, m = 9, m-std = 0.5, bins = 11 }";
    let reference = serve_per_sample(policy, 1);
    assert_eq!(reference.len(), 80, "40 samples × 2 epochs");
    for lanes in [2, 4] {
        let other = serve_per_sample(policy, lanes);
        // drop-last: whole global batches of 8 × lanes, 32 of the 40 samples per epoch.
        assert_eq!(other.len(), 64, "world size {lanes}");
        for (key, bytes) in &other {
            assert!(
                reference.get(key) == Some(bytes),
                "world size {lanes}: sample {key:?} augmented differently"
            );
        }
    }
}
