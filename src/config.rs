//! Configuration: the TOML file (serde data mirroring `configs/*.toml`), flag overrides, and
//! the one validation step that turns both into a checked [`Plan`].
//!
//! Everything downstream takes a [`Plan`] and never re-validates: if a `Plan` exists, its
//! values are in range.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::augment::{AugmentConfig, Augmenter};
use crate::source::selection::{InfoBatch, SelectionConfig, SelectionMode};
use crate::source::{SamplingConfig, SourceConfig, SourceKind};

/// The built-in configuration `ringfeed serve` uses when no `--config` is given: the bundled
/// sample dataset under `data/sample/`, which the binary embeds
/// ([`crate::source::bundled_sample_dir`] writes it out and gives the base directory).
pub const DEFAULT_CONFIG: &str = include_str!("../configs/default.toml");

/// The whole configuration file, as written by a user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// Where samples come from (`[source]`).
    pub source: SourceConfig,
    /// Order, shuffling and epochs (`[sampling]`).
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// Batch shape (`[batch]`).
    #[serde(default)]
    pub batch: BatchConfig,
    /// Per-sample transforms and the output tensor (`[augment]`).
    pub augment: AugmentConfig,
    /// The shared-memory ring (`[ring]`).
    #[serde(default)]
    pub ring: RingConfig,
    /// Worker threads and failure policy (`[workers]`).
    #[serde(default)]
    pub workers: WorkersConfig,
    /// Rank layout across nodes (`[distributed]`).
    #[serde(default)]
    pub distributed: DistributedConfig,
    /// Per-epoch sample selection from reported losses (`[selection]`).
    #[serde(default)]
    pub selection: SelectionConfig,
}

/// `[batch]`: how many samples a batch holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BatchConfig {
    /// Samples per batch (default 32).
    pub size: u32,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { size: 32 }
    }
}

/// `[ring]`: the shared-memory ring's name and shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RingConfig {
    /// Ring name consumers attach to (default `"default"`).
    pub name: String,
    /// Lanes = consumers served at once, one per local rank (default 1).
    pub lanes: u32,
    /// Batches each lane can hold ready or in use at once (default 4).
    pub slots_per_lane: u32,
    /// Directory for a named ring file `ringfeed-<name>.ring` instead of the default sealed
    /// memfd (e.g. `/dev/shm`; default none).
    pub shm_dir: Option<PathBuf>,
    /// Group (name or gid) whose members may attach besides the daemon's own user (default
    /// none: owner only).
    pub allow_group: Option<String>,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            name: "default".to_owned(),
            lanes: 1,
            slots_per_lane: 4,
            shm_dir: None,
            allow_group: None,
        }
    }
}

/// `[workers]`: decode/augment threads and how many failures are tolerated.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkersConfig {
    /// Worker threads; 0 = one per available core (default 0).
    pub threads: usize,
    /// Largest share of an epoch's samples that may fail before the daemon stops with an
    /// error instead of silently serving a much smaller dataset (default 0.05).
    pub max_skip_fraction: f64,
    /// Seconds between status lines (default 5).
    pub status_interval_s: f64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            threads: 0,
            max_skip_fraction: 0.05,
            status_interval_s: 5.0,
        }
    }
}

/// `[distributed]`: where this node's lanes sit among all ranks of the job.
///
/// Lane `l` serves global rank `first-rank + l`. Unset values come from torchrun's
/// environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`) when present, else a
/// single node whose lanes are all the ranks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DistributedConfig {
    /// Total ranks in the job, all nodes together.
    pub world_size: Option<u32>,
    /// Global rank of this node's lane 0.
    pub first_rank: Option<u32>,
}

/// Flag values that override the file (`None` = keep the file's value).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--name`
    pub name: Option<String>,
    /// `--shards` (replaces `[source] shards`)
    pub shards: Option<Vec<String>>,
    /// `--lanes`
    pub lanes: Option<u32>,
    /// `--slots-per-lane`
    pub slots_per_lane: Option<u32>,
    /// `--batch-size`
    pub batch_size: Option<u32>,
    /// `--workers`
    pub workers: Option<usize>,
    /// `--epochs`
    pub epochs: Option<u64>,
    /// `--seed`
    pub seed: Option<u64>,
    /// `--world-size`
    pub world_size: Option<u32>,
    /// `--first-rank`
    pub first_rank: Option<u32>,
    /// `--status-interval`
    pub status_interval_s: Option<f64>,
    /// `--max-skip-fraction`
    pub max_skip_fraction: Option<f64>,
    /// `--shm-dir`
    pub shm_dir: Option<PathBuf>,
    /// `--allow-group`
    pub allow_group: Option<String>,
    /// `--state-dir`
    pub state_dir: Option<PathBuf>,
    /// `--key-file` / `RINGFEED_KEY_FILE` (replaces `[source] key-file`)
    pub key_file: Option<PathBuf>,
}

/// A configuration problem, named precisely enough to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown/mistyped key.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// The file (or "built-in default").
        origin: String,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config value `{key}` = {value}: {allowed}")]
    Invalid {
        /// Dotted key, e.g. `ring.lanes`.
        key: &'static str,
        /// The offending value.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// The augmentation section was refused.
    #[error("invalid config [augment]: {0}")]
    Augment(#[from] crate::augment::AugmentConfigError),
}

/// The validated configuration every other part is built from.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The file as resolved, overrides applied.
    pub file: ConfigFile,
    /// Directory relative paths in the file resolve against.
    pub base_dir: PathBuf,
    /// Worker threads (resolved: never 0).
    pub threads: usize,
    /// Global rank of each lane, and the world size.
    pub ranks: RankPlan,
    /// Several lanes and no world size from anywhere (`[distributed] world-size`,
    /// `--world-size`, `WORLD_SIZE`): the world size was assumed to be the lane count (a
    /// single-node job), which `serve` says loudly. On several nodes every node would then
    /// serve the same samples.
    pub world_size_assumed: bool,
    /// `ring.allow-group` resolved to a gid.
    pub allow_gid: Option<u32>,
    /// The checked InfoBatch parameters (`None`: `[selection] mode = "none"`).
    pub infobatch: Option<InfoBatch>,
    /// Where selection state is persisted (`None`: nowhere, no cache directory known).
    pub state_dir: Option<PathBuf>,
}

/// Which global rank each lane serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlan {
    /// Ranks in the whole job.
    pub world_size: u32,
    /// Global rank of lane 0; lane `l` serves `first_rank + l`.
    pub first_rank: u32,
}

impl RankPlan {
    /// The global rank lane `lane` serves.
    pub fn rank(&self, lane: u32) -> u32 {
        self.first_rank + lane
    }
}

impl ConfigFile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: without_type_names(e.to_string().trim_end()).replace('\n', "\n  "),
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        ConfigFile::parse(&text, &path.display().to_string())
    }

    /// The built-in default (the bundled sample dataset).
    pub fn builtin_default() -> ConfigFile {
        ConfigFile::parse(DEFAULT_CONFIG, "built-in default")
            .expect("configs/default.toml is checked by a unit test")
    }
}

/// A parser message with the Rust type names serde puts in it (`expected struct FlipConfig`,
/// `expected enum ShuffleMode`) replaced by what a user writes: a table, one of the names.
fn without_type_names(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("expected ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "expected ".len()..];
        let (kind, replacement) = if after.starts_with("struct ") {
            ("struct ", "expected a table")
        } else if after.starts_with("enum ") {
            ("enum ", "expected one of the documented names")
        } else {
            out.push_str("expected ");
            rest = after;
            continue;
        };
        let name = &after[kind.len()..];
        let end = name
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(name.len());
        out.push_str(replacement);
        rest = &name[end..];
    }
    out.push_str(rest);
    out
}

/// Environment variables of torchrun that describe the rank layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TorchrunEnv {
    /// `WORLD_SIZE`
    pub world_size: Option<u32>,
    /// `RANK`
    pub rank: Option<u32>,
    /// `LOCAL_RANK`
    pub local_rank: Option<u32>,
    /// `LOCAL_WORLD_SIZE`
    pub local_world_size: Option<u32>,
}

impl TorchrunEnv {
    /// Reads the variables from the process environment; unparsable values are errors.
    pub fn from_process_env() -> Result<TorchrunEnv, ConfigError> {
        fn var(key: &'static str) -> Result<Option<u32>, ConfigError> {
            match std::env::var(key) {
                Err(_) => Ok(None),
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| ConfigError::Invalid {
                        key,
                        value: format!("{v:?}"),
                        allowed: "a non-negative integer (environment variable)".to_owned(),
                    }),
            }
        }
        Ok(TorchrunEnv {
            world_size: var("WORLD_SIZE")?,
            rank: var("RANK")?,
            local_rank: var("LOCAL_RANK")?,
            local_world_size: var("LOCAL_WORLD_SIZE")?,
        })
    }
}

/// Checks `[selection]`; the InfoBatch parameters when `mode = "infobatch"`.
fn check_selection(file: &ConfigFile) -> Result<Option<InfoBatch>, ConfigError> {
    let s = &file.selection;
    if !(0.0..1.0).contains(&s.prune_ratio) {
        return Err(invalid(
            "selection.prune-ratio",
            s.prune_ratio,
            "0.0 to below 1.0",
        ));
    }
    if !(0.0..=1.0).contains(&s.anneal) {
        return Err(invalid("selection.anneal", s.anneal, "0.0 to 1.0"));
    }
    if !(0.0..1.0).contains(&s.ema_factor) {
        return Err(invalid(
            "selection.ema-factor",
            s.ema_factor,
            "0.0 to below 1.0",
        ));
    }
    if s.state_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        return Err(invalid("selection.state-dir", "\"\"", "a directory path"));
    }
    if s.mode == SelectionMode::None {
        return Ok(None);
    }
    let epochs = match file.sampling.epochs {
        0 => s.epochs,
        n => n,
    };
    if epochs == 0 {
        return Err(invalid(
            "selection.epochs",
            0,
            "the run length to anneal against (needed when [sampling] epochs = 0)",
        ));
    }
    Ok(Some(InfoBatch {
        prune_ratio: s.prune_ratio,
        anneal: s.anneal,
        epochs,
    }))
}

fn invalid(key: &'static str, value: impl std::fmt::Display, allowed: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        allowed: allowed.to_owned(),
    }
}

impl Plan {
    /// Applies `overrides` to `file` and checks every value once.
    pub fn resolve(
        mut file: ConfigFile,
        overrides: &Overrides,
        base_dir: &Path,
        env: &TorchrunEnv,
    ) -> Result<Plan, ConfigError> {
        let o = overrides;
        if let Some(v) = &o.name {
            file.ring.name = v.clone();
        }
        if let Some(v) = &o.shards {
            if !file.source.streams.is_empty() {
                return Err(invalid(
                    "source.streams",
                    format!("{} streams", file.source.streams.len()),
                    "--shards replaces [source] shards, but this config mixes [[source.streams]]: \
                     edit the streams' shards in the file instead",
                ));
            }
            file.source.kind = SourceKind::Tar;
            file.source.shards = v.clone();
        }
        if let Some(v) = &o.key_file {
            file.source.key_file = Some(v.clone());
        }
        if let Some(v) = o.lanes {
            file.ring.lanes = v;
        }
        if let Some(v) = o.slots_per_lane {
            file.ring.slots_per_lane = v;
        }
        if let Some(v) = o.batch_size {
            file.batch.size = v;
        }
        if let Some(v) = o.workers {
            file.workers.threads = v;
        }
        if let Some(v) = o.epochs {
            file.sampling.epochs = v;
        }
        if let Some(v) = o.seed {
            file.sampling.seed = v;
        }
        if let Some(v) = o.world_size {
            file.distributed.world_size = Some(v);
        }
        if let Some(v) = o.first_rank {
            file.distributed.first_rank = Some(v);
        }
        if let Some(v) = o.status_interval_s {
            file.workers.status_interval_s = v;
        }
        if let Some(v) = o.max_skip_fraction {
            file.workers.max_skip_fraction = v;
        }
        if let Some(v) = &o.shm_dir {
            file.ring.shm_dir = Some(v.clone());
        }
        if let Some(v) = &o.allow_group {
            file.ring.allow_group = Some(v.clone());
        }
        if let Some(v) = &o.state_dir {
            file.selection.state_dir = Some(v.clone());
        }

        if let Err(e) = crate::ring::validate_name(&file.ring.name) {
            return Err(invalid(
                "ring.name",
                format!("{:?}", file.ring.name),
                &e.to_string(),
            ));
        }
        if !(1..=64).contains(&file.ring.lanes) {
            return Err(invalid("ring.lanes", file.ring.lanes, "1 to 64"));
        }
        if !(1..=64).contains(&file.ring.slots_per_lane) {
            return Err(invalid(
                "ring.slots-per-lane",
                file.ring.slots_per_lane,
                "1 to 64",
            ));
        }
        if !(1..=65536).contains(&file.batch.size) {
            return Err(invalid("batch.size", file.batch.size, "1 to 65536"));
        }
        let m = file.source.max_sample_bytes;
        if !(1..=u64::from(u32::MAX)).contains(&m) {
            return Err(invalid(
                "source.max-sample-bytes",
                m,
                "1 to 4294967295 bytes",
            ));
        }
        if file.workers.threads > 1024 {
            return Err(invalid(
                "workers.threads",
                file.workers.threads,
                "0 (one per core) to 1024",
            ));
        }
        let f = file.workers.max_skip_fraction;
        if !(0.0..=1.0).contains(&f) {
            return Err(invalid("workers.max-skip-fraction", f, "0.0 to 1.0"));
        }
        let s = file.workers.status_interval_s;
        if !(s.is_finite() && s > 0.0) {
            return Err(invalid(
                "workers.status-interval-s",
                s,
                "a positive number of seconds",
            ));
        }
        if file
            .ring
            .shm_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid("ring.shm-dir", "\"\"", "a directory path"));
        }
        let allow_gid = match &file.ring.allow_group {
            None => None,
            Some(g) => Some(
                crate::ring::resolve_group(g)
                    .map_err(|e| invalid("ring.allow-group", format!("{g:?}"), &e.to_string()))?,
            ),
        };
        let infobatch = check_selection(&file)?;
        if infobatch.is_some() && file.augment.repeated_augment.is_some() {
            return Err(invalid(
                "augment.repeated-augment",
                "with [selection]",
                "leave out one of them: selection decides which samples an epoch serves, \
                 repeated augmentation serves every sample several times",
            ));
        }
        let state_dir = file.selection.state_dir.clone().or_else(|| {
            crate::source::index::default_cache_dir(|k| std::env::var(k).ok())
                .map(|d| d.join("state").join(&file.ring.name))
        });
        // Building the augmenter checks the whole [augment] table.
        let main = Augmenter::new(&file.augment)?;
        crate::batch::Mixer::new(&file.augment, file.source.num_classes)?;
        for (i, stream) in file.source.streams.iter().enumerate() {
            if let Some(augment) = &stream.augment {
                if augment.repeated_augment.is_some() {
                    return Err(invalid(
                        "source.streams.augment",
                        format!("stream {i}: repeated-augment"),
                        "repeated augmentation shapes the whole epoch: configure it in [augment]",
                    ));
                }
                if crate::batch::Mixer::new(augment, Some(2)).map_or(true, |m| m.is_some()) {
                    return Err(invalid(
                        "source.streams.augment",
                        format!(
                            "stream {i}: mixup / cutmix / mix-prob / switch-prob / label-smoothing"
                        ),
                        "batch mixing mixes whole batches across streams: configure it in \
                         [augment] (with [source] num-classes)",
                    ));
                }
                let own = Augmenter::new(augment)?;
                if let Err(difference) = main.same_output(&own) {
                    return Err(invalid(
                        "source.streams.augment",
                        format!("stream {i}: {difference}"),
                        "a stream's own [augment] must write the same output as [augment] \
                         (size, dtype, layout, channels, normalize): one ring holds one shape",
                    ));
                }
            }
        }
        if file.sampling.samples_per_epoch == Some(0) {
            return Err(invalid(
                "sampling.samples-per-epoch",
                0,
                "at least 1 (or leave it out: the dataset's size)",
            ));
        }

        if file.sampling.on_demand {
            if file.sampling.epochs != 0 {
                return Err(invalid(
                    "sampling.epochs",
                    file.sampling.epochs,
                    "0 with [sampling] on-demand = true (a trainer asks for as many passes as it \
                     wants; leave epochs out)",
                ));
            }
            if infobatch.is_some() {
                return Err(invalid(
                    "selection.mode",
                    "\"infobatch\"",
                    "\"none\" with [sampling] on-demand = true (an evaluation pass serves every \
                     sample)",
                ));
            }
        }
        let ranks = resolve_ranks(&file, env)?;
        let world_size_assumed = file.ring.lanes > 1
            && file.distributed.world_size.is_none()
            && env.world_size.is_none();
        let threads = if file.workers.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            file.workers.threads
        };
        Ok(Plan {
            file,
            base_dir: base_dir.to_owned(),
            threads,
            ranks,
            world_size_assumed,
            allow_gid,
            infobatch,
            state_dir,
        })
    }

    /// The ring's name.
    pub fn name(&self) -> &str {
        &self.file.ring.name
    }
}

fn resolve_ranks(file: &ConfigFile, env: &TorchrunEnv) -> Result<RankPlan, ConfigError> {
    let lanes = file.ring.lanes;
    // torchrun: the node's first rank is RANK - LOCAL_RANK.
    let env_first = match (env.rank, env.local_rank) {
        (Some(r), Some(l)) if l <= r => Some(r - l),
        _ => None,
    };
    let world_size = file
        .distributed
        .world_size
        .or(env.world_size)
        .unwrap_or(lanes);
    let first_rank = file.distributed.first_rank.or(env_first).unwrap_or(0);
    if world_size == 0 {
        return Err(invalid("distributed.world-size", world_size, "at least 1"));
    }
    if u64::from(first_rank) + u64::from(lanes) > u64::from(world_size) {
        return Err(invalid(
            "distributed.first-rank",
            first_rank,
            &format!(
                "first-rank + ring.lanes ({lanes}) must not exceed distributed.world-size ({world_size})"
            ),
        ));
    }
    Ok(RankPlan {
        world_size,
        first_rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str, o: &Overrides, env: &TorchrunEnv) -> Result<Plan, ConfigError> {
        let file = ConfigFile::parse(text, "test")?;
        Plan::resolve(file, o, Path::new(env!("CARGO_MANIFEST_DIR")), env)
    }

    #[test]
    fn a_flip_takes_a_bare_probability_and_errors_name_no_rust_types() {
        let with = |flip: &str| {
            ConfigFile::parse(
                &format!("[source]\nshards = [\"x.tar\"]\n[augment]\nhorizontal-flip = {flip}\n"),
                "test",
            )
        };
        for (text, p) in [
            ("0.5", 0.5),
            ("1", 1.0),
            ("{ p = 0.25 }", 0.25),
            ("{}", 0.5),
        ] {
            let file = with(text).unwrap();
            assert_eq!(file.augment.horizontal_flip.unwrap().p, p, "{text}");
        }
        for bad in ["\"yes\"", "[0.5]", "{ q = 1 }"] {
            let message = with(bad).unwrap_err().to_string();
            assert!(!message.contains("FlipConfig"), "{message}");
            assert!(
                message.contains("horizontal-flip") || message.contains("line 4"),
                "{message}"
            );
        }
        let shuffle = ConfigFile::parse(
            "[source]\nshards = [\"x.tar\"]\n[sampling]\nshuffle = 3\n[augment]\n",
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(
            !shuffle.contains("ShuffleMode") && !shuffle.contains("struct "),
            "{shuffle}"
        );
        assert_eq!(
            without_type_names("invalid type: integer `3`, expected struct RotateConfig at x"),
            "invalid type: integer `3`, expected a table at x"
        );
    }

    #[test]
    fn builtin_default_parses_and_validates() {
        let p = plan(
            DEFAULT_CONFIG,
            &Overrides::default(),
            &TorchrunEnv::default(),
        )
        .unwrap();
        assert_eq!(p.name(), "default");
        assert_eq!(
            p.ranks,
            RankPlan {
                world_size: 1,
                first_rank: 0
            }
        );
        assert!(p.threads >= 1);
    }

    #[test]
    fn every_preset_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let file = ConfigFile::load(&path).unwrap();
            // Presets may name datasets that are not on this machine: validation of the
            // values must still pass.
            Plan::resolve(file, &Overrides::default(), &dir, &TorchrunEnv::default())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(seen >= 4, "expected the four presets, found {seen}");
    }

    #[test]
    fn selection_is_checked_and_needs_a_run_length() {
        let with = |table: &str, epochs: &str| {
            let text = DEFAULT_CONFIG.replace("epochs = 0                # until stopped", epochs)
                + "\n[selection]\n"
                + table;
            plan(&text, &Overrides::default(), &TorchrunEnv::default())
        };
        let p = plan(
            DEFAULT_CONFIG,
            &Overrides::default(),
            &TorchrunEnv::default(),
        )
        .unwrap();
        assert!(p.infobatch.is_none(), "mode none by default");
        let err = with("mode = \"infobatch\"", "epochs = 0").unwrap_err();
        assert!(err.to_string().contains("selection.epochs"), "{err}");
        let p = with("mode = \"infobatch\"\nepochs = 90", "epochs = 0").unwrap();
        assert_eq!(p.infobatch.unwrap().epochs, 90);
        let p = with("mode = \"infobatch\"\nepochs = 90", "epochs = 8").unwrap();
        assert_eq!(
            p.infobatch.unwrap().epochs,
            8,
            "[sampling] epochs wins when bounded"
        );
        for (table, key) in [
            ("prune-ratio = 1.0", "selection.prune-ratio"),
            ("anneal = 1.5", "selection.anneal"),
            ("ema-factor = -0.1", "selection.ema-factor"),
            ("state-dir = \"\"", "selection.state-dir"),
        ] {
            let err = with(table, "epochs = 8").unwrap_err();
            assert!(err.to_string().contains(key), "{table}: {err}");
        }
        let err = with("mode = \"best\"", "epochs = 8").unwrap_err();
        assert!(err.to_string().contains("infobatch"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{DEFAULT_CONFIG}\n[bogus]\nx = 1\n");
        let err = plan(&text, &Overrides::default(), &TorchrunEnv::default()).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_key_and_range() {
        let o = Overrides {
            lanes: Some(0),
            ..Overrides::default()
        };
        let err = plan(DEFAULT_CONFIG, &o, &TorchrunEnv::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ring.lanes") && msg.contains("1 to 64"),
            "{msg}"
        );

        let o = Overrides {
            name: Some("../etc".into()),
            ..Overrides::default()
        };
        let err = plan(DEFAULT_CONFIG, &o, &TorchrunEnv::default()).unwrap_err();
        assert!(err.to_string().contains("ring.name"), "{err}");

        let o = Overrides {
            allow_group: Some("no-such-group-ringfeed".into()),
            ..Overrides::default()
        };
        let err = plan(DEFAULT_CONFIG, &o, &TorchrunEnv::default()).unwrap_err();
        assert!(err.to_string().contains("ring.allow-group"), "{err}");
    }

    #[test]
    fn ring_memory_and_access_keys() {
        let text = DEFAULT_CONFIG.replace(
            "[ring]",
            "[ring]\nshm-dir = \"/dev/shm\"\nallow-group = \"4242\"",
        );
        let p = plan(&text, &Overrides::default(), &TorchrunEnv::default()).unwrap();
        assert_eq!(p.file.ring.shm_dir.as_deref(), Some(Path::new("/dev/shm")));
        assert_eq!(p.allow_gid, Some(4242));
        let o = Overrides {
            shm_dir: Some("/tmp".into()),
            ..Overrides::default()
        };
        let p = plan(&text, &o, &TorchrunEnv::default()).unwrap();
        assert_eq!(p.file.ring.shm_dir.as_deref(), Some(Path::new("/tmp")));
    }

    #[test]
    fn overrides_win_over_the_file() {
        let o = Overrides {
            batch_size: Some(7),
            seed: Some(99),
            epochs: Some(3),
            ..Overrides::default()
        };
        let p = plan(DEFAULT_CONFIG, &o, &TorchrunEnv::default()).unwrap();
        assert_eq!(p.file.batch.size, 7);
        assert_eq!(p.file.sampling.seed, 99);
        assert_eq!(p.file.sampling.epochs, 3);
    }

    #[test]
    fn ranks_come_from_torchrun_env_unless_configured() {
        let env = TorchrunEnv {
            world_size: Some(8),
            rank: Some(5),
            local_rank: Some(1),
            local_world_size: Some(4),
        };
        let o = Overrides {
            lanes: Some(4),
            ..Overrides::default()
        };
        let p = plan(DEFAULT_CONFIG, &o, &env).unwrap();
        assert_eq!(
            p.ranks,
            RankPlan {
                world_size: 8,
                first_rank: 4
            }
        );
        assert_eq!(p.ranks.rank(3), 7);

        let o = Overrides {
            lanes: Some(4),
            world_size: Some(6),
            first_rank: Some(4),
            ..Overrides::default()
        };
        let err = plan(DEFAULT_CONFIG, &o, &env).unwrap_err();
        assert!(err.to_string().contains("first-rank"), "{err}");
    }

    const MIXTURE: &str = r#"
[[source.streams]]
kind = "tar"
shards = ["a/*.tar"]
weight = 3
[[source.streams]]
kind = "imagefolder"
path = "b"
augment = { center-crop = { size = 32 } }
[sampling]
samples-per-epoch = 100
[augment]
random-resized-crop = { size = 32 }
"#;

    #[test]
    fn a_mixture_with_matching_stream_augmentation_validates() {
        let p = plan(MIXTURE, &Overrides::default(), &TorchrunEnv::default()).unwrap();
        assert_eq!(p.file.source.streams.len(), 2);
        assert_eq!(p.file.sampling.samples_per_epoch, Some(100));
    }

    #[test]
    fn mixture_mistakes_name_the_key() {
        let env = TorchrunEnv::default();
        let other_size =
            MIXTURE.replace("center-crop = { size = 32 }", "center-crop = { size = 16 }");
        let err = plan(&other_size, &Overrides::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("source.streams.augment") && err.contains("stream 1"),
            "{err}"
        );
        let zero = MIXTURE.replace("samples-per-epoch = 100", "samples-per-epoch = 0");
        let err = plan(&zero, &Overrides::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sampling.samples-per-epoch"), "{err}");
        let shards = Overrides {
            shards: Some(vec!["x.tar".to_owned()]),
            ..Overrides::default()
        };
        let err = plan(MIXTURE, &shards, &env).unwrap_err().to_string();
        assert!(
            err.contains("--shards") && err.contains("source.streams"),
            "{err}"
        );
        let typo = MIXTURE.replace("weight = 3", "wieght = 3");
        let err = plan(&typo, &Overrides::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("wieght"), "{err}");
    }
}
