//! [`Mixture`]: the datasets a ring serves, as one id space — one stream for a plain `[source]`,
//! several for `[[source.streams]]`.
//!
//! Stream `i` holds ids `start_i .. start_i + len_i`, streams in configuration order, so sample
//! ids stay unique across streams and a plain `[source]` keeps exactly its dataset's ids. Each
//! stream may rewrite its labels (`label-offset`, `label-map`) so class ids of different
//! datasets don't collide; a label the map does not know is a per-sample error (skipped and
//! counted like a corrupt image), never a wrong class.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::{SourceConfig, StreamConfig};
use super::dataset::Dataset;
use super::error::{IndexIssue, SampleReadError, SourceError};
use super::sampler::StreamShare;

/// The datasets of one ring, concatenated into one id space.
#[derive(Debug)]
pub struct Mixture {
    streams: Vec<Stream>,
    /// True for `[[source.streams]]`: batches then carry a `source` tensor.
    explicit: bool,
    /// `[source] num-classes` of a mixture, checked on the served (rewritten) labels; a single
    /// dataset checks it on its own labels while indexing.
    num_classes: Option<u64>,
}

/// One dataset of a [`Mixture`].
#[derive(Debug)]
pub struct Stream {
    name: String,
    dataset: Dataset,
    start: u64,
    weight: f64,
    labels: LabelRule,
}

#[derive(Debug)]
enum LabelRule {
    Keep,
    Offset(i64),
    Map {
        file: PathBuf,
        map: HashMap<i64, i64>,
    },
}

impl Stream {
    /// The stream's name (`name`, else `stream-<i>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its first id.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Its number of samples.
    pub fn len(&self) -> u64 {
        self.dataset.len()
    }

    /// True if it has no sample (never the case for an opened stream).
    pub fn is_empty(&self) -> bool {
        self.dataset.is_empty()
    }

    /// Its relative weight.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// The dataset behind it.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }
}

impl Mixture {
    /// Opens every dataset `cfg` names; relative paths resolve against `base_dir`.
    pub fn open(cfg: &SourceConfig, base_dir: &Path) -> Result<Mixture, SourceError> {
        if cfg.streams.is_empty() {
            let dataset = Dataset::open(cfg, base_dir)?;
            return Ok(Mixture {
                streams: vec![Stream {
                    name: "stream-0".to_owned(),
                    dataset,
                    start: 0,
                    weight: 1.0,
                    labels: LabelRule::Keep,
                }],
                explicit: false,
                num_classes: None,
            });
        }
        if !cfg.shards.is_empty() || cfg.path.is_some() {
            return Err(SourceError::Config(
                "[source] has `streams`: give `shards` or `path` inside each [[source.streams]], \
                 not in [source]"
                    .to_owned(),
            ));
        }
        if cfg.streams.len() > usize::from(u16::MAX) {
            return Err(SourceError::Config(format!(
                "{} streams (at most {}: the `source` tensor is u16)",
                cfg.streams.len(),
                u16::MAX
            )));
        }
        let mut streams = Vec::with_capacity(cfg.streams.len());
        let mut start = 0u64;
        for (i, stream) in cfg.streams.iter().enumerate() {
            let name = stream.name.clone().unwrap_or_else(|| format!("stream-{i}"));
            let context = |message: String| {
                SourceError::Config(format!("[[source.streams]] {i} ({name}): {message}"))
            };
            let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if name.is_empty() || name.len() > 32 || !name.chars().all(safe) {
                return Err(context(
                    "name must be 1-32 characters from A-Z a-z 0-9 . _ - (it labels metrics)"
                        .to_owned(),
                ));
            }
            if streams.iter().any(|s: &Stream| s.name == name) {
                return Err(context("another stream has this name".to_owned()));
            }
            if !(stream.weight.is_finite() && stream.weight > 0.0) {
                return Err(context(format!(
                    "weight must be finite and > 0, got {}",
                    stream.weight
                )));
            }
            let dataset =
                Dataset::open(&stream.source(cfg), base_dir).map_err(|e| context(e.to_string()))?;
            let labels = label_rule(stream, base_dir).map_err(context)?;
            let len = dataset.len();
            streams.push(Stream {
                name,
                dataset,
                start,
                weight: stream.weight,
                labels,
            });
            start += len;
        }
        Ok(Mixture {
            streams,
            explicit: true,
            num_classes: cfg.num_classes,
        })
    }

    /// Samples over all streams; ids are `0..len()`.
    pub fn len(&self) -> u64 {
        self.streams.iter().map(Stream::len).sum()
    }

    /// True if there is no sample (never the case for an opened mixture).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Digest (16 hex digits) of the datasets' identity: each stream's name and weight and its
    /// dataset's [`Dataset::digest_into`], in stream order.
    pub fn identity_digest(&self) -> String {
        let mut digest = crate::ring::resume::Digest::default();
        digest.u64(self.streams.len() as u64);
        for stream in &self.streams {
            digest.str(&stream.name).u64(stream.weight.to_bits());
            stream.dataset.digest_into(&mut digest);
        }
        digest.hex()
    }

    /// True when the configuration used `[[source.streams]]` (batches carry `source`).
    pub fn has_streams(&self) -> bool {
        self.explicit
    }

    /// The streams, in configuration order.
    pub fn streams(&self) -> &[Stream] {
        &self.streams
    }

    /// The index of the stream that holds `id` (ids past the end belong to the last).
    pub fn stream_of(&self, id: u64) -> usize {
        self.streams
            .partition_point(|s| s.start <= id)
            .saturating_sub(1)
    }

    fn locate(&self, id: u64) -> (&Stream, u64) {
        let stream = &self.streams[self.stream_of(id)];
        (stream, id - stream.start)
    }

    /// The id range of the stream holding `id`, for fallbacks that must stay in that stream.
    pub fn stream_range(&self, id: u64) -> std::ops::Range<u64> {
        let stream = &self.streams[self.stream_of(id)];
        stream.start..stream.start + stream.len()
    }

    /// The label sample `id` is served with: its dataset's label, rewritten by its stream's
    /// `label-offset` / `label-map`. A label the map does not know is an error naming the map.
    ///
    /// # Panics
    /// If `id >= len()` (ids come from the sampler, which never yields one).
    pub fn label(&self, id: u64) -> Result<i64, String> {
        let (stream, local) = self.locate(id);
        let served = self.rewrite(stream, stream.dataset.label(local))?;
        if served < 0 {
            return Err(format!(
                "label {served} of stream {} is negative after its label rule",
                stream.name
            ));
        }
        match self.num_classes {
            Some(n) if served as u64 >= n => Err(format!(
                "label {served} of stream {} is not below [source] num-classes = {n}",
                stream.name
            )),
            _ => Ok(served),
        }
    }

    fn rewrite(&self, stream: &Stream, label: i64) -> Result<i64, String> {
        match &stream.labels {
            LabelRule::Keep => Ok(label),
            LabelRule::Offset(offset) => label.checked_add(*offset).ok_or_else(|| {
                format!(
                    "label {label} + label-offset {offset} of stream {} overflows",
                    stream.name
                )
            }),
            LabelRule::Map { file, map } => map.get(&label).copied().ok_or_else(|| {
                format!(
                    "label {label} of stream {} has no line in label-map {}",
                    stream.name,
                    file.display()
                )
            }),
        }
    }

    /// Where sample `id` lives, for log lines; prefixed by the stream's name in a mixture.
    pub fn describe(&self, id: u64) -> String {
        let (stream, local) = self.locate(id);
        if self.explicit {
            format!("{}: {}", stream.name, stream.dataset.describe(local))
        } else {
            stream.dataset.describe(local)
        }
    }

    /// Where sample `id` comes from (see [`Dataset::origin`]), with its stream's name in a
    /// mixture of several streams.
    pub fn origin(&self, id: u64) -> Option<(Option<&str>, Option<&Path>, String)> {
        if id >= self.len() {
            return None;
        }
        let (stream, local) = self.locate(id);
        let (shard, member) = stream.dataset.origin(local)?;
        let name = self.explicit.then_some(stream.name.as_str());
        Some((name, shard, member))
    }

    /// Reads sample `id`'s encoded bytes into `buf` (see [`Dataset::read_into`]).
    pub fn read_into(&self, id: u64, buf: &mut Vec<u8>) -> Result<(), SampleReadError> {
        let (stream, local) = self.locate(id);
        stream.dataset.read_into(local, buf)
    }

    /// True when any stream's shards are `s3://` objects.
    pub fn is_remote(&self) -> bool {
        self.streams.iter().any(|s| s.dataset.is_remote())
    }

    /// [`Dataset::plan_reads`] of every stream, with the ids of each one's own.
    pub fn plan_reads(&self, current: &[u64], next: &[u64]) {
        for stream in self.streams.iter().filter(|s| s.dataset.is_remote()) {
            let range = stream.start..stream.start + stream.len();
            let local = |ids: &[u64]| -> Vec<u64> {
                ids.iter()
                    .filter(|id| range.contains(id))
                    .map(|id| id - stream.start)
                    .collect()
            };
            stream.dataset.plan_reads(&local(current), &local(next));
        }
    }

    /// [`Dataset::recheck_shards`] of every stream.
    pub fn recheck_shards(&self) -> Vec<SampleReadError> {
        self.streams
            .iter()
            .flat_map(|s| s.dataset.recheck_shards())
            .collect()
    }

    /// What indexing skipped, over all streams.
    pub fn skipped_at_index(&self) -> Vec<&IndexIssue> {
        self.streams
            .iter()
            .flat_map(|s| s.dataset.skipped_at_index())
            .collect()
    }

    /// Class names of a single ImageFolder dataset (a mixture has no single list).
    pub fn class_names(&self) -> Option<&[String]> {
        match self.streams.as_slice() {
            [only] if !self.explicit => only.dataset.class_names(),
            _ => None,
        }
    }

    /// The shard files of a single tar dataset (a mixture has no single dataset directory).
    pub fn shard_paths(&self) -> Vec<&Path> {
        match self.streams.as_slice() {
            [only] if !self.explicit => only.dataset.shard_paths(),
            _ => Vec::new(),
        }
    }

    /// Ids where shards start, over all streams (ascending from 0).
    pub fn shard_starts(&self) -> Vec<u64> {
        self.streams
            .iter()
            .flat_map(|s| s.dataset.shard_starts().iter().map(move |&x| s.start + x))
            .collect()
    }

    /// The streams as the sampler deals them.
    pub fn shares(&self) -> Vec<StreamShare> {
        self.streams
            .iter()
            .map(|s| StreamShare {
                start: s.start,
                len: s.len(),
                weight: s.weight,
                shard_starts: s.dataset.shard_starts().to_vec(),
            })
            .collect()
    }
}

fn label_rule(stream: &StreamConfig, base_dir: &Path) -> Result<LabelRule, String> {
    match (&stream.label_offset, &stream.label_map) {
        (Some(_), Some(_)) => Err("give `label-offset` or `label-map`, not both".to_owned()),
        (Some(offset), None) => Ok(LabelRule::Offset(*offset)),
        (None, None) => Ok(LabelRule::Keep),
        (None, Some(file)) => {
            let file = base_dir.join(file);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read label-map {}: {e}", file.display()))?;
            let map =
                parse_label_map(&text).map_err(|e| format!("label-map {}: {e}", file.display()))?;
            Ok(LabelRule::Map { file, map })
        }
    }
}

/// `FROM TO` integer pairs, one per line; blank lines and `#` comments ignored; a `FROM` given
/// twice is an error.
fn parse_label_map(text: &str) -> Result<HashMap<i64, i64>, String> {
    let mut map = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let pair = match fields.as_slice() {
            [from, to] => from.parse::<i64>().ok().zip(to.parse::<i64>().ok()),
            _ => None,
        };
        let Some((from, to)) = pair else {
            return Err(format!(
                "line {}: expected two integers `FROM TO`, got {line:?}",
                n + 1
            ));
        };
        if map.insert(from, to).is_some() {
            return Err(format!("line {}: label {from} is mapped twice", n + 1));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_maps_parse_pairs_and_name_bad_lines() {
        let map = parse_label_map("# from to\n3 10\n\n 4\t11 # tab\n").unwrap();
        assert_eq!(map, HashMap::from([(3, 10), (4, 11)]));
        let err = parse_label_map("1 2\n7\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_label_map("1 2\n1 3\n")
            .unwrap_err()
            .contains("mapped twice"));
        assert!(parse_label_map("a b\n").is_err());
    }
}
