//! The threads that connect the stages: one filler loop claims ring slots and, for each batch,
//! lets the worker pool read, decode and augment every sample straight into the slot.
//!
//! No stage logic lives here: reading is [`crate::source`], pixels are [`crate::augment`], the
//! tensors are [`crate::batch`], the memory is [`crate::ring`]. This module decides only
//! *which* batch goes into *which* slot, *when*, and what happens when a sample fails.
//!
//! # Brief overview
//!
//! [`Pipeline::from_plan`] takes a checked [`Plan`], opens its dataset, deals the epochs
//! ([`Sampler`]) and lays out the batch ([`BatchSchema`]); the stages themselves (augmenters,
//! mixer) come built in the plan. This is the whole path of `ringfeed serve`, `bench` and
//! `peek`, and of a program embedding the library:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ringfeed::batch::BatchBuffers;
//! use ringfeed::config::{ConfigFile, Overrides, Plan, TorchrunEnv};
//! use ringfeed::pipeline::{Cursor, Pipeline};
//!
//! let file = ConfigFile::load("configs/default.toml".as_ref())?;
//! let plan = Plan::resolve(file, &Overrides::default(), ".".as_ref(), &TorchrunEnv::default())?;
//! let pipeline = Pipeline::from_plan(plan)?;
//! // Either fill batches into memory…
//! let mut batch = BatchBuffers::new(pipeline.schema());
//! let report = pipeline.fill_batch(Cursor { epoch: 0, index: 0 }, 0, &mut batch.tensors(), &mut Vec::new())?;
//! assert_eq!(report.skipped(), 0);
//! // …or serve them into a ring: `Producer::create_with(&pipeline.ring_spec(), &dir,
//! // &pipeline.producer_options())`, then `pipeline.serve(&producer, &stop, start)`.
//! # Ok(())
//! # }
//! ```
//!
//! # Determinism
//! The bytes of batch `(lane, epoch, index)` depend only on the configuration: the sampler's
//! order is a function of (seed, epoch), each sample's augmentation a function of
//! (seed, epoch, sample id), and a failed sample is replaced by a fixed fallback chain. Thread
//! count and timing change nothing.
//!
//! With `[selection] mode = "infobatch"`, epoch `e` is served from an [`EpochPlan`] decided
//! once every lane has reported that it finished epoch `e − 1` (its feedback frames arrive
//! in order on its connection, so every loss of that epoch is in): the plan is then a function
//! of (seed, epoch, scores), not of timing. Until it is decided, the lanes at epoch `e` wait.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::augment::{SampleKey, Scratch};
use crate::batch::{
    BatchReport, BatchSchema, BatchTensors, ImageGeometry, Mixer, SampleFailure, SkipReason,
    TensorIndex,
};
use crate::config::Plan;
use crate::feedback::{ParamLog, Scores, Selector, StateStore};
use crate::ring::feedback::Feedback;
use crate::ring::resume::{Digest, Fingerprint};
use crate::ring::{BatchMeta, Producer, ProducerOptions, RingSpec};
use crate::source::selection::EpochPlan;
use crate::source::{Mixture, Sampler, SourceError};

/// How many other samples are tried, in a fixed order, before a failed sample's row is given
/// up on (and the batch with it).
const FALLBACK_TRIES: u64 = 16;

/// Why the pipeline stopped serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// Too many samples of one epoch failed.
    #[error(
        "{skipped} of {total} samples failed in epoch {epoch} (more than the allowed {allowed:.1} %, \
         workers.max-skip-fraction); last error: {last_error}"
    )]
    TooManyFailures {
        /// Epoch that crossed the limit.
        epoch: u64,
        /// Samples that failed in it so far.
        skipped: u64,
        /// Samples in an epoch.
        total: u64,
        /// The limit, in percent.
        allowed: f64,
        /// The last failure's description.
        last_error: String,
    },
    /// The `--shm-dir` ring file was truncated under the daemon.
    #[error(
        "the ring file {path} was truncated by a process with write access to it (the daemon's \
         user, or a consumer or member of the --allow-group group); no consumer can be served \
         any more. The default memfd ring (no --shm-dir) is sealed and cannot be truncated"
    )]
    RingTruncated {
        /// The ring file.
        path: std::path::PathBuf,
    },
    /// Not a single sample of a fallback chain could be used.
    #[error(
        "no usable sample found near sample {sample_id} ({tries} tried); last error: {last_error}"
    )]
    NoUsableSample {
        /// The sample that failed first.
        sample_id: u64,
        /// How many were tried.
        tries: u64,
        /// The last failure's description.
        last_error: String,
    },
    /// The sampler refused a batch position.
    #[error(transparent)]
    Sampler(#[from] crate::source::SamplerError),
    /// The worker pool could not be built.
    #[error("cannot start {threads} worker threads: {message}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// The reason.
        message: String,
    },
    /// Core dumps could not be turned off before a key is read (encrypted shards).
    #[error("cannot disable core dumps before reading the key: {source}")]
    CoreDumps {
        /// Why.
        source: std::io::Error,
    },
    /// The dataset of `[source]` could not be opened.
    #[error("cannot open the dataset of [source] (relative paths resolve against {})", base_dir.display())]
    Dataset {
        /// The directory relative paths resolved against.
        base_dir: std::path::PathBuf,
        /// Why.
        source: SourceError,
    },
    /// Indexing found no usable sample.
    #[error("the dataset has no usable samples (relative paths resolve against {})", base_dir.display())]
    EmptyDataset {
        /// The directory relative paths resolved against.
        base_dir: std::path::PathBuf,
    },
    /// Indexing found more unusable samples than `workers.max-skip-fraction` allows.
    #[error(
        "{unusable} of {total} samples were unusable while indexing, more than \
         workers.max-skip-fraction = {allowed}; first: {first}"
    )]
    UnusableAtIndex {
        /// Samples skipped while indexing.
        unusable: u64,
        /// Samples found, usable or not.
        total: u64,
        /// The limit (a fraction).
        allowed: f64,
        /// The first skipped sample, and why.
        first: String,
    },
}

/// One position in a lane's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Epoch.
    pub epoch: u64,
    /// Batch index within the epoch.
    pub index: u64,
}

impl Cursor {
    /// The batch after this one.
    pub fn advance(self, batches_per_epoch: u64) -> Cursor {
        if self.index + 1 >= batches_per_epoch {
            Cursor {
                epoch: self.epoch + 1,
                index: 0,
            }
        } else {
            Cursor {
                epoch: self.epoch,
                index: self.index + 1,
            }
        }
    }
}

/// Batches of the next epoch whose shards a remote dataset fetches ahead at the end of an
/// epoch (the prefetcher keeps the first `fetch-ahead` shards of them).
const NEXT_EPOCH_BATCHES: u64 = 64;

/// How long every lane may wait for an epoch decision before the daemon says which lanes it
/// waits for.
const DECISION_WAIT_WARNING: Duration = Duration::from_secs(30);

/// Upper bounds, in seconds, of the per-sample processing time histogram's buckets.
pub const SAMPLE_TIME_BUCKETS_S: [f64; 10] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128,
];

/// A lock-free histogram of per-sample decode + augment + write times (Prometheus style:
/// counts per upper bound, plus a last bucket for anything slower, a sum and a count).
#[derive(Debug, Default)]
pub struct SampleTimes {
    buckets: [AtomicU64; SAMPLE_TIME_BUCKETS_S.len() + 1],
    sum_ns: AtomicU64,
}

impl SampleTimes {
    /// Records one sample's time.
    pub fn record(&self, ns: u64) {
        let s = ns as f64 / 1e9;
        let bucket = SAMPLE_TIME_BUCKETS_S
            .iter()
            .position(|&bound| s <= bound)
            .unwrap_or(SAMPLE_TIME_BUCKETS_S.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Counts per bucket (the last one is "slower than every bound"), and the sum in ns.
    pub fn snapshot(&self) -> (Vec<u64>, u64) {
        (
            self.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            self.sum_ns.load(Ordering::Relaxed),
        )
    }
}

/// Counters the status line and `bench` read while the pipeline runs.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    /// Samples written into slots.
    pub samples_ok: AtomicU64,
    /// Samples that failed (and were replaced by a fallback).
    pub samples_skipped: AtomicU64,
    /// Batches published.
    pub batches: AtomicU64,
    /// Nanoseconds spent reading sample bytes, summed over workers.
    pub read_ns: AtomicU64,
    /// Nanoseconds spent decoding and augmenting, summed over workers.
    pub process_ns: AtomicU64,
    /// Epoch of the last batch published in lane 0 (for progress displays).
    pub lane0_epoch: AtomicU64,
    /// Index of the last batch published in lane 0, plus one (0 = none yet this epoch).
    pub lane0_batches_done: AtomicU64,
    /// Per-sample decode + augment + write times.
    pub sample_times: SampleTimes,
    /// Samples served from each stream of a mixture, in configuration order (empty for a
    /// plain `[source]`).
    pub stream_samples: Vec<AtomicU64>,
    /// The streams' names, matching `stream_samples`.
    pub stream_names: Vec<String>,
    /// Batches per lane of lane 0's current epoch (with `[selection]`; 0 = not decided).
    pub lane0_epoch_batches: AtomicU64,
    /// Samples pruned from lane 0's current epoch, all ranks together.
    pub lane0_epoch_pruned: AtomicU64,
    /// Valid losses reported.
    pub losses_reported: AtomicU64,
    /// NaN, infinite or negative losses, and unknown ids, reported (ignored).
    pub losses_ignored: AtomicU64,
    last_error: Mutex<String>,
}

impl PipelineCounters {
    /// `(name, samples served)` of each stream of a mixture (empty for a plain `[source]`).
    pub fn stream_counts(&self) -> Vec<(String, u64)> {
        self.stream_names
            .iter()
            .cloned()
            .zip(
                self.stream_samples
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed)),
            )
            .collect()
    }

    /// The last failure's description, empty if none.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

/// The longest a low-priority (on-demand) ring waits for its turn at the shared pool while a
/// training ring has slots to fill: after it, the batch is filled anyway, so an evaluation
/// pass progresses (about a batch per this interval) even under a trainer that never waits.
pub const LOW_PRIORITY_MAX_WAIT: Duration = Duration::from_millis(500);

/// One worker pool shared by every ring of a daemon (`serve --config a.toml --config b.toml`),
/// and the turn-taking between them: a training ring that has a free slot to fill is
/// *hungry*; an on-demand (evaluation) ring starts a batch only when no training ring is
/// hungry (or after [`LOW_PRIORITY_MAX_WAIT`]). Rings take turns at batch boundaries; a batch
/// once started is filled by every thread that is free.
pub struct SharedPool {
    pool: rayon::ThreadPool,
    threads: usize,
    /// Training rings with a free slot to fill right now.
    hungry: Mutex<u32>,
    changed: std::sync::Condvar,
}

impl std::fmt::Debug for SharedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl SharedPool {
    /// Starts `threads` worker threads.
    pub fn new(threads: usize) -> Result<Arc<SharedPool>, PipelineError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ringfeed-worker-{i}"))
            .build()
            .map_err(|e| PipelineError::Threads {
                threads,
                message: e.to_string(),
            })?;
        Ok(Arc::new(SharedPool {
            pool,
            threads,
            hungry: Mutex::new(0),
            changed: std::sync::Condvar::new(),
        }))
    }

    /// Worker threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Records whether a training ring has a free slot to fill; `was` is that ring's own
    /// flag, so each ring counts once.
    fn set_hungry(&self, was: &mut bool, now: bool) {
        if *was == now {
            return;
        }
        *was = now;
        let mut hungry = self.hungry.lock().unwrap_or_else(PoisonError::into_inner);
        if now {
            *hungry += 1;
        } else {
            *hungry = hungry.saturating_sub(1);
        }
        drop(hungry);
        self.changed.notify_all();
    }

    /// Waits until no training ring is hungry, or at most `max`.
    fn wait_for_turn(&self, max: Duration) {
        let deadline = Instant::now() + max;
        let mut hungry = self.hungry.lock().unwrap_or_else(PoisonError::into_inner);
        while *hungry > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            hungry = self
                .changed
                .wait_timeout(hungry, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A training ring's hungry flag at its [`SharedPool`], cleared when the serve loop ends,
/// however it ends.
struct Hunger<'a> {
    pool: &'a SharedPool,
    hungry: bool,
}

impl Hunger<'_> {
    fn set(&mut self, now: bool) {
        self.pool.set_hungry(&mut self.hungry, now);
    }
}

impl Drop for Hunger<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// A worker thread's reusable buffers: no per-sample allocation after warm-up.
struct WorkerBuffers {
    encoded: Vec<u8>,
    /// One per augmenter (the main one first, then each stream's own).
    scratch: Vec<Scratch>,
}

/// One row's result: the sample written (after any fallbacks) and the samples skipped on the
/// way.
struct Row {
    id: u64,
    label: i64,
    failures: Vec<SampleFailure>,
}

/// A skipped sample, logged as it happens (the daemon keeps serving; the batch's report and
/// the epoch's failure share count it).
fn skipped(sample_id: u64, reason: SkipReason, message: String) -> SampleFailure {
    log::warn!("skipped sample {message}");
    SampleFailure {
        sample_id,
        reason,
        message,
    }
}

/// Everything the filler loop needs, built once from a [`Plan`] ([`Pipeline::from_plan`]).
pub struct Pipeline {
    dataset: Arc<Mixture>,
    sampler: Sampler,
    schema: BatchSchema,
    /// The checked plan, with the built augmenters and mixer.
    plan: Plan,
    pool: Arc<SharedPool>,
    workers: Vec<Mutex<WorkerBuffers>>,
    counters: Arc<PipelineCounters>,
    /// Scores, loss statistics and the per-epoch decision (only the filler loop locks it).
    selector: Mutex<Selector>,
    /// The parameters each served sample was generated with (written by the workers).
    params: Arc<ParamLog>,
    /// A `PASS` frame reached this ring, which is not on-demand: warned once (a consumer
    /// sending them in a loop must not flood the log).
    pass_warned: AtomicBool,
}

impl Pipeline {
    /// Opens `plan`'s dataset, reports what indexing skipped, deals the epochs and lays out
    /// the batch: the checked path of `ringfeed serve`. The pipeline gets a worker pool of
    /// its own, of the plan's threads.
    ///
    /// With encrypted shards (`[source] key-file`), core dumps of the whole process are
    /// turned off first (soft and hard limit): a dump would write the key and decrypted
    /// images to disk.
    pub fn from_plan(plan: Plan) -> Result<Pipeline, PipelineError> {
        Pipeline::build(plan, None)
    }

    /// Like [`from_plan`](Self::from_plan), on a worker pool shared with other pipelines (one
    /// daemon serving several rings): an on-demand ring then gives way to the others (see
    /// [`SharedPool`]).
    pub fn from_plan_in(plan: Plan, pool: Arc<SharedPool>) -> Result<Pipeline, PipelineError> {
        Pipeline::build(plan, Some(pool))
    }

    fn build(plan: Plan, pool: Option<Arc<SharedPool>>) -> Result<Pipeline, PipelineError> {
        if plan.source().key_file.is_some() {
            // A core dump of a process holding a key would write the key and decrypted images
            // to disk: none from here on (the hard limit too, so nothing in-process can undo
            // it).
            let none = rustix::process::Rlimit {
                current: Some(0),
                maximum: Some(0),
            };
            rustix::process::setrlimit(rustix::process::Resource::Core, none)
                .map_err(|e| PipelineError::CoreDumps { source: e.into() })?;
        }
        let dataset = Mixture::open(plan.source(), plan.base_dir()).map_err(|source| {
            PipelineError::Dataset {
                base_dir: plan.base_dir().to_owned(),
                source,
            }
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
        if n == 0 {
            return Err(PipelineError::EmptyDataset {
                base_dir: plan.base_dir().to_owned(),
            });
        }
        let total = n + issues.len() as u64;
        let max = plan.workers().max_skip_fraction();
        if issues.len() as f64 > max * total as f64 {
            return Err(PipelineError::UnusableAtIndex {
                unusable: issues.len() as u64,
                total,
                allowed: max,
                first: issues.first().map(|i| i.to_string()).unwrap_or_default(),
            });
        }
        let sampling = plan.sampling();
        if dataset.is_remote() && sampling.shuffle == crate::source::ShuffleMode::Global {
            log::warn!(
                "shuffle = \"global\" on s3:// shards reads each sample with its own ranged GET \
                 unless its shard's copy is in the cache (fetched ahead within half of \
                 cache-limit); shuffle = \"block\" or \"buffer\" read shards in order and fetch \
                 each whole, once (README, \"Object storage\")"
            );
        }
        let (batch, world) = (plan.batch_size(), plan.ranks().world_size());
        let sampler = if dataset.has_streams() || sampling.samples_per_epoch.is_some_and(|s| s != n)
        {
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
        let sampler = match &plan.augment().repeated_augment {
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
        let mut schema = BatchSchema::new(batch, plan.augmenter())
            .with_weights(plan.selection().selecting())
            .with_targets(plan.mixer().map(Mixer::num_classes));
        if dataset.has_streams() {
            schema = schema.with_source();
        }
        let pool = match pool {
            Some(pool) => pool,
            None => SharedPool::new(plan.workers().threads())?,
        };
        Pipeline::assemble(plan, Arc::new(dataset), sampler, schema, pool)
    }

    /// The pipeline of a plan whose dataset is open, sampler dealt and schema laid out.
    fn assemble(
        plan: Plan,
        dataset: Arc<Mixture>,
        sampler: Sampler,
        schema: BatchSchema,
        pool: Arc<SharedPool>,
    ) -> Result<Pipeline, PipelineError> {
        let threads = pool.threads();
        let workers = (0..threads)
            .map(|_| {
                Mutex::new(WorkerBuffers {
                    encoded: Vec::new(),
                    scratch: plan.augmenters().iter().map(|a| a.scratch()).collect(),
                })
            })
            .collect();
        let n = dataset.len();
        let sel = plan.selection();
        let store = match (sel.infobatch(), sel.state_dir()) {
            (Some(ib), Some(dir)) => {
                let fingerprint = format!(
                    "n={n} seed={} batch={} world={} shuffle={:?} drop-last={} r={} anneal={} epochs={} score={:?} ema={}",
                    plan.sampling().seed,
                    plan.batch_size(),
                    plan.ranks().world_size(),
                    plan.sampling().shuffle,
                    plan.sampling().drop_last,
                    ib.prune_ratio,
                    ib.anneal,
                    ib.epochs,
                    sel.score(),
                    sel.ema_factor()
                );
                match StateStore::open(dir, fingerprint) {
                    Ok(store) => Some(store),
                    Err(e) => {
                        log::warn!(
                            "selection state directory {}: {e}; a restarted daemon will not reproduce its epochs",
                            dir.display()
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let selector = Selector::new(
            n,
            plan.ring().lanes(),
            Scores::new(n, sel.score(), sel.ema_factor()),
            sel.infobatch().copied(),
            store,
        );
        let params = selector.param_log();
        let streams = dataset.streams().len();
        let counters = PipelineCounters {
            stream_samples: if dataset.has_streams() {
                (0..streams).map(|_| AtomicU64::new(0)).collect()
            } else {
                Vec::new()
            },
            stream_names: if dataset.has_streams() {
                dataset
                    .streams()
                    .iter()
                    .map(|s| s.name().to_owned())
                    .collect()
            } else {
                Vec::new()
            },
            ..PipelineCounters::default()
        };
        Ok(Pipeline {
            dataset,
            sampler,
            schema,
            plan,
            pool,
            workers,
            counters: Arc::new(counters),
            selector: Mutex::new(selector),
            params,
            pass_warned: AtomicBool::new(false),
        })
    }

    /// Shared counters, for status lines and benchmarks.
    pub fn counters(&self) -> Arc<PipelineCounters> {
        Arc::clone(&self.counters)
    }

    /// Batches per epoch and lane.
    pub fn batches_per_epoch(&self) -> u64 {
        self.sampler.batches_per_epoch()
    }

    /// The checked plan this pipeline was built from (with its augmenters and mixer).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The datasets served.
    pub fn dataset(&self) -> &Mixture {
        &self.dataset
    }

    /// The datasets served, shared (for catalogs and tools that outlive a borrow).
    pub fn shared_dataset(&self) -> Arc<Mixture> {
        Arc::clone(&self.dataset)
    }

    /// The sampler dealing the epochs.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The batch schema slots are laid out by.
    pub fn schema(&self) -> &BatchSchema {
        &self.schema
    }

    /// The ring that serves this pipeline's batches: the plan's name, lanes and epochs.
    pub fn ring_spec(&self) -> RingSpec {
        let (plan, schema) = (&self.plan, &self.schema);
        RingSpec {
            name: plan.name().to_owned(),
            lanes: plan.ring().lanes(),
            slots_per_lane: plan.ring().slots_per_lane(),
            batch_size: plan.batch_size(),
            tensors: schema.tensors(),
            drop_last: plan.sampling().drop_last,
            nhwc: schema.nhwc,
            selection: plan.selection().selecting(),
            on_demand: plan.sampling().on_demand,
            batches_per_epoch: self.batches_per_epoch(),
            epochs: plan.sampling().epochs,
            seed: plan.sampling().seed,
            samples_per_epoch: self.dataset.len(),
            world_size: plan.ranks().world_size(),
            first_rank: plan.ranks().first_rank(),
            epoch_samples: self.sampler.epoch_len(),
            mean: schema.mean,
            std: schema.std,
        }
    }

    /// How the plan's ring is created beyond its [`RingSpec`]: memory, access, and the resume
    /// [`fingerprint`](Self::fingerprint).
    pub fn producer_options(&self) -> ProducerOptions {
        ProducerOptions {
            shm_dir: self.plan.ring().shm_dir().map(Into::into),
            allow_group: self.plan.ring().allow_gid(),
            fingerprint: Some(self.fingerprint()),
        }
    }

    /// What defines this pipeline's epoch order and batches (the ring's resume fingerprint,
    /// format 1.3).
    pub fn fingerprint(&self) -> Fingerprint {
        let plan = &self.plan;
        let mut augment = Digest::default();
        augment.str(&format!("{:?}", plan.augment()));
        for stream in &plan.source().streams {
            augment.str(&format!("{:?}", stream.augment));
        }
        Fingerprint {
            seed: plan.sampling().seed,
            dataset: self.dataset.identity_digest(),
            samples: self.sampler.epoch_len(),
            shuffle: {
                let shuffle = serde_json::to_string(&plan.sampling().shuffle).unwrap_or_default();
                // Repeated augmentation deals the order in chunks of the batch size: a resume
                // across another count or batch size would be another order, so both belong
                // to the order's fields here.
                match &plan.augment().repeated_augment {
                    Some(r) if r.count > 1 => format!(
                        "{shuffle} with repeated-augment {} in chunks of {}",
                        r.count,
                        plan.batch_size()
                    ),
                    _ => shuffle,
                }
            },
            selection: if plan.selection().selecting() {
                "infobatch"
            } else {
                "none"
            }
            .to_owned(),
            world_size: plan.ranks().world_size(),
            batch_size: plan.batch_size(),
            drop_last: plan.sampling().drop_last,
            augment: augment.hex(),
        }
    }

    /// Fills one batch (`rank`'s batch at `cursor`) into `tensors` (a ring slot's, or
    /// [`BatchBuffers`](crate::batch::BatchBuffers)) and says what happened to it. This is
    /// the whole per-batch work, used by the ring loop, `bench` and `peek`.
    pub fn fill_batch(
        &self,
        cursor: Cursor,
        rank: u32,
        tensors: &mut BatchTensors<'_>,
        ids: &mut Vec<u64>,
    ) -> Result<BatchReport, PipelineError> {
        let mut views = Vec::with_capacity(ids.capacity());
        self.sampler
            .batch_views(cursor.epoch, rank, cursor.index, ids, &mut views)?;
        let valid = self.sampler.valid_rows(rank, cursor.index);
        self.fill_rows(
            cursor.epoch,
            (rank, cursor.index),
            tensors,
            (ids, &views),
            None,
            valid,
        )
    }

    /// Fills the rows of `ids` (samples of `epoch`) into the tensors, `weights` into the
    /// `weights` tensor when given, marks the first `valid` rows 1 in `valid` (the rest is
    /// padding); then mixes the batch (`rank`'s batch `index`) when configured. `views[row]`
    /// is the row's view of its sample (repeated augmentation; empty means all 0).
    fn fill_rows(
        &self,
        epoch: u64,
        (rank, index): (u32, u64),
        tensors: &mut BatchTensors<'_>,
        (ids, views): (&[u64], &[u32]),
        weights: Option<&[f32]>,
        valid: u32,
    ) -> Result<BatchReport, PipelineError> {
        let sample_bytes = self.schema.sample_bytes();
        let seed = self.plan.sampling().seed;

        let images = tensors.images_mut();
        let rows: Vec<Result<Row, PipelineError>> = self.pool.pool.install(|| {
            images
                .par_chunks_mut(sample_bytes)
                .zip(ids.par_iter())
                .enumerate()
                .map(|(row, (out, &first))| {
                    // Each pool thread has its own buffers: the lock is never contended.
                    let worker = rayon::current_thread_index().unwrap_or(0) % self.workers.len();
                    let mut buffers = self.workers[worker]
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    let view = views.get(row).copied().unwrap_or(0);
                    self.fill_sample(seed, epoch, (first, view), out, &mut buffers)
                })
                .collect()
        });

        let mut report = BatchReport::default();
        let mut sample_ids = Vec::with_capacity(rows.len());
        let mut labels = Vec::with_capacity(rows.len());
        for row in rows {
            let row = row?;
            sample_ids.push(row.id);
            labels.push(row.label);
            report.failures.extend(row.failures);
        }
        report.written = sample_ids.len() as u64;
        self.count(&report);
        tensors.write_rows(TensorIndex::Labels, labels.iter().copied());
        tensors.write_rows(
            TensorIndex::SampleIds,
            sample_ids.iter().map(|&id| id as i64),
        );
        if self.schema.has(TensorIndex::Source) {
            // At most u16::MAX streams: Mixture::open refuses more.
            let streams: Vec<usize> = sample_ids
                .iter()
                .map(|&id| self.dataset.stream_of(id))
                .collect();
            tensors.write_rows(TensorIndex::Source, streams.iter().map(|&s| s as u16));
            for &stream in &streams {
                if let Some(counter) = self.counters.stream_samples.get(stream) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(weights) = weights {
            tensors.write_rows(TensorIndex::Weights, weights.iter().copied());
        }
        let batch_size = self.schema.batch_size as usize;
        tensors.write_rows(
            TensorIndex::Valid,
            (0..batch_size).map(|row| u8::from(row < valid as usize)),
        );
        if let Some(mixer) = self.plan.mixer() {
            let (c, h, w) = self.schema.chw;
            let params = mixer.draw(seed, epoch, rank, index, h as usize, w as usize);
            let geometry = ImageGeometry {
                dtype: self.schema.image_dtype,
                chw: (c as usize, h as usize, w as usize),
                nhwc: self.schema.nhwc,
            };
            let rows = labels.len() * sample_bytes;
            let images = &mut tensors.images_mut()[..rows];
            self.pool
                .pool
                .install(|| mixer.apply(&params, images, geometry));
            if let Some(targets) = tensors.tensor_mut(TensorIndex::Targets) {
                mixer.targets(&params, &labels, targets);
            }
        }
        Ok(report)
    }

    /// Adds a filled batch's report to the shared counters the status line reads.
    fn count(&self, report: &BatchReport) {
        let c = &self.counters;
        c.samples_ok.fetch_add(report.written, Ordering::Relaxed);
        c.samples_skipped
            .fetch_add(report.skipped(), Ordering::Relaxed);
        if let (Some(message), Ok(mut last)) = (report.last_error(), c.last_error.lock()) {
            message.clone_into(&mut last);
        }
    }

    /// Reads and processes `first`, or — if it fails — the next samples of its fixed fallback
    /// chain, which stays within `first`'s stream so a mixture's shares stay exact. Returns
    /// the row: the id actually written, its label, and the samples skipped before it.
    fn fill_sample(
        &self,
        seed: u64,
        epoch: u64,
        (first, view): (u64, u32),
        out: &mut [u8],
        buffers: &mut WorkerBuffers,
    ) -> Result<Row, PipelineError> {
        let range = self.dataset.stream_range(first);
        let n = range.end - range.start;
        let at = self.plan.augmenter_index(self.dataset.stream_of(first));
        let augmenter = &self.plan.augmenters()[at];
        let mut failures = Vec::new();
        for attempt in 0..FALLBACK_TRIES.min(n) {
            // A stride coprime to nothing in particular: neighbours in the fallback chain are
            // spread over the stream, yet the chain is fixed for a given (first, stream).
            let id = range.start + (first - range.start + attempt * 7_919) % n;
            let label = match self.dataset.label(id) {
                Ok(label) => label,
                Err(e) => {
                    let message = format!("{}: {e}", self.dataset.describe(id));
                    failures.push(skipped(id, SkipReason::Label, message));
                    continue;
                }
            };
            let t0 = std::time::Instant::now();
            let read = self.dataset.read_into(id, &mut buffers.encoded);
            let t1 = std::time::Instant::now();
            self.counters
                .read_ns
                .fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
            let result = match read {
                Ok(()) => {
                    let key = SampleKey {
                        seed,
                        epoch,
                        sample_id: id,
                    }
                    .view(view);
                    let r = augmenter.process_traced(
                        &buffers.encoded,
                        key,
                        out,
                        &mut buffers.scratch[at],
                    );
                    let ns = t1.elapsed().as_nanos() as u64;
                    self.counters.process_ns.fetch_add(ns, Ordering::Relaxed);
                    self.counters.sample_times.record(ns);
                    r.map(|params| self.params.record(id, epoch, &params))
                        .map_err(|e| {
                            (
                                SkipReason::Process,
                                format!("{}: {e}", self.dataset.describe(id)),
                            )
                        })
                }
                // Read errors already name the shard and member.
                Err(e) => Err((SkipReason::Read, e.to_string())),
            };
            match result {
                Ok(()) => {
                    return Ok(Row {
                        id,
                        label,
                        failures,
                    })
                }
                Err((reason, message)) => failures.push(skipped(id, reason, message)),
            }
        }
        Err(PipelineError::NoUsableSample {
            sample_id: first,
            tries: FALLBACK_TRIES.min(n),
            last_error: failures.pop().map(|f| f.message).unwrap_or_default(),
        })
    }

    /// Whether epochs are selected from reported losses (`[selection] mode = "infobatch"`).
    pub fn selecting(&self) -> bool {
        self.plan.selection().selecting()
    }

    fn selector(&self) -> std::sync::MutexGuard<'_, Selector> {
        self.selector.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies the feedback frames the producer received: losses to scores and statistics,
    /// end-of-epoch marks to the selection barrier. Returns the passes asked for (on an
    /// on-demand ring), as `(lane, cursor)`, oldest first.
    fn apply_feedback(&self, producer: &Producer) -> Vec<(u32, Cursor)> {
        let frames = producer.take_feedback();
        let mut passes = Vec::new();
        if frames.is_empty() {
            return passes;
        }
        let mut selector = self.selector();
        for (lane, frame) in frames {
            match frame {
                Feedback::Report { epoch, ids, losses } => {
                    let mixed = self.dataset.has_streams();
                    let a = selector.report(
                        epoch,
                        &ids,
                        &losses,
                        |id| self.dataset.label(id).unwrap_or(-1),
                        // At most u16::MAX streams: Mixture::open refuses more.
                        |id| mixed.then(|| self.dataset.stream_of(id) as u16),
                    );
                    self.counters
                        .losses_reported
                        .fetch_add(a.accepted, Ordering::Relaxed);
                    self.counters
                        .losses_ignored
                        .fetch_add(a.bad_loss + a.bad_id, Ordering::Relaxed);
                    if a.bad_id > 0 {
                        log::warn!(
                            "lane {lane}: {} reported sample ids outside the dataset (0..{}) ignored",
                            a.bad_id,
                            self.dataset.len()
                        );
                    }
                }
                Feedback::EpochDone { epoch } => selector.epoch_done(lane, epoch),
                Feedback::Pass { pass, index } => {
                    if self.on_demand() {
                        passes.push((lane, Cursor { epoch: pass, index }));
                    } else if !self.pass_warned.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "lane {lane}: a pass was asked for, but this ring is not on-demand \
                             ([sampling] on-demand = true); ignored (said once)"
                        );
                    }
                }
            }
        }
        passes
    }

    /// Whether this is an on-demand (evaluation) ring: lanes produce only the passes their
    /// consumers ask for.
    pub fn on_demand(&self) -> bool {
        self.plan.sampling().on_demand
    }

    /// What `ringfeed stat` and the metrics endpoint show about reported losses.
    pub fn evaluation_json(&self) -> serde_json::Value {
        let selector = self.selector();
        let scores = selector.scores().values();
        let (sum, seen) = scores
            .iter()
            .filter(|v| v.is_finite())
            .fold((0.0f64, 0u64), |(s, c), &v| (s + f64::from(v), c + 1));
        let mut v = selector.evaluation().to_json();
        v["scores"] = serde_json::json!({
            "samples": scores.len(),
            "seen": seen,
            "mean": if seen > 0 { sum / seen as f64 } else { 0.0 },
        });
        let c = &self.counters;
        v["selection"] = serde_json::json!({
            "mode": if self.selecting() { "infobatch" } else { "none" },
            "epoch": c.lane0_epoch.load(Ordering::Relaxed),
            "epoch_batches": c.lane0_epoch_batches.load(Ordering::Relaxed),
            "epoch_pruned": c.lane0_epoch_pruned.load(Ordering::Relaxed),
        });
        v
    }

    /// Decides the plans the lanes' current epochs need and may have, drops plans no lane
    /// needs any more, clamps resumed positions and announces each lane's epoch length.
    fn plan_epochs(
        &self,
        producer: &Producer,
        cursors: &mut [Cursor],
        plans: &mut BTreeMap<u64, Arc<EpochPlan>>,
        announced: &mut [Option<u64>],
    ) -> Result<(), PipelineError> {
        let epochs = self.plan.sampling().epochs;
        for cursor in cursors.iter() {
            let e = cursor.epoch;
            if (epochs > 0 && e >= epochs) || plans.contains_key(&e) {
                continue;
            }
            let mut selector = self.selector();
            if !selector.may_decide(e) {
                continue;
            }
            let plan = selector
                .decide(
                    e,
                    self.sampler.full_order(e),
                    self.plan.sampling().seed,
                    self.sampler.batch_size(),
                    self.sampler.world_size(),
                    self.sampler.drop_last(),
                )
                .ok_or(crate::source::SamplerError::Invalid(format!(
                    "epoch {e} keeps too few samples for one batch on every rank"
                )))?;
            log::info!(
                "epoch {e}: {} samples served, {} pruned, {} batches per lane",
                plan.kept(),
                plan.pruned(),
                plan.batches()
            );
            plans.insert(e, Arc::new(plan));
        }
        if let Some(oldest) = cursors.iter().map(|c| c.epoch).min() {
            plans.retain(|&e, _| e >= oldest);
        }
        for (l, cursor) in cursors.iter_mut().enumerate() {
            let Some(plan) = plans.get(&cursor.epoch) else {
                continue;
            };
            cursor.index = cursor.index.min(plan.batches() - 1);
            if announced[l] != Some(cursor.epoch) {
                announced[l] = Some(cursor.epoch);
                producer.announce_epoch(
                    l as u32,
                    cursor.epoch,
                    plan.batches(),
                    plan.kept(),
                    plan.pruned(),
                );
                if l == 0 {
                    self.counters
                        .lane0_epoch_batches
                        .store(plan.batches(), Ordering::Relaxed);
                    self.counters
                        .lane0_epoch_pruned
                        .store(plan.pruned(), Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Serves batches into `producer` until every configured epoch is published (then marks
    /// the ring finished) or `stop` is set. Returns after the batch in flight is published.
    pub fn serve(
        &self,
        producer: &Producer,
        stop: &AtomicBool,
        start: Cursor,
    ) -> Result<(), PipelineError> {
        let result = self.serve_loop(producer, stop, start);
        self.apply_feedback(producer);
        self.selector().save(true);
        producer.set_evaluation(self.evaluation_json());
        result
    }

    /// Tells a remote dataset what this node reads in `epoch` from the lanes' cursors on, in
    /// serving order (batch by batch, lane by lane), and what the next epoch reads first, so
    /// its shards are fetched ahead in that order.
    fn plan_reads(&self, epoch: u64, cursors: &[Cursor]) {
        let full = self.sampler.batches_per_epoch();
        let ranks = |at: u64| -> Vec<(u32, u64)> {
            cursors
                .iter()
                .enumerate()
                .filter(|(_, c)| c.epoch == at)
                .map(|(lane, c)| (self.plan.ranks().rank(lane as u32), c.index))
                .collect()
        };
        let mut ids = Vec::new();
        let mut reads = |epoch: u64, lanes: &[(u32, u64)], batches: u64| {
            let mut out = Vec::new();
            for index in 0..batches {
                for &(rank, from) in lanes {
                    if index >= from && self.sampler.batch(epoch, rank, index, &mut ids).is_ok() {
                        out.extend_from_slice(&ids);
                    }
                }
            }
            out
        };
        let current = reads(epoch, &ranks(epoch), full);
        let epochs = self.plan.sampling().epochs;
        let next = if epochs == 0 || epoch + 1 < epochs {
            let lanes: Vec<(u32, u64)> = (0..cursors.len() as u32)
                .map(|lane| (self.plan.ranks().rank(lane), 0))
                .collect();
            reads(epoch + 1, &lanes, full.min(NEXT_EPOCH_BATCHES))
        } else {
            Vec::new()
        };
        self.dataset.plan_reads(&current, &next);
    }

    fn serve_loop(
        &self,
        producer: &Producer,
        stop: &AtomicBool,
        start: Cursor,
    ) -> Result<(), PipelineError> {
        let lanes = self.plan.ring().lanes();
        let epochs = self.plan.sampling().epochs;
        let selecting = self.selecting();
        let full_epoch = self.sampler.batches_per_epoch();
        let mut cursors = vec![start; lanes as usize];
        let mut plans: BTreeMap<u64, Arc<EpochPlan>> = BTreeMap::new();
        let mut announced: Vec<Option<u64>> = vec![None; lanes as usize];
        let mut ids = Vec::new();
        let mut weights = Vec::new();
        let mut finished = false;
        let mut epoch_skips = EpochSkips::new(
            self.plan.workers().max_skip_fraction(),
            self.sampler.epoch_len(),
        );
        let mut rechecked_epoch = None;
        // The epoch whose reads a remote dataset was last told of (for fetching ahead).
        let mut planned_epoch = None;
        let mut evaluation_at: Option<Instant> = None;
        let on_demand = self.on_demand();
        // Fetching ahead needs the epoch's order up front: not with a selection or passes.
        let remote = !selecting && !on_demand && self.dataset.is_remote();
        // On an on-demand ring: whether each lane's pass (its cursor) is still to be served.
        let mut in_pass = vec![false; lanes as usize];
        // Whether this (training) ring counts as hungry at the shared pool.
        let mut hungry = Hunger {
            pool: &self.pool,
            hungry: false,
        };
        let clamp = |index: u64| index.min(full_epoch.saturating_sub(1));
        // Since when every active lane waits for an epoch decision, for the stall warning.
        let mut waiting_since: Option<Instant> = None;

        while !stop.load(Ordering::Relaxed) {
            if let Some(path) = producer.truncated_file() {
                return Err(PipelineError::RingTruncated {
                    path: path.to_path_buf(),
                });
            }
            for request in producer.take_seek_requests() {
                let lane = request.lane as usize;
                if lane < cursors.len() {
                    cursors[lane] = Cursor {
                        epoch: request.epoch,
                        // With selection the epoch's length is known once it is decided.
                        index: if selecting {
                            request.index
                        } else {
                            request.index.min(full_epoch.saturating_sub(1))
                        },
                    };
                    announced[lane] = None;
                    self.selector().resumed(request.lane, request.epoch);
                    // On an on-demand ring a resume is a pass asked for at attach.
                    in_pass[lane] = on_demand;
                }
                request.apply();
                // A seek makes a finished ring serve again (even one to the end of the last
                // epoch, where nothing is left to publish), so it must be finished anew.
                finished = false;
            }
            for (lane, pass) in self.apply_feedback(producer) {
                if let Some(c) = cursors.get_mut(lane as usize) {
                    *c = Cursor {
                        epoch: pass.epoch,
                        index: clamp(pass.index),
                    };
                    in_pass[lane as usize] = true;
                }
            }
            if evaluation_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                evaluation_at = Some(Instant::now());
                producer.set_evaluation(self.evaluation_json());
                self.selector().save(false);
            }
            if selecting {
                self.plan_epochs(producer, &mut cursors, &mut plans, &mut announced)?;
            }
            let all_done = epochs > 0 && cursors.iter().all(|c| c.epoch >= epochs);
            if on_demand {
                // Only while asked: a pass whose consumer left is dropped (the next consumer
                // asks for its own).
                for (l, asked) in in_pass.iter_mut().enumerate() {
                    if *asked && !producer.lane_attached(l as u32) {
                        *asked = false;
                    }
                }
            }
            let active: Vec<u32> = (0..lanes)
                .filter(|&l| {
                    if on_demand {
                        return in_pass[l as usize];
                    }
                    let e = cursors[l as usize].epoch;
                    (epochs == 0 || e < epochs) && (!selecting || plans.contains_key(&e))
                })
                .collect();
            if active.is_empty() {
                hungry.set(false);
                if on_demand {
                    // Nothing asked for: poll for PASS frames often, a trainer waits for them.
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                if all_done {
                    if !finished {
                        producer.finish();
                        finished = true;
                    }
                    // Stay alive for late seeks (a resumed consumer) until told to stop.
                    std::thread::sleep(Duration::from_millis(50));
                } else {
                    // Lanes wait for the next epoch's decision: poll the feedback often, the
                    // trainers are waiting too.
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= DECISION_WAIT_WARNING {
                        waiting_since = Some(Instant::now());
                        let epoch = cursors.iter().map(|c| c.epoch).min().unwrap_or(0);
                        log::warn!(
                            "epoch {epoch} waits for lane(s) {:?} to finish epoch {} (a lane without a consumer holds every epoch back; see docs/feedback.md)",
                            self.selector().lanes_behind(epoch),
                            epoch.saturating_sub(1)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            waiting_since = None;
            finished = false;
            if remote {
                let epoch = active.iter().map(|&l| cursors[l as usize].epoch).min();
                if planned_epoch != epoch {
                    planned_epoch = epoch;
                    if let Some(epoch) = epoch {
                        self.plan_reads(epoch, &cursors);
                    }
                }
            }
            let claimed = match producer.claim_any(&active, Duration::ZERO) {
                Some(slot) => Some(slot),
                None => {
                    hungry.set(false);
                    producer.claim_any(&active, Duration::from_millis(100))
                }
            };
            let Some(mut slot) = claimed else {
                continue;
            };
            if on_demand {
                self.pool.wait_for_turn(LOW_PRIORITY_MAX_WAIT);
            } else {
                hungry.set(true);
            }
            let lane = slot.lane();
            let cursor = cursors[lane as usize];
            if cursor.index == 0 && rechecked_epoch.is_none_or(|e| cursor.epoch > e) {
                // Shards deleted or replaced while open would otherwise be read through their
                // old descriptors forever.
                for problem in self.dataset.recheck_shards() {
                    log::warn!(
                        "epoch {}: {problem}; its samples are skipped from now on",
                        cursor.epoch
                    );
                }
                rechecked_epoch = Some(cursor.epoch);
            }
            let rank = self.plan.ranks().rank(lane);
            let (per_epoch, report) = {
                let mut tensors = slot.batch_tensors();
                match plans.get(&cursor.epoch) {
                    Some(plan) if selecting => {
                        plan.batch(rank, cursor.index, &mut ids, &mut weights);
                        let valid = plan.valid_rows(rank, cursor.index);
                        let report = self.fill_rows(
                            cursor.epoch,
                            (rank, cursor.index),
                            &mut tensors,
                            (&ids, &[]),
                            Some(&weights),
                            valid,
                        )?;
                        (plan.batches(), report)
                    }
                    // Every pass of an on-demand ring is epoch 0's batches, whatever its number.
                    _ if on_demand => {
                        let batch = Cursor {
                            epoch: 0,
                            index: cursor.index,
                        };
                        let report = self.fill_batch(batch, rank, &mut tensors, &mut ids)?;
                        (full_epoch, report)
                    }
                    _ => {
                        let report = self.fill_batch(cursor, rank, &mut tensors, &mut ids)?;
                        (full_epoch, report)
                    }
                }
            };
            producer.add_samples(report.written, report.skipped());
            if let Some(message) = report.last_error() {
                producer.record_error(message);
            }
            epoch_skips.add(
                cursor.epoch,
                report.failed_ids(),
                &self.counters.last_error(),
            )?;
            slot.publish(BatchMeta {
                epoch: cursor.epoch,
                index: cursor.index,
                count: self.plan.batch_size(),
                last_of_epoch: cursor.index + 1 == per_epoch,
            });
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            if lane == 0 {
                self.counters
                    .lane0_epoch
                    .store(cursor.epoch, Ordering::Relaxed);
                self.counters
                    .lane0_batches_done
                    .store(cursor.index + 1, Ordering::Relaxed);
            }
            if on_demand && cursor.index + 1 >= per_epoch {
                in_pass[lane as usize] = false; // the pass is complete: wait for the next
            } else {
                cursors[lane as usize] = cursor.advance(per_epoch);
            }
        }
        Ok(())
    }
}

/// Failure accounting per epoch, against `workers.max-skip-fraction`: the share of the
/// epoch's distinct samples that failed. A sample that fails as a first choice and again as
/// another row's fallback counts once, so a vanished shard weighs its true share.
struct EpochSkips {
    max_fraction: f64,
    samples: u64,
    epoch: u64,
    failed: std::collections::HashSet<u64>,
}

impl EpochSkips {
    fn new(max_fraction: f64, samples: u64) -> EpochSkips {
        EpochSkips {
            max_fraction,
            samples,
            epoch: 0,
            failed: std::collections::HashSet::new(),
        }
    }

    fn add(
        &mut self,
        epoch: u64,
        failed: impl IntoIterator<Item = u64>,
        last_error: &str,
    ) -> Result<(), PipelineError> {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.failed.clear();
        }
        self.failed.extend(failed);
        let skipped = self.failed.len() as u64;
        let limit = (self.max_fraction * self.samples as f64).floor() as u64;
        if skipped > limit {
            return Err(PipelineError::TooManyFailures {
                epoch,
                skipped,
                total: self.samples,
                allowed: self.max_fraction * 100.0,
                last_error: last_error.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_wraps_at_epoch_end() {
        let c = Cursor { epoch: 2, index: 4 };
        assert_eq!(c.advance(5), Cursor { epoch: 3, index: 0 });
        assert_eq!(c.advance(6), Cursor { epoch: 2, index: 5 });
    }

    #[test]
    fn sample_times_fall_into_their_buckets() {
        let t = SampleTimes::default();
        t.record(100_000); // 0.1 ms → first bucket
        t.record(1_000_000); // exactly 1 ms → the 1 ms bucket
        t.record(1_000_000_000); // 1 s → slower than every bound
        let (counts, sum) = t.snapshot();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[2], 1);
        assert_eq!(counts[SAMPLE_TIME_BUCKETS_S.len()], 1);
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(sum, 1_001_100_000);
    }

    #[test]
    fn skip_limit_is_per_epoch_and_counts_each_sample_once() {
        let ten: Vec<u64> = (0..10).collect();
        let mut s = EpochSkips::new(0.1, 100);
        s.add(0, ten.clone(), "x").unwrap();
        s.add(
            0,
            ten[..5].to_vec(),
            "the same samples failing again as fallbacks",
        )
        .unwrap();
        assert!(s.add(0, [10], "bad jpeg").is_err());
        let mut s = EpochSkips::new(0.1, 100);
        s.add(0, ten.clone(), "x").unwrap();
        s.add(1, ten, "x").unwrap();
    }
}
