//! Configuration of the source stage: where samples come from (`[source]`) and in which order
//! they are served (`[sampling]`). Plain serde data mirroring the TOML file.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// `[source]`: the dataset.
///
/// ```toml
/// [source]
/// kind = "tar"
/// shards = ["data/shard-{000000..000127}.tar"]
/// index-dir = "/var/cache/ringfeed"   # optional
/// key-file = "/etc/ringfeed/data.key"  # optional: encrypted shards
/// classes = "classes.txt"              # optional: or ["cat", "dog", …]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SourceConfig {
    /// Which layout the dataset has (default `tar`; with `streams`, each stream names its own).
    #[serde(default)]
    pub kind: SourceKind,
    /// Tar only: shard paths, globs and brace expressions (`{000000..000127}`, `{a,b}`),
    /// relative to the configuration's directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<String>,
    /// ImageFolder only: the root holding one directory per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Tar only: where sidecar indexes go when they cannot be written beside the shard
    /// (read-only dataset directory). Default: `$XDG_CACHE_HOME/ringfeed`, else
    /// `~/.cache/ringfeed`. An index beside the shard is always preferred when fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_dir: Option<PathBuf>,
    /// Tar only: the key file of encrypted shards (`ringfeed keygen`, `ringfeed pack
    /// --encrypt-key-file`), a relative path resolving like `shards`; `--key-file` /
    /// `RINGFEED_KEY_FILE` override it. With a key, every shard must be encrypted with it.
    /// The file holds the key; this setting only names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Number of classes: a sample whose label is `>= num-classes` is skipped and counted
    /// like a non-integer one (a cross-entropy loss would fail on it mid-training). Negative
    /// labels are always skipped. Default: no upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<u64>,
    /// Largest encoded image accepted, in bytes (default [`DEFAULT_MAX_SAMPLE_BYTES`], at most
    /// 4 GiB − 1). A larger image file or member is skipped and counted like a corrupt one, so
    /// a hostile dataset (an 8 TiB sparse `.jpg`, a forged index) cannot make a worker
    /// allocate its claimed size.
    #[serde(default = "default_max_sample_bytes")]
    pub max_sample_bytes: u64,
    /// Optional names of the classes, label `i` being the `i`-th: a list, or a text file of
    /// one name per line (relative to the configuration's directory). Only shown to people
    /// (`ringfeed peek`); the labels served stay numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<ClassNames>,
    /// Several datasets mixed into one stream (`[[source.streams]]`); empty = the one dataset
    /// described by the keys above. See `docs/sampling.md`, "Mixing several datasets".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamConfig>,
    /// Tar only, `s3://` shards: the local directory remote shards are fetched into (relative
    /// to the configuration's directory). Default: `remote-shards` in the index cache
    /// directory (`$XDG_CACHE_HOME/ringfeed`, else `~/.cache/ringfeed`). Several daemons on
    /// one node may share it (see [`crate::source::remote`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Tar only, `s3://` shards: the most bytes of shards kept in `cache-dir`; least recently
    /// used shards that no daemon has open are evicted past it. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_limit: Option<u64>,
    /// Tar only, `s3://` shards: allow a plain-HTTP endpoint (`AWS_ENDPOINT_URL=http://…`, a
    /// local S3-compatible server). Default false; `AWS_ALLOW_HTTP=true` allows it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    /// Tar only, `s3://` shards: how many shards are fetched ahead of the decode workers in
    /// the epoch's order (and fetches in flight at most); 0 fetches each shard only when a
    /// sample of it is first read, whole, before that sample is served. Default
    /// [`crate::source::remote::DEFAULT_FETCH_AHEAD`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_ahead: Option<u32>,
}

/// Default of [`SourceConfig::max_sample_bytes`]: 64 MiB, far above any real encoded image.
pub const DEFAULT_MAX_SAMPLE_BYTES: u64 = 64 << 20;

fn default_max_sample_bytes() -> u64 {
    DEFAULT_MAX_SAMPLE_BYTES
}

/// `[source] classes`: the class names, inline or in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassNames {
    /// `classes = ["cat", "dog"]`.
    List(Vec<String>),
    /// `classes = "classes.txt"`: one name per line.
    File(PathBuf),
}

/// One `[[source.streams]]` entry: a dataset as in `[source]`, its share of each epoch and how
/// its labels join the others'.
///
/// ```toml
/// [[source.streams]]
/// kind = "tar"
/// shards = ["curated/shard-{000000..000009}.tar"]
/// weight = 3
/// augment = { random-resized-crop = { size = 224, scale = [0.35, 1.0] } , output = { dtype = "f32" } }
///
/// [[source.streams]]
/// kind = "imagefolder"
/// path = "web-photos"
/// weight = 1
/// label-offset = 1000
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StreamConfig {
    /// Name in `stat`, the status line and the metrics (default `stream-<i>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Which layout this dataset has.
    pub kind: SourceKind,
    /// Tar only: shard specs, as `[source] shards`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<String>,
    /// ImageFolder only: the root holding one directory per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Relative share of each epoch (default 1): stream `i` gets
    /// `weight_i / Σ weight × samples-per-epoch` samples.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Added to every label of this stream, so class ids of different datasets don't collide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_offset: Option<i64>,
    /// A text file of `FROM TO` label pairs, one per line (`#` starts a comment): this
    /// stream's label `FROM` is served as `TO`; a label without a line is skipped and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_map: Option<PathBuf>,
    /// This stream's own `[augment]` table (e.g. weaker augmentation for a clean set); its
    /// output must have the same shape and dtype as the main one. Default: `[augment]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<crate::augment::AugmentConfig>,
}

fn default_weight() -> f64 {
    1.0
}

impl StreamConfig {
    /// The dataset part of this stream as a plain source, with `[source]`'s shared keys
    /// (`index-dir`, `key-file`, `max-sample-bytes`).
    pub fn source(&self, top: &SourceConfig) -> SourceConfig {
        SourceConfig {
            kind: self.kind,
            shards: self.shards.clone(),
            path: self.path.clone(),
            index_dir: match self.kind {
                SourceKind::Tar => top.index_dir.clone(),
                SourceKind::Imagefolder => None,
            },
            key_file: match self.kind {
                SourceKind::Tar => top.key_file.clone(),
                SourceKind::Imagefolder => None,
            },
            // Streams remap labels (label-offset, label-map): the mixture checks num-classes on
            // the served labels instead of each dataset on its raw ones.
            num_classes: None,
            max_sample_bytes: top.max_sample_bytes,
            classes: None,
            streams: Vec::new(),
            cache_dir: top.cache_dir.clone(),
            cache_limit: top.cache_limit,
            allow_http: top.allow_http,
            fetch_ahead: top.fetch_ahead,
        }
    }
}

impl SourceConfig {
    /// A tar-shard source over `shards` specs.
    pub fn tar(shards: impl IntoIterator<Item = impl Into<String>>) -> SourceConfig {
        SourceConfig {
            kind: SourceKind::Tar,
            shards: shards.into_iter().map(Into::into).collect(),
            path: None,
            index_dir: None,
            key_file: None,
            num_classes: None,
            max_sample_bytes: DEFAULT_MAX_SAMPLE_BYTES,
            classes: None,
            streams: Vec::new(),
            cache_dir: None,
            cache_limit: None,
            allow_http: false,
            fetch_ahead: None,
        }
    }

    /// An ImageFolder source rooted at `path`.
    pub fn imagefolder(path: impl Into<PathBuf>) -> SourceConfig {
        SourceConfig {
            kind: SourceKind::Imagefolder,
            shards: Vec::new(),
            path: Some(path.into()),
            index_dir: None,
            key_file: None,
            num_classes: None,
            max_sample_bytes: DEFAULT_MAX_SAMPLE_BYTES,
            classes: None,
            streams: Vec::new(),
            cache_dir: None,
            cache_limit: None,
            allow_http: false,
            fetch_ahead: None,
        }
    }
}

/// The dataset layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// WebDataset-style tar shards: `<key>.jpg` + `<key>.cls` members.
    #[default]
    Tar,
    /// `<root>/<class>/<file>`; classes sorted by name give the labels.
    Imagefolder,
}

/// `[sampling]`: the order in which samples are served.
///
/// ```toml
/// [sampling]
/// seed = 42
/// shuffle = "global"                                   # or "block", "buffer", "none"
/// # shuffle = { mode = "block", block-size = 64, window = 32 }
/// # shuffle = { mode = "buffer", size = 2000 }
/// drop-last = true
/// epochs = 0                                           # 0 = until stopped
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SamplingConfig {
    /// Seed of the per-epoch order (and, elsewhere, of augmentation). Default 0.
    #[serde(default)]
    pub seed: u64,
    /// How samples are shuffled each epoch. Default `global`.
    #[serde(default)]
    pub shuffle: ShuffleMode,
    /// Drop the tail that cannot fill a full batch on every rank (default `false`: pad it by
    /// repeating samples from the start of the epoch's order, like PyTorch's
    /// `DistributedSampler`).
    #[serde(default)]
    pub drop_last: bool,
    /// Number of epochs to serve; 0 serves until stopped. Default 0.
    #[serde(default)]
    pub epochs: u64,
    /// Samples in each epoch, all ranks together (default: the dataset's size, or the sum of
    /// the streams' sizes). Smaller walks a large dataset in a rotating window across epochs;
    /// larger repeats samples. See `docs/sampling.md`, "Mixing several datasets".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_epoch: Option<u64>,
    /// An evaluation ring (default `false`): nothing is produced until a consumer asks for a
    /// pass, and every pass is one complete epoch from the first sample, in the same order
    /// (epoch 0's). `epochs` must then be 0: the trainer decides how many passes it wants.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            seed: 0,
            shuffle: ShuffleMode::Global,
            drop_last: false,
            epochs: 0,
            samples_per_epoch: None,
            on_demand: false,
        }
    }
}

/// Default block size of [`ShuffleMode::Block`], in samples.
pub const DEFAULT_BLOCK_SIZE: u64 = 64;
/// Default window of [`ShuffleMode::Block`], in blocks.
pub const DEFAULT_BLOCK_WINDOW: u64 = 32;
/// Default size of [`ShuffleMode::Buffer`]'s shuffle buffer, in samples.
pub const DEFAULT_BUFFER_SIZE: u64 = 2000;

/// The per-epoch shuffle. See `docs/sampling.md` for the trade-off between shuffle quality and
/// read pattern.
///
/// In TOML either a bare name (`"block"`, with default parameters) or a table with a `mode`
/// key and the mode's parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "mode",
    rename_all = "kebab-case",
    deny_unknown_fields,
    remote = "Self"
)]
pub enum ShuffleMode {
    /// A uniform random permutation of all samples (Fisher-Yates). Random reads.
    #[default]
    Global,
    /// Shuffle blocks of `block-size` consecutive ids, then shuffle ids within windows of
    /// `window` consecutive blocks of that order. Reads stay within a few regions at a time.
    #[serde(rename_all = "kebab-case")]
    Block {
        /// Consecutive ids per block. Default [`DEFAULT_BLOCK_SIZE`].
        #[serde(default = "default_block_size")]
        block_size: u64,
        /// Blocks whose ids are mixed together. Default [`DEFAULT_BLOCK_WINDOW`].
        #[serde(default = "default_block_window")]
        window: u64,
    },
    /// WebDataset's order: shuffle the shards, stream them, and draw each sample from a
    /// shuffle buffer of `size` samples. Sequential reads within a shard.
    Buffer {
        /// Samples in the shuffle buffer. Default [`DEFAULT_BUFFER_SIZE`].
        #[serde(default = "default_buffer_size")]
        size: u64,
    },
    /// Dataset order.
    None,
}

fn default_block_size() -> u64 {
    DEFAULT_BLOCK_SIZE
}
fn default_block_window() -> u64 {
    DEFAULT_BLOCK_WINDOW
}
fn default_buffer_size() -> u64 {
    DEFAULT_BUFFER_SIZE
}

impl Serialize for ShuffleMode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ShuffleMode::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for ShuffleMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ModeVisitor;
        impl<'de> Visitor<'de> for ModeVisitor {
            type Value = ShuffleMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""global", "block", "buffer", "none", or a table with a "mode" key"#)
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<ShuffleMode, E> {
                match name {
                    "global" => Ok(ShuffleMode::Global),
                    "block" => Ok(ShuffleMode::Block {
                        block_size: DEFAULT_BLOCK_SIZE,
                        window: DEFAULT_BLOCK_WINDOW,
                    }),
                    "buffer" => Ok(ShuffleMode::Buffer {
                        size: DEFAULT_BUFFER_SIZE,
                    }),
                    "none" => Ok(ShuffleMode::None),
                    other => Err(E::unknown_variant(
                        other,
                        &["global", "block", "buffer", "none"],
                    )),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ShuffleMode, A::Error> {
                ShuffleMode::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_any(ModeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct File {
        source: SourceConfig,
        sampling: SamplingConfig,
    }

    #[test]
    fn toml_with_every_key_parses() {
        let file: File = toml::from_str(
            r#"
            [source]
            kind = "tar"
            shards = ["data/shard-{000000..000001}.tar"]
            index-dir = "/tmp/idx"
            [sampling]
            seed = 7
            shuffle = { mode = "block", block-size = 16, window = 4 }
            drop-last = true
            epochs = 3
            "#,
        )
        .unwrap();
        assert_eq!(file.source.kind, SourceKind::Tar);
        assert_eq!(file.source.index_dir, Some(PathBuf::from("/tmp/idx")));
        assert_eq!(
            file.sampling,
            SamplingConfig {
                seed: 7,
                shuffle: ShuffleMode::Block {
                    block_size: 16,
                    window: 4
                },
                drop_last: true,
                epochs: 3,
                samples_per_epoch: None,
                on_demand: false,
            }
        );
        // Round trip through TOML.
        let text = toml::to_string(&file).unwrap();
        assert_eq!(toml::from_str::<File>(&text).unwrap(), file);
    }

    #[test]
    fn shuffle_accepts_bare_names_with_defaults() {
        #[derive(Deserialize)]
        struct S {
            shuffle: ShuffleMode,
        }
        let parse = |t: &str| toml::from_str::<S>(t).map(|s| s.shuffle);
        assert_eq!(parse(r#"shuffle = "none""#).unwrap(), ShuffleMode::None);
        assert_eq!(
            parse(r#"shuffle = "buffer""#).unwrap(),
            ShuffleMode::Buffer {
                size: DEFAULT_BUFFER_SIZE
            }
        );
        assert_eq!(
            parse(r#"shuffle = { mode = "buffer", size = 10 }"#).unwrap(),
            ShuffleMode::Buffer { size: 10 }
        );
        assert!(parse(r#"shuffle = "random""#).is_err());
        assert!(parse(r#"shuffle = { mode = "block", blocksize = 3 }"#).is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<SourceConfig>("kind = \"tar\"\nshard = []").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let sampling: SamplingConfig = toml::from_str("").unwrap();
        assert_eq!(sampling, SamplingConfig::default());
    }
}
