//! Real data: the bundled sample shards, and the shared photos-dev set when it is present.

use std::fs;
use std::path::{Path, PathBuf};

use ringfeed::source::{build_index, Dataset, Sampler, SamplingConfig, ShuffleMode, SourceConfig};

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample")
}

#[test]
fn bundled_sample_shards_index_cleanly() {
    let mut total = 0;
    let mut labels = Vec::new();
    for shard in ["shard-000000.tar", "shard-000001.tar"] {
        // build_index writes nothing, so the repository stays clean.
        let index = build_index(&sample_dir().join(shard)).unwrap();
        assert!(index.issues.is_empty(), "{shard}: {:?}", index.issues);
        assert_eq!(index.samples.len(), 48);
        total += index.samples.len();
        labels.extend(index.samples.iter().map(|s| s.label));
    }
    assert_eq!(total, 96);
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels, (0..8).collect::<Vec<i64>>());
}

#[test]
fn bundled_sample_serves_jpegs_in_sampler_order() {
    let dir = tempfile::tempdir().unwrap();
    for shard in ["shard-000000.tar", "shard-000001.tar"] {
        fs::copy(sample_dir().join(shard), dir.path().join(shard)).unwrap();
    }
    let ds = Dataset::open(
        &SourceConfig::tar(["shard-{000000..000001}.tar"]),
        dir.path(),
    )
    .unwrap();
    assert_eq!(ds.len(), 96);
    assert!(ds.skipped_at_index().is_empty());
    assert_eq!(ds.describe(50), "shard-000001.tar:sample_000050.jpg");
    let sampling = SamplingConfig {
        shuffle: ShuffleMode::Buffer { size: 16 },
        drop_last: true,
        ..SamplingConfig::default()
    };
    let sampler = Sampler::new(ds.len(), 8, 2, &sampling)
        .unwrap()
        .with_shard_starts(ds.shard_starts())
        .unwrap();
    let (mut ids, mut buf) = (Vec::new(), Vec::new());
    let mut served = 0;
    for rank in 0..2 {
        for index in 0..sampler.batches_per_epoch() {
            sampler.batch(0, rank, index, &mut ids).unwrap();
            for &id in &ids {
                ds.read_into(id, &mut buf).unwrap();
                assert_eq!(
                    &buf[..3],
                    [0xff, 0xd8, 0xff],
                    "{} is not a JPEG",
                    ds.describe(id)
                );
                assert_eq!(
                    &buf[buf.len() - 2..],
                    [0xff, 0xd9],
                    "{} is cut short",
                    ds.describe(id)
                );
                assert!((0..8).contains(&ds.label(id)));
                served += 1;
            }
        }
    }
    assert_eq!(served, 96);
}

/// The shared real-photo set (not part of the repository): only checked where it exists.
fn photos_dev() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos-dev");
    let dir = if dir.is_dir() {
        dir
    } else {
        PathBuf::from("/work/shared/data/photos-dev")
    };
    dir.join("manifest.json").is_file().then_some(dir)
}

#[test]
fn photos_dev_shards_and_imagefolder_agree_when_present() {
    let Some(dir) = photos_dev() else {
        eprintln!("photos-dev not present; skipping");
        return;
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let n = manifest["n"].as_u64().unwrap();
    let mut shards: Vec<PathBuf> = fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    shards.sort();
    let mut tar_samples = Vec::new();
    for shard in &shards {
        let index = build_index(shard).unwrap();
        assert!(
            index.issues.is_empty(),
            "{}: {:?}",
            shard.display(),
            index.issues
        );
        tar_samples.extend(index.samples);
    }
    assert_eq!(tar_samples.len() as u64, n);

    // The ImageFolder copy holds the same JPEG bytes under <label:03d>/<key>.jpg; reading it
    // writes nothing into the shared directory.
    let folder = Dataset::open(
        &SourceConfig::imagefolder(dir.join("imagefolder")),
        Path::new("/"),
    )
    .unwrap();
    assert_eq!(folder.len(), n);
    let classes = folder.class_names().unwrap();
    let first_shard = fs::read(&shards[0]).unwrap();
    let sample = &tar_samples[0];
    let tar_bytes = &first_shard[sample.offset as usize..(sample.offset + sample.size) as usize];
    let id = (0..folder.len())
        .find(|&id| {
            folder
                .describe(id)
                .ends_with(&format!("/{}.jpg", sample.key))
        })
        .expect("the first tar sample is in the ImageFolder copy");
    let mut buf = Vec::new();
    folder.read_into(id, &mut buf).unwrap();
    assert_eq!(buf, tar_bytes);
    assert_eq!(
        classes[folder.label(id) as usize].parse::<i64>().unwrap(),
        sample.label
    );
}
