//! The periodic status line of `serve`: throughput, ring occupancy per lane, and who waits for
//! whom — the figure that says whether the loader or the trainer is the bottleneck. On a
//! terminal, a progress bar for the current epoch is redrawn in place between status lines.

use std::io::{IsTerminal as _, Write as _};
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
        epoch_shape: EpochShape,
    ) -> StatusReporter {
        let tty = std::io::stderr().is_terminal();
        let handle = std::thread::Builder::new()
            .name("ringfeed-status".into())
            .spawn(move || {
                let mut last = (Instant::now(), producer.stats());
                let mut next_line = Instant::now() + interval;
                let mut next_bar = Instant::now();
                let mut bar_rate = RateWindow::new();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if stop_when_drained {
                        let s = producer.stats();
                        if s.state == Some(ProducerState::Finished)
                            && s.lanes.iter().all(|l| l.ready == 0 && l.held == 0)
                        {
                            log::info!("every epoch served and released; exiting");
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                    if Instant::now() >= next_line {
                        let now = (Instant::now(), producer.stats());
                        log::info!("{}", status_line(&last, &now, &counters));
                        last = now;
                        next_line += interval;
                    }
                    if tty && Instant::now() >= next_bar {
                        let images = counters.samples_ok.load(Ordering::Relaxed);
                        let rate = bar_rate.push(Instant::now(), images);
                        let bar = progress_bar(
                            &epoch_shape,
                            counters.lane0_epoch.load(Ordering::Relaxed),
                            counters.lane0_batches_done.load(Ordering::Relaxed),
                            rate,
                        );
                        let _ = write!(std::io::stderr().lock(), "\r\x1b[2K{bar}");
                        next_bar += Duration::from_millis(250);
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

/// What the progress bar measures against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EpochShape {
    /// Batches per epoch and lane.
    pub(crate) batches_per_epoch: u64,
    /// Epochs to serve, 0 = unbounded.
    pub(crate) epochs: u64,
    /// Samples per batch.
    pub(crate) batch_size: u32,
    /// Lanes (every lane advances at about the same pace).
    pub(crate) lanes: u32,
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

/// `epoch 2/10 [#########-----------]  45% 123/270 batches  1234 img/s  ETA 0:32`
pub(crate) fn progress_bar(shape: &EpochShape, epoch: u64, done: u64, rate: f64) -> String {
    const WIDTH: usize = 24;
    let total = shape.batches_per_epoch.max(1);
    let done = done.min(total);
    let filled = (done as usize * WIDTH) / total as usize;
    let epochs = if shape.epochs == 0 {
        "∞".to_owned()
    } else {
        shape.epochs.to_string()
    };
    let left_images = (total - done) as f64 * f64::from(shape.batch_size) * f64::from(shape.lanes);
    let eta = if rate > 0.0 {
        let s = (left_images / rate).round() as u64;
        format!("{}:{:02}", s / 60, s % 60)
    } else {
        "–".to_owned()
    };
    format!(
        "epoch {}/{epochs} [{}{}] {:3.0}% {done}/{total} batches  {rate:.0} img/s  ETA {eta}",
        epoch + 1,
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        done as f64 / total as f64 * 100.0,
    )
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
        "{rate:.0} img/s | {} | loader waited {producer_wait:.0} % | skipped {skipped} | {verdict}",
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
    fn progress_bar_shows_position_rate_and_eta() {
        let shape = EpochShape {
            batches_per_epoch: 100,
            epochs: 3,
            batch_size: 10,
            lanes: 1,
        };
        let bar = progress_bar(&shape, 1, 25, 100.0);
        assert!(
            bar.starts_with("epoch 2/3 [######------------------]  25% 25/100"),
            "{bar}"
        );
        assert!(bar.ends_with("100 img/s  ETA 0:08"), "{bar}"); // 750 images at 100/s = 7.5 s
        let unbounded = EpochShape { epochs: 0, ..shape };
        assert!(progress_bar(&unbounded, 0, 0, 0.0).contains("epoch 1/∞"));
        assert!(progress_bar(&unbounded, 0, 0, 0.0).ends_with("ETA –"));
    }

    #[test]
    fn share_is_bounded() {
        assert_eq!(share(0, Duration::from_secs(1)), 0.0);
        assert_eq!(share(2_000_000_000, Duration::from_secs(1)), 100.0);
        assert!((share(250_000_000, Duration::from_secs(1)) - 25.0).abs() < 1e-9);
    }
}
