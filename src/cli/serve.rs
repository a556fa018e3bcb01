//! `ringfeed serve`: the daemon.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ringfeed::pipeline::Cursor;
use ringfeed::ring::{Producer, RuntimeDir};

use super::common::{build_stages, resolve_plan, PlanArgs};
use super::status::{EpochShape, StatusReporter};

/// Flags of `ringfeed serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Exit once every epoch has been served and every batch released (needs --epochs).
    #[arg(long)]
    exit_when_done: bool,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9108. Off by
    /// default; give a loopback address unless the metrics should be reachable from outside.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// Runs the daemon until SIGINT/SIGTERM (or, with --exit-when-done, the end of the data).
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let plan = resolve_plan(&args.plan)?;
    anyhow::ensure!(
        !args.exit_when_done || plan.file.sampling.epochs > 0,
        "--exit-when-done needs a bounded number of epochs (--epochs N or [sampling] epochs)"
    );
    let stages = build_stages(&plan)?;
    let pipeline = &stages.pipeline;
    let spec = stages.ring_spec(&plan);
    let dir = RuntimeDir::from_env()?;
    let producer = Arc::new(Producer::create(&spec, &dir)?);

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    // Bind the metrics listener before announcing the ring, so a scraper that waits for the
    // announcement finds it.
    let metrics = args
        .metrics
        .map(|addr| {
            super::metrics::MetricsServer::spawn(
                addr,
                Arc::clone(&producer),
                pipeline.counters(),
                Arc::clone(&stop),
            )
        })
        .transpose()?;
    log::info!(
        "serving ring '{}' ({} lane(s) × {} slots of {} samples, {} batches per epoch per lane, {} samples, {} workers) — attach with ringfeed.Loader({:?})",
        spec.name,
        spec.lanes,
        spec.slots_per_lane,
        spec.batch_size,
        spec.batches_per_epoch,
        spec.samples_per_epoch,
        plan.threads,
        spec.name,
    );

    let reporter = StatusReporter::spawn(
        Arc::clone(&producer),
        pipeline.counters(),
        Duration::from_secs_f64(plan.file.workers.status_interval_s),
        Arc::clone(&stop),
        args.exit_when_done,
        EpochShape {
            batches_per_epoch: spec.batches_per_epoch,
            epochs: spec.epochs,
            batch_size: spec.batch_size,
            lanes: spec.lanes,
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
