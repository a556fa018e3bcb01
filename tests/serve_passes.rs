//! On-demand (evaluation) rings and one daemon serving several rings, through the real
//! daemon and the Rust consumer: a pass is asked for with `Consumer::start_pass`, every pass is
//! the same batches in the same order, nothing is produced between passes, a train and a val
//! ring share one worker pool, and `--metrics` shows both rings in one valid exposition.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{free_addr, http_get, write_dataset, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

/// A ring's configuration over `shards`: validation transforms, drop-last off.
fn ring_config(dir: &Path, name: &str, shards: &str, sampling: &str) -> PathBuf {
    let text = format!(
        r#"
[source]
kind = "tar"
shards = ["{shards}"]

[sampling]
seed = 3
drop-last = false
{sampling}

[batch]
size = 6

[augment]
resize = {{ size = 24 }}
center-crop = {{ size = 16 }}
output = {{ dtype = "u8", layout = "nchw" }}

[ring]
name = "{name}"
slots-per-lane = 2

[workers]
threads = 2
status-interval-s = 0.5
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn attach(runtime: &Path, name: &str) -> Consumer {
    let mut opts = AttachOptions::new(name, 0);
    opts.dir = Some(RuntimeDir::at(runtime));
    Consumer::attach_with(&opts).expect("attach")
}

/// One pass: (pass number, its ids in order, its image bytes).
fn pass(consumer: &Consumer) -> (u64, Vec<i64>, Vec<u8>) {
    let number = consumer.start_pass();
    let (mut ids, mut bytes) = (Vec::new(), Vec::new());
    common::drain(consumer, |batch| {
        assert_eq!(batch.epoch(), number, "a batch of another pass");
        ids.extend(batch.tensor::<i64>("sample_ids").unwrap());
        bytes.extend_from_slice(batch.tensor_bytes(0));
    });
    (number, ids, bytes)
}

#[test]
fn rust_consumer_passes_are_whole_identical_and_only_on_demand() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = write_dataset(tmp.path(), 2, 20);
    let val = ring_config(
        tmp.path(),
        "val",
        &shards,
        "shuffle = \"global\"\non-demand = true",
    );
    let runtime = RuntimeTmp::new();
    let daemon = Daemon::start(runtime.path(), &["--config", val.to_str().unwrap()]);
    let banner = daemon.log.last().unwrap();
    assert!(
        banner.contains("on-demand: 7 batches per pass per lane"),
        "{banner}"
    );
    let consumer = attach(runtime.path(), "val");
    assert!(consumer.layout().on_demand());
    assert_eq!(consumer.layout().epochs, 0);
    // Nothing is asked for: next() says so at once, and nothing was produced.
    assert!(consumer.next().unwrap().is_none());
    std::thread::sleep(Duration::from_millis(300));
    let (first_number, first_ids, first_bytes) = pass(&consumer);
    let (second_number, second_ids, second_bytes) = pass(&consumer);
    assert!(second_number > first_number);
    assert_eq!(first_ids.len(), 42); // 40 samples, the last batch padded to 6
    let mut distinct = first_ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct, (0..40).collect::<Vec<i64>>());
    assert_eq!(first_ids, second_ids);
    assert_eq!(first_bytes, second_bytes);
    // Abandon a pass after one batch: the next pass starts from the first batch again.
    consumer.start_pass();
    drop(
        consumer
            .next_timeout(Duration::from_secs(60))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(pass(&consumer).1, first_ids);
}

#[test]
fn one_daemon_serves_a_train_and_a_val_ring_with_both_in_its_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = write_dataset(tmp.path(), 2, 20);
    let train = ring_config(tmp.path(), "train", &shards, "epochs = 0");
    let val = ring_config(tmp.path(), "val", &shards, "on-demand = true");
    let runtime = RuntimeTmp::new();
    let addr = free_addr();
    let mut daemon = Daemon::spawn(
        runtime.path(),
        &[
            "--config",
            train.to_str().unwrap(),
            "--config",
            val.to_str().unwrap(),
            "--workers",
            "3",
            "--metrics",
            &addr,
        ],
    );
    daemon.wait_for_line("serving ring 'train'", Duration::from_secs(120));
    let banner = daemon.wait_for_line("serving ring 'val'", Duration::from_secs(30));
    assert!(
        banner.contains("3 workers shared by rings train, val"),
        "{banner}"
    );
    // Each ring's status line names it.
    daemon.wait_for_line("[train] ", Duration::from_secs(30));
    daemon.wait_for_line("[val] ", Duration::from_secs(30));
    let t = attach(runtime.path(), "train");
    let v = attach(runtime.path(), "val");
    let (_, ids, _) = pass(&v);
    assert_eq!(ids.len(), 42);
    // Training goes on during a pass: a train batch between every val batch.
    v.start_pass();
    let mut val_batches = 0;
    while let Some(batch) = v.next_timeout(Duration::from_secs(60)).unwrap() {
        drop(batch);
        val_batches += 1;
        let train_batch = t.next_timeout(Duration::from_secs(60)).unwrap();
        assert!(train_batch.is_some(), "the training ring ended");
    }
    assert_eq!(val_batches, 7);
    let body = http_get(&addr, "/metrics");
    for family in ["ringfeed_samples_total", "ringfeed_lane_published_total"] {
        assert_eq!(
            body.matches(&format!("# TYPE {family} ")).count(),
            1,
            "{family} declared once:\n{body}"
        );
    }
    assert!(body.contains("ringfeed_batches_published_total{ring=\"train\"}"));
    assert!(body.contains("ringfeed_batches_published_total{ring=\"val\"}"));
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    let stat = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringfeed"))
            .args(args)
            .env("RINGFEED_RUNTIME_DIR", runtime.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = stat(&["stat", "val", "--once"]);
    assert!(
        text.contains("on-demand: 7 batches per pass per lane"),
        "{text}"
    );
    assert!(text.contains("daemon serves rings: train, val"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(stat(&["stat", "train", "--once", "--json"]).trim()).unwrap();
    assert_eq!(json["on_demand"], false);
    assert_eq!(json["daemon_rings"], serde_json::json!(["train", "val"]));
}

/// One raw request line to `name`'s socket and its reply (which may be long).
fn raw_request(runtime: &Path, name: &str, line: &str) -> serde_json::Value {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut stream =
        std::os::unix::net::UnixStream::connect(runtime.join(format!("{name}.sock"))).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn classes_and_describe_requests_refuse_hostile_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = write_dataset(tmp.path(), 2, 20);
    std::fs::write(tmp.path().join("classes.txt"), "zero\none\ntwo\n").unwrap();
    let val = ring_config(tmp.path(), "val", &shards, "on-demand = true");
    let runtime = RuntimeTmp::new();
    let _daemon = Daemon::start(runtime.path(), &["--config", val.to_str().unwrap()]);
    let classes = raw_request(runtime.path(), "val", "{\"op\":\"classes\"}\n");
    assert_eq!(
        classes["classes"],
        serde_json::json!(["zero", "one", "two"])
    );
    let described = raw_request(
        runtime.path(),
        "val",
        "{\"op\":\"describe\",\"ids\":[0,39,40]}\n",
    );
    let samples = described["samples"].as_array().unwrap();
    assert!(samples[0]["shard"]
        .as_str()
        .unwrap()
        .ends_with("shard-000000.tar"));
    assert!(samples[1]["shard"]
        .as_str()
        .unwrap()
        .ends_with("shard-000001.tar"));
    assert!(samples[2]["error"].as_str().unwrap().contains("outside"));
    let many: Vec<String> = (0..129).map(|i| i.to_string()).collect();
    let refused = raw_request(
        runtime.path(),
        "val",
        &format!("{{\"op\":\"describe\",\"ids\":[{}]}}\n", many.join(",")),
    );
    assert!(refused["error"].as_str().unwrap().contains("at most 128"));
    let negative = raw_request(
        runtime.path(),
        "val",
        "{\"op\":\"describe\",\"ids\":[-1]}\n",
    );
    assert!(negative["error"]
        .as_str()
        .unwrap()
        .starts_with("bad request"));
    // The daemon still serves after the hostile requests.
    let consumer = attach(runtime.path(), "val");
    assert_eq!(pass(&consumer).1.len(), 42);
}
