//! The batch schema: which tensors a ring slot holds, in which order, dtype and shape.
//!
//! Every image batch has three tensors, always in this order (see `docs/ring-format.md` §5.2):
//! `images` (the augmenter's output dtype, `[B, C, H, W]` or `[B, H, W, C]`), `labels`
//! (`i64 [B]`) and `sample_ids` (`i64 [B]`, the sample's position in the dataset); a mixture of
//! datasets adds `source` (`u16 [B]`, each sample's stream), and `[selection]` on adds
//! `weights` after it (`f32 [B]`, the factor a trainer multiplies each sample's loss by: 1, or
//! `1 / (1 - prune-ratio)` for kept well-learned samples; see [`BatchSchema::weights_index`]).
//! Then comes `valid` (`u8 [B]`, since format 1.3): 1 for a sample's first occurrence in the
//! epoch on this job's ranks, 0 for a padding row that repeats the epoch's start
//! (`drop-last = false`); see [`BatchSchema::valid_index`]. Batch mixing (`mixup` / `cutmix`,
//! `mix.rs`) adds `targets` after it, last (`f32 [B, num_classes]`, rows summing to 1; see
//! [`BatchSchema::targets_index`]).
#![forbid(unsafe_code)]

mod mix;

pub use mix::{ImageGeometry, MixParams, Mixer};

use crate::augment::{Augmenter, OutDType};
use crate::ring::{DType, TensorSpec};

/// Position of each tensor in the schema (and in the ring's tensor table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorIndex {
    /// `images`
    Images = 0,
    /// `labels`
    Labels = 1,
    /// `sample_ids`
    SampleIds = 2,
    /// `source` (mixtures only)
    Source = 3,
}

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

    /// Position of the `targets` tensor (last, after `valid`), if any.
    pub fn targets_index(&self) -> Option<usize> {
        self.targets.map(|_| self.valid_index() + 1)
    }

    /// The same schema with (or without) the `weights` tensor.
    pub fn with_weights(self, weights: bool) -> BatchSchema {
        BatchSchema { weights, ..self }
    }

    /// Position of the `valid` tensor: the last one, or the one before `targets`.
    pub fn valid_index(&self) -> usize {
        TensorIndex::SampleIds as usize + 1 + usize::from(self.source) + usize::from(self.weights)
    }

    /// Position of the `weights` tensor (after `source` when there is one), if any.
    pub fn weights_index(&self) -> Option<usize> {
        self.weights
            .then_some(TensorIndex::SampleIds as usize + 1 + usize::from(self.source))
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
        let b = u64::from(self.batch_size);
        let (c, h, w) = (
            u64::from(self.chw.0),
            u64::from(self.chw.1),
            u64::from(self.chw.2),
        );
        let image_shape = if self.nhwc {
            vec![b, h, w, c]
        } else {
            vec![b, c, h, w]
        };
        let mut tensors = vec![
            TensorSpec {
                name: "images".to_owned(),
                dtype: self.image_dtype,
                shape: image_shape,
            },
            TensorSpec {
                name: "labels".to_owned(),
                dtype: DType::I64,
                shape: vec![b],
            },
            TensorSpec {
                name: "sample_ids".to_owned(),
                dtype: DType::I64,
                shape: vec![b],
            },
        ];
        if self.source {
            tensors.push(TensorSpec {
                name: "source".to_owned(),
                dtype: DType::U16,
                shape: vec![b],
            });
        }
        if self.weights {
            tensors.push(TensorSpec {
                name: "weights".to_owned(),
                dtype: DType::F32,
                shape: vec![b],
            });
        }
        tensors.push(TensorSpec {
            name: "valid".to_owned(),
            dtype: DType::U8,
            shape: vec![b],
        });
        if let Some(classes) = self.targets {
            tensors.push(TensorSpec {
                name: "targets".to_owned(),
                dtype: DType::F32,
                shape: vec![b, u64::from(classes)],
            });
        }
        tensors
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
        let t = s.tensors();
        assert_eq!(t.len(), 4);
        assert_eq!(s.valid_index(), 3);
        assert_eq!((t[3].name.as_str(), t[3].dtype), ("valid", DType::U8));
        assert_eq!(t[TensorIndex::Images as usize].shape, vec![4, 3, 8, 6]);
        assert_eq!(t[TensorIndex::Labels as usize].name, "labels");
        assert_eq!(t[TensorIndex::SampleIds as usize].dtype, DType::I64);
        assert_eq!(s.sample_bytes(), 3 * 8 * 6 * 4);
        let nhwc = BatchSchema {
            nhwc: true,
            ..s.clone()
        };
        assert_eq!(nhwc.tensors()[0].shape, vec![4, 8, 6, 3]);
        let mixed = nhwc.with_source().tensors();
        assert_eq!(mixed[TensorIndex::Source as usize].name, "source");
        assert_eq!(mixed[TensorIndex::Source as usize].dtype, DType::U16);
        assert_eq!(mixed[TensorIndex::Source as usize].shape, vec![4]);
        for source in [false, true] {
            let schema = BatchSchema {
                source,
                ..s.clone()
            }
            .with_weights(true);
            let at = schema.weights_index().unwrap();
            let t = schema.tensors();
            assert_eq!(
                (at, t.len()),
                (3 + usize::from(source), 5 + usize::from(source))
            );
            assert_eq!((t[at].name.as_str(), t[at].dtype), ("weights", DType::F32));
            assert_eq!(t[schema.valid_index()].name, "valid");
            assert_eq!(schema.valid_index(), t.len() - 1);
        }
        assert_eq!(s.weights_index(), None);
        let all = s
            .clone()
            .with_source()
            .with_weights(true)
            .with_targets(Some(7));
        let at = all.targets_index().unwrap();
        let t = all.tensors();
        assert_eq!((at, t.len(), all.valid_index()), (6, 7, 5));
        assert_eq!(
            (t[at].name.as_str(), t[at].dtype, t[at].shape.clone()),
            ("targets", DType::F32, vec![4, 7])
        );
        assert_eq!(s.targets_index(), None);
    }
}
