//! `ringfeed bench`: per-stage rates on one core and end-to-end images/s through a real ring,
//! with an in-process consumer that releases every batch at once.
//!
//! Every figure is a median over repetitions, and the end-to-end rate is also given as a ratio
//! to the decode floor measured in the same run (single-core full-decode rate × workers), so
//! results stay comparable on a noisy machine.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use ringfeed::augment::SampleKey;
use ringfeed::decode::{DecodeRequest, Decoder};
use ringfeed::pipeline::{Cursor, Pipeline};
use ringfeed::ring::{AttachOptions, Consumer, Producer, RingSpec, RuntimeDir};
use ringfeed::source::{Mixture, SourceKind};

use super::common::{resolve_plan, PlanArgs};

/// Flags of `ringfeed bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Samples used for the single-core stage timings.
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Batches consumed in each end-to-end repetition.
    #[arg(long, default_value_t = 8)]
    batches: u64,
    /// Only the one-core stage timings, no end-to-end run through a ring: a quick baseline of
    /// the machine's current speed for the same work (the soak script takes one per epoch).
    #[arg(long)]
    stages_only: bool,
    /// A/B in the same run: the same per-sample work (read, decrypt when encrypted, decode,
    /// augment) on these shards too, interleaved with this dataset's in every repetition, e.g.
    /// plaintext copies of encrypted shards. Prints each one's CPU time per sample and the
    /// difference. Use --samples at least the dataset's size so both cover the same images.
    #[arg(long, num_args = 1.., value_name = "SHARD")]
    baseline_shards: Option<Vec<String>>,
}

/// Runs the stage and end-to-end measurements and prints a table.
pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(args.batches >= 2, "--batches must be at least 2");
    let pipeline = Pipeline::from_plan(resolve_plan(&args.plan)?)?;
    let plan = pipeline.plan();
    let dataset = pipeline.dataset();
    let augmenter = plan.augmenter();
    let threads = plan.workers().threads();
    let ids: Vec<u64> = (0..dataset.len().min(args.samples as u64)).collect();
    let seed = plan.sampling().seed;

    println!(
        "ringfeed bench: {} samples in the dataset, {} used for stage timings, {} repeats, {} workers, batch {}",
        dataset.len(),
        ids.len(),
        args.repeats,
        threads,
        plan.batch_size()
    );

    // Stage timings, one core (this thread), warm page cache.
    let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(ids.len());
    for &id in &ids {
        let mut buf = Vec::new();
        dataset
            .read_into(id, &mut buf)
            .with_context(|| format!("reading {}", dataset.describe(id)))?;
        encoded.push(buf);
    }
    let read = median_rate(args.repeats, ids.len(), || read_all(dataset, &ids));
    let mut decoder = Decoder::new(plan.augment().max_pixels);
    let (decode, decode_cpu) = wall_and_cpu_rates(args.repeats, ids.len(), || {
        for bytes in &encoded {
            if let Ok(info) = decoder.probe(bytes) {
                let _ = decoder.decode(bytes, &info, DecodeRequest::FULL);
            }
        }
    });
    let mut scratch = augmenter.scratch();
    let mut out = vec![0u8; augmenter.sample_bytes()];
    let (process, process_cpu) = wall_and_cpu_rates(args.repeats, ids.len(), || {
        for (bytes, &id) in encoded.iter().zip(&ids) {
            let key = SampleKey {
                seed,
                epoch: 0,
                sample_id: id,
            };
            let _ = augmenter.process(bytes, key, &mut out, &mut scratch);
        }
    });

    println!();
    println!("| stage (one core) | images/s | µs/image |");
    println!("|---|---:|---:|");
    for (name, rate) in [
        ("read (positioned read, page cache)", read),
        ("full decode only (floor per core)", decode),
        ("full decode only, per CPU second of the thread", decode_cpu),
        ("decode + augment + write (ROI decode)", process),
        ("same, per CPU second of the thread", process_cpu),
    ] {
        println!("| {name} | {rate:.0} | {:.1} |", 1e6 / rate);
    }
    if let Some(specs) = &args.baseline_shards {
        compare_with_baseline(&pipeline, specs, args.samples as u64, args.repeats)?;
    }
    if args.stages_only {
        return Ok(ExitCode::SUCCESS);
    }
    let end_to_end = end_to_end(&pipeline, args.batches, args.repeats)?;
    let floor = decode * threads as f64;
    println!();
    println!(
        "end to end through the ring, {} workers: {:.0} images/s (median of {})",
        threads, end_to_end, args.repeats
    );
    println!(
        "decode floor (full decode × {} workers): {floor:.0} images/s → ringfeed reaches {:.0} % of it",
        threads,
        end_to_end / floor * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints the per-sample CPU time of the whole per-sample work on this dataset and on the
/// `specs` shards (plaintext, no key), interleaved in every repetition, and their difference.
fn compare_with_baseline(
    pipeline: &Pipeline,
    specs: &[String],
    samples: u64,
    repeats: usize,
) -> anyhow::Result<()> {
    let plan = pipeline.plan();
    let mut cfg = plan.source().clone();
    cfg.kind = SourceKind::Tar;
    cfg.shards = specs.to_vec();
    cfg.key_file = None;
    cfg.streams = Vec::new();
    let baseline = Mixture::open(&cfg, plan.base_dir())
        .with_context(|| format!("cannot open --baseline-shards {}", specs.join(" ")))?;
    let dataset = pipeline.dataset();
    let augmenter = plan.augmenter();
    let ids = |d: &Mixture| (0..d.len().min(samples)).collect::<Vec<u64>>();
    let (ids_a, ids_b) = (ids(dataset), ids(&baseline));
    if ids_a.len() != ids_b.len() {
        log::warn!(
            "--baseline-shards: {} samples against {} here; the two sets of images differ",
            ids_b.len(),
            ids_a.len()
        );
    }
    let mut scratch = augmenter.scratch();
    let mut out = vec![0u8; augmenter.sample_bytes()];
    let mut buf = Vec::new();
    let seed = plan.sampling().seed;
    let mut per_sample = |d: &Mixture, ids: &[u64]| {
        let before = thread_cpu_seconds();
        for &id in ids {
            if d.read_into(id, &mut buf).is_ok() {
                let key = SampleKey {
                    seed,
                    epoch: 0,
                    sample_id: id,
                };
                let _ = augmenter.process(&buf, key, &mut out, &mut scratch);
            }
        }
        (thread_cpu_seconds() - before) / ids.len().max(1) as f64 * 1e6
    };
    let (mut here, mut base) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        base.push(per_sample(&baseline, &ids_b));
        here.push(per_sample(dataset, &ids_a));
    }
    let (here, base) = (median(&mut here), median(&mut base));
    println!();
    println!(
        "| per-sample work, one core (read, decrypt if encrypted, decode, augment) | samples | µs CPU/sample |"
    );
    println!("|---|---:|---:|");
    println!(
        "| baseline (--baseline-shards) | {} | {base:.1} |",
        ids_b.len()
    );
    println!("| this dataset | {} | {here:.1} |", ids_a.len());
    println!(
        "this dataset costs {:+.1} % CPU per sample against the baseline (medians of {repeats} interleaved repeats)",
        (here / base - 1.0) * 100.0
    );
    Ok(())
}

fn read_all(dataset: &Mixture, ids: &[u64]) {
    let mut buf = Vec::new();
    for &id in ids {
        let _ = dataset.read_into(id, &mut buf);
    }
}

/// Median over `repeats` runs of `work` (which handles `items` items), in items per second.
fn median_rate(repeats: usize, items: usize, mut work: impl FnMut()) -> f64 {
    let mut rates: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            work();
            items as f64 / t.elapsed().as_secs_f64().max(1e-9)
        })
        .collect();
    median(&mut rates)
}

/// Like [`median_rate`], and also the items per second of this thread's CPU time over all
/// repetitions: on a shared machine a thread may get less than a core, and the CPU rate is
/// the per-core figure whatever else runs.
fn wall_and_cpu_rates(repeats: usize, items: usize, work: impl FnMut()) -> (f64, f64) {
    let cpu_before = thread_cpu_seconds();
    let wall = median_rate(repeats, items, work);
    let cpu = thread_cpu_seconds() - cpu_before;
    (wall, (items * repeats) as f64 / cpu.max(1e-9))
}

fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Serves into a private ring while a consumer thread takes and releases batches; returns the
/// median images/s over `repeats` windows of `batches` batches each (after one warm-up batch).
fn end_to_end(pipeline: &Pipeline, batches: u64, repeats: usize) -> anyhow::Result<f64> {
    let dir = RuntimeDir::from_env()?;
    let name = format!("bench-{}", std::process::id());
    // A private, unbounded single-lane ring: the consumer below stops the run.
    let spec = RingSpec {
        name: name.clone(),
        lanes: 1,
        epochs: 0,
        ..pipeline.ring_spec()
    };
    let producer = Producer::create(&spec, &dir)?;
    let stop = Arc::new(AtomicBool::new(false));
    let total = 1 + batches * repeats as u64;
    let consumer = {
        let stop = Arc::clone(&stop);
        let mut opts = AttachOptions::new(&name, 0);
        opts.dir = Some(dir.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<(Instant, u32)>> {
            let consumer = Consumer::attach_with(&opts)?;
            let mut seen = Vec::with_capacity(total as usize);
            while (seen.len() as u64) < total {
                match consumer.next_timeout(Duration::from_secs(60))? {
                    Some(batch) => seen.push((Instant::now(), batch.count())),
                    None => break,
                }
            }
            stop.store(true, Ordering::Relaxed);
            Ok(seen)
        })
    };
    pipeline.serve(&producer, &stop, Cursor { epoch: 0, index: 0 })?;
    let seen = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("the bench consumer thread panicked"))??;
    anyhow::ensure!(
        seen.len() as u64 == total,
        "the bench consumer saw {} batches, expected {total}",
        seen.len()
    );
    let mut rates = Vec::with_capacity(repeats);
    // Window k spans batches (k*batches, (k+1)*batches]: the first batch is the warm-up.
    for k in 0..repeats {
        let start = seen[k * batches as usize].0;
        let window = &seen[k * batches as usize + 1..=(k + 1) * batches as usize];
        let images: u64 = window.iter().map(|&(_, n)| u64::from(n)).sum();
        let elapsed = window[window.len() - 1].0 - start;
        rates.push(images as f64 / elapsed.as_secs_f64().max(1e-9));
    }
    Ok(median(&mut rates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_rate_leaves_out_time_off_the_cpu() {
        let (wall, cpu) = wall_and_cpu_rates(3, 10, || {
            std::thread::sleep(Duration::from_millis(20));
        });
        assert!(wall > 0.0 && wall <= 10.0 / 0.02, "wall rate {wall}");
        assert!(
            cpu > wall * 5.0,
            "sleeping used CPU time: cpu {cpu}, wall {wall}"
        );
    }

    #[test]
    fn cpu_rate_of_a_busy_thread_is_at_least_its_wall_rate() {
        let (wall, cpu) = wall_and_cpu_rates(3, 10, || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(20) {
                std::hint::black_box(0u64);
            }
        });
        // One thread's CPU time cannot exceed the wall time it ran for.
        assert!(cpu >= wall * 0.9, "cpu {cpu}, wall {wall}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
