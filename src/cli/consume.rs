//! `ringfeed consume`: a minimal Rust consumer, for demos, smoke tests and latency checks.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use ringfeed::ring::{AttachError, AttachOptions, Consumer, RuntimeDir};

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
    /// Print one line per batch in the client-neutral digest form (`epoch E index I count C
    /// ids SUM images HASH [redelivered]`, HASH the FNV-1a 64 of the images bytes), then
    /// `end`: the form every client's conformance reader prints (tests/conformance.py).
    #[arg(long)]
    digest: bool,
    /// Seconds to hold the last batch of each epoch before releasing it, and again after the
    /// release before asking for the next batch (a trainer's end-of-epoch work).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pause_at_epoch_end: f64,
    /// Start at batch INDEX of epoch EPOCH (the next batch wanted, as a checkpoint saves it):
    /// the daemon seeks the lane there.
    #[arg(long, value_name = "EPOCH:INDEX", value_parser = parse_resume)]
    resume: Option<(u64, u64)>,
    /// Take N batches without releasing them, print `holding`, then wait to be killed: a
    /// trainer that dies holding batches (the failure-mode tests).
    #[arg(long, value_name = "N", hide = true)]
    hold: Option<u64>,
}

/// `--resume` value: `EPOCH:INDEX`.
fn parse_resume(s: &str) -> Result<(u64, u64), String> {
    let (e, i) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not EPOCH:INDEX"))?;
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{v:?} in {s:?} is not a batch number"))
    };
    Ok((num(e)?, num(i)?))
}

/// FNV-1a, 64 bits: the conformance test's hash of a tensor's bytes (trivial in any language).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Attaches, consumes, prints a line per batch and a summary.
pub(crate) fn run(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let dir = RuntimeDir::from_env_for(args.trust_uid)?;
    let consumer = match attach_waiting(&dir, &args) {
        Err(e) if e.code() == "finished" => {
            // Not a failure: the run this consumer would read is over.
            eprintln!("{e}");
            if args.digest {
                println!("end");
            }
            return Ok(ExitCode::SUCCESS);
        }
        // The digest form reports errors as every conformance reader does: the code first.
        Err(e) if args.digest => {
            eprintln!("error {}: {e}", e.code());
            return Ok(ExitCode::FAILURE);
        }
        other => other.with_context(|| format!("cannot attach to ring '{}'", args.name))?,
    };
    let layout = consumer.layout();
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let (mut batches, mut samples) = (0u64, 0u64);
    let mut held = Vec::new();
    loop {
        if args.batches.is_some_and(|n| batches >= n) {
            break;
        }
        let t0 = Instant::now();
        let batch = match consumer.next() {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(e) if args.digest => {
                eprintln!("error {}: {e}", e.code());
                return Ok(ExitCode::FAILURE);
            }
            Err(e) => return Err(e.into()),
        };
        waited += t0.elapsed();
        batches += 1;
        samples += u64::from(batch.count());
        if args.digest {
            let ids: &[i64] = batch.tensor("sample_ids")?;
            let images = layout
                .tensor_index("images")
                .context("the schema has no images tensor")?;
            println!(
                "epoch {} index {} count {} ids {} images {:016x}{}",
                batch.epoch(),
                batch.index(),
                batch.count(),
                ids.iter().fold(0i64, |a, &b| a.wrapping_add(b)),
                fnv1a64(batch.tensor_bytes(images)),
                if batch.redelivered() {
                    " redelivered"
                } else {
                    ""
                }
            );
        } else if !args.quiet {
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
        if let Some(n) = args.hold {
            held.push(batch);
            if held.len() as u64 >= n {
                println!("holding");
                loop {
                    std::thread::park();
                }
            }
            continue;
        }
        let epoch_end = batch.last_of_epoch();
        if epoch_end && args.pause_at_epoch_end > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(args.pause_at_epoch_end));
        }
        drop(batch);
        if epoch_end && args.pause_at_epoch_end > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(args.pause_at_epoch_end));
        }
    }
    if args.digest {
        println!("end");
        return Ok(ExitCode::SUCCESS);
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "consumed {batches} batches ({samples} samples) in {elapsed:.2} s: {:.0} samples/s, waited for data {:.0} % of the time",
        samples as f64 / elapsed,
        waited.as_secs_f64() / elapsed * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

/// Attaches, waiting up to `--wait` while the daemon is not up yet (no runtime directory, no
/// socket, nobody listening) or refuses for now (lane held, stopping): the library's
/// retryable errors. Anything else, such as a socket we may not open, will not go away by
/// waiting.
fn attach_waiting(dir: &RuntimeDir, args: &ConsumeArgs) -> Result<Consumer, AttachError> {
    let mut opts = AttachOptions::new(&args.name, args.lane);
    opts.dir = Some(dir.clone());
    opts.trust_uid = args.trust_uid;
    opts.resume = args.resume;
    opts.wait = Duration::from_secs_f64(args.wait.max(0.0));
    Consumer::attach_with(&opts)
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
