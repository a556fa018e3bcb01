//! Tar datasets end to end: sidecar index placement, reuse and staleness, members skipped at
//! index time, and errors when shards change under a running reader.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::tar;
use ringfeed::source::index::{index_path_beside, index_path_in};
use ringfeed::source::{
    load_or_build_index, Dataset, IssueReason, SampleReadError, SourceConfig, SourceError,
};

fn samples(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .flat_map(|i| {
            [
                (
                    format!("{prefix}_{i:04}.jpg"),
                    format!("jpeg-{prefix}-{i}").into_bytes(),
                ),
                (
                    format!("{prefix}_{i:04}.cls"),
                    format!("{}\n", i % 10).into_bytes(),
                ),
            ]
        })
        .collect()
}

fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    fs::write(path, tar(members)).unwrap();
}

fn cfg(spec: &str, index_dir: Option<&Path>) -> SourceConfig {
    let mut cfg = SourceConfig::tar([spec]);
    cfg.index_dir = index_dir.map(Path::to_path_buf);
    cfg
}

fn read(ds: &Dataset, id: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    ds.read_into(id, &mut buf).unwrap();
    buf
}

#[test]
fn index_is_written_beside_the_shard_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let shard = dir.path().join("shard-000000.tar");
    write_tar(&shard, &samples("img", 5));

    let first = load_or_build_index(&shard, Some(&cache)).unwrap();
    assert!(!first.reused);
    assert_eq!(first.path, index_path_beside(&shard));
    assert!(dir.path().join("shard-000000.tar.idx").is_file());
    assert!(
        !cache.exists(),
        "nothing goes to the cache when the shard dir is writable"
    );

    let second = load_or_build_index(&shard, Some(&cache)).unwrap();
    assert!(second.reused);
    assert_eq!(second.index, first.index);

    let ds = Dataset::open(&cfg("shard-000000.tar", Some(&cache)), dir.path()).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(read(&ds, 3), b"jpeg-img-3");
    assert_eq!(ds.describe(3), "shard-000000.tar:img_0003.jpg");
}

#[test]
fn stale_or_corrupt_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("s.tar");
    write_tar(&shard, &samples("a", 2));
    assert!(!load_or_build_index(&shard, None).unwrap().reused);

    // Size change: the shard grew by two samples.
    write_tar(&shard, &samples("a", 4));
    let rebuilt = load_or_build_index(&shard, None).unwrap();
    assert!(!rebuilt.reused);
    assert_eq!(rebuilt.index.samples.len(), 4);

    // Same size, other contents and mtime: still detected.
    write_tar(&shard, &samples("b", 4));
    let later = SystemTime::now() + Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let rebuilt = load_or_build_index(&shard, None).unwrap();
    assert!(!rebuilt.reused);
    assert_eq!(rebuilt.index.samples[0].key, "b_0000");

    // A corrupt index file is replaced, not an error.
    fs::write(index_path_beside(&shard), b"{not json").unwrap();
    let rebuilt = load_or_build_index(&shard, None).unwrap();
    assert!(!rebuilt.reused);
    assert!(load_or_build_index(&shard, None).unwrap().reused);
}

/// Runs `f` as an unprivileged user when the tests run as root (root ignores permission bits),
/// by dropping the uid of one thread only.
fn as_unprivileged<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            if rustix::process::geteuid().is_root() {
                // The raw syscall changes this thread's credentials only, not the process's.
                rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(65534)).unwrap();
            }
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn read_only_shard_dir_puts_the_index_in_the_cache_dir() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let shards = dir.path().join("ro");
    fs::create_dir(&shards).unwrap();
    let shard = shards.join("s.tar");
    write_tar(&shard, &samples("r", 3));
    fs::set_permissions(&shard, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&shards, fs::Permissions::from_mode(0o555)).unwrap();
    let cache = dir.path().join("cache");
    fs::create_dir(&cache).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();

    let (first, second, len) = as_unprivileged(|| {
        let first = load_or_build_index(&shard, Some(&cache)).unwrap();
        let second = load_or_build_index(&shard, Some(&cache)).unwrap();
        let ds = Dataset::open(&cfg("ro/s.tar", Some(&cache)), dir.path()).unwrap();
        (first, second, ds.len())
    });
    assert!(!first.reused);
    assert_eq!(first.path, index_path_in(&cache, &shard));
    assert!(first.path.is_file());
    assert!(!index_path_beside(&shard).exists());
    assert!(second.reused);
    assert_eq!(second.path, first.path);
    assert_eq!(len, 3);
    let leftovers: Vec<PathBuf> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(leftovers, [first.path], "no temporary files left behind");
}

fn issues_of(
    members: &[(&str, &[u8])],
) -> (tempfile::TempDir, Dataset, Vec<(String, IssueReason)>) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("t.tar"), tar(members)).unwrap();
    let ds = Dataset::open(&cfg("t.tar", None), dir.path()).unwrap();
    let issues = ds
        .skipped_at_index()
        .iter()
        .map(|i| {
            assert_eq!(i.shard, dir.path().join("t.tar"));
            (i.member.clone(), i.reason.clone())
        })
        .collect();
    (dir, ds, issues)
}

#[test]
fn traversal_names_are_skipped_and_counted() {
    let (_dir, ds, issues) = issues_of(&[
        ("../up.jpg", b"x"),
        ("../up.cls", b"1"),
        ("/etc/abs.jpg", b"x"),
        ("ok/../../esc.jpg", b"x"),
        ("./fine.jpg", b"fine"),
        ("./fine.cls", b"4"),
    ]);
    assert_eq!(ds.len(), 1);
    assert_eq!(
        (ds.describe(0), ds.label(0)),
        ("t.tar:fine.jpg".to_owned(), 4)
    );
    let members: Vec<_> = issues.iter().map(|(m, r)| (m.as_str(), r)).collect();
    assert_eq!(
        members,
        [
            ("../up.jpg", &IssueReason::UnsafePath),
            ("../up.cls", &IssueReason::UnsafePath),
            ("/etc/abs.jpg", &IssueReason::UnsafePath),
            ("ok/../../esc.jpg", &IssueReason::UnsafePath),
        ]
    );
}

#[test]
fn missing_label_bad_label_and_unknown_ext_are_skipped_and_counted() {
    let (_dir, ds, issues) = issues_of(&[
        ("a.jpg", b"A"),
        ("a.cls", b" 3 \n"),
        ("nolabel.jpg", b"N"),
        ("badlabel.jpg", b"B"),
        ("badlabel.cls", b"three"),
        ("anim.gif", b"G"),
        ("anim.cls", b"1"),
        ("z.webp", b"Z"),
        ("z.cls", b"0"),
        // No class has a negative label: a cross-entropy loss would fail on it mid-training.
        ("neg.jpg", b"M"),
        ("neg.cls", b"-1"),
    ]);
    assert_eq!(ds.len(), 2);
    assert_eq!((ds.label(0), ds.label(1)), (3, 0));
    assert_eq!(read(&ds, 1), b"Z");
    assert_eq!(
        issues,
        [
            // Label checks run on the indexed samples, before the index's own issues.
            (
                "neg.jpg".to_owned(),
                IssueReason::NegativeLabel { label: -1 }
            ),
            ("nolabel".to_owned(), IssueReason::MissingLabel),
            (
                "badlabel".to_owned(),
                IssueReason::BadLabel {
                    text: "three".to_owned()
                }
            ),
            (
                "anim".to_owned(),
                IssueReason::UnknownExt {
                    exts: "gif".to_owned()
                }
            ),
        ]
    );
}

#[test]
fn truncated_tar_keeps_the_samples_before_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tar(&samples("t", 4));
    // Each sample is 2 members of 1024 bytes; cut in the middle of the third sample's image data.
    fs::write(dir.path().join("cut.tar"), &bytes[..2 * 2048 + 512 + 4]).unwrap();
    fs::write(dir.path().join("whole.tar"), &bytes).unwrap();
    let ds = Dataset::open(&cfg("{cut,whole}.tar", None), dir.path()).unwrap();
    assert_eq!(ds.len(), 2 + 4);
    assert_eq!(ds.shard_starts(), [0, 2]);
    assert_eq!(read(&ds, 1), b"jpeg-t-1");
    let issues = ds.skipped_at_index();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(issues[0].shard.ends_with("cut.tar"));
    assert!(issues[0].to_string().contains("truncated"), "{}", issues[0]);
}

#[test]
fn shard_replaced_by_a_directory_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("s.tar");
    write_tar(&shard, &samples("d", 2));
    let ds = Dataset::open(&cfg("s.tar", None), dir.path()).unwrap();
    fs::remove_file(&shard).unwrap();
    fs::create_dir(&shard).unwrap();
    let mut buf = Vec::new();
    let err = ds.read_into(1, &mut buf).unwrap_err();
    assert!(matches!(err, SampleReadError::Open { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("s.tar:d_0001.jpg") && text.contains("not a regular file"),
        "{text}"
    );
    assert!(buf.is_empty());
}

#[test]
fn shard_vanished_or_truncated_after_indexing_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("s.tar");
    write_tar(&shard, &samples("v", 3));
    let ds = Dataset::open(&cfg("s.tar", None), dir.path()).unwrap();
    assert_eq!(read(&ds, 0), b"jpeg-v-0");

    // Truncated under an open descriptor: the positioned read comes up short, the reopen
    // notices the new size.
    fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(1024)
        .unwrap();
    let mut buf = Vec::new();
    let err = ds.read_into(2, &mut buf).unwrap_err();
    assert!(matches!(err, SampleReadError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("s.tar:v_0002.jpg"), "{err}");

    fs::remove_file(&shard).unwrap();
    let err = ds.read_into(0, &mut buf).unwrap_err();
    assert!(matches!(err, SampleReadError::Open { .. }), "{err}");
}

#[test]
fn spec_matching_nothing_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::open(&cfg("missing-*.tar", None), dir.path()).unwrap_err();
    assert!(
        matches!(&err, SourceError::NoMatch { spec } if spec == "missing-*.tar"),
        "{err}"
    );
}

#[test]
fn index_command_writes_reuses_and_measures_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    for s in 0..2 {
        write_tar(
            &dir.path().join(format!("shard-{s:06}.tar")),
            &samples(&format!("s{s}"), 7),
        );
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringfeed"))
            .arg("index")
            .args(args)
            .arg("shard-{000000..000001}.tar")
            .current_dir(dir.path())
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run(&[]);
    assert_eq!(first.matches("(written)").count(), 2, "{first}");
    assert!(first.contains("2 shards, 14 samples, 0 skipped"), "{first}");
    assert!(dir.path().join("shard-000001.tar.idx").is_file());
    let second = run(&["--memory"]);
    assert_eq!(second.matches("(fresh, reused)").count(), 2, "{second}");
    let line = second
        .lines()
        .find(|l| l.starts_with("dataset of 14 samples opened in "))
        .unwrap_or_else(|| panic!("no memory line in:\n{second}"));
    let kib: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // "dataset of 14 samples opened in S s; RssAnon B KiB before, A KiB with …": 14, B, A.
    assert_eq!(kib.len(), 3, "{line}");
    assert!(kib[1] > 0 && kib[2] >= kib[1], "{line}");
}
