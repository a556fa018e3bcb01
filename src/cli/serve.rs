//! `ringfeed serve`: the daemon.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ringfeed::pipeline::Cursor;
use ringfeed::ring::{Producer, ProducerOptions, RuntimeDir};

use super::common::{build_stages, resolve_plan, PlanArgs};
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

/// Runs the daemon until SIGINT/SIGTERM (or, with --exit-when-done, the end of the data).
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let plan = resolve_plan(&args.plan)?;
    anyhow::ensure!(
        !args.exit_when_done || plan.file.sampling.epochs > 0,
        "--exit-when-done needs a bounded number of epochs (--epochs N or [sampling] epochs)"
    );
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
    let stages = build_stages(&plan)?;
    let pipeline = &stages.pipeline;
    let spec = stages.ring_spec(&plan);
    let dir = RuntimeDir::from_env()?;
    let options = ProducerOptions {
        shm_dir: plan.file.ring.shm_dir.clone(),
        allow_group: plan.allow_gid,
        fingerprint: Some(stages.fingerprint(&plan)),
    };
    ring_exists.store(true, Ordering::SeqCst);
    let producer = Arc::new(Producer::create_with(&spec, &dir, &options)?);
    // Samples skipped while indexing (bad or out-of-range labels, …) never reach the pipeline:
    // count them once in the ring's skip counter and name the first in its last error, so
    // `stat`, the metrics and the status line show them with the log.
    let issues = stages.dataset.skipped_at_index();
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
    if stages.dataset.has_streams() {
        // `ringfeed stat` reads the streams' served counts from the info reply.
        let counters = pipeline.counters();
        let fixed: Vec<(f64, u64)> = stages
            .dataset
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
    // Bind the metrics listener before announcing the ring, so a scraper that waits for the
    // announcement finds it.
    let metrics = args
        .metrics
        .map(|addr| {
            let registry =
                RingCollector::new(Arc::clone(&producer), pipeline.counters()).into_registry();
            MetricsServer::spawn(addr, registry, Arc::clone(&stop))
        })
        .transpose()?;
    if plan.world_size_assumed {
        log::warn!(
            "WORLD SIZE ASSUMED: {lanes} lanes and no world size given (--world-size, [distributed] \
             world-size or WORLD_SIZE): serving ranks 0..{lanes} of world size {lanes}, a \
             single-node job. On a multi-node job every node would serve the SAME samples: give \
             --world-size and --first-rank, or start it with ringfeed.serve() under torchrun",
            lanes = spec.lanes
        );
    }
    log::info!(
        "serving ring '{}' ({} lane(s) × {} slots of {} samples, {} batches per epoch per lane, {} samples, {} workers; ranks {} of world size {}) — attach with ringfeed.Loader({:?})",
        spec.name,
        spec.lanes,
        spec.slots_per_lane,
        spec.batch_size,
        spec.batches_per_epoch,
        spec.samples_per_epoch,
        plan.threads,
        rank_range(plan.ranks.first_rank, spec.lanes),
        plan.ranks.world_size,
        spec.name,
    );

    let reporter = StatusReporter::spawn(
        Arc::clone(&producer),
        pipeline.counters(),
        Duration::from_secs_f64(plan.file.workers.status_interval_s),
        Arc::clone(&stop),
        args.exit_when_done
            .then(|| Duration::from_secs_f64(args.linger)),
        EpochShape {
            batches_per_epoch: spec.batches_per_epoch,
            epochs: spec.epochs,
        },
    );
    let result = pipeline.serve(&producer, &stop, Cursor { epoch: 0, index: 0 });
    stop.store(true, Ordering::Relaxed);
    reporter.join();
    if let Some(m) = metrics {
        m.join();
    }
    match result {
        Ok(()) => {
            log::info!("stopped; ring '{}' removed", spec.name);
            drop(producer);
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            producer.fail(&err.to_string());
            // Give attached consumers a moment to read FAILED and the reason before the ring
            // disappears with this process.
            std::thread::sleep(Duration::from_millis(300));
            Err(err.into())
        }
    }
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
