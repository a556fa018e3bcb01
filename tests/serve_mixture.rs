//! Weighted mixtures of datasets (`[[source.streams]]`) through the real daemon: each epoch
//! takes exactly each stream's share (read back from the `source` tensor), never an id twice,
//! walks a large stream without repeats across epochs, splits across ranks, resumes mid-epoch
//! with the same bytes, and reports served counts per stream in `ringfeed stat`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{free_addr, http_get, jpeg, tar, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

/// `n` tiny samples in `shards` tar files under `dir/name/`; labels `i % 7`.
fn stream_dataset(dir: &Path, name: &str, n: u32, shards: u32) -> String {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let per = n / shards;
    for s in 0..shards {
        let members: Vec<(String, Vec<u8>)> = (s * per..(s + 1) * per)
            .flat_map(|i| {
                [
                    (format!("{name}_{i:05}.jpg"), jpeg(20, 16, i)),
                    (
                        format!("{name}_{i:05}.cls"),
                        format!("{}\n", i % 7).into_bytes(),
                    ),
                ]
            })
            .collect();
        std::fs::write(root.join(format!("shard-{s:06}.tar")), tar(&members)).unwrap();
    }
    format!("{}/shard-{{000000..{:06}}}.tar", root.display(), shards - 1)
}

fn mixture_config(dir: &Path, name: &str, shuffle: &str) -> std::path::PathBuf {
    let curated = stream_dataset(dir, "curated", 1000, 4);
    let web = stream_dataset(dir, "web", 1000, 4);
    let text = format!(
        r#"
[[source.streams]]
name = "curated"
kind = "tar"
shards = ["{curated}"]
weight = 3

[[source.streams]]
name = "web"
kind = "tar"
shards = ["{web}"]
weight = 1
label-offset = 100
augment = {{ center-crop = {{ size = 8 }}, normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }} }}

[sampling]
seed = 11
shuffle = "{shuffle}"
drop-last = true
samples-per-epoch = 800

[batch]
size = 8

[augment]
random-resized-crop = {{ size = 8 }}
horizontal-flip = {{ p = 0.5 }}
normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }}

[ring]
name = "{name}"
slots-per-lane = 3

[workers]
status-interval-s = 0.5
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// One served row: (sample id, label, stream).
type Row = (u64, i64, u16);

/// What a lane served: (epoch, batch index) → its rows, and → its bytes (images + source).
struct Served {
    rows: BTreeMap<(u64, u64), Vec<Row>>,
    bytes: BTreeMap<(u64, u64), Vec<u8>>,
}

fn read_lane(runtime: &Path, name: &str, lane: u32, resume: Option<(u64, u64)>) -> Served {
    let mut opts = AttachOptions::new(name, lane);
    opts.dir = Some(RuntimeDir::at(runtime));
    opts.resume = resume;
    let consumer = Consumer::attach_with(&opts).expect("attach");
    let names: Vec<String> = consumer
        .layout()
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(names, ["images", "labels", "sample_ids", "source", "valid"]);
    let mut served = Served {
        rows: BTreeMap::new(),
        bytes: BTreeMap::new(),
    };
    while let Some(batch) = consumer.next_timeout(Duration::from_secs(60)).unwrap() {
        let labels = batch.tensor_bytes(1).chunks(8);
        let ids = batch.tensor_bytes(2).chunks(8);
        let source = batch.tensor_bytes(3).chunks(2);
        let rows = ids
            .zip(labels)
            .zip(source)
            .map(|((id, label), source)| {
                (
                    u64::from_le_bytes(id.try_into().unwrap()),
                    i64::from_le_bytes(label.try_into().unwrap()),
                    u16::from_le_bytes(source.try_into().unwrap()),
                )
            })
            .collect();
        let key = (batch.epoch(), batch.index());
        served.rows.insert(key, rows);
        let mut bytes = batch.tensor_bytes(0).to_vec();
        bytes.extend_from_slice(batch.tensor_bytes(3));
        served.bytes.insert(key, bytes);
    }
    served
}

fn epoch_rows(lanes: &[&Served], epoch: u64) -> Vec<Row> {
    lanes
        .iter()
        .flat_map(|s| {
            s.rows
                .range((epoch, 0)..(epoch + 1, 0))
                .flat_map(|(_, r)| r.clone())
        })
        .collect()
}

/// 600 + 200 per epoch by the `source` tensor, no id twice in an epoch, the second stream's
/// 4 × 200 draws all distinct, labels offset for the second stream, ids in their ranges.
fn check_four_epochs(lanes: &[&Served]) {
    let mut web_seen = HashSet::new();
    for epoch in 0..4 {
        let rows = epoch_rows(lanes, epoch);
        assert_eq!(rows.len(), 800, "epoch {epoch}");
        let ids: HashSet<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(ids.len(), 800, "an id twice in epoch {epoch}");
        let curated = rows.iter().filter(|r| r.2 == 0).count();
        let web = rows.iter().filter(|r| r.2 == 1).count();
        assert_eq!((curated, web), (600, 200), "epoch {epoch}");
        for &(id, label, stream) in &rows {
            match stream {
                0 => assert!(id < 1000 && (0..7).contains(&label), "{id} {label}"),
                1 => {
                    assert!((1000..2000).contains(&id), "{id}");
                    assert_eq!(label, (id as i64 - 1000) % 7 + 100, "label-offset");
                    assert!(
                        web_seen.insert(id),
                        "web sample {id} served twice in 4 epochs"
                    );
                }
                other => panic!("stream {other}"),
            }
        }
    }
    assert_eq!(web_seen.len(), 800);
}

#[test]
fn a_mixture_serves_each_streams_share_with_no_repeats_on_one_and_two_ranks() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let config = mixture_config(data.path(), "mix", "global");
    let config = config.to_str().unwrap();

    let metrics = free_addr();
    let args = ["--config", config, "--epochs", "4", "--metrics", &metrics];
    let mut daemon = Daemon::start(runtime.path(), &args);
    let one = read_lane(runtime.path(), "mix", 0, None);
    check_four_epochs(&[&one]);
    let scrape = http_get(&metrics, "/metrics");
    for row in [
        "# TYPE ringfeed_stream_samples_total counter",
        "ringfeed_stream_samples_total{ring=\"mix\",stream=\"curated\"} 2400",
        "ringfeed_stream_samples_total{ring=\"mix\",stream=\"web\"} 800",
    ] {
        assert!(scrape.contains(row), "{row} not in\n{scrape}");
    }
    let stat = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["stat", "mix", "--once", "--json"])
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    assert!(
        stat.status.success(),
        "{}",
        String::from_utf8_lossy(&stat.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    let streams = report["streams"]
        .as_array()
        .expect("streams in stat --json");
    let served: Vec<(String, u64, u64)> = streams
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap().to_owned();
            (
                name,
                s["samples_per_epoch"].as_u64().unwrap(),
                s["served"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        served,
        [
            ("curated".to_owned(), 600, 2400),
            ("web".to_owned(), 200, 800)
        ]
    );
    daemon.wait_for_line("served curated 2400, web 800", Duration::from_secs(30));
    assert!(daemon.terminate().success());

    // Two ranks (two lanes of one daemon): the same shares, split without overlap.
    let daemon = Daemon::start(
        runtime.path(),
        &["--config", config, "--epochs", "4", "--lanes", "2"],
    );
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| read_lane(runtime.path(), "mix", 0, None));
        let b = s.spawn(|| read_lane(runtime.path(), "mix", 1, None));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.rows.len(), 4 * 50);
    assert_eq!(b.rows.len(), 4 * 50);
    check_four_epochs(&[&a, &b]);
    assert!(daemon.terminate().success());
}

#[test]
fn a_mixture_resumes_mid_epoch_with_the_same_bytes_in_every_shuffle_mode() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    for shuffle in ["global", "block", "buffer", "none"] {
        let config = mixture_config(data.path(), "mixr", shuffle);
        let args = ["--config", config.to_str().unwrap(), "--epochs", "2"];
        let daemon = Daemon::start(runtime.path(), &args);
        let full = read_lane(runtime.path(), "mixr", 0, None);
        assert_eq!(full.rows.len(), 200, "{shuffle}");
        check_shares(&full, shuffle);
        assert!(daemon.terminate().success());

        // One worker thread instead of one per core: the same bytes.
        let one_thread = [&args[..], &["--workers", "1"]].concat();
        let daemon = Daemon::start(runtime.path(), &one_thread);
        let single = read_lane(runtime.path(), "mixr", 0, None);
        assert!(
            single.bytes == full.bytes,
            "{shuffle}: bytes depend on the thread count"
        );
        assert!(daemon.terminate().success());

        let daemon = Daemon::start(runtime.path(), &args);
        let rest = read_lane(runtime.path(), "mixr", 0, Some((1, 37)));
        assert_eq!(rest.rows.len(), 100 - 37, "{shuffle}");
        for (key, bytes) in &rest.bytes {
            assert!(
                full.bytes[key] == *bytes,
                "{shuffle}: batch {key:?} differs after resume"
            );
        }
        assert!(daemon.terminate().success());
    }
}

fn check_shares(served: &Served, shuffle: &str) {
    for epoch in 0..2 {
        let rows = epoch_rows(&[served], epoch);
        let web = rows.iter().filter(|r| r.2 == 1).count();
        assert_eq!((rows.len(), web), (800, 200), "{shuffle} epoch {epoch}");
        let ids: HashSet<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(ids.len(), 800, "{shuffle}: an id twice in epoch {epoch}");
    }
}

#[test]
fn a_label_map_rewrites_labels_and_skips_what_it_does_not_map() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let curated = stream_dataset(data.path(), "curated", 280, 2);
    let web = stream_dataset(data.path(), "web", 280, 2);
    // Labels 0..=5 map to 10..=15; label 6 has no line: those samples are skipped.
    let map: String = (0..6).map(|l| format!("{l} {}\n", l + 10)).collect();
    std::fs::write(
        data.path().join("web-labels.txt"),
        format!("# web → ours\n{map}"),
    )
    .unwrap();
    // num-classes = 15 applies to the served labels: web's label 5 (served as 15) goes too.
    let text = format!(
        r#"
[source]
num-classes = 15
[[source.streams]]
name = "curated"
kind = "tar"
shards = ["{curated}"]
[[source.streams]]
name = "web"
kind = "tar"
shards = ["{web}"]
label-map = "{}/web-labels.txt"
[sampling]
seed = 3
drop-last = true
[batch]
size = 8
[augment]
random-resized-crop = {{ size = 8 }}
[ring]
name = "mapped"
[workers]
max-skip-fraction = 0.5
status-interval-s = 0.5
"#,
        data.path().display()
    );
    let config = data.path().join("mapped.toml");
    std::fs::write(&config, text).unwrap();
    let mut daemon = Daemon::start(
        runtime.path(),
        &["--config", config.to_str().unwrap(), "--epochs", "1"],
    );
    let served = read_lane(runtime.path(), "mapped", 0, None);
    let rows = epoch_rows(&[&served], 0);
    assert_eq!(rows.len(), 560);
    assert_eq!(
        rows.iter().filter(|r| r.2 == 1).count(),
        280,
        "fallbacks stay in the stream"
    );
    for &(id, label, stream) in &rows {
        if stream == 1 {
            assert!(
                (10..=14).contains(&label),
                "web sample {id} served with label {label}"
            );
            assert!(
                (id - 280) % 7 < 5,
                "an unmapped or out-of-range sample was served"
            );
        }
    }
    daemon.wait_for_line(
        "is not below [source] num-classes = 15",
        Duration::from_secs(30),
    );
    let line = daemon.wait_for_line("has no line in label-map", Duration::from_secs(30));
    assert!(
        line.contains("web: ") && line.contains("web-labels.txt"),
        "{line}"
    );
    assert!(daemon.terminate().success());
}

#[test]
fn bad_stream_configurations_are_refused_naming_the_stream() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let shards = stream_dataset(data.path(), "one", 16, 1);
    let top_shards = format!("kind = \"tar\"\nshards = [\"{shards}\"]");
    // (extra [source] keys, extra keys of the stream, what the error must say)
    let cases = [
        (top_shards.as_str(), "", "not in [source]"),
        (
            "",
            "label-offset = 3\nlabel-map = \"x.txt\"",
            "[[source.streams]] 0 (stream-0): give `label-offset` or `label-map`, not both",
        ),
        (
            "",
            "name = \"has space\"",
            "[[source.streams]] 0 (has space): name must be 1-32 characters",
        ),
        ("", "label-map = \"missing.txt\"", "cannot read label-map"),
    ];
    for (i, (top, stream, expected)) in cases.iter().enumerate() {
        let text = format!(
            "[source]\n{top}\n[[source.streams]]\nkind = \"tar\"\nshards = [\"{shards}\"]\n{stream}\n\
             [augment]\nrandom-resized-crop = {{ size = 8 }}\n[batch]\nsize = 4\n"
        );
        let config = data.path().join(format!("bad{i}.toml"));
        std::fs::write(&config, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("RINGFEED_RUNTIME_DIR", runtime.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} served");
        assert!(stderr.contains(expected), "case {i}: {stderr}");
    }
}
