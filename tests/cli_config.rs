//! Invalid configuration is refused before anything starts, with an error that names the key
//! (or file, or shard spec) and what is allowed; SIGTERM stops a serving daemon cleanly.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{small_config, write_dataset, Daemon};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

fn serve(args: &[&str], runtime: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .arg("serve")
        .args(args)
        .env("RINGFEED_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_name_the_key_and_the_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let spec = write_dataset(dir.path(), 1, 4);
    let good = small_config(dir.path(), &spec, "cfg");
    let text = std::fs::read_to_string(&good).unwrap();

    let cases = [
        (
            "unknown-key",
            text.replace("[batch]", "[batch]\nsizee = 3"),
            "sizee",
        ),
        ("bad-section", format!("{text}\n[augmentt]\n"), "augmentt"),
        (
            "bad-lanes",
            text.replace("slots-per-lane = 3", "slots-per-lane = 0"),
            "ring.slots-per-lane",
        ),
        (
            "bad-prob",
            text.replace("p = 0.5", "p = 1.5"),
            "horizontal-flip",
        ),
        (
            "bad-fraction",
            text.replace("status-interval-s = 0.5", "max-skip-fraction = 2.0"),
            "workers.max-skip-fraction",
        ),
    ];
    for (name, text, needle) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let (ok, stderr) = serve(&["--config", path.to_str().unwrap()], runtime.path());
        assert!(!ok, "{name}: accepted");
        assert!(
            stderr.contains(needle),
            "{name}: error does not name {needle:?}: {stderr}"
        );
    }

    let (ok, stderr) = serve(&["--config", "/nonexistent/x.toml"], runtime.path());
    assert!(!ok && stderr.contains("/nonexistent/x.toml"), "{stderr}");

    let missing = format!("{}/nothing-{{000..003}}.tar", dir.path().display());
    let (ok, stderr) = serve(
        &["--config", good.to_str().unwrap(), "--shards", &missing],
        runtime.path(),
    );
    assert!(!ok && stderr.contains("nothing-"), "{stderr}");

    let (ok, stderr) = serve(
        &["--config", good.to_str().unwrap(), "--name", "../x"],
        runtime.path(),
    );
    assert!(!ok && stderr.contains("ring.name"), "{stderr}");
}

#[test]
fn sigterm_finishes_cleanly_and_removes_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let spec = write_dataset(dir.path(), 1, 16);
    let config = small_config(dir.path(), &spec, "term");
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    let mut opts = AttachOptions::new("term", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let consumer = Consumer::attach_with(&opts).unwrap();
    let batch = consumer
        .next_timeout(Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert_eq!(batch.count(), 8);
    drop(batch);
    assert!(runtime.path().join("term.sock").exists());
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    assert!(!runtime.path().join("term.sock").exists());
    assert!(!runtime.path().join("term.lock").exists());
    // Batches published before the stop are still intact and may be taken; after them the
    // consumer learns that the producer is gone instead of hanging.
    let mut leftovers = 0;
    let err = loop {
        match consumer.next_timeout(Duration::from_secs(5)) {
            Ok(Some(_)) => leftovers += 1,
            other => break other,
        }
    };
    assert!(
        leftovers <= 3,
        "{leftovers} batches after stop, ring has 3 slots"
    );
    assert!(
        matches!(err, Err(ringfeed::ring::ConsumeError::ProducerGone { .. })),
        "{err:?}"
    );
}
