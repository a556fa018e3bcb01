//! The errors a newcomer meets first, rendered by the real binary: each names its cause once
//! (no OS error repeated by the error chain), and a hint appears only where it fits the cause.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{small_config, Daemon};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};

/// Runs `ringfeed ARGS` with the runtime directory `runtime`; returns (success, stderr).
fn ringfeed(runtime: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(args)
        .env("RINGFEED_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The error line names `cause` exactly once, repeats no OS error, and has each `hint` once.
fn assert_named_once(text: &str, cause: &str, hints: &[&str]) {
    assert_eq!(
        text.matches(cause).count(),
        1,
        "cause {cause:?} not once:\n{text}"
    );
    assert!(
        text.matches("(os error").count() <= 1,
        "an OS error repeated:\n{text}"
    );
    for hint in hints {
        assert_eq!(
            text.matches(hint).count(),
            1,
            "hint {hint:?} not once:\n{text}"
        );
    }
}

#[test]
fn no_daemon_names_the_socket_and_says_to_start_one() {
    let runtime = tempfile::tempdir().unwrap();
    std::fs::set_permissions(runtime.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, text) = ringfeed(runtime.path(), &["consume", "nodaemon", "--wait", "0"]);
    assert!(!ok);
    assert_named_once(
        &text,
        "nodaemon.sock: No such file or directory",
        &["no daemon serves this ring"],
    );
    assert!(!text.contains("--allow-group"), "{text}");
}

#[test]
fn a_missing_runtime_directory_says_where_it_was_looked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("never-made");
    let (ok, text) = ringfeed(&missing, &["consume", "x", "--wait", "0"]);
    assert!(!ok);
    let cause = format!("runtime directory {} does not exist", missing.display());
    assert_named_once(&text, &cause, &["RINGFEED_RUNTIME_DIR to the daemon's"]);
    assert!(
        !text.contains("No such file"),
        "the OS error adds nothing here:\n{text}"
    );
}

#[test]
fn another_users_ring_says_who_may_attach_and_how() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root to run a process as another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Traversable, so the refusal is about the runtime directory's owner, not its parent.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let runtime = tmp.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["consume", "theirs", "--wait", "0"])
        .env("RINGFEED_RUNTIME_DIR", &runtime)
        .output()
        .expect("setpriv (util-linux) runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_named_once(
        &text,
        "is owned by uid 0, not by this user (uid 65534)",
        &["--allow-group GROUP", "trust_uid=0", "--trust-uid 0"],
    );
}

#[test]
fn a_held_lane_names_the_consumer_holding_it() {
    let data = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let spec = format!(
        "{}/data/sample/shard-000000.tar",
        env!("CARGO_MANIFEST_DIR")
    );
    let config = small_config(data.path(), &spec, "held");
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    let mut opts = AttachOptions::new("held", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let _holder = Consumer::attach_with(&opts).unwrap();
    let (ok, text) = ringfeed(runtime.path(), &["consume", "held", "--wait", "0"]);
    assert!(!ok);
    let cause = format!("lane 0 is held by live consumer pid {}", std::process::id());
    assert_named_once(&text, &cause, &[]);
    assert!(!text.contains("no daemon serves"), "{text}");
    daemon.terminate();
}

#[test]
fn a_bad_config_key_is_named_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("typo.toml");
    std::fs::write(&config, "[source]\nkind = \"tar\"\nshardz = [\"a.tar\"]\n").unwrap();
    let (ok, text) = ringfeed(dir.path(), &["serve", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert_named_once(&text, "unknown field `shardz`", &[]);
    assert_eq!(text.matches("typo.toml").count(), 1, "{text}");
}

#[test]
fn a_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("gone-000000.tar");
    let (ok, text) = ringfeed(dir.path(), &["serve", "--shards", shard.to_str().unwrap()]);
    assert!(!ok);
    assert_named_once(&text, &format!("{} does not exist", shard.display()), &[]);
    // A relative one resolves against the current directory, and the message says so.
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["serve", "--shards", "gone-000000.tar"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let base = dir.path().canonicalize().unwrap();
    assert!(
        text.contains(&format!(
            "relative paths resolve against {}",
            base.display()
        )),
        "{text}"
    );
}
