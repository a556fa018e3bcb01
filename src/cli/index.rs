//! `ringfeed index`: write the sidecar indexes of tar shards ahead of time.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ringfeed::source::{
    expand_shards, load_or_build_index, Dataset, Sampler, SamplingConfig, SourceConfig,
};

/// Flags of `ringfeed index`.
#[derive(Debug, Args)]
pub(crate) struct IndexArgs {
    /// Shards: paths, globs or brace ranges (`data/shard-{000000..000127}.tar`).
    #[arg(required = true, value_name = "SHARD")]
    shards: Vec<String>,
    /// Cache directory for indexes that cannot be written beside a read-only shard.
    #[arg(long, value_name = "DIR")]
    index_dir: Option<PathBuf>,
    /// Then open the shards as one dataset, as `serve` does, cache two epochs' orders (global
    /// shuffle), and print how long opening took and this process's resident memory
    /// (RssAnon): what the daemon's index and orders will cost for this dataset.
    #[arg(long)]
    memory: bool,
}

/// Indexes every shard (reusing fresh indexes), one line per shard and per skipped member.
pub(crate) fn run(args: IndexArgs) -> anyhow::Result<ExitCode> {
    let cwd = std::env::current_dir()?;
    let shards = expand_shards(&args.shards, &cwd)?;
    let (mut samples, mut skipped) = (0usize, 0usize);
    for shard in &shards {
        let loaded = load_or_build_index(shard, args.index_dir.as_deref())?;
        let index = &loaded.index;
        for issue in &index.issues {
            log::warn!(
                "skipped {}:{}: {}",
                shard.display(),
                issue.member,
                issue.reason
            );
        }
        println!(
            "{}: {} samples, {} skipped, index {} ({})",
            shard.display(),
            index.samples.len(),
            index.issues.len(),
            loaded.path.display(),
            if loaded.reused {
                "fresh, reused"
            } else {
                "written"
            }
        );
        samples += index.samples.len();
        skipped += index.issues.len();
    }
    println!(
        "{} shards, {samples} samples, {skipped} skipped",
        shards.len()
    );
    if args.memory {
        open_and_measure(&args.shards, &cwd, args.index_dir)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens `shards` as a dataset (from the fresh indexes just written), caches the orders of
/// epochs 0 and 1, and prints the time the open took and the process's RssAnon.
fn open_and_measure(
    shards: &[String],
    cwd: &Path,
    index_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let before = rss_anon_kib()?;
    let start = Instant::now();
    let mut cfg = SourceConfig::tar(shards.iter().cloned());
    cfg.index_dir = index_dir;
    let dataset = Dataset::open(&cfg, cwd)?;
    let opened = start.elapsed();
    let sampler = Sampler::new(dataset.len(), 1, 1, &SamplingConfig::default())?;
    let mut ids = Vec::new();
    for epoch in 0..2 {
        sampler.batch(epoch, 0, 0, &mut ids)?;
    }
    let after = rss_anon_kib()?;
    println!(
        "dataset of {} samples opened in {:.3} s; RssAnon {before} KiB before, {after} KiB with \
         the dataset and two epoch orders",
        dataset.len(),
        opened.as_secs_f64()
    );
    Ok(())
}

/// This process's `RssAnon` (resident anonymous memory) from /proc/self/status, in KiB.
fn rss_anon_kib() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no RssAnon line in /proc/self/status")
}
