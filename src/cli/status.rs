//! The periodic status line of `serve`: throughput, ring occupancy per lane, and who waits for
//! whom — the figure that says whether the loader or the trainer is the bottleneck. On a
//! terminal, an `indicatif` progress bar for the current epoch ([`EpochBar`]) stays below the
//! status lines.
//!
//! It also watches for stalled lanes (docs/failure-modes.md): a lane with no free slot whose
//! live consumer has neither taken nor released a batch for [`STALL_AFTER`] — a trainer that
//! hangs, or a process stopped with SIGSTOP. The ring never takes slots back from a live
//! process (it may still read them: reclaiming would hand it torn data), so the lane waits;
//! the status line marks it `STALLED`, and a warning names the consumer (at once when it is
//! stopped by a signal, after [`STALL_WARN_AFTER`] when it runs: a trainer holding a batch
//! through a validation pass is no stall) and says when the lane flows again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use ringfeed::pipeline::PipelineCounters;
use ringfeed::ring::{
    mono_ns, LaneStats, Observer, Producer, ProducerState, RingSnapshot, RingStats, RuntimeDir,
};

use super::logging;

/// How long a consumer of a full lane may go without taking or releasing a batch before the
/// lane is reported as stalled. Longer than any sane training step's pause between batches.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(5);

/// How long a *running* consumer of a full lane may stay silent before the stall is logged as
/// a warning: a trainer that holds a batch through a validation pass or a checkpoint save is
/// normal, a minute without a take or release is not. A consumer stopped by a signal is
/// warned about after [`STALL_AFTER`].
pub(crate) const STALL_WARN_AFTER: Duration = Duration::from_secs(60);

/// A thread printing a status line every interval.
pub(crate) struct StatusReporter {
    handle: JoinHandle<()>,
}

impl StatusReporter {
    /// Starts the reporter. With `stop_when_drained = Some(linger)`, it also sets `stop` once
    /// the ring is finished, every batch has been released and every consumer has detached,
    /// or `linger` after the last release if a consumer stays attached (the end of a finite
    /// run, docs/ring-format.md §7). `label` starts each status line and the progress bar (a
    /// daemon of several rings names the ring there; empty otherwise).
    pub(crate) fn spawn(
        producer: Arc<Producer>,
        counters: Arc<PipelineCounters>,
        interval: Duration,
        stop: Arc<AtomicBool>,
        stop_when_drained: Option<Duration>,
        epoch_shape: EpochShape,
        label: String,
    ) -> StatusReporter {
        let handle = std::thread::Builder::new()
            .name("ringfeed-status".into())
            .spawn(move || {
                let mut last = (Instant::now(), producer.stats());
                let mut next_line = Instant::now() + interval;
                let mut next_bar = Instant::now();
                let mut bar_rate = RateWindow::new();
                // The producer's own ring, read like `ringfeed stat` does: the consumer table
                // (heartbeats) is not part of the producer's counters.
                let observer = RuntimeDir::from_env()
                    .ok()
                    .and_then(|dir| Observer::open(&dir, &producer.layout().name).ok());
                let mut stalls = StallWatch::default();
                let mut bar = EpochBar::new(epoch_shape);
                bar.label.clone_from(&label);
                let mut drained_since: Option<Instant> = None;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if let Some(linger) = stop_when_drained {
                        let s = producer.stats();
                        let drained = s.state == Some(ProducerState::Finished)
                            && s.lanes.iter().all(|l| l.ready == 0 && l.held == 0);
                        if !drained {
                            drained_since = None; // a resume made the ring serve again
                        } else {
                            let since = *drained_since.get_or_insert_with(Instant::now);
                            let attached = producer.consumers_attached();
                            if attached == 0 || since.elapsed() >= linger {
                                if attached == 0 {
                                    log::info!("{label}every epoch served and released, every consumer detached; exiting");
                                } else {
                                    log::info!("{label}every epoch served and released; {attached} consumer(s) still attached after the {linger:?} linger; exiting (the ring stays FINISHED for them)");
                                }
                                stop.store(true, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    if Instant::now() >= next_line {
                        let now = (Instant::now(), producer.stats());
                        let stalled = observer
                            .as_ref()
                            .map(|o| stalls.update(&o.snapshot()))
                            .unwrap_or_default();
                        log::info!("{label}{}", status_line(&last, &now, &counters, &stalled));
                        last = now;
                        next_line += interval;
                    }
                    if Instant::now() >= next_bar {
                        let images = counters.samples_ok.load(Ordering::Relaxed);
                        // A selected epoch's real length, once decided.
                        match counters.lane0_epoch_batches.load(Ordering::Relaxed) {
                            0 => {}
                            n => bar.set_batches_per_epoch(n),
                        }
                        bar.update(
                            counters.lane0_epoch.load(Ordering::Relaxed),
                            counters.lane0_batches_done.load(Ordering::Relaxed),
                            bar_rate.push(Instant::now(), images),
                        );
                        next_bar += Duration::from_millis(250);
                    }
                }
                bar.finish();
            })
            .expect("spawning the status thread");
        StatusReporter { handle }
    }

    /// Waits for the reporter to end (after `stop` is set).
    pub(crate) fn join(self) {
        let _ = self.handle.join();
    }
}

/// What the progress bar measures against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EpochShape {
    /// Batches per epoch and lane.
    pub(crate) batches_per_epoch: u64,
    /// Epochs to serve, 0 = unbounded.
    pub(crate) epochs: u64,
}

/// Images/s over the last few seconds, from (time, images) samples.
struct RateWindow {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateWindow {
    fn new() -> RateWindow {
        RateWindow {
            samples: std::collections::VecDeque::new(),
        }
    }

    /// Adds a sample and returns the rate over the window (0 until two samples exist).
    fn push(&mut self, at: Instant, images: u64) -> f64 {
        self.samples.push_back((at, images));
        while self.samples.len() > 2 && at - self.samples[0].0 > Duration::from_secs(5) {
            self.samples.pop_front();
        }
        let (t0, n0) = self.samples[0];
        let dt = (at - t0).as_secs_f64();
        if dt > 0.0 {
            images.saturating_sub(n0) as f64 / dt
        } else {
            0.0
        }
    }
}

/// The epoch's progress bar (an `indicatif` bar, drawn only when stderr is a terminal):
/// `epoch 2/10 [#########-----------]  45% 123/270 batches  1234 img/s  ETA 32s`.
pub(crate) struct EpochBar {
    bar: ProgressBar,
    shape: EpochShape,
    /// Starts the bar's prefix (the ring's name in a daemon of several rings).
    pub(crate) label: String,
}

impl EpochBar {
    /// A bar for `shape`, drawn with the process's other bars (see [`logging::bars`]).
    pub(crate) fn new(shape: EpochShape) -> EpochBar {
        let bar = logging::bars().add(ProgressBar::new(shape.batches_per_epoch.max(1)));
        EpochBar::styled(bar, shape)
    }

    /// Gives `bar` the epoch bar's look.
    pub(crate) fn styled(bar: ProgressBar, shape: EpochShape) -> EpochBar {
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:24}] {percent:>3}% {pos}/{len} batches  {msg}  ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("#>-");
        bar.set_style(style);
        EpochBar {
            bar,
            shape,
            label: String::new(),
        }
    }

    /// Shows epoch `epoch` (0-based) with `done` batches of it served, at `rate` images/s.
    pub(crate) fn update(&self, epoch: u64, done: u64, rate: f64) {
        let epochs = if self.shape.epochs == 0 {
            "∞".to_owned()
        } else {
            self.shape.epochs.to_string()
        };
        self.bar
            .set_prefix(format!("{}epoch {}/{epochs}", self.label, epoch + 1));
        self.bar.set_message(format!("{rate:.0} img/s"));
        self.bar
            .set_position(done.min(self.shape.batches_per_epoch.max(1)));
    }

    /// Sets the current epoch's length (with `[selection]`, epochs differ in length).
    pub(crate) fn set_batches_per_epoch(&mut self, batches: u64) {
        if batches != self.shape.batches_per_epoch {
            self.shape.batches_per_epoch = batches;
            self.bar.set_length(batches.max(1));
        }
    }

    /// Removes the bar from the terminal.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Share of `elapsed` that `waited_ns` represents, in percent (0–100).
pub(crate) fn share(waited_ns: u64, elapsed: Duration) -> f64 {
    let total = elapsed.as_nanos().max(1) as f64;
    (waited_ns as f64 / total * 100.0).clamp(0.0, 100.0)
}

/// A lane's stall: how long its consumer has been silent while the lane had no free slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stall {
    /// The lane.
    pub(crate) lane: u32,
    /// The silent consumer.
    pub(crate) pid: u32,
    /// Since its last `next`/`release`.
    pub(crate) silent: Duration,
    /// Batches it holds.
    pub(crate) held: u32,
}

/// Whether `lane` is stalled: a consumer is attached, the producer has no slot to fill (none
/// `FREE`, none being written) and the consumer's heartbeat — refreshed by every `next` and
/// release — is older than [`STALL_AFTER`].
pub(crate) fn lane_stall(
    lane: &LaneStats,
    consumer_heartbeat_age: Option<Duration>,
) -> Option<Stall> {
    let silent = consumer_heartbeat_age?;
    (lane.consumer_pid != 0 && lane.free == 0 && lane.writing == 0 && silent >= STALL_AFTER)
        .then_some(Stall {
            lane: lane.lane,
            pid: lane.consumer_pid,
            silent,
            held: lane.held,
        })
}

/// The stalled lanes of a snapshot.
pub(crate) fn stalls(snap: &RingSnapshot) -> Vec<Stall> {
    let now = mono_ns();
    snap.stats
        .lanes
        .iter()
        .filter_map(|l| {
            let age = snap
                .consumers
                .iter()
                .find(|c| c.lane == l.lane && c.pid == l.consumer_pid)
                .map(|c| Duration::from_nanos(now.saturating_sub(c.heartbeat_mono_ns)));
            lane_stall(l, age)
        })
        .collect()
}

/// `"stopped by a signal"` when `/proc/<pid>/stat` says the process is stopped (`T`) or
/// traced (`t`), `"running"` otherwise, `"gone"` if it cannot be read.
pub(crate) fn process_state(pid: u32) -> &'static str {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => proc_stat_state(&stat),
        Err(_) => "gone",
    }
}

/// The state word of one `/proc/<pid>/stat` text (the field after the parenthesised name,
/// which may itself contain spaces and parentheses).
pub(crate) fn proc_stat_state(stat: &str) -> &'static str {
    let state = stat
        .rfind(')')
        .and_then(|at| stat[at + 1..].split_whitespace().next());
    match state {
        Some("T" | "t") => "stopped by a signal",
        _ => "running",
    }
}

/// Remembers which lanes are stalled, to warn once when a stall starts and once when it ends.
#[derive(Debug, Default)]
struct StallWatch {
    /// Lanes whose stall was logged.
    warned: Vec<u32>,
}

/// Whether a stall deserves a warning: its consumer is stopped by a signal, or has been
/// silent for [`STALL_WARN_AFTER`].
fn stall_warrants_warning(silent: Duration, process: &str) -> bool {
    process == "stopped by a signal" || silent >= STALL_WARN_AFTER
}

impl StallWatch {
    /// The current stalls, logging the transitions since the last call.
    fn update(&mut self, snap: &RingSnapshot) -> Vec<Stall> {
        let now = stalls(snap);
        for s in &now {
            if !self.warned.contains(&s.lane)
                && stall_warrants_warning(s.silent, process_state(s.pid))
            {
                self.warned.push(s.lane);
                log::warn!(
                    "lane {} stalled: consumer pid {} ({}) has neither taken nor released a batch for {:.0} s and holds {}; the lane has no free slot and waits (slots of a live consumer are never reclaimed)",
                    s.lane,
                    s.pid,
                    process_state(s.pid),
                    s.silent.as_secs_f64(),
                    s.held
                );
            }
        }
        self.warned.retain(|lane| {
            let still = now.iter().any(|s| s.lane == *lane);
            if !still {
                log::warn!("lane {lane} flowing again");
            }
            still
        });
        now
    }
}

/// One status line from two snapshots, with the lanes found stalled.
pub(crate) fn status_line(
    before: &(Instant, RingStats),
    after: &(Instant, RingStats),
    counters: &PipelineCounters,
    stalled: &[Stall],
) -> String {
    let elapsed = after.0 - before.0;
    let (a, b) = (&before.1, &after.1);
    let images = b.samples_ok.saturating_sub(a.samples_ok);
    let rate = images as f64 / elapsed.as_secs_f64().max(1e-9);
    let producer_wait = share(
        b.producer_wait_ns.saturating_sub(a.producer_wait_ns),
        elapsed,
    );
    let mut lanes = Vec::new();
    let mut trainer_waits = Vec::new();
    for (la, lb) in a.lanes.iter().zip(&b.lanes) {
        let consumer = if lb.consumer_pid == 0 {
            "no consumer".to_owned()
        } else {
            format!("pid {}", lb.consumer_pid)
        };
        let wait = share(
            lb.consumer_wait_ns.saturating_sub(la.consumer_wait_ns),
            elapsed,
        );
        if lb.consumer_pid != 0 {
            trainer_waits.push(wait);
        }
        let stall = stalled
            .iter()
            .find(|s| s.lane == lb.lane)
            .map(|s| format!(" STALLED {:.0} s", s.silent.as_secs_f64()))
            .unwrap_or_default();
        lanes.push(format!(
            "lane {}: {} ready {} held ({consumer}, waited {wait:.0} %){stall}",
            lb.lane, lb.ready, lb.held
        ));
    }
    let verdict = verdict(&trainer_waits, producer_wait);
    let skipped = counters.samples_skipped.load(Ordering::Relaxed);
    let streams = counters.stream_counts();
    let served = if streams.is_empty() {
        String::new()
    } else {
        let each: Vec<String> = streams.iter().map(|(n, c)| format!("{n} {c}")).collect();
        format!(" | served {}", each.join(", "))
    };
    format!(
        "{rate:.0} img/s | {} | loader waited {producer_wait:.0} % | skipped {skipped}{served}{} | {verdict}",
        lanes.join(" | "),
        selection_text(counters)
    )
}

/// ` | epoch E: B batches/lane, P pruned | losses L (I ignored)` once reports or a selected
/// epoch exist; empty otherwise (a daemon nobody reports to shows what it always showed).
pub(crate) fn selection_text(counters: &PipelineCounters) -> String {
    let mut text = String::new();
    let batches = counters.lane0_epoch_batches.load(Ordering::Relaxed);
    if batches > 0 {
        text.push_str(&format!(
            " | epoch {}: {batches} batches/lane, {} pruned",
            counters.lane0_epoch.load(Ordering::Relaxed),
            counters.lane0_epoch_pruned.load(Ordering::Relaxed)
        ));
    }
    let losses = counters.losses_reported.load(Ordering::Relaxed);
    let ignored = counters.losses_ignored.load(Ordering::Relaxed);
    if losses + ignored > 0 {
        text.push_str(&format!(" | losses {losses} ({ignored} ignored)"));
    }
    text
}

/// The one-line answer to "is the loader the bottleneck?".
pub(crate) fn verdict(trainer_waits: &[f64], loader_wait: f64) -> String {
    let Some(worst) = trainer_waits.iter().cloned().reduce(f64::max) else {
        return "waiting for a consumer".to_owned();
    };
    if worst >= 10.0 {
        format!("trainer waits for data {worst:.0} % of the time: the loader is the bottleneck (add workers or lighten augmentation)")
    } else if loader_wait >= 10.0 {
        "loader is ahead: the trainer is the bottleneck".to_owned()
    } else {
        "balanced".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_batch_is_no_warning_until_a_real_stall() {
        // A trainer holding a batch through a 10 s validation pass: no warning.
        assert!(!stall_warrants_warning(Duration::from_secs(10), "running"));
        assert!(!stall_warrants_warning(
            STALL_WARN_AFTER - Duration::from_secs(1),
            "running"
        ));
        assert!(stall_warrants_warning(STALL_WARN_AFTER, "running"));
        // A SIGSTOPped consumer is a stall as soon as it is seen.
        assert!(stall_warrants_warning(STALL_AFTER, "stopped by a signal"));
    }

    #[test]
    fn verdict_names_the_bottleneck() {
        assert_eq!(verdict(&[], 50.0), "waiting for a consumer");
        assert!(verdict(&[37.0, 2.0], 0.0).contains("loader is the bottleneck"));
        assert!(verdict(&[1.0], 80.0).contains("trainer is the bottleneck"));
        assert_eq!(verdict(&[1.0], 1.0), "balanced");
    }

    #[test]
    fn progress_bar_shows_position_rate_and_eta() {
        use indicatif::{InMemoryTerm, ProgressDrawTarget};
        let shape = EpochShape {
            batches_per_epoch: 100,
            epochs: 3,
        };
        let draw = |shape: EpochShape, epoch: u64, done: u64, rate: f64| {
            let term = InMemoryTerm::new(2, 120);
            let target = ProgressDrawTarget::term_like(Box::new(term.clone()));
            let bar = EpochBar::styled(ProgressBar::with_draw_target(Some(100), target), shape);
            bar.update(epoch, done, rate);
            bar.bar.force_draw();
            term.contents()
        };
        let line = draw(shape, 1, 25, 100.0);
        assert!(
            line.starts_with(
                "epoch 2/3 [######>-----------------]  25% 25/100 batches  100 img/s  ETA "
            ),
            "{line}"
        );
        let unbounded = EpochShape { epochs: 0, ..shape };
        assert!(draw(unbounded, 0, 0, 0.0).starts_with("epoch 1/∞ ["));
        // Past the end of the epoch (a lane ahead of lane 0) the bar stays full.
        assert!(draw(shape, 0, 500, 0.0).contains("100% 100/100 batches"));
    }

    fn lane(free: u32, writing: u32, held: u32, pid: u32) -> LaneStats {
        LaneStats {
            lane: 0,
            ready: 3 - free - writing - held,
            held,
            free,
            writing,
            consumer_pid: pid,
            consumer_wait_ns: 0,
            producer_wait_ns: 0,
            published: 0,
            released: 0,
            stream: 0,
        }
    }

    #[test]
    fn a_full_lane_with_a_silent_consumer_is_stalled() {
        let long = Some(STALL_AFTER + Duration::from_secs(1));
        let short = Some(STALL_AFTER / 2);
        let s = lane_stall(&lane(0, 0, 2, 42), long).expect("stalled");
        assert_eq!((s.pid, s.held), (42, 2));
        // Full of READY batches nobody takes: stalled too.
        assert!(lane_stall(&lane(0, 0, 0, 42), long).is_some());
        // A consumer that is merely slow, a lane the producer can still fill, or no consumer.
        assert!(lane_stall(&lane(0, 0, 2, 42), short).is_none());
        assert!(lane_stall(&lane(1, 0, 2, 42), long).is_none());
        assert!(lane_stall(&lane(0, 1, 2, 42), long).is_none());
        assert!(lane_stall(&lane(0, 0, 0, 0), long).is_none());
        assert!(lane_stall(&lane(0, 0, 2, 42), None).is_none());
    }

    #[test]
    fn proc_stat_state_finds_stopped_processes() {
        assert_eq!(proc_stat_state("17 (python) T 1 17"), "stopped by a signal");
        assert_eq!(proc_stat_state("17 (a (b) c) t 1"), "stopped by a signal");
        assert_eq!(proc_stat_state("17 (trainer) S 1 17"), "running");
        assert_eq!(proc_stat_state("17 (odd T) R 1"), "running");
        assert_eq!(process_state(std::process::id()), "running");
    }

    #[test]
    fn selection_and_reports_appear_once_there_are_any() {
        let c = PipelineCounters::default();
        assert_eq!(selection_text(&c), "", "nothing reported, nothing selected");
        c.lane0_epoch.store(3, Ordering::Relaxed);
        c.lane0_epoch_batches.store(9, Ordering::Relaxed);
        c.lane0_epoch_pruned.store(24, Ordering::Relaxed);
        c.losses_reported.store(500, Ordering::Relaxed);
        c.losses_ignored.store(2, Ordering::Relaxed);
        assert_eq!(
            selection_text(&c),
            " | epoch 3: 9 batches/lane, 24 pruned | losses 500 (2 ignored)"
        );
    }

    #[test]
    fn share_is_bounded() {
        assert_eq!(share(0, Duration::from_secs(1)), 0.0);
        assert_eq!(share(2_000_000_000, Duration::from_secs(1)), 100.0);
        assert!((share(250_000_000, Duration::from_secs(1)) - 25.0).abs() < 1e-9);
    }
}
