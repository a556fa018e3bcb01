//! `ringfeed bench` on the bundled sample: the stage table, the end-to-end line with its ratio
//! to the decode floor, and `--stages-only` (the quick baseline the soak script takes);
//! the DeiT policy preset through the same.

mod common;

use std::process::Command;

fn bench(extra: &[&str]) -> String {
    let runtime = common::RuntimeTmp::new();
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args([
            "bench",
            "--samples",
            "8",
            "--repeats",
            "1",
            "--batch-size",
            "4",
        ])
        .args(["--batches", "2", "--workers", "1"])
        .args(extra)
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The images/s of the table row named `row`.
fn rate(table: &str, row: &str) -> f64 {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {row} |")))
        .unwrap_or_else(|| panic!("no row {row:?} in\n{table}"));
    line.split('|').nth(2).unwrap().trim().parse().unwrap()
}

#[test]
fn bench_reports_stages_and_end_to_end_against_the_floor() {
    let out = bench(&[]);
    for row in [
        "read (positioned read, page cache)",
        "full decode only (floor per core)",
        "decode + augment + write (ROI decode)",
    ] {
        assert!(rate(&out, row) > 0.0, "{row}: {out}");
    }
    assert!(
        out.contains("end to end through the ring, 1 workers:"),
        "{out}"
    );
    assert!(out.contains("% of it"), "{out}");
}

#[test]
fn stages_only_skips_the_ring() {
    let out = bench(&["--stages-only"]);
    assert!(
        rate(&out, "decode + augment + write (ROI decode)") > 0.0,
        "{out}"
    );
    assert!(!out.contains("end to end"), "{out}");
}

/// The DeiT preset — RandAugment, random erasing, mixup/CutMix with `targets`, repeated
/// augmentation — runs through the stage timings and the ring like the plain pipeline.
#[test]
fn bench_runs_the_deit_policy_preset() {
    let out = bench(&[
        "--config",
        "configs/imagenet-train-deit.toml",
        "--shards",
        "data/sample/shard-{000000..000001}.tar",
    ]);
    assert!(
        rate(&out, "decode + augment + write (ROI decode)") > 0.0,
        "{out}"
    );
    assert!(
        out.contains("end to end through the ring, 1 workers:"),
        "{out}"
    );
}
