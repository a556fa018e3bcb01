//! `ringfeed stat` against a real `ringfeed serve`: the JSON report's structure, its
//! deterministic values, and counters that move while a consumer drains the ring.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};
use serde_json::Value;

fn stat_once(runtime: &Path, name: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["stat", name, "--once", "--json"])
        .env("RINGFEED_RUNTIME_DIR", runtime)
        .output()
        .expect("running ringfeed stat");
    assert!(
        out.status.success(),
        "stat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "--once --json prints one line: {text}");
    serde_json::from_str(lines[0]).unwrap()
}

#[test]
fn stat_reports_a_live_ring_without_a_daemon_round_trip() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    // 2 shards × 16 samples, batch 8, drop_last: 4 batches per epoch on one lane.
    let spec = write_dataset(data.path(), 2, 16);
    let config = small_config(data.path(), &spec, "statring");
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);

    let stop = Arc::new(AtomicBool::new(false));
    let (attached_tx, attached_rx) = std::sync::mpsc::channel();
    let drainer = {
        let stop = Arc::clone(&stop);
        let dir = RuntimeDir::at(runtime.path());
        std::thread::spawn(move || {
            let mut opts = AttachOptions::new("statring", 0);
            opts.dir = Some(dir);
            let consumer = Consumer::attach_with(&opts).unwrap();
            attached_tx.send(()).unwrap();
            let mut taken = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(_batch)) = consumer.next_timeout(Duration::from_millis(200)) {
                    taken += 1;
                }
            }
            taken
        })
    };
    attached_rx.recv_timeout(Duration::from_secs(30)).unwrap();

    let first = stat_once(runtime.path(), "statring");
    assert_eq!(first["name"], "statring");
    assert_eq!(first["state"], "serving");
    assert_eq!(first["lanes"], 1);
    assert_eq!(first["slots_per_lane"], 3);
    assert_eq!(first["batch_size"], 8);
    assert_eq!(first["batches_per_epoch"], 4);
    assert_eq!(first["samples_per_epoch"], 32);
    assert_eq!(first["epochs"], 0);
    assert_eq!(first["producer_pid"], daemon.child.id());
    assert_eq!(first["samples_skipped"], 0);
    assert!(first["generation"].as_u64().unwrap() != 0);
    assert!(first["heartbeat_age_s"].as_f64().unwrap() < 3.0);
    for window in ["1s", "60s"] {
        let r = &first["rates"][window];
        for key in ["span_s", "images_per_s", "batches_per_s"] {
            assert!(r[key].as_f64().is_some(), "rates.{window}.{key}: {first}");
        }
    }
    assert!(first["verdict"].as_str().is_some_and(|v| !v.is_empty()));
    let lane = &first["lane_stats"][0];
    assert_eq!(lane["lane"], 0);
    assert_eq!(lane["consumer_pid"], std::process::id());
    let slots: u64 = ["ready", "held", "free", "writing"]
        .iter()
        .map(|k| lane[*k].as_u64().unwrap())
        .sum();
    assert_eq!(slots, 3);
    assert!(lane["index"].as_u64().unwrap() < 4);
    assert!(lane["consumer_wait_pct"].as_f64().is_some());
    let consumers = first["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["pid"], std::process::id());
    assert_eq!(consumers[0]["lane"], 0);

    // The consumer keeps draining, so the producer keeps writing.
    let second = stat_once(runtime.path(), "statring");
    assert_eq!(second["generation"], first["generation"]);
    let (a, b) = (
        first["samples_ok"].as_u64().unwrap(),
        second["samples_ok"].as_u64().unwrap(),
    );
    assert!(b > a, "samples_ok did not grow: {a} then {b}");
    assert!(second["batches_published"].as_u64() > first["batches_published"].as_u64());

    stop.store(true, Ordering::Relaxed);
    assert!(drainer.join().unwrap() > 0);
    assert!(daemon.terminate().success());
}

#[test]
fn stat_of_an_absent_ring_says_no_producer_runs() {
    let runtime = RuntimeTmp::new();
    std::fs::create_dir(runtime.path()).unwrap();
    let mut perms = std::fs::metadata(runtime.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
    std::fs::set_permissions(runtime.path(), perms).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["stat", "nosuchring", "--once"])
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no producer is running"), "{err}");
}

fn stat(runtime: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .arg("stat")
        .args(args)
        .env("RINGFEED_RUNTIME_DIR", runtime)
        .output()
        .expect("running ringfeed stat");
    assert!(
        out.status.success(),
        "stat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn stat_without_a_name_lists_the_rings_and_a_report_shows_ranks() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 1, 16);
    let config = small_config(data.path(), &spec, "listed");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--lanes",
        "2",
        "--world-size",
        "6",
        "--first-rank",
        "2",
        "--batch-size",
        "2",
    ];
    let daemon = Daemon::start(runtime.path(), &args);
    // A stale lock file of a dead producer is not a running ring.
    std::fs::write(runtime.path().join("gone.lock"), "999999999").unwrap();

    let list = stat(runtime.path(), &[]);
    assert!(list.contains("listed"), "{list}");
    assert!(list.contains("2 lane(s), world size 6"), "{list}");
    assert!(!list.contains("gone"), "{list}");
    let json: Value = serde_json::from_str(stat(runtime.path(), &["--json"]).trim()).unwrap();
    assert_eq!(json[0]["name"], "listed");
    assert_eq!(
        (
            json[0]["world_size"].as_u64(),
            json[0]["first_rank"].as_u64()
        ),
        (Some(6), Some(2))
    );

    let text = stat(runtime.path(), &["listed", "--once"]);
    assert!(text.contains("ranks 2-3 of world size 6"), "{text}");
    assert!(text.contains("lane 1 (rank 3):"), "{text}");
    // One second observed: the 60 s window says so instead of repeating the 1 s rate.
    assert!(
        text.contains("60 s: – (only 1 s observed so far)"),
        "{text}"
    );
    let report = stat_once(runtime.path(), "listed");
    assert_eq!(report["world_size"], 6);
    assert_eq!(report["lane_stats"][1]["rank"], 3);
    assert!(daemon.terminate().success());

    let none = stat(runtime.path(), &[]);
    assert!(none.contains("no ring is running"), "{none}");
}
