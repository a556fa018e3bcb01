//! Bad input never stops the daemon: corrupt or truncated images, missing or non-integer
//! labels, unknown extensions, members that try to leave the shard and a truncated tar are
//! skipped, counted and named in the log, while every batch is still served. Past the
//! configured failure share the daemon stops with a clear error instead.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{jpeg, small_config, tar, Daemon};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

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
    let mut daemon = Daemon::start(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--epochs",
            "2",
            "--exit-when-done",
            "--batch-size",
            "2",
            "--max-skip-fraction",
            "0.3",
        ],
    );
    let mut opts = AttachOptions::new("badinput", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let consumer = Consumer::attach_with(&opts).unwrap();
    let mut batches = 0;
    let mut ids = BTreeSet::new();
    while let Some(batch) = consumer.next_timeout(Duration::from_secs(60)).unwrap() {
        batches += 1;
        ids.extend(batch.tensor::<i64>("sample_ids").unwrap().iter().copied());
        let labels = batch.tensor::<i64>("labels").unwrap();
        // Good samples have label 3, the tail 4, the two broken JPEGs 1. A truncated JPEG
        // can still be served when the crop's region lies before the cut (region decoding
        // never reads past it); then its pixels are real.
        assert!(
            labels.iter().all(|&l| l == 3 || l == 4 || l == 1),
            "{labels:?}"
        );
    }
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
