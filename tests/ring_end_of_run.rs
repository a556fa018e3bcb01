//! The end of a finite run is not a crash (docs/ring-format.md §7 "The end of a finite
//! run"): the daemon lingers while consumers are attached, answers a re-attach with a
//! finished ring, keeps `FINISHED` when it exits and leaves `<name>.finished`; and refusals
//! carry machine-readable codes (§3). The same behaviour through every client, with pauses,
//! is tests/conformance/run.py.

mod common;

use std::time::{Duration, Instant};

use common::{drain, lane_options, serve_finite, small_config, Daemon, RuntimeTmp};
use ringfeed::ring::{AttachError, Consumer};

fn finite_daemon(runtime: &std::path::Path, data: &std::path::Path, name: &str) -> Daemon {
    let shards = format!(
        "{}/data/sample/shard-000000.tar",
        env!("CARGO_MANIFEST_DIR")
    );
    let config = small_config(data, &shards, name);
    serve_finite(runtime, &config, "1", &["--lanes", "2", "--linger", "60"])
}

#[test]
fn a_finished_daemon_lingers_for_attached_consumers_and_then_says_finished() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let mut daemon = finite_daemon(runtime.path(), data.path(), "fin");
    let lane0 = Consumer::attach_with(&lane_options(runtime.path(), "fin", 0)).unwrap();
    let lane1 = Consumer::attach_with(&lane_options(runtime.path(), "fin", 1)).unwrap();
    let per_lane = drain(&lane0, |_| {});
    assert!(per_lane > 0);
    assert_eq!(drain(&lane1, |_| {}), per_lane);
    // Every batch is released, both consumers still attached: the daemon lingers, and the
    // socket still answers. Lane 1 leaves and comes back: it is attached to the finished
    // ring, whose stream has ended (not "cannot connect").
    let generation = lane1.generation();
    drop(lane1);
    let mut again = lane_options(runtime.path(), "fin", 1);
    again.wait = Duration::from_secs(5); // our EOF may reach the daemon after the new request
    let lane1 = Consumer::attach_with(&again).unwrap();
    assert_eq!(lane1.generation(), generation);
    assert!(lane1
        .next_timeout(Duration::from_secs(10))
        .unwrap()
        .is_none());
    assert!(
        runtime.path().join("fin.sock").exists(),
        "the daemon left during its linger"
    );
    // Once every consumer has detached it exits at once (well within its 60 s linger), clean.
    drop(lane1);
    drop(lane0);
    let left = Instant::now();
    assert!(daemon.wait(Duration::from_secs(30)).success());
    assert!(left.elapsed() < Duration::from_secs(30));
    assert!(!runtime.path().join("fin.sock").exists());
    let marker = std::fs::read_to_string(runtime.path().join("fin.finished")).unwrap();
    assert!(
        marker.contains(&format!("\"generation_str\":\"{generation}\"")),
        "{marker}"
    );
    // A consumer that comes later is told the run finished: a permanent answer.
    match Consumer::attach_with(&lane_options(runtime.path(), "fin", 0)) {
        Err(e @ AttachError::Finished { .. }) => {
            assert_eq!(e.code(), "finished");
            assert!(!e.retryable());
            assert!(e.to_string().contains(&generation.to_string()), "{e}");
        }
        other => panic!("expected Finished, got {other:?}"),
    }
    // The next producer of the name removes the marker: a new run is not "finished".
    let mut next = finite_daemon(runtime.path(), data.path(), "fin");
    assert!(!runtime.path().join("fin.finished").exists());
    next.child.kill().unwrap();
    next.wait(Duration::from_secs(30));
}

#[test]
fn a_consumer_still_attached_past_the_linger_sees_the_end_not_a_crash() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let shards = format!(
        "{}/data/sample/shard-000000.tar",
        env!("CARGO_MANIFEST_DIR")
    );
    let config = small_config(data.path(), &shards, "gone");
    let mut daemon = serve_finite(runtime.path(), &config, "1", &["--linger", "0"]);
    let c = Consumer::attach_with(&lane_options(runtime.path(), "gone", 0)).unwrap();
    loop {
        let b = c.next_timeout(Duration::from_secs(60)).unwrap().unwrap();
        let end = b.last_of_epoch();
        drop(b);
        if end {
            break;
        }
    }
    // The last release lets the daemon exit (no linger) while we are still attached: the
    // ring we map stays FINISHED, so the stream ends cleanly.
    assert!(daemon.wait(Duration::from_secs(30)).success());
    assert!(c.next_timeout(Duration::from_secs(10)).unwrap().is_none());
}

#[test]
fn refusals_carry_codes_that_say_whether_to_retry() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let shards = format!(
        "{}/data/sample/shard-000000.tar",
        env!("CARGO_MANIFEST_DIR")
    );
    let config = small_config(data.path(), &shards, "codes");
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    let _holder = Consumer::attach_with(&lane_options(runtime.path(), "codes", 0)).unwrap();
    let held = Consumer::attach_with(&lane_options(runtime.path(), "codes", 0)).unwrap_err();
    assert_eq!(
        (held.code(), held.retryable()),
        ("lane_held", true),
        "{held}"
    );
    // Waiting on a held lane retries until the wait is over, then says why.
    let mut patient = lane_options(runtime.path(), "codes", 0);
    patient.wait = Duration::from_millis(500);
    let started = Instant::now();
    let err = Consumer::attach_with(&patient).unwrap_err();
    assert_eq!(err.code(), "lane_held");
    assert!(started.elapsed() >= patient.wait);
    let range = Consumer::attach_with(&lane_options(runtime.path(), "codes", 7)).unwrap_err();
    assert_eq!(
        (range.code(), range.retryable()),
        ("lane_range", false),
        "{range}"
    );
    let mut beyond = lane_options(runtime.path(), "codes", 0);
    beyond.resume = Some((u64::MAX, 0));
    let resume = Consumer::attach_with(&beyond).unwrap_err();
    assert_eq!(resume.code(), "resume_range", "{resume}");
    daemon.terminate();
    // No daemon any more, and no finished run: "not running", retryable.
    let none = Consumer::attach_with(&lane_options(runtime.path(), "codes", 0)).unwrap_err();
    assert_eq!(
        (none.code(), none.retryable()),
        ("not_running", true),
        "{none}"
    );
}
