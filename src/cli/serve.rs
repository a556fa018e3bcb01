//! `ringfeed serve`: the daemon.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ringfeed::pipeline::{Cursor, Pipeline, SharedPool};
use ringfeed::ring::{Producer, RuntimeDir};

use super::common::{resolve_plans, PlanArgs};
use super::metrics::RingCollector;
use super::metrics_http::MetricsServer;
use super::status::{EpochShape, StatusReporter};

/// Flags of `ringfeed serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Exit once every epoch has been served, every batch released and every consumer
    /// detached (needs --epochs); consumers still attached are waited for at most --linger.
    #[arg(long)]
    exit_when_done: bool,
    /// With --exit-when-done: seconds to wait, after the last batch is released, for attached
    /// consumers to detach before exiting. Until then the socket answers (a re-attach is
    /// told the ring is finished); the ring stays FINISHED for those still attached.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0,
          value_parser = parse_linger)]
    linger: f64,
    /// Serve Prometheus metrics (GET /metrics) on ADDR: a port alone (9108) binds loopback
    /// 127.0.0.1, reachable by every local user; IP:PORT binds that address (0.0.0.0:9108:
    /// the network). Read-only. Off by default: no listener at all.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    metrics: Option<std::net::SocketAddr>,
    /// Stop when process PID exits, however it ends: set by `ringfeed.serve()` in Python, so
    /// a daemon started from a training script never outlives it (see parent_watch.rs).
    #[arg(long, value_name = "PID", hide = true)]
    parent_pid: Option<u32>,
}

/// `--linger` value: finite, ≥ 0 seconds.
fn parse_linger(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds ≥ 0")),
    }
}

/// `--metrics` value: `PORT` (loopback) or `IP:PORT`.
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok((std::net::Ipv4Addr::LOCALHOST, port).into());
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither a port (binds 127.0.0.1) nor IP:PORT"))
}

/// One ring of the daemon: its pipeline (with the plan it was built from), its producer and
/// its own stop flag.
struct Ring {
    pipeline: Pipeline,
    spec: ringfeed::ring::RingSpec,
    producer: Arc<Producer>,
    /// Set to stop this ring's pipeline (by the daemon's stop, or, with --exit-when-done, by
    /// its status reporter once every epoch is served and released).
    stop: Arc<AtomicBool>,
}

/// Runs the daemon until SIGINT/SIGTERM (or, with --exit-when-done, the end of the data).
///
/// Several `--config` files make one daemon serve several rings (a training ring and an
/// on-demand validation ring, typically) from one worker pool, sized for the largest
/// `[workers] threads`; on-demand rings give way to the others at batch boundaries (see
/// [`ringfeed::pipeline::SharedPool`]).
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let plans = resolve_plans(&args.plan)?;
    if args.exit_when_done {
        anyhow::ensure!(
            plans.iter().any(|p| !p.sampling().on_demand),
            "--exit-when-done needs a ring that ends: an on-demand ring serves passes until stopped"
        );
        for plan in plans.iter().filter(|p| !p.sampling().on_demand) {
            anyhow::ensure!(
                plan.sampling().epochs > 0,
                "--exit-when-done needs a bounded number of epochs (--epochs N or [sampling] epochs) \
                 for ring '{}'",
                plan.name()
            );
        }
    }
    // Installed first. Until the ring is about to be created there is nothing to clean up, so
    // a SIGINT/SIGTERM ends the process at once (indexing a large dataset must not make
    // Ctrl-C wait); from then on it only asks for a stop, so the ring is always removed by
    // the normal exit path.
    let stop = Arc::new(AtomicBool::new(false));
    let ring_exists = Arc::new(AtomicBool::new(false));
    {
        let (stop, ring_exists) = (Arc::clone(&stop), Arc::clone(&ring_exists));
        ctrlc::set_handler(move || {
            if ring_exists.load(Ordering::SeqCst) {
                stop.store(true, Ordering::SeqCst);
            } else {
                log::info!("interrupted before the ring was created; nothing to clean up");
                std::process::exit(0);
            }
        })
        .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    if let Some(pid) = args.parent_pid {
        let (stop, ring_exists) = (Arc::clone(&stop), Arc::clone(&ring_exists));
        super::parent_watch::spawn(pid, move || {
            // The same policy as a SIGTERM: exit at once until a ring exists, then stop cleanly.
            if ring_exists.load(Ordering::SeqCst) {
                stop.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(0);
            }
        })?;
    }
    let threads = plans
        .iter()
        .map(|p| p.workers().threads())
        .max()
        .unwrap_or(1);
    let pool = SharedPool::new(threads)?;
    let mut pipelines = Vec::with_capacity(plans.len());
    for plan in plans {
        pipelines.push(Pipeline::from_plan_in(plan, Arc::clone(&pool))?);
    }
    let dir = RuntimeDir::from_env()?;
    ring_exists.store(true, Ordering::SeqCst);
    let mut rings = Vec::with_capacity(pipelines.len());
    for pipeline in pipelines {
        let spec = pipeline.ring_spec();
        let producer = Arc::new(Producer::create_with(
            &spec,
            &dir,
            &pipeline.producer_options(),
        )?);
        note_index_skips(&pipeline, &producer);
        producer.set_catalog(super::provenance::catalog(
            pipeline.plan(),
            pipeline.shared_dataset(),
        ));
        set_info_extra(&pipeline, &producer);
        rings.push(Ring {
            pipeline,
            spec,
            producer,
            stop: Arc::new(AtomicBool::new(false)),
        });
    }
    let together: Vec<String> = rings.iter().map(|r| r.spec.name.clone()).collect();
    if together.len() > 1 {
        for ring in &rings {
            let together = together.clone();
            let extra = ring.producer.take_info_extra();
            ring.producer.set_info_extra(Box::new(move || {
                let mut v = extra.as_ref().map_or(serde_json::json!({}), |f| f());
                v["daemon_rings"] = serde_json::json!(together);
                v
            }));
        }
    }
    // Bind the metrics listener before announcing the rings, so a scraper that waits for the
    // announcement finds them.
    let metrics = args
        .metrics
        .map(|addr| {
            let registries = rings
                .iter()
                .map(|r| {
                    RingCollector::new(Arc::clone(&r.producer), r.pipeline.counters())
                        .into_registry()
                })
                .collect();
            MetricsServer::spawn(addr, registries, Arc::clone(&stop))
        })
        .transpose()?;
    for ring in &rings {
        let spec = &ring.spec;
        if ring.pipeline.plan().ranks().world_size_assumed() {
            log::warn!(
                "WORLD SIZE ASSUMED: {lanes} lanes and no world size given (--world-size, [distributed] \
                 world-size or WORLD_SIZE): serving ranks 0..{lanes} of world size {lanes}, a \
                 single-node job. On a multi-node job every node would serve the SAME samples: give \
                 --world-size and --first-rank, or start it with ringfeed.serve() under torchrun",
                lanes = spec.lanes
            );
        }
        let kind = if spec.on_demand {
            format!(
                "on-demand: {} batches per pass per lane, produced when a consumer asks",
                spec.batches_per_epoch
            )
        } else {
            format!("{} batches per epoch per lane", spec.batches_per_epoch)
        };
        log::info!(
            "serving ring '{}' ({} lane(s) × {} slots of {} samples, {kind}, {} samples, {} workers{}; ranks {} of world size {}) — attach with ringfeed.Loader({:?})",
            spec.name,
            spec.lanes,
            spec.slots_per_lane,
            spec.batch_size,
            spec.samples_per_epoch,
            pool.threads(),
            if together.len() > 1 {
                format!(" shared by rings {}", together.join(", "))
            } else {
                String::new()
            },
            rank_range(ring.pipeline.plan().ranks().first_rank(), spec.lanes),
            ring.pipeline.plan().ranks().world_size(),
            spec.name,
        );
    }
    let reporters: Vec<StatusReporter> = rings
        .iter()
        .map(|ring| {
            StatusReporter::spawn(
                Arc::clone(&ring.producer),
                ring.pipeline.counters(),
                ring.pipeline.plan().workers().status_interval(),
                Arc::clone(&ring.stop),
                (args.exit_when_done && !ring.spec.on_demand)
                    .then(|| Duration::from_secs_f64(args.linger)),
                EpochShape {
                    batches_per_epoch: ring.spec.batches_per_epoch,
                    epochs: ring.spec.epochs,
                },
                if together.len() > 1 {
                    format!("[{}] ", ring.spec.name)
                } else {
                    String::new()
                },
            )
        })
        .collect();
    let results: Vec<Result<(), ringfeed::pipeline::PipelineError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rings
            .iter()
            .map(|ring| {
                scope.spawn(|| {
                    let result = ring.pipeline.serve(
                        &ring.producer,
                        &ring.stop,
                        Cursor { epoch: 0, index: 0 },
                    );
                    // A ring that fails stops the daemon (its other rings with it).
                    if result.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    result
                })
            })
            .collect();
        supervise(&rings, &stop, args.exit_when_done);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Ok(())))
            .collect()
    });
    stop.store(true, Ordering::Relaxed);
    for reporter in reporters {
        reporter.join();
    }
    if let Some(m) = metrics {
        m.join();
    }
    let mut first_error = None;
    for (ring, result) in rings.iter().zip(results) {
        if let Err(err) = result {
            ring.producer.fail(&err.to_string());
            first_error.get_or_insert(err);
        }
    }
    match first_error {
        None => {
            for ring in rings {
                log::info!("stopped; ring '{}' removed", ring.spec.name);
                drop(ring);
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(err) => {
            // Give attached consumers a moment to read FAILED and the reason before the ring
            // disappears with this process.
            std::thread::sleep(Duration::from_millis(300));
            Err(err.into())
        }
    }
}

/// Waits until the daemon is told to stop, a ring fails, or (with --exit-when-done) every
/// ring that ends has been served and released; then stops every ring.
fn supervise(rings: &[Ring], stop: &AtomicBool, exit_when_done: bool) {
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if exit_when_done
            && rings
                .iter()
                .filter(|r| !r.spec.on_demand)
                .all(|r| r.stop.load(Ordering::SeqCst))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for ring in rings {
        ring.stop.store(true, Ordering::SeqCst);
    }
}

/// Samples skipped while indexing (bad or out-of-range labels, …) never reach the pipeline:
/// counts them once in the ring's skip counter and names the first in its last error, so
/// `stat`, the metrics and the status line show them with the log.
fn note_index_skips(pipeline: &Pipeline, producer: &Producer) {
    let issues = pipeline.dataset().skipped_at_index();
    if let Some(first) = issues.first() {
        let n = issues.len() as u64;
        producer.add_samples(0, n);
        pipeline
            .counters()
            .samples_skipped
            .fetch_add(n, Ordering::Relaxed);
        let more = if n > 1 {
            format!(" (and {} more, see the log)", n - 1)
        } else {
            String::new()
        };
        producer.record_error(&format!("skipped while indexing: {first}{more}"));
    }
}

/// A mixture's streams in the `info` reply: `ringfeed stat` reads their served counts there.
fn set_info_extra(pipeline: &Pipeline, producer: &Producer) {
    if !pipeline.dataset().has_streams() {
        return;
    }
    let counters = pipeline.counters();
    let fixed: Vec<(f64, u64)> = pipeline
        .dataset()
        .streams()
        .iter()
        .zip(pipeline.sampler().stream_draws())
        .map(|(s, draws)| (s.weight(), draws))
        .collect();
    producer.set_info_extra(Box::new(move || {
        let streams: Vec<_> = counters
            .stream_counts()
            .into_iter()
            .zip(&fixed)
            .map(|((name, served), (weight, per_epoch))| {
                serde_json::json!({"name": name, "weight": weight,
                    "samples_per_epoch": per_epoch, "served": served})
            })
            .collect();
        serde_json::json!({ "streams": streams })
    }));
}

/// Ranks `first..first + lanes` as people write them: `3`, or `0-1`.
pub(crate) fn rank_range(first: u32, lanes: u32) -> String {
    match lanes {
        0 | 1 => first.to_string(),
        n => format!("{first}-{}", first + n - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_metrics_addr;

    #[test]
    fn metrics_port_alone_binds_loopback() {
        assert_eq!(
            parse_metrics_addr("9108").unwrap().to_string(),
            "127.0.0.1:9108"
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9").unwrap().to_string(),
            "0.0.0.0:9"
        );
        assert!(parse_metrics_addr("localhost").is_err());
    }
}
