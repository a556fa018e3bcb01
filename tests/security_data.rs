//! A dataset's author is not trusted (docs/security.md): files built here to attack the real
//! daemon — an 8 TiB sparse image, FIFOs named like images, sidecar indexes that are symlinks
//! (to `/dev/zero`, or to a valid index), a FIFO, oversized, or forged with a 2 GiB member —
//! are skipped or rebuilt, while the daemon keeps serving, its memory stays bounded, and
//! SIGTERM ends it at once.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{config_with_source, jpeg, samples, tar, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};
use ringfeed::source::build_index;

/// The daemon's address-space limit in these tests: far above what it needs, far below the
/// sizes the hostile files claim, so a runaway allocation fails in the daemon (and the test)
/// instead of swapping the machine.
const ADDRESS_SPACE: u64 = 6 << 30;
/// Peak resident memory allowed: the hostile files claim 2 GiB and 8 TiB.
const PEAK_RSS: u64 = 1 << 30;
/// What "SIGTERM exits at once" means here.
const EXIT_WITHIN: Duration = Duration::from_secs(2);
const EIGHT_TIB: u64 = 8 << 40;

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

fn sparse(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Takes every batch of lane 0 until the stream ends; returns the batches and sample ids.
fn drain(name: &str, runtime: &Path) -> (usize, BTreeSet<i64>) {
    let mut opts = AttachOptions::new(name, 0);
    opts.dir = Some(RuntimeDir::at(runtime));
    let consumer = Consumer::attach_with(&opts).unwrap();
    let mut ids = BTreeSet::new();
    let batches = common::drain(&consumer, |batch| {
        ids.extend(batch.tensor::<i64>("sample_ids").unwrap().iter().copied());
    });
    (batches, ids)
}

fn stop_promptly(daemon: Daemon) {
    let rss = daemon.peak_rss_bytes();
    assert!(rss < PEAK_RSS, "daemon peak RSS {rss} bytes");
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}");
    assert!(took < EXIT_WITHIN, "SIGTERM took {took:?}");
}

#[test]
fn sparse_and_fifo_images_are_skipped_and_serving_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let root = data.path().join("root");
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..12u32 {
            let path = root.join(class).join(format!("img_{i:03}.jpg"));
            std::fs::write(path, jpeg(64, 48, i)).unwrap();
        }
    }
    // Present when the daemon scans the tree.
    sparse(&root.join("a/huge.jpg"), EIGHT_TIB);
    mkfifo(&root.join("a/pipe.jpg"));
    let source = format!("kind = \"imagefolder\"\npath = \"{}\"", root.display());
    let config = config_with_source(data.path(), &source, "hostimg");
    let mut daemon = Daemon::start_with_memory_limit(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--max-skip-fraction",
            "0.5",
        ],
        ADDRESS_SPACE,
    );
    // Swapped in after the scan: listed images that became a FIFO and an 8 TiB sparse file.
    std::fs::remove_file(root.join("b/img_003.jpg")).unwrap();
    mkfifo(&root.join("b/img_003.jpg"));
    sparse(&root.join("b/img_004.jpg"), EIGHT_TIB);

    let (batches, ids) = drain("hostimg", runtime.path());
    // The skip warnings travel through a reader thread: a line written just before the last
    // batch was published may still be on its way, so each is awaited (with a deadline).
    for needle in ["huge.jpg", "pipe.jpg", "img_003.jpg", "img_004.jpg"] {
        if !daemon.log.iter().any(|line| line.contains(needle)) {
            daemon.wait_for_line(needle, Duration::from_secs(10));
        }
    }
    let log = daemon.log.join("\n");
    // 24 images listed (the two hostile ones skipped at the scan): 6 batches per epoch.
    assert_eq!(batches, 2 * 6, "{log}");
    assert!(ids.len() >= 20, "{ids:?}");
    assert!(log.contains("max-sample-bytes"), "{log}");
    stop_promptly(daemon);
}

#[test]
fn planted_oversized_and_forged_indexes_are_rebuilt_not_trusted() {
    use ringfeed::source::index::{decode_index, encode_index, max_index_bytes};
    const SHARDS: u32 = 10;
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let dir = data.path();
    let shard = |i: u32| dir.join(format!("shard-{i:06}.tar"));
    let beside = |i: u32| dir.join(format!("shard-{i:06}.tar.idx"));
    for i in 0..SHARDS {
        std::fs::write(shard(i), tar(&samples(&format!("s{i}"), 6))).unwrap();
    }
    let valid = |i: u32| encode_index(&build_index(&shard(i)).unwrap()).unwrap();
    // 0: a symlink to /dev/zero (an endless read); 1: a FIFO (a read that never starts).
    std::os::unix::fs::symlink("/dev/zero", beside(0)).unwrap();
    mkfifo(&beside(1));
    // 2: forged: fresh size and mtime (as `cp -p` keeps them), a valid checksum, and one
    // member claiming 2 GiB.
    let mut forged = build_index(&shard(2)).unwrap();
    forged.samples[0].size = 1 << 31;
    std::fs::write(beside(2), encode_index(&forged).unwrap()).unwrap();
    // 3: a symlink to a valid index kept elsewhere: a link can only have been planted.
    let elsewhere = dir.join("elsewhere.idx");
    std::fs::write(&elsewhere, valid(3)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, beside(3)).unwrap();
    // 4: a valid index padded past the size limit for its shard.
    let mut padded = valid(4);
    let limit = max_index_bytes(std::fs::metadata(shard(4)).unwrap().len());
    padded.resize(limit as usize + 1, 0);
    std::fs::write(beside(4), padded).unwrap();
    // 5: wrong magic; 6: one flipped bit (bad checksum); 7: truncated.
    let mut magic = valid(5);
    magic[0] ^= 0x20;
    std::fs::write(beside(5), magic).unwrap();
    let mut flipped = valid(6);
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    std::fs::write(beside(6), flipped).unwrap();
    let whole = valid(7);
    std::fs::write(beside(7), &whole[..whole.len() - 9]).unwrap();
    // 8: forged, valid checksum, an entry past the shard's end.
    let mut past = build_index(&shard(8)).unwrap();
    past.samples[5].offset = past.shard_size;
    std::fs::write(beside(8), encode_index(&past).unwrap()).unwrap();
    // 9: the JSON index of an earlier release under the new name, and a forged one under the
    // old name (never read any more).
    let old = serde_json::to_vec(&build_index(&shard(9)).unwrap()).unwrap();
    std::fs::write(beside(9), &old).unwrap();
    let mut old_forged = build_index(&shard(9)).unwrap();
    old_forged.samples[0].size = 1 << 31;
    old_forged.version = 2;
    let old_name = dir.join("shard-000009.tar.idx.json");
    std::fs::write(&old_name, serde_json::to_vec(&old_forged).unwrap()).unwrap();

    let spec = format!("{}/shard-{{000000..{:06}}}.tar", dir.display(), SHARDS - 1);
    let source = format!("kind = \"tar\"\nshards = [\"{spec}\"]");
    let config = config_with_source(dir, &source, "hostidx");
    let daemon = Daemon::start_with_memory_limit(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--epochs",
            "1",
            "--batch-size",
            "2",
        ],
        ADDRESS_SPACE,
    );
    let (batches, ids) = drain("hostidx", runtime.path());
    let log = daemon.log.join("\n");
    // Every sample of every shard is served: nothing the hostile indexes said was used.
    assert_eq!(batches, 3 * SHARDS as usize, "{log}");
    assert_eq!(ids, (0..6 * i64::from(SHARDS)).collect(), "{log}");
    for (i, why) in [
        (0, "symlink"),
        (1, ""),
        (2, "do not lie inside the shard"),
        (3, "symlink"),
        (4, "larger than"),
        (5, "no RFINDEX magic"),
        (6, "checksum mismatch"),
        (7, "truncated"),
        (8, "do not lie inside the shard"),
        (9, "JSON index of an earlier release"),
    ] {
        let path = beside(i);
        let line = log
            .lines()
            .find(|l| l.contains(&format!("{} of shard", path.display())))
            .unwrap_or_else(|| panic!("no warning about {}:\n{log}", path.display()));
        assert!(line.contains(why), "index {i}: {line}");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file(), "{} was not replaced", path.display());
        let rebuilt = decode_index(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(rebuilt, build_index(&shard(i)).unwrap());
    }
    assert_eq!(
        std::fs::read(&elsewhere).unwrap(),
        valid(3),
        "link target touched"
    );
    assert!(old_name.exists(), "the old JSON index is left alone");
    stop_promptly(daemon);
}
