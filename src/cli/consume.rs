//! `ringfeed consume`: a minimal Rust consumer, for demos, smoke tests and latency checks.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use ringfeed::ring::{AttachError, AttachOptions, Consumer, RuntimeDir, RuntimeDirError};

/// Flags of `ringfeed consume`.
#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    /// Ring name.
    #[arg(default_value = "default")]
    name: String,
    /// Lane to attach to.
    #[arg(long, default_value_t = 0)]
    lane: u32,
    /// Stop after this many batches (default: until the stream ends).
    #[arg(long)]
    batches: Option<u64>,
    /// Simulated training time per batch, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    step_ms: f64,
    /// Seconds to wait for the daemon to appear.
    #[arg(long, default_value_t = 30.0)]
    wait: f64,
    /// Print only the summary.
    #[arg(long, short)]
    quiet: bool,
    /// Also trust a daemon running as this uid (default: only one running as yours), to read
    /// a ring another user serves with `--allow-group`.
    #[arg(long, value_name = "UID")]
    trust_uid: Option<u32>,
}

/// Attaches, consumes, prints a line per batch and a summary.
pub(crate) fn run(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let dir = RuntimeDir::from_env()?;
    let consumer = attach_waiting(&dir, &args)?;
    let layout = consumer.layout();
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let (mut batches, mut samples) = (0u64, 0u64);
    loop {
        if args.batches.is_some_and(|n| batches >= n) {
            break;
        }
        let t0 = Instant::now();
        let Some(batch) = consumer.next()? else {
            break;
        };
        waited += t0.elapsed();
        batches += 1;
        samples += u64::from(batch.count());
        if !args.quiet {
            let labels: &[i64] = batch.tensor("labels")?;
            let ids: &[i64] = batch.tensor("sample_ids")?;
            let shown = labels.len().min(4);
            println!(
                "lane {} epoch {} batch {}{} seq {} | {} | labels {:?}… ids {:?}…{}",
                args.lane,
                batch.epoch(),
                batch.index(),
                if batch.last_of_epoch() { " (last)" } else { "" },
                batch.seq(),
                describe_tensors(layout),
                &labels[..shown],
                &ids[..shown],
                if batch.redelivered() {
                    " (redelivered)"
                } else {
                    ""
                },
            );
        }
        if args.step_ms > 0.0 {
            busy_wait(Duration::from_secs_f64(args.step_ms / 1000.0));
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "consumed {batches} batches ({samples} samples) in {elapsed:.2} s: {:.0} samples/s, waited for data {:.0} % of the time",
        samples as f64 / elapsed,
        waited.as_secs_f64() / elapsed * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

fn attach_waiting(dir: &RuntimeDir, args: &ConsumeArgs) -> anyhow::Result<Consumer> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait);
    let mut opts = AttachOptions::new(&args.name, args.lane);
    opts.dir = Some(dir.clone());
    opts.trust_uid = args.trust_uid;
    loop {
        match Consumer::attach_with(&opts) {
            Ok(c) => return Ok(c),
            // Not started yet (no runtime directory, no socket, or nobody listening): wait.
            // Anything else, such as a socket we may not open, will not go away by waiting.
            Err(AttachError::Connect { ref source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(AttachError::RuntimeDir(RuntimeDirError::Missing { .. }))
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            // The other attach errors name the ring themselves.
            Err(e @ AttachError::RuntimeDir(_)) => {
                return Err(e).with_context(|| format!("cannot attach to ring '{}'", args.name))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn describe_tensors(layout: &ringfeed::ring::Layout) -> String {
    layout
        .tensors
        .iter()
        .map(|t| format!("{} {:?}{:?}", t.name, t.dtype, t.shape))
        .collect::<Vec<_>>()
        .join(", ")
}

fn busy_wait(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}
