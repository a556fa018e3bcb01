//! Flag definitions and dispatch. Flags are parsed by clap into raw structs here, then resolved
//! once into a checked [`ringfeed::config::Plan`] (see [`common::resolve_plan`]).
#![forbid(unsafe_code)]

mod bench;
mod caption;
mod common;
mod completions;
mod consume;
mod feedback_metrics;
mod index;
mod keygen;
mod logging;
mod man;
mod metrics;
mod metrics_http;
mod pack;
mod parent_watch;
mod peek;
mod provenance;
mod serve;
mod stat;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ringfeed: decode and augment image batches into a zero-copy shared-memory ring.
#[derive(Debug, Parser)]
#[command(name = "ringfeed", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: read, decode and augment samples into the ring until stopped.
    ///
    /// With no flags it serves the bundled sample dataset (configs/default.toml) as ring
    /// `default`.
    Serve(serve::ServeArgs),
    /// Measure the pipeline: per-stage rates on one core and end-to-end images/s through a
    /// real ring, without an external consumer.
    Bench(bench::BenchArgs),
    /// Write the sidecar index of tar shards ahead of time.
    Index(index::IndexArgs),
    /// A minimal consumer: attach to a ring lane, take batches and print one line each.
    Consume(consume::ConsumeArgs),
    /// Show a running ring's state, throughput, occupancy and who waits for whom, read
    /// straight from its shared memory (refreshes every second).
    Stat(stat::StatArgs),
    /// Write a PNG grid of one batch (class names or labels, and sample ids, under each
    /// image): copied from a running ring without taking it from the trainer, or rendered from
    /// --config FILE.
    Peek(peek::PeekArgs),
    /// Convert an ImageFolder tree (or a `path label` list file) into WebDataset tar shards
    /// plus index.json.
    Pack(pack::PackArgs),
    /// Write a new random 256-bit key for encrypted shards to FILE (created 0600, never
    /// overwritten); prints its key id.
    Keygen(keygen::KeygenArgs),
    /// Print a shell completion script: `ringfeed completions bash > ~/.local/share/bash-completion/completions/ringfeed`.
    Completions(completions::CompletionsArgs),
    /// Print the man page (roff): `ringfeed man | man -l -`.
    Man(man::ManArgs),
}

/// Parses the command line and runs the subcommand.
pub(crate) fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    logging::init();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Index(args) => index::run(args),
        Command::Consume(args) => consume::run(args),
        Command::Stat(args) => stat::run(args),
        Command::Peek(args) => peek::run(args),
        Command::Pack(args) => pack::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => man::run(args),
    }
}
