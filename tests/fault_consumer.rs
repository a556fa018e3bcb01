//! Consumer faults against a real `ringfeed serve`: a consumer SIGKILLed while it holds several
//! batches (20 times in a row), and a consumer SIGSTOPped for longer than the stall threshold.
//! Consumers are this test binary re-executed as a child (`RINGFEED_FAULT_ROLE`).

mod common;
mod fault_support;

use std::time::Duration;

use common::{small_config, write_dataset, Daemon, RuntimeTmp};
use fault_support::{
    await_word, lane_state, observe, role, rss_kib, say, wait_until, Peer, Watchdog,
};
use ringfeed::ring::{AttachOptions, Consumer, RuntimeDir};
use rustix::process::Signal;

const ENTRY: &str = "role_entry";

/// Entry point of the consumer children; a no-op in the parent run.
#[test]
fn role_entry() {
    let Some(role) = role() else { return };
    let name = std::env::var("FAULT_RING").unwrap();
    let hold: usize = std::env::var("FAULT_HOLD").unwrap().parse().unwrap();
    assert_eq!(role, "hold", "unknown role {role}");
    let consumer = Consumer::attach(&name, 0).unwrap();
    // One batch taken and released first, so each child makes the daemon publish anew.
    drop(consumer.next().unwrap().expect("a batch"));
    let mut held = Vec::new();
    for _ in 0..hold {
        held.push(consumer.next().unwrap().expect("a batch"));
    }
    let seqs: Vec<String> = held.iter().map(|b| b.seq().to_string()).collect();
    say(&format!("HOLDING {}", seqs.join(",")));
    await_word("release");
    drop(held);
    for _ in 0..2 {
        drop(consumer.next().unwrap().expect("a batch"));
    }
    say("RESUMED");
    await_word("exit");
    std::process::exit(0);
}

fn hold_env(name: &str, hold: usize) -> Vec<(&'static str, String)> {
    vec![
        ("FAULT_RING", name.to_owned()),
        ("FAULT_HOLD", hold.to_string()),
    ]
}

/// Lane 0 with every slot `READY` and no consumer: what a lane looks like once a killed
/// consumer's batches are back and the producer has filled the rest.
fn wait_lane_full_and_vacant(runtime: &RuntimeTmp, name: &str, slots: u32) {
    let observer = observe(runtime.path(), name);
    wait_until(
        "the killed consumer's slots return and the lane refills",
        Duration::from_secs(30),
        || lane_state(&observer.snapshot(), 0) == (slots, 0, 0, 0, 0),
    );
}

#[test]
fn consumer_killed_while_holding_batches_20_times_leaves_slots_and_memory_unchanged() {
    let dog = Watchdog::arm("consumer kill loop", Duration::from_secs(300));
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 24);
    let config = small_config(data.path(), &spec, "ckill");
    let slots = 4u32;
    let mut daemon = Daemon::start(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--slots-per-lane",
            &slots.to_string(),
        ],
    );
    let daemon_pid = daemon.child.id();
    dog.guard(daemon_pid);
    let observer = observe(runtime.path(), "ckill");
    let generation = observer.layout().generation;

    // One cycle first: the ring's pages, the handshake paths and the allocator's arenas are
    // all touched once before the baseline is taken.
    let cycle = |round: usize| {
        let mut child = Peer::spawn(ENTRY, "hold", runtime.path(), &hold_env("ckill", 3));
        let held = child.expect("HOLDING");
        assert_eq!(held.split(',').count(), 3, "round {round}: {held}");
        // The held count is the producer's copy of the child's lane page (format 2.0): it
        // follows within a heartbeat.
        wait_until(
            &format!("round {round}: the ring shows the child holding 3"),
            Duration::from_secs(10),
            || {
                let (_, held, _, _, pid) = lane_state(&observer.snapshot(), 0);
                (held, pid) == (3, child.pid())
            },
        );
        child.sigkill();
        wait_lane_full_and_vacant(&runtime, "ckill", slots);
    };
    cycle(0);
    let rss_before = rss_kib(daemon_pid);
    let published_before = observer.snapshot().stats.batches_published;
    for round in 1..=20 {
        cycle(round);
    }
    let rss_after = rss_kib(daemon_pid);
    let snap = observer.snapshot();
    eprintln!("daemon RSS {rss_before} KiB after warm-up, {rss_after} KiB after 20 kills");

    // Same ring, same slot count, every slot accounted for, and the daemon kept producing.
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon exited");
    assert_eq!(observer.layout().generation, generation);
    assert_eq!(observer.layout().slots_per_lane, slots);
    assert_eq!(lane_state(&snap, 0), (slots, 0, 0, 0, 0));
    assert!(
        snap.stats.batches_published >= published_before + 20,
        "{} published before the loop, {} after",
        published_before,
        snap.stats.batches_published
    );
    // The ring is allocated once; a consumer costs the daemon a socket and a thread's worth
    // of stack at most while attached. 20 kills may leave allocator slack, never a leak
    // proportional to the kills: allow 5 % or 2 MiB, whichever is larger.
    let bound = (rss_before / 20).max(2048);
    assert!(
        rss_after <= rss_before + bound,
        "daemon RSS grew from {rss_before} KiB to {rss_after} KiB (bound +{bound} KiB)"
    );

    // A new consumer gets the last victim's three batches again (flagged), then new ones.
    // (Every child released one batch before holding three: the daemon published each time.)
    let mut opts = AttachOptions::new("ckill", 0);
    opts.dir = Some(RuntimeDir::at(runtime.path()));
    let consumer = Consumer::attach_with(&opts).unwrap();
    let mut seqs = Vec::new();
    let mut redelivered = 0;
    for _ in 0..8 {
        let b = consumer
            .next_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        redelivered += usize::from(b.redelivered());
        seqs.push(b.seq());
    }
    assert_eq!(redelivered, 3, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    drop(consumer);
    assert!(daemon.terminate().success());
}

#[test]
fn stopped_consumer_stalls_its_lane_is_reported_and_keeps_its_slots() {
    let dog = Watchdog::arm("SIGSTOP", Duration::from_secs(180));
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 24);
    let config = small_config(data.path(), &spec, "cstop");
    let mut daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);
    dog.guard(daemon.child.id());
    let observer = observe(runtime.path(), "cstop");

    let mut child = Peer::spawn(ENTRY, "hold", runtime.path(), &hold_env("cstop", 2));
    dog.guard(child.pid());
    child.expect("HOLDING");
    child.signal(Signal::STOP);
    let line = daemon.wait_for_line("lane 0 stalled", Duration::from_secs(60));
    assert!(line.contains(&format!("pid {}", child.pid())), "{line}");
    assert!(line.contains("stopped by a signal"), "{line}");
    assert!(line.contains("holds 2"), "{line}");
    // The status line marks the lane as well.
    daemon.wait_for_line("STALLED", Duration::from_secs(10));
    // Nothing is taken from a live process: its two slots stay held (taken, not released), the third is READY and
    // the producer waits.
    let snap = observer.snapshot();
    assert_eq!(lane_state(&snap, 0), (1, 2, 0, 0, child.pid()));
    let published = snap.stats.lanes[0].published;
    // `ringfeed stat` reports it too.
    let stat = std::process::Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["stat", "cstop", "--once", "--json"])
        .env("RINGFEED_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    assert!(stat.status.success(), "{stat:?}");
    let report: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    let stalled = report["lane_stats"][0]["stalled_s"].as_f64();
    assert!(stalled.is_some_and(|s| s >= 5.0), "{report}");

    child.signal(Signal::CONT);
    child.send("release");
    child.expect("RESUMED");
    daemon.wait_for_line("lane 0 flowing again", Duration::from_secs(30));
    assert!(observer.snapshot().stats.lanes[0].published > published);
    child.send("exit");
    assert!(child.child.wait().unwrap().success());
    assert!(daemon.terminate().success());
}
