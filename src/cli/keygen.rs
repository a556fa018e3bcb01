//! `ringfeed keygen FILE`: a new key for encrypted shards.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ringfeed::source::ShardKey;

/// Flags of `ringfeed keygen`.
#[derive(Debug, Args)]
pub(crate) struct KeygenArgs {
    /// Where to write the key (64 hex digits); created 0600 with O_EXCL, so an existing file
    /// or symbolic link is refused, never overwritten.
    file: PathBuf,
}

/// Writes the key and prints its id (never the key).
pub(crate) fn run(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let key = ShardKey::generate(&args.file)?;
    eprintln!(
        "ringfeed: wrote a new key to {} (key id {}); keep it apart from the shards and back it \
         up: without it the shards cannot be read",
        args.file.display(),
        key.id()
    );
    Ok(ExitCode::SUCCESS)
}
