//! The batch schema: which tensors a ring slot holds, in which order, dtype and shape.
//!
//! Every image batch has three tensors, always in this order (see `docs/ring-format.md` §5.2):
//! `images` (the augmenter's output dtype, `[B, C, H, W]` or `[B, H, W, C]`), `labels`
//! (`i64 [B]`) and `sample_ids` (`i64 [B]`, the sample's position in the dataset); a mixture of
//! datasets adds `source` (`u16 [B]`, each sample's stream), and `[selection]` on adds
//! `weights` after it (`f32 [B]`, the factor a trainer multiplies each sample's loss by: 1, or
//! `1 / (1 - prune-ratio)` for kept well-learned samples).
//! Then comes `valid` (`u8 [B]`, since format 1.3): 1 for a sample's first occurrence in the
//! epoch on this job's ranks, 0 for a padding row that repeats the epoch's start
//! (`drop-last = false`). Batch mixing (`mixup` / `cutmix`, `mix.rs`) adds `targets` after it,
//! last (`f32 [B, num_classes]`, rows summing to 1).
//!
//! # Brief overview
//!
//! - [`TensorIndex`] (`tensors.rs`) names every tensor a batch may hold, with its ring name and
//!   dtype; [`BatchSchema`] says which of them a batch holds ([`BatchSchema::has`]) and so
//!   where each sits ([`BatchSchema::position`]).
//! - [`BatchTensors`] are one batch's tensors by name (a ring slot's, or [`BatchBuffers`] in
//!   memory), written through typed row views ([`BatchTensors::write_rows`]): no tensor is
//!   found by position arithmetic.
//! - Filling a batch returns a [`BatchReport`] (`report.rs`): rows written, samples skipped
//!   and why.
//! - [`Mixer`] (`mix.rs`) mixes a filled batch (mixup / cutmix) and writes its `targets`.
#![forbid(unsafe_code)]

mod mix;
mod report;
mod tensors;

pub use mix::{ImageGeometry, MixParams, Mixer};
pub use report::{BatchReport, SampleFailure, SkipReason};
pub use tensors::{BatchBuffers, BatchTensors, RowValue, Rows, TensorIndex};

use crate::augment::{Augmenter, OutDType};
use crate::ring::{DType, TensorSpec};

/// The shape of one batch, derived from the batch size and the augmenter's output.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSchema {
    /// Samples per batch.
    pub batch_size: u32,
    /// Channels, height, width of one image.
    pub chw: (u32, u32, u32),
    /// Element type of `images`.
    pub image_dtype: DType,
    /// `images` is `[B, H, W, C]` rather than `[B, C, H, W]`.
    pub nhwc: bool,
    /// Normalisation mean per channel (unused channels and "not normalised" are 0), as the
    /// ring header records it for tools that un-normalise.
    pub mean: [f32; 4],
    /// Normalisation std per channel (all 0 = not normalised).
    pub std: [f32; 4],
    /// Batches carry a `source` tensor (the ring mixes several datasets).
    pub source: bool,
    /// Batches carry a `weights` tensor (`[selection]` on).
    pub weights: bool,
    /// Batches carry a `targets` tensor of this many classes, last (batch mixing on).
    pub targets: Option<u32>,
}

impl BatchSchema {
    /// The schema for `batch_size` samples of `augmenter`'s output.
    pub fn new(batch_size: u32, augmenter: &Augmenter) -> BatchSchema {
        let (c, h, w) = augmenter.output_shape();
        let (mean, std) = match augmenter.mean_std() {
            Some((m, s)) => ([m[0], m[1], m[2], 0.0], [s[0], s[1], s[2], 0.0]),
            None => ([0.0; 4], [0.0; 4]),
        };
        BatchSchema {
            batch_size,
            chw: (c, h, w),
            image_dtype: ring_dtype(augmenter.out_dtype()),
            nhwc: augmenter.nhwc(),
            mean,
            std,
            source: false,
            weights: false,
            targets: None,
        }
    }

    /// The same schema with a `targets` tensor of `num_classes` (batch mixing), or without.
    pub fn with_targets(self, num_classes: Option<u32>) -> BatchSchema {
        BatchSchema {
            targets: num_classes,
            ..self
        }
    }

    /// The same schema with (or without) the `weights` tensor.
    pub fn with_weights(self, weights: bool) -> BatchSchema {
        BatchSchema { weights, ..self }
    }

    /// Whether this schema's batches carry tensor `t`.
    pub fn has(&self, t: TensorIndex) -> bool {
        match t {
            TensorIndex::Images
            | TensorIndex::Labels
            | TensorIndex::SampleIds
            | TensorIndex::Valid => true,
            TensorIndex::Source => self.source,
            TensorIndex::Weights => self.weights,
            TensorIndex::Targets => self.targets.is_some(),
        }
    }

    /// Tensor `t`'s position in the slot (and in the ring's tensor table), if the batch
    /// carries it: the tensors it carries, in [`TensorIndex::ALL`]'s order.
    pub fn position(&self, t: TensorIndex) -> Option<usize> {
        self.has(t).then(|| {
            TensorIndex::ALL
                .iter()
                .take_while(|&&other| other != t)
                .filter(|&&other| self.has(other))
                .count()
        })
    }

    /// The same schema with a `source` tensor (a mixture of datasets).
    pub fn with_source(self) -> BatchSchema {
        BatchSchema {
            source: true,
            ..self
        }
    }

    /// Bytes of one sample's image.
    pub fn sample_bytes(&self) -> usize {
        let (c, h, w) = self.chw;
        c as usize * h as usize * w as usize * self.image_dtype.size()
    }

    /// The ring's tensor table for this schema.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        TensorIndex::ALL
            .into_iter()
            .filter(|&t| self.has(t))
            .map(|t| TensorSpec {
                name: t.name().to_owned(),
                dtype: t.dtype().unwrap_or(self.image_dtype),
                shape: self.shape(t),
            })
            .collect()
    }

    /// Tensor `t`'s shape, batch dimension first.
    fn shape(&self, t: TensorIndex) -> Vec<u64> {
        let b = u64::from(self.batch_size);
        let (c, h, w) = (
            u64::from(self.chw.0),
            u64::from(self.chw.1),
            u64::from(self.chw.2),
        );
        match t {
            TensorIndex::Images if self.nhwc => vec![b, h, w, c],
            TensorIndex::Images => vec![b, c, h, w],
            TensorIndex::Targets => vec![b, u64::from(self.targets.unwrap_or(0))],
            _ => vec![b],
        }
    }
}

/// The ring dtype that stores an augmenter output dtype.
pub fn ring_dtype(dtype: OutDType) -> DType {
    match dtype {
        OutDType::U8 => DType::U8,
        OutDType::F16 => DType::F16,
        OutDType::Bf16 => DType::BF16,
        OutDType::F32 => DType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_table_follows_layout() {
        let s = BatchSchema {
            batch_size: 4,
            chw: (3, 8, 6),
            image_dtype: DType::F32,
            nhwc: false,
            mean: [0.0; 4],
            std: [0.0; 4],
            source: false,
            weights: false,
            targets: None,
        };
        let at = |schema: &BatchSchema, t| schema.position(t).unwrap();
        let t = s.tensors();
        assert_eq!(t.len(), 4);
        assert_eq!(at(&s, TensorIndex::Valid), 3);
        assert_eq!((t[3].name.as_str(), t[3].dtype), ("valid", DType::U8));
        assert_eq!(at(&s, TensorIndex::Images), 0);
        assert_eq!(t[0].shape, vec![4, 3, 8, 6]);
        assert_eq!(t[at(&s, TensorIndex::Labels)].name, "labels");
        assert_eq!(at(&s, TensorIndex::SampleIds), 2);
        assert_eq!(t[2].dtype, DType::I64);
        assert_eq!(s.sample_bytes(), 3 * 8 * 6 * 4);
        let nhwc = BatchSchema {
            nhwc: true,
            ..s.clone()
        };
        assert_eq!(nhwc.tensors()[0].shape, vec![4, 8, 6, 3]);
        let mixed = nhwc.with_source();
        let source = at(&mixed, TensorIndex::Source);
        assert_eq!(source, 3);
        let t = mixed.tensors();
        assert_eq!(t[source].name, "source");
        assert_eq!(t[source].dtype, DType::U16);
        assert_eq!(t[source].shape, vec![4]);
        for source in [false, true] {
            let schema = BatchSchema {
                source,
                ..s.clone()
            }
            .with_weights(true);
            let w = at(&schema, TensorIndex::Weights);
            let t = schema.tensors();
            assert_eq!(
                (w, t.len()),
                (3 + usize::from(source), 5 + usize::from(source))
            );
            assert_eq!((t[w].name.as_str(), t[w].dtype), ("weights", DType::F32));
            assert_eq!(t[at(&schema, TensorIndex::Valid)].name, "valid");
            assert_eq!(at(&schema, TensorIndex::Valid), t.len() - 1);
        }
        assert_eq!(s.position(TensorIndex::Weights), None);
        assert_eq!(s.position(TensorIndex::Source), None);
        let all = s
            .clone()
            .with_source()
            .with_weights(true)
            .with_targets(Some(7));
        let targets = at(&all, TensorIndex::Targets);
        let t = all.tensors();
        assert_eq!((targets, t.len(), at(&all, TensorIndex::Valid)), (6, 7, 5));
        assert_eq!(
            (
                t[targets].name.as_str(),
                t[targets].dtype,
                t[targets].shape.clone()
            ),
            ("targets", DType::F32, vec![4, 7])
        );
        assert_eq!(s.position(TensorIndex::Targets), None);
        // Every position names its tensor in the table.
        for t in TensorIndex::ALL {
            if let Some(p) = all.position(t) {
                assert_eq!(all.tensors()[p].name, t.name());
            }
        }
    }
}
