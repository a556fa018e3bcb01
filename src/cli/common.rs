//! Flags shared by `serve`, `bench` and `peek`, and their resolution into a checked plan
//! (from which the library's `Pipeline::from_plan` builds everything else).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use ringfeed::config::{ConfigFile, Overrides, Plan, TorchrunEnv};
use ringfeed::source::bundled_sample_dir;

/// The configuration file and the flags that override it.
#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// TOML configuration (see configs/). Default: the bundled sample dataset. `serve` takes
    /// it several times to serve several rings (e.g. training and validation) from one
    /// worker pool.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: Vec<PathBuf>,
    /// Ring name consumers attach to.
    #[arg(long)]
    name: Option<String>,
    /// Tar shards: paths, globs or brace ranges (replaces [source] shards).
    #[arg(long, num_args = 1.., value_name = "SHARD")]
    pub(crate) shards: Option<Vec<String>>,
    /// Lanes (one per local rank).
    #[arg(long)]
    lanes: Option<u32>,
    /// Slots per lane.
    #[arg(long)]
    slots_per_lane: Option<u32>,
    /// Samples per batch.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Worker threads (0 = one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Epochs to serve (0 = unbounded).
    #[arg(long)]
    epochs: Option<u64>,
    /// Seed of the order and of every augmentation.
    #[arg(long)]
    seed: Option<u64>,
    /// Total ranks in the job (default: WORLD_SIZE, else the lane count).
    #[arg(long)]
    world_size: Option<u32>,
    /// Global rank of lane 0 (default: RANK - LOCAL_RANK, else 0).
    #[arg(long)]
    first_rank: Option<u32>,
    /// Seconds between status lines.
    #[arg(long, value_name = "SECONDS")]
    status_interval: Option<f64>,
    /// Largest share of an epoch's samples that may fail before the daemon stops.
    #[arg(long, value_name = "FRACTION")]
    max_skip_fraction: Option<f64>,
    /// Put the ring in the named file DIR/ringfeed-<name>.ring (e.g. /dev/shm) instead of the
    /// default sealed memfd; reserved in full at start, removed on exit.
    #[arg(long, value_name = "DIR")]
    shm_dir: Option<PathBuf>,
    /// Let members of GROUP (name or gid) attach too: runtime dir 0750, socket and ring file
    /// 0660, given to GROUP. Default: only this user.
    #[arg(long, value_name = "GROUP")]
    allow_group: Option<String>,
    /// Where [selection] keeps scores and epoch snapshots, so a restarted daemon serving a
    /// resumed trainer decides the same epochs. Default: state/<name> under the cache
    /// directory ($XDG_CACHE_HOME/ringfeed or ~/.cache/ringfeed).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Key file of encrypted shards (`ringfeed keygen`): members are decrypted in the workers'
    /// memory only. Must be a regular file of this user with no group/other permissions.
    /// Replaces [source] key-file.
    #[arg(long, value_name = "FILE", env = "RINGFEED_KEY_FILE")]
    key_file: Option<PathBuf>,
}

impl PlanArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            name: self.name.clone(),
            shards: self.shards.clone(),
            lanes: self.lanes,
            slots_per_lane: self.slots_per_lane,
            batch_size: self.batch_size,
            workers: self.workers,
            epochs: self.epochs,
            seed: self.seed,
            world_size: self.world_size,
            first_rank: self.first_rank,
            status_interval_s: self.status_interval,
            max_skip_fraction: self.max_skip_fraction,
            shm_dir: self.shm_dir.clone(),
            allow_group: self.allow_group.clone(),
            state_dir: self.state_dir.clone(),
            // Relative to the current directory, whatever the configuration's base directory.
            key_file: self
                .key_file
                .as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        }
    }
}

/// Reads the configuration, applies flags and the torchrun environment, validates once.
/// Refuses more than one `--config` (only `serve` hosts several rings).
pub(crate) fn resolve_plan(args: &PlanArgs) -> anyhow::Result<Plan> {
    anyhow::ensure!(
        args.config.len() <= 1,
        "--config is given {} times: only `ringfeed serve` serves several rings",
        args.config.len()
    );
    resolve_one(args, args.config.first())
}

/// One plan per `--config` (`serve`): with several, flags that shape one ring (its name,
/// shards, batch, epochs, seed…) are refused, since they would apply to every ring; the rest
/// describe the node and apply to all (lanes — one per local rank —, workers, world size,
/// first rank, status interval, shm-dir, allow-group, key file, state dir,
/// max-skip-fraction). Ring names must differ.
pub(crate) fn resolve_plans(args: &PlanArgs) -> anyhow::Result<Vec<Plan>> {
    if args.config.len() <= 1 {
        return Ok(vec![resolve_one(args, args.config.first())?]);
    }
    let per_ring = [
        ("--name", args.name.is_some()),
        ("--shards", args.shards.is_some()),
        ("--slots-per-lane", args.slots_per_lane.is_some()),
        ("--batch-size", args.batch_size.is_some()),
        ("--epochs", args.epochs.is_some()),
        ("--seed", args.seed.is_some()),
    ];
    if let Some((flag, _)) = per_ring.iter().find(|(_, given)| *given) {
        anyhow::bail!(
            "{flag} shapes one ring, but {} --config files are given: set it in the ring's \
             configuration file instead",
            args.config.len()
        );
    }
    let mut plans: Vec<Plan> = Vec::with_capacity(args.config.len());
    for path in &args.config {
        let plan =
            resolve_one(args, Some(path)).with_context(|| format!("in {}", display(path)))?;
        if let Some(other) = plans.iter().find(|p| p.name() == plan.name()) {
            anyhow::bail!(
                "two --config files name the ring '{}' ({} and another): give each [ring] a name \
                 of its own",
                other.name(),
                display(path)
            );
        }
        plans.push(plan);
    }
    Ok(plans)
}

fn resolve_one(args: &PlanArgs, config: Option<&PathBuf>) -> anyhow::Result<Plan> {
    let (file, base_dir) = match config {
        Some(path) => {
            let file = ConfigFile::load(path)?;
            // Relative shard paths in a config file resolve against the current directory,
            // as on the command line.
            (file, std::env::current_dir().context("current directory")?)
        }
        // Shards given as flags replace the sample and, like any path on the command line,
        // resolve against the current directory.
        None if args.shards.is_some() => (
            ConfigFile::builtin_default(),
            std::env::current_dir().context("current directory")?,
        ),
        // The built-in default serves the sample embedded in the binary, so it works from any
        // directory and from a binary installed far from the repository (pip).
        None => (ConfigFile::builtin_default(), bundled_sample_dir()?),
    };
    let env = TorchrunEnv::from_process_env()?;
    Ok(Plan::resolve(file, &args.overrides(), &base_dir, &env)?)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
