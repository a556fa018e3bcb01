//! Encrypted shards end to end: `ringfeed keygen`, `ringfeed pack --encrypt-key-file`, and
//! `ringfeed serve --key-file` through real daemons and consumers. The shards on disk hold no
//! image or label in the clear; the right key serves every sample with its label in every
//! shuffle mode, across lanes and nodes; a wrong or exposed key stops the daemon at start,
//! naming the key file; an altered or swapped member is skipped, counted and named.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, RuntimeTmp};
use image::codecs::jpeg::JpegEncoder;
use image::{ImageEncoder, RgbImage};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

const CLASSES: [&str; 3] = ["blue", "green", "red"];

fn ringfeed() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringfeed"))
}

/// A solid JPEG of class `label` (in `CLASSES` order): channel `2 - label` bright, the others
/// dark. Two sizes per class, so some members share a size (for the swap test).
fn solid_jpeg(label: usize, i: u32) -> Vec<u8> {
    let mut px = [30u8; 3];
    px[2 - label] = 220;
    let (w, h) = (64 + (i % 2) * 16, 48);
    let img = RgbImage::from_pixel(w, h, image::Rgb(px));
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 95)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

/// An ImageFolder of `per_class` images per class under `dir/src`; returns it and every
/// image's bytes.
fn image_folder(dir: &Path, per_class: u32) -> (PathBuf, Vec<Vec<u8>>) {
    let src = dir.join("src");
    let mut images = Vec::new();
    for (label, class) in CLASSES.iter().enumerate() {
        std::fs::create_dir_all(src.join(class)).unwrap();
        for i in 0..per_class {
            let bytes = solid_jpeg(label, i);
            std::fs::write(src.join(class).join(format!("img{i:02}.jpg")), &bytes).unwrap();
            images.push(bytes);
        }
    }
    (src, images)
}

fn keygen(path: &Path) -> String {
    let out = ringfeed().arg("keygen").arg(path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// `ringfeed pack SRC OUT --encrypt-key-file KEY EXTRA…`.
fn pack(src: &Path, out: &Path, key: &Path, extra: &[&str]) {
    let result = ringfeed()
        .arg("pack")
        .args([src, out])
        .arg("--encrypt-key-file")
        .arg(key)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

fn shard_paths(dir: &Path) -> Vec<PathBuf> {
    let mut shards: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    shards.sort();
    shards
}

/// `(name, data offset, size)` of every member of a tar file.
fn members(bytes: &[u8]) -> Vec<(String, usize, usize)> {
    ringfeed::source::tar::entries(bytes, bytes.len() as u64)
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8(e.path).unwrap(),
                e.data_offset as usize,
                e.size as usize,
            )
        })
        .collect()
}

fn config(dir: &Path, shards: &Path, name: &str, shuffle: &str, key: Option<&Path>) -> PathBuf {
    let key_line = key.map_or_else(String::new, |k| {
        format!("key-file = {:?}", k.display().to_string())
    });
    let text = format!(
        r#"
[source]
kind = "tar"
shards = ["{}/shard-*.tar"]
{key_line}

[sampling]
seed = 5
shuffle = {shuffle}
drop-last = true

[batch]
size = 3

[augment]
random-resized-crop = {{ size = 16 }}
normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }}

[ring]
name = "{name}"
slots-per-lane = 2
"#,
        shards.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The class a served image shows: the brightest channel's index, counted from blue.
fn class_of(images: &[f32], n: usize) -> i64 {
    let per = 3 * 16 * 16;
    let mean = |ch: usize| {
        let s = &images[n * per + ch * 256..n * per + (ch + 1) * 256];
        s.iter().sum::<f32>() / 256.0
    };
    let bright = (0..3).max_by(|&a, &b| mean(a).total_cmp(&mean(b))).unwrap();
    2 - bright as i64
}

/// Consumes every lane of ring `name` until the daemon finishes; returns, per sample id, how
/// often it was served. Panics if a served image's colour disagrees with its label.
fn consume_all(runtime: &Path, name: &str, lanes: u32) -> BTreeMap<i64, u32> {
    let handles: Vec<_> = (0..lanes)
        .map(|lane| {
            let mut opts = AttachOptions::new(name, lane);
            opts.dir = Some(RuntimeDir::at(runtime));
            std::thread::spawn(move || {
                let consumer = Consumer::attach_with(&opts).unwrap();
                let mut seen = Vec::new();
                common::drain(&consumer, |batch| {
                    let labels: &[i64] = batch.tensor("labels").unwrap();
                    let images: &[f32] = batch.tensor("images").unwrap();
                    let ids: &[i64] = batch.tensor("sample_ids").unwrap();
                    for (n, (&label, &id)) in labels.iter().zip(ids).enumerate() {
                        assert_eq!(class_of(images, n), label, "sample {id}, lane {lane}");
                        seen.push(id);
                    }
                });
                seen
            })
        })
        .collect();
    let mut counts = BTreeMap::new();
    for handle in handles {
        for id in handle.join().unwrap() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn packed_shards_hold_no_image_label_or_ordinal_in_the_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, images) = image_folder(tmp.path(), 4);
    let key = tmp.path().join("data.key");
    let said = keygen(&key);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // keygen never overwrites a key.
    let again = ringfeed().arg("keygen").arg(&key).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    for (out, extra) in [("visible", &[][..]), ("hidden", &["--hide-names"][..])] {
        let out = tmp.path().join(out);
        pack(
            &src,
            &out,
            &key,
            &[&["--samples-per-shard", "5"][..], extra].concat(),
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        let key_id = index["encryption"]["key-id"].as_str().unwrap();
        assert!(
            said.contains(key_id),
            "keygen said {said:?}, index has {key_id}"
        );
        assert_eq!(index["samples"], 12);

        let mut windows = HashSet::new();
        let shards = shard_paths(&out);
        assert_eq!(shards.len(), 3);
        let all: Vec<Vec<u8>> = shards.iter().map(|p| std::fs::read(p).unwrap()).collect();
        for bytes in &all {
            let names: Vec<String> = members(bytes).into_iter().map(|m| m.0).collect();
            assert_eq!(names[0], "__ringfeed-crypt__.json");
            assert_eq!(names[names.len() - 1], "__ringfeed-manifest__.sealed");
            let samples = &names[1..names.len() - 1];
            assert!(samples.iter().all(|n| !n.ends_with(".cls")), "{names:?}");
            if extra.is_empty() {
                assert!(samples.iter().all(|n| n.ends_with(".jpg")), "{names:?}");
            } else {
                assert!(
                    samples.iter().all(|n| n.len() == 36
                        && n.ends_with(".img")
                        && n[..32].bytes().all(|b| b.is_ascii_hexdigit())),
                    "{names:?}"
                );
            }
            windows.extend(bytes.windows(24));
        }
        // Not one 24-byte run of any source image (headers, tables, entropy-coded data)
        // appears anywhere in the shards. All-zero runs are tar padding, not image data.
        for (n, image) in images.iter().enumerate() {
            for w in image.windows(24).filter(|w| w.iter().any(|&b| b != 0)) {
                assert!(
                    !windows.contains(w),
                    "image {n} appears in the clear in {out:?}"
                );
            }
        }
    }
}

#[test]
fn every_shuffle_mode_round_trips_across_lanes_and_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = image_folder(tmp.path(), 8);
    let key = tmp.path().join("k");
    keygen(&key);
    let shards = tmp.path().join("shards");
    pack(&src, &shards, &key, &["--samples-per-shard", "5"]);
    let every_id: Vec<i64> = (0..24).collect();

    for (n, shuffle) in [
        r#""global""#,
        r#"{ mode = "block", block-size = 4, window = 2 }"#,
        r#"{ mode = "buffer", size = 5 }"#,
        r#""none""#,
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("crypt{n}");
        let cfg = config(tmp.path(), &shards, &name, shuffle, Some(&key));
        let runtime = RuntimeTmp::new();
        let mut daemon = Daemon::start(
            runtime.path(),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--lanes",
                "2",
                "--epochs",
                "1",
                "--exit-when-done",
            ],
        );
        // A daemon holding a key writes no core dump.
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", daemon.child.id())).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert_eq!(
            &core.split_whitespace().collect::<Vec<_>>()[4..6],
            ["0", "0"],
            "{core}"
        );
        let counts = consume_all(runtime.path(), &name, 2);
        assert!(daemon.wait(Duration::from_secs(60)).success());
        assert_eq!(
            counts.keys().copied().collect::<Vec<_>>(),
            every_id,
            "{shuffle}"
        );
        assert!(counts.values().all(|&c| c == 1), "{shuffle}: {counts:?}");
    }

    // Two nodes of two lanes each, the key given on the command line.
    let runtimes = [RuntimeTmp::new(), RuntimeTmp::new()];
    let mut daemons = Vec::new();
    for node in 0..2u32 {
        let cfg = config(
            tmp.path(),
            &shards,
            &format!("node{node}"),
            r#""global""#,
            None,
        );
        let first = (2 * node).to_string();
        daemons.push(Daemon::start(
            runtimes[node as usize].path(),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--lanes",
                "2",
                "--world-size",
                "4",
                "--first-rank",
                &first,
                "--epochs",
                "1",
                "--exit-when-done",
                "--key-file",
                key.to_str().unwrap(),
            ],
        ));
    }
    let mut counts = BTreeMap::new();
    for (node, runtime) in runtimes.iter().enumerate() {
        for (id, c) in consume_all(runtime.path(), &format!("node{node}"), 2) {
            *counts.entry(id).or_insert(0) += c;
        }
    }
    for daemon in &mut daemons {
        assert!(daemon.wait(Duration::from_secs(60)).success());
    }
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), every_id);
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
}

/// Runs `ringfeed serve` expecting it to fail at start; returns its stderr.
fn serve_fails(cfg: &Path, args: &[&str]) -> String {
    let runtime = RuntimeTmp::new();
    let out = ringfeed()
        .arg("serve")
        .arg("--config")
        .arg(cfg)
        .args(["--epochs", "1", "--exit-when-done"])
        .args(args)
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .env_remove("RINGFEED_KEY_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "served anyway:\n{stderr}");
    assert!(!stderr.contains("serving ring"), "{stderr}");
    stderr
}

#[test]
fn wrong_missing_or_exposed_keys_stop_the_daemon_at_start_naming_the_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = image_folder(tmp.path(), 2);
    let (key, other) = (tmp.path().join("right.key"), tmp.path().join("other.key"));
    keygen(&key);
    keygen(&other);
    let shards = tmp.path().join("shards");
    pack(&src, &shards, &key, &[]);
    let cfg = config(tmp.path(), &shards, "keys", r#""global""#, None);

    let err = serve_fails(&cfg, &["--key-file", other.to_str().unwrap()]);
    assert!(
        err.contains("wrong key") && err.contains(other.to_str().unwrap()),
        "{err}"
    );

    let err = serve_fails(&cfg, &[]);
    assert!(
        err.contains("is encrypted") && err.contains("--key-file"),
        "{err}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = serve_fails(&cfg, &["--key-file", key.to_str().unwrap()]);
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("0640"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let err = serve_fails(&cfg, &["--key-file", key.to_str().unwrap()]);
    assert!(err.contains("0604"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A plaintext shard slipped in beside the encrypted ones is refused, not served.
    std::fs::write(
        shards.join("shard-000009.tar"),
        common::tar(&[("x.jpg", solid_jpeg(0, 0)), ("x.cls", b"0".to_vec())]),
    )
    .unwrap();
    let err = serve_fails(&cfg, &["--key-file", key.to_str().unwrap()]);
    assert!(
        err.contains("shard-000009.tar") && err.contains("not encrypted"),
        "{err}"
    );
    std::fs::remove_file(shards.join("shard-000009.tar")).unwrap();

    // peek reads the key the same way, here from RINGFEED_KEY_FILE.
    let grid = tmp.path().join("grid.png");
    let out = ringfeed()
        .args(["peek", "--config"])
        .arg(&cfg)
        .env("RINGFEED_KEY_FILE", &key)
        .arg("--out")
        .arg(&grid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(grid.exists());
}

#[test]
fn flipped_and_swapped_members_are_skipped_counted_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = image_folder(tmp.path(), 8);
    let key = tmp.path().join("k");
    keygen(&key);
    let shards = tmp.path().join("shards");
    pack(&src, &shards, &key, &["--samples-per-shard", "24"]);
    let shard = shard_paths(&shards).remove(0);
    let pristine = std::fs::read(&shard).unwrap();
    let images: Vec<_> = members(&pristine)
        .into_iter()
        .filter(|m| m.0.ends_with(".jpg"))
        .collect();
    // A bit flipped in the middle of one member; another's bytes replaced by those of a
    // third member of the same size (a swap the tar headers cannot show).
    let flipped = &images[0];
    let (swapped, donor) = images[1..]
        .iter()
        .enumerate()
        .find_map(|(i, a)| images[i + 2..].iter().find(|b| b.2 == a.2).map(|b| (a, b)))
        .expect("two members of the same size");
    let mut bytes = pristine.clone();
    bytes[flipped.1 + flipped.2 / 2] ^= 0x10;
    let donor_bytes = pristine[donor.1..donor.1 + donor.2].to_vec();
    bytes[swapped.1..swapped.1 + swapped.2].copy_from_slice(&donor_bytes);
    std::fs::write(&shard, &bytes).unwrap();

    let cfg = config(tmp.path(), &shards, "tampered", r#""none""#, Some(&key));
    let runtime = RuntimeTmp::new();
    let mut daemon = Daemon::start(
        runtime.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--epochs",
            "1",
            "--exit-when-done",
            "--max-skip-fraction",
            "0.2",
        ],
    );
    // Every served image matches its label: nothing forged got through.
    let counts = consume_all(runtime.path(), "tampered", 1);
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(status.success(), "{log}");
    for name in [&flipped.0, &swapped.0] {
        assert!(
            log.lines()
                .any(|l| l.contains(name.as_str()) && l.contains("failed authentication")),
            "{name} not named as failing authentication:\n{log}"
        );
    }
    assert!(!log.contains(&format!("{} failed", donor.0)), "{log}");
    // Members are in pack order in a single shard: ids are their positions.
    let position = |name: &str| images.iter().position(|m| m.0 == name).unwrap() as i64;
    assert!(!counts.contains_key(&position(&flipped.0)), "{counts:?}");
    assert!(!counts.contains_key(&position(&swapped.0)), "{counts:?}");
    assert!(log.contains("skipped"), "{log}");

    // Many failed members trip workers.max-skip-fraction (default 0.05).
    let mut bytes = pristine;
    for m in &images[..12] {
        bytes[m.1 + m.2 - 1] ^= 1;
    }
    std::fs::write(&shard, &bytes).unwrap();
    let runtime = RuntimeTmp::new();
    let mut daemon = Daemon::start(runtime.path(), &["--config", cfg.to_str().unwrap()]);
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("max-skip-fraction") && log.contains("failed authentication"),
        "{log}"
    );
}

#[test]
fn bench_times_encrypted_shards_against_plaintext_copies_in_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = image_folder(tmp.path(), 3);
    let key = tmp.path().join("k");
    keygen(&key);
    let (enc, plain) = (tmp.path().join("enc"), tmp.path().join("plain"));
    pack(&src, &enc, &key, &[]);
    assert!(ringfeed()
        .arg("pack")
        .args([&src, &plain])
        .status()
        .unwrap()
        .success());
    let cfg = config(tmp.path(), &enc, "bench", r#""global""#, Some(&key));
    let runtime = RuntimeTmp::new();
    let out = ringfeed()
        .args(["bench", "--config"])
        .arg(&cfg)
        .args([
            "--stages-only",
            "--samples",
            "100",
            "--repeats",
            "1",
            "--workers",
            "1",
        ])
        .arg("--baseline-shards")
        .arg(plain.join("shard-*.tar"))
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let us = |row: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {row} |")))
            .unwrap_or_else(|| panic!("no row {row:?} in\n{stdout}"));
        assert_eq!(line.split('|').nth(2).unwrap().trim(), "9", "{line}");
        line.split('|').nth(3).unwrap().trim().parse().unwrap()
    };
    assert!(us("baseline (--baseline-shards)") > 0.0);
    assert!(us("this dataset") > 0.0);
    assert!(
        stdout.contains("CPU per sample against the baseline"),
        "{stdout}"
    );
}
