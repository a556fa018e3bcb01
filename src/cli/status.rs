//! The periodic status line of `serve`: throughput, ring occupancy per lane, and who waits for
//! whom — the figure that says whether the loader or the trainer is the bottleneck.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfeed::pipeline::PipelineCounters;
use ringfeed::ring::{Producer, ProducerState, RingStats};

/// A thread printing a status line every interval.
pub(crate) struct StatusReporter {
    handle: JoinHandle<()>,
}

impl StatusReporter {
    /// Starts the reporter. With `stop_when_drained`, it also sets `stop` once the ring is
    /// finished and every batch has been released.
    pub(crate) fn spawn(
        producer: Arc<Producer>,
        counters: Arc<PipelineCounters>,
        interval: Duration,
        stop: Arc<AtomicBool>,
        stop_when_drained: bool,
    ) -> StatusReporter {
        let handle = std::thread::Builder::new()
            .name("ringfeed-status".into())
            .spawn(move || {
                let mut last = (Instant::now(), producer.stats());
                let mut next_line = Instant::now() + interval;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if stop_when_drained {
                        let s = producer.stats();
                        if s.state == Some(ProducerState::Finished)
                            && s.lanes.iter().all(|l| l.ready == 0 && l.held == 0)
                        {
                            eprintln!("ringfeed: every epoch served and released; exiting");
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                    if Instant::now() >= next_line {
                        let now = (Instant::now(), producer.stats());
                        eprintln!("{}", status_line(&last, &now, &counters));
                        last = now;
                        next_line += interval;
                    }
                }
            })
            .expect("spawning the status thread");
        StatusReporter { handle }
    }

    /// Waits for the reporter to end (after `stop` is set).
    pub(crate) fn join(self) {
        let _ = self.handle.join();
    }
}

/// Share of `elapsed` that `waited_ns` represents, in percent (0–100).
pub(crate) fn share(waited_ns: u64, elapsed: Duration) -> f64 {
    let total = elapsed.as_nanos().max(1) as f64;
    (waited_ns as f64 / total * 100.0).clamp(0.0, 100.0)
}

/// One status line from two snapshots.
pub(crate) fn status_line(
    before: &(Instant, RingStats),
    after: &(Instant, RingStats),
    counters: &PipelineCounters,
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
        lanes.push(format!(
            "lane {}: {} ready {} held ({consumer}, waited {wait:.0} %)",
            lb.lane, lb.ready, lb.held
        ));
    }
    let verdict = verdict(&trainer_waits, producer_wait);
    let skipped = counters.samples_skipped.load(Ordering::Relaxed);
    format!(
        "ringfeed: {rate:.0} img/s | {} | loader waited {producer_wait:.0} % | skipped {skipped} | {verdict}",
        lanes.join(" | ")
    )
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
    fn verdict_names_the_bottleneck() {
        assert_eq!(verdict(&[], 50.0), "waiting for a consumer");
        assert!(verdict(&[37.0, 2.0], 0.0).contains("loader is the bottleneck"));
        assert!(verdict(&[1.0], 80.0).contains("trainer is the bottleneck"));
        assert_eq!(verdict(&[1.0], 1.0), "balanced");
    }

    #[test]
    fn share_is_bounded() {
        assert_eq!(share(0, Duration::from_secs(1)), 0.0);
        assert_eq!(share(2_000_000_000, Duration::from_secs(1)), 100.0);
        assert!((share(250_000_000, Duration::from_secs(1)) - 25.0).abs() < 1e-9);
    }
}
