//! `ringfeed peek`: a PNG grid from a running ring (without taking the batch) and from a
//! configuration alone; the two agree for the same batch.

mod common;

use std::path::Path;
use std::process::Command;

use common::{small_config, write_dataset, Daemon, RuntimeTmp};

fn peek(runtime: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .arg("peek")
        .args(args)
        .env("RINGFEED_RUNTIME_DIR", runtime)
        .output()
        .expect("running ringfeed peek");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "peek failed: {stderr}");
    stderr
}

/// Decodes the PNG and checks the grid of 8 samples of 32×32 (3 columns × 3 rows of tiles
/// with a two-line caption) holds real picture content.
fn check_grid(path: &Path) -> image::RgbImage {
    let img = image::open(path).unwrap().to_rgb8();
    // Tiles 32 px wide + 4 px gap; 32 px tall + 19 px caption + 4 px gap; 4 px border.
    assert_eq!((img.width(), img.height()), (3 * 36 + 4, 3 * 55 + 4));
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 100, "only {} colours", colours.len());
    img
}

#[test]
fn peek_copies_a_published_batch_and_matches_the_offline_render() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 16);
    let config = small_config(data.path(), &spec, "peekring");
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);

    let live = data.path().join("live.png");
    let said = peek(
        runtime.path(),
        &["peekring", "--lane", "0", "--out", live.to_str().unwrap()],
    );
    let live_img = check_grid(&live);
    // "lane 0 seq S epoch E batch I (8 samples)"
    let words: Vec<&str> = said
        .lines()
        .find(|l| l.contains(" seq "))
        .unwrap_or_else(|| panic!("no batch line in {said}"))
        .split_whitespace()
        .collect();
    let after = |key: &str| {
        let i = words.iter().position(|w| *w == key).unwrap();
        words[i + 1].to_owned()
    };
    let (epoch, index) = (after("epoch"), after("batch"));

    // Peeking took nothing: a consumer still receives the ring's first batch.
    let mut opts = ringfeed::ring::AttachOptions::new("peekring", 0);
    opts.dir = Some(ringfeed::ring::RuntimeDir::at(runtime.path()));
    let consumer = ringfeed::ring::Consumer::attach_with(&opts).unwrap();
    let first = consumer.next().unwrap().unwrap();
    assert_eq!((first.epoch(), first.index(), first.seq()), (0, 0, 1));
    drop(first);
    drop(consumer);

    let offline = data.path().join("offline.png");
    peek(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--epoch",
            &epoch,
            "--index",
            &index,
            "--out",
            offline.to_str().unwrap(),
        ],
    );
    let offline_img = check_grid(&offline);
    assert!(
        live_img == offline_img,
        "the ring's batch (epoch {epoch}, batch {index}) differs from the offline render"
    );
    assert!(daemon.terminate().success());
}
