//! Flags shared by `serve` and `bench`, and their resolution into a checked plan.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use ringfeed::augment::Augmenter;
use ringfeed::batch::{BatchSchema, Mixer};
use ringfeed::config::{ConfigFile, Overrides, Plan, TorchrunEnv};
use ringfeed::pipeline::{Pipeline, SharedPool};
use ringfeed::ring::resume::{Digest, Fingerprint};
use ringfeed::ring::RingSpec;
use ringfeed::source::{bundled_sample_dir, Mixture, Sampler};

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

/// The stages built from a plan, ready to run.
pub(crate) struct Stages {
    pub(crate) pipeline: Pipeline,
    pub(crate) dataset: Arc<Mixture>,
}

/// Opens the dataset, reports what indexing skipped, and builds the pipeline (with a worker
/// pool of its own).
pub(crate) fn build_stages(plan: &Plan) -> anyhow::Result<Stages> {
    build_stages_in(plan, None)
}

/// Like [`build_stages`], on `pool` when given (one daemon serving several rings).
pub(crate) fn build_stages_in(
    plan: &Plan,
    pool: Option<Arc<SharedPool>>,
) -> anyhow::Result<Stages> {
    if plan.file.source.key_file.is_some() {
        // A core dump of a process holding a key would write the key and decrypted images to
        // disk: none from here on (the hard limit too, so nothing in-process can undo it).
        let none = rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        rustix::process::setrlimit(rustix::process::Resource::Core, none)
            .context("cannot disable core dumps before reading the key")?;
    }
    let dataset = Mixture::open(&plan.file.source, &plan.base_dir).with_context(|| {
        format!(
            "cannot open the dataset of [source] ({})",
            source_hint(plan)
        )
    })?;
    let issues = dataset.skipped_at_index();
    if !issues.is_empty() {
        for issue in issues.iter().take(10) {
            log::warn!("skipped while indexing: {issue}");
        }
        if issues.len() > 10 {
            log::warn!("… and {} more skipped while indexing", issues.len() - 10);
        }
    }
    let n = dataset.len();
    anyhow::ensure!(
        n > 0,
        "the dataset has no usable samples ({})",
        source_hint(plan)
    );
    let total = n + issues.len() as u64;
    let max = plan.file.workers.max_skip_fraction;
    anyhow::ensure!(
        issues.len() as f64 <= max * total as f64,
        "{} of {total} samples were unusable while indexing, more than workers.max-skip-fraction = {max}; first: {}",
        issues.len(),
        issues.first().map(|i| i.to_string()).unwrap_or_default()
    );
    let sampling = &plan.file.sampling;
    if dataset.is_remote() && sampling.shuffle == ringfeed::source::ShuffleMode::Global {
        log::warn!(
            "shuffle = \"global\" on s3:// shards reads each sample with its own ranged GET \
             unless its shard's copy is in the cache (fetched ahead within half of \
             cache-limit); shuffle = \"block\" or \"buffer\" read shards in order and fetch \
             each whole, once (README, \"Object storage\")"
        );
    }
    let (batch, world) = (plan.file.batch.size, plan.ranks.world_size);
    let sampler = if dataset.has_streams() || sampling.samples_per_epoch.is_some_and(|s| s != n) {
        Sampler::mixture(
            &dataset.shares(),
            sampling.samples_per_epoch,
            batch,
            world,
            sampling,
        )?
    } else {
        Sampler::new(n, batch, world, sampling)?.with_shard_starts(&dataset.shard_starts())?
    };
    let sampler = match &plan.file.augment.repeated_augment {
        Some(r) => sampler.with_repeats(r.count)?,
        None => sampler,
    };
    if dataset.has_streams() {
        let draws = sampler.stream_draws();
        for (stream, draws) in dataset.streams().iter().zip(draws) {
            log::info!(
                "stream {}: {} samples, weight {}, {draws} per epoch",
                stream.name(),
                stream.len(),
                stream.weight()
            );
        }
    }
    let augmenter = Augmenter::new(&plan.file.augment)?;
    let mixer = Mixer::new(&plan.file.augment, plan.file.source.num_classes)?;
    let mut schema = BatchSchema::new(batch, &augmenter)
        .with_weights(plan.infobatch.is_some())
        .with_targets(mixer.as_ref().map(Mixer::num_classes));
    if dataset.has_streams() {
        schema = schema.with_source();
    }
    let dataset = Arc::new(dataset);
    let pool = match pool {
        Some(pool) => pool,
        None => SharedPool::new(plan.threads)?,
    };
    let mut pipeline = Pipeline::with_pool(
        plan.clone(),
        Arc::clone(&dataset),
        sampler,
        augmenter,
        schema,
        pool,
    )?;
    for (i, stream) in plan.file.source.streams.iter().enumerate() {
        if let Some(augment) = &stream.augment {
            pipeline = pipeline.with_stream_augmenter(i, Augmenter::new(augment)?);
        }
    }
    if let Some(mixer) = mixer {
        pipeline = pipeline.with_mixer(mixer);
    }
    Ok(Stages { pipeline, dataset })
}

impl Stages {
    /// The ring that serves this plan's batches: the configured name, lanes and epochs.
    pub(crate) fn ring_spec(&self, plan: &Plan) -> RingSpec {
        let schema = self.pipeline.schema();
        RingSpec {
            name: plan.name().to_owned(),
            lanes: plan.file.ring.lanes,
            slots_per_lane: plan.file.ring.slots_per_lane,
            batch_size: plan.file.batch.size,
            tensors: schema.tensors(),
            drop_last: plan.file.sampling.drop_last,
            nhwc: schema.nhwc,
            selection: plan.infobatch.is_some(),
            on_demand: plan.file.sampling.on_demand,
            batches_per_epoch: self.pipeline.batches_per_epoch(),
            epochs: plan.file.sampling.epochs,
            seed: plan.file.sampling.seed,
            samples_per_epoch: self.dataset.len(),
            world_size: plan.ranks.world_size,
            first_rank: plan.ranks.first_rank,
            epoch_samples: self.pipeline.sampler().epoch_len(),
            mean: schema.mean,
            std: schema.std,
        }
    }
}

impl Stages {
    /// What defines this plan's epoch order and batches (the ring's resume fingerprint, 1.3).
    pub(crate) fn fingerprint(&self, plan: &Plan) -> Fingerprint {
        let f = &plan.file;
        let mut augment = Digest::default();
        augment.str(&format!("{:?}", f.augment));
        for stream in &f.source.streams {
            augment.str(&format!("{:?}", stream.augment));
        }
        Fingerprint {
            seed: f.sampling.seed,
            dataset: self.dataset.identity_digest(),
            samples: self.pipeline.sampler().epoch_len(),
            shuffle: {
                let shuffle = serde_json::to_string(&f.sampling.shuffle).unwrap_or_default();
                // Repeated augmentation deals the order in chunks of the batch size: a resume
                // across another count or batch size would be another order, so both belong
                // to the order's fields here.
                match &f.augment.repeated_augment {
                    Some(r) if r.count > 1 => format!(
                        "{shuffle} with repeated-augment {} in chunks of {}",
                        r.count, f.batch.size
                    ),
                    _ => shuffle,
                }
            },
            selection: if plan.infobatch.is_some() {
                "infobatch"
            } else {
                "none"
            }
            .to_owned(),
            world_size: plan.ranks.world_size,
            batch_size: f.batch.size,
            drop_last: f.sampling.drop_last,
            augment: augment.hex(),
        }
    }
}

fn source_hint(plan: &Plan) -> String {
    format!("relative paths resolve against {}", display(&plan.base_dir))
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
