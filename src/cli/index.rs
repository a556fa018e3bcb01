//! `ringfeed index`: write the sidecar indexes of tar shards ahead of time.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ringfeed::source::{expand_shard_specs, ShardIndex};

/// Flags of `ringfeed index`.
#[derive(Debug, Args)]
pub(crate) struct IndexArgs {
    /// Shards: paths, globs or brace ranges (`data/shard-{000000..000127}.tar`).
    #[arg(required = true, value_name = "SHARD")]
    shards: Vec<String>,
    /// Write the indexes here instead of next to the shards.
    #[arg(long, value_name = "DIR")]
    index_dir: Option<PathBuf>,
}

/// Indexes every shard, printing one line per shard and the skipped members.
pub(crate) fn run(args: IndexArgs) -> anyhow::Result<ExitCode> {
    let cwd = std::env::current_dir()?;
    let shards = expand_shard_specs(&args.shards, &cwd)?;
    let (mut samples, mut skipped) = (0usize, 0usize);
    for shard in &shards {
        let index = ShardIndex::build(shard)?;
        let written = index.write(shard, args.index_dir.as_deref())?;
        for issue in index.issues() {
            eprintln!("ringfeed: skipped: {issue}");
        }
        println!(
            "{}: {} samples, {} skipped → {}",
            shard.display(),
            index.len(),
            index.issues().len(),
            written.display()
        );
        samples += index.len();
        skipped += index.issues().len();
    }
    println!("{} shards, {samples} samples, {skipped} skipped", shards.len());
    Ok(ExitCode::SUCCESS)
}
