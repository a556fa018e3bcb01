//! `ringfeed index`: write the sidecar indexes of tar shards ahead of time.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ringfeed::source::{expand_shards, load_or_build_index};

/// Flags of `ringfeed index`.
#[derive(Debug, Args)]
pub(crate) struct IndexArgs {
    /// Shards: paths, globs or brace ranges (`data/shard-{000000..000127}.tar`).
    #[arg(required = true, value_name = "SHARD")]
    shards: Vec<String>,
    /// Cache directory for indexes that cannot be written beside a read-only shard.
    #[arg(long, value_name = "DIR")]
    index_dir: Option<PathBuf>,
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
    Ok(ExitCode::SUCCESS)
}
