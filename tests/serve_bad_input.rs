//! Bad input never stops the daemon: corrupt or truncated images, missing or non-integer
//! labels, unknown extensions, members that try to leave the shard and a truncated tar are
//! skipped, counted and named in the log, while every batch is still served. Past the
//! configured failure share the daemon stops with a clear error instead.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    drain, free_addr, http_get, jpeg, lane_options, serve_finite, small_config, tar, Daemon,
};
use ringfeed::ring::Consumer;

fn member(name: &str, bytes: Vec<u8>) -> (String, Vec<u8>) {
    (name.to_owned(), bytes)
}

#[test]
fn corrupt_samples_are_skipped_counted_and_named_and_serving_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let mut members = Vec::new();
    for i in 0..30u32 {
        members.push(member(&format!("good_{i:03}.jpg"), jpeg(80, 60, i)));
        members.push(member(&format!("good_{i:03}.cls"), b"3".to_vec()));
    }
    let mut truncated = jpeg(80, 60, 99);
    truncated.truncate(truncated.len() / 3);
    members.extend([
        // Decode-time failures: indexed, then skipped when read.
        member(
            "corrupt.jpg",
            b"\xff\xd8\xff\xe0 this is not a jpeg at all".to_vec(),
        ),
        member("corrupt.cls", b"1".to_vec()),
        member("truncated.jpg", truncated),
        member("truncated.cls", b"1".to_vec()),
        // Index-time failures.
        member("nolabel.jpg", jpeg(40, 40, 1)),
        member("badlabel.jpg", jpeg(40, 40, 2)),
        member("badlabel.cls", b"cat".to_vec()),
        member("strange.bmpx", b"??".to_vec()),
        member("strange.cls", b"2".to_vec()),
        member("../escape.jpg", jpeg(40, 40, 3)),
        member("../escape.cls", b"2".to_vec()),
    ]);
    let mut shard0 = tar(&members);
    // A second shard cut in the middle of a member.
    let mut shard1 = tar(&[
        member("tail_000.jpg", jpeg(64, 64, 5)),
        member("tail_000.cls", b"4".to_vec()),
        member("tail_001.jpg", jpeg(64, 64, 6)),
        member("tail_001.cls", b"4".to_vec()),
    ]);
    shard1.truncate(shard1.len() - 1024 - 300);
    std::fs::write(data.path().join("shard-000000.tar"), &shard0).unwrap();
    std::fs::write(data.path().join("shard-000001.tar"), &shard1).unwrap();
    shard0.clear();

    let spec = format!("{}/shard-{{000000..000001}}.tar", data.path().display());
    let config = small_config(data.path(), &spec, "badinput");
    let extra = ["--batch-size", "2", "--max-skip-fraction", "0.3"];
    let mut daemon = serve_finite(runtime.path(), &config, "2", &extra);
    let consumer = Consumer::attach_with(&lane_options(runtime.path(), "badinput", 0)).unwrap();
    let mut ids = BTreeSet::new();
    let batches = drain(&consumer, |batch| {
        ids.extend(batch.tensor::<i64>("sample_ids").unwrap().iter().copied());
        let labels = batch.tensor::<i64>("labels").unwrap();
        // Good samples have label 3, the tail 4, the two broken JPEGs 1. A truncated JPEG
        // can still be served when the crop's region lies before the cut (region decoding
        // never reads past it); then its pixels are real.
        assert!(
            labels.iter().all(|&l| l == 3 || l == 4 || l == 1),
            "{labels:?}"
        );
    });
    // Detach, as a trainer does at its end: the daemon exits at once (it would otherwise
    // linger for an attached consumer, ring-format §7).
    drop(consumer);
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(status.success(), "{status}\n{log}");
    // 30 good + 2 undecodable + 2 tail samples before the cut are indexed: 17 batches of 2
    // per epoch, every row filled (undecodable samples are replaced by fallbacks).
    assert!(log.contains("34 samples"), "{log}");
    assert_eq!(batches, 2 * 17, "{log}");
    // Index-time issues are named with shard and member.
    for needle in [
        "nolabel",
        "badlabel",
        "bmpx",
        "escape.jpg",
        "shard-000001.tar",
    ] {
        assert!(
            log.contains(needle),
            "log does not mention {needle}:\n{log}"
        );
    }
    // Decode-time failures are named and counted, and never served.
    assert!(log.contains("corrupt.jpg"), "{log}");
    assert!(log.contains("truncated.jpg"), "{log}");
    // Sample 30 (corrupt.jpg) can never be decoded, so it is never served.
    assert!(!ids.contains(&30), "the undecodable sample was served");
    assert!(ids.len() >= 30);
}

#[test]
fn too_many_failures_stop_the_daemon_with_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let mut members = Vec::new();
    for i in 0..4u32 {
        members.push(member(&format!("good_{i}.jpg"), jpeg(64, 64, i)));
        members.push(member(&format!("good_{i}.cls"), b"0".to_vec()));
    }
    for i in 0..12u32 {
        members.push(member(
            &format!("bad_{i}.jpg"),
            vec![0xff, 0xd8, 0xff, 0, 1, 2, 3],
        ));
        members.push(member(&format!("bad_{i}.cls"), b"0".to_vec()));
    }
    std::fs::write(data.path().join("shard-000000.tar"), tar(&members)).unwrap();
    let spec = format!("{}/shard-000000.tar", data.path().display());
    let config = small_config(data.path(), &spec, "toobad");
    let mut daemon = Daemon::start(
        runtime.path(),
        &["--config", config.to_str().unwrap(), "--batch-size", "4"],
    );
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(
        !status.success(),
        "daemon kept serving a mostly broken dataset\n{log}"
    );
    assert!(log.contains("max-skip-fraction"), "{log}");
    assert!(!runtime.path().join("toobad.sock").exists());
}

#[test]
fn labels_no_class_has_are_skipped_counted_and_named() {
    let data = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let mut members = Vec::new();
    for i in 0..16u32 {
        members.push(member(&format!("good_{i:03}.jpg"), jpeg(48, 40, i)));
        members.push(member(
            &format!("good_{i:03}.cls"),
            (i % 5).to_string().into_bytes(),
        ));
    }
    // Each is skipped for its own reason; `num-classes = 5` below makes 5 out of range.
    let bad: [(&str, &[u8]); 4] = [
        ("negative", b"-1"),
        ("word", b"cat"),
        ("overflow", b"99999999999999999999"),
        ("toohigh", b"5"),
    ];
    for (i, (key, label)) in bad.iter().enumerate() {
        members.push(member(&format!("{key}.jpg"), jpeg(48, 40, 100 + i as u32)));
        members.push(member(&format!("{key}.cls"), label.to_vec()));
    }
    std::fs::write(data.path().join("labels.tar"), tar(&members)).unwrap();
    let spec = format!("{}/labels.tar", data.path().display());
    let config = small_config(data.path(), &spec, "labels");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("kind = \"tar\"", "kind = \"tar\"\nnum-classes = 5"),
    )
    .unwrap();
    // A free loopback port: bind port 0, note it, let it go.
    let metrics = free_addr();
    let extra = ["--max-skip-fraction", "0.3", "--metrics", &metrics];
    let mut daemon = serve_finite(runtime.path(), &config, "1", &extra);
    let consumer = Consumer::attach_with(&lane_options(runtime.path(), "labels", 0)).unwrap();
    // The ring counts the four once and names the first, with shard and member.
    let stat = std::process::Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["stat", "labels", "--once"])
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout).into_owned();
    assert!(stat.contains("skipped 4"), "{stat}");
    assert!(
        stat.contains("labels.tar:negative.jpg: label -1 is negative"),
        "{stat}"
    );
    let scraped = http_get(&metrics, "/metrics");
    assert!(
        scraped.contains("ringfeed_samples_skipped_total{ring=\"labels\"} 4"),
        "{scraped}"
    );
    assert!(
        scraped.contains("labels.tar:negative.jpg: label -1 is negative"),
        "{scraped}"
    );
    // Only the 16 valid samples are served: 2 batches of 8, so len() stays right.
    assert_eq!(consumer.layout().batches_per_epoch, 2);
    let mut served = Vec::new();
    drain(&consumer, |batch| {
        let labels = batch.tensor::<i64>("labels").unwrap();
        assert!(labels.iter().all(|l| (0..5).contains(l)), "{labels:?}");
        served.extend(batch.tensor::<i64>("sample_ids").unwrap().iter().copied());
    });
    served.sort_unstable();
    assert_eq!(served, (0..16).collect::<Vec<i64>>());
    // Detach, as a trainer does at its end: the daemon exits at once (it would otherwise
    // linger for an attached consumer, ring-format §7).
    drop(consumer);
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("16 samples"), "{log}");
    for reason in [
        "negative.jpg: label -1 is negative",
        "labels.tar:word: label \"cat\" is not an integer",
        "labels.tar:overflow: label \"99999999999999999999\" is not an integer",
        "toohigh.jpg: label 5 is not below num-classes = 5",
    ] {
        assert_eq!(
            log.matches(reason).count(),
            1,
            "{reason} not named once:\n{log}"
        );
    }
}
