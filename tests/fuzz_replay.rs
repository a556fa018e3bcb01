//! Runs the fuzz targets' properties (`fuzz/src/lib.rs`, the same code libFuzzer drives) over
//! the committed seed corpora and the inputs of every crash the fuzzers found, so a plain
//! `cargo test` keeps them fixed without cargo-fuzz.
//!
//! `cargo test --test fuzz_replay -- --ignored write_seeds` regenerates the seeds made by the
//! library itself (a valid ring control region, small ustar shards); `fuzz/make_seeds.py` makes
//! the others.

use std::path::{Path, PathBuf};

#[allow(dead_code, unreachable_pub)]
#[path = "../fuzz/src/lib.rs"]
mod checks;

mod common;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 4] = [
    ("ring_header", checks::ring_header),
    ("tar_reader", checks::tar_reader),
    ("label", checks::label),
    ("decode", checks::decode),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly under `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file());
    out.sort();
    out
}

#[test]
fn every_seed_and_regression_passes_its_target() {
    for (target, check) in TARGETS {
        let seeds = files(&fuzz_dir().join("seeds").join(target));
        assert!(!seeds.is_empty(), "no seeds for {target}");
        let regressions = files(&fuzz_dir().join("regressions").join(target));
        for path in seeds.iter().chain(&regressions) {
            let bytes = std::fs::read(path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&bytes));
            assert!(outcome.is_ok(), "{target} fails on {}", path.display());
        }
    }
}

#[test]
#[ignore = "writes fuzz/seeds; run by hand after a format change"]
fn write_seeds() {
    use ringfeed::ring::layout::{encode_control, plan, DType, RingSpec, TensorSpec};

    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };

    let spec = RingSpec {
        drop_last: true,
        nhwc: true,
        batches_per_epoch: 3,
        epochs: 1,
        seed: 1,
        samples_per_epoch: 12,
        mean: [0.5; 4],
        std: [0.25; 4],
        ..RingSpec::new(
            "seed",
            2,
            2,
            2,
            vec![
                TensorSpec {
                    name: "images".into(),
                    dtype: DType::U8,
                    shape: vec![2, 4, 4, 3],
                },
                TensorSpec {
                    name: "labels".into(),
                    dtype: DType::I64,
                    shape: vec![2],
                },
            ],
        )
    };
    let layout = plan(&spec, 1).unwrap();
    write(
        "ring_header",
        "two_lanes.bin",
        &encode_control(&layout, 1, 1),
    );

    let jpeg = common::jpeg(8, 8, 1);
    write(
        "tar_reader",
        "two_samples.tar",
        &common::tar(&[
            ("a/s0.jpg", &jpeg[..]),
            ("a/s0.cls", b"3\n"),
            ("a/s1.png", b"\x89PNG\r\n\x1a\n"),
            ("a/s1.cls", b"-1"),
        ]),
    );
    write(
        "tar_reader",
        "issues.tar",
        &common::tar(&[
            ("../up.jpg", &b"x"[..]),
            (".hidden.jpg", b"x"),
            ("nolabel.jpg", b"x"),
            ("nolabel_img.cls", b"1"),
            ("odd.txt", b"x"),
            ("bad.jpg", b"x"),
            ("bad.cls", b"one"),
        ]),
    );

    // An encrypted shard: header, two sealed images, sealed manifest.
    use ringfeed::source::crypt::{
        Manifest, ManifestEntry, ShardSealer, HEADER_MEMBER, MANIFEST_MEMBER,
    };
    let key = ringfeed::source::ShardKey::from_bytes(&[7; 32], Path::new("seed.key"));
    let sealer = ShardSealer::new(&key, false).unwrap();
    let mut manifest = Manifest {
        samples: Vec::new(),
    };
    let mut members = vec![(HEADER_MEMBER.to_owned(), sealer.header())];
    for (i, name) in ["000000000.jpg", "000000001.jpg"].iter().enumerate() {
        members.push(((*name).to_owned(), sealer.seal(name, &jpeg).unwrap()));
        manifest.samples.push(ManifestEntry {
            member: (*name).to_owned(),
            label: i as i64,
        });
    }
    members.push((
        MANIFEST_MEMBER.to_owned(),
        sealer.manifest(&manifest).unwrap(),
    ));
    write("tar_reader", "sealed.tar", &common::tar(&members));
}
