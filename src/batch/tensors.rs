//! Named, typed views of one batch's tensors: the one place that knows which tensors a batch
//! can hold, what each is called in the ring's tensor table, and how a row of it is encoded.
//!
//! Adding a tensor is one variant of [`TensorIndex`] with its name, dtype and shape here, and
//! its condition in [`BatchSchema::has`](super::BatchSchema::has); the schema's positions,
//! the ring's tensor table and the writers below follow from it.

use std::marker::PhantomData;

use super::BatchSchema;
use crate::ring::DType;

/// Every tensor a batch may hold, in the order they sit in a slot (`docs/ring-format.md`
/// §5.2). Which of them a batch holds, and so their positions, come from the
/// [`BatchSchema`](super::BatchSchema) ([`position`](super::BatchSchema::position)); a slot's
/// tensors are found by name ([`BatchTensors::from_named`]), never by position arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorIndex {
    /// `images`: the augmenter's output dtype, `[B, C, H, W]` or `[B, H, W, C]`.
    Images,
    /// `labels`: `i64 [B]`.
    Labels,
    /// `sample_ids`: `i64 [B]`, each row's position in the dataset.
    SampleIds,
    /// `source`: `u16 [B]`, each row's stream (mixtures only).
    Source,
    /// `weights`: `f32 [B]`, the factor a trainer multiplies each loss by (`[selection]` on).
    Weights,
    /// `valid`: `u8 [B]`, 1 for a sample's first occurrence in the epoch, 0 for padding.
    Valid,
    /// `targets`: `f32 [B, num_classes]`, soft targets of batch mixing, rows summing to 1.
    Targets,
}

impl TensorIndex {
    /// Every tensor, in slot order.
    pub const ALL: [TensorIndex; 7] = [
        TensorIndex::Images,
        TensorIndex::Labels,
        TensorIndex::SampleIds,
        TensorIndex::Source,
        TensorIndex::Weights,
        TensorIndex::Valid,
        TensorIndex::Targets,
    ];

    /// The tensor's name in the ring's tensor table.
    pub fn name(self) -> &'static str {
        match self {
            TensorIndex::Images => "images",
            TensorIndex::Labels => "labels",
            TensorIndex::SampleIds => "sample_ids",
            TensorIndex::Source => "source",
            TensorIndex::Weights => "weights",
            TensorIndex::Valid => "valid",
            TensorIndex::Targets => "targets",
        }
    }

    /// The tensor called `name`, if ringfeed writes one of that name.
    pub fn from_name(name: &str) -> Option<TensorIndex> {
        TensorIndex::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The element type; `None` for `images`, whose dtype is the augmenter's output dtype.
    pub fn dtype(self) -> Option<DType> {
        match self {
            TensorIndex::Images => None,
            TensorIndex::Labels | TensorIndex::SampleIds => Some(DType::I64),
            TensorIndex::Source => Some(DType::U16),
            TensorIndex::Weights | TensorIndex::Targets => Some(DType::F32),
            TensorIndex::Valid => Some(DType::U8),
        }
    }
}

/// An element type a row of a one-dimensional tensor is written as (little-endian, as the
/// ring format stores every value).
pub trait RowValue: Copy {
    /// The ring's dtype of this element.
    const DTYPE: DType;
    /// Writes the value's little-endian bytes into `out` (exactly its size).
    fn write_le(self, out: &mut [u8]);
}

macro_rules! element {
    ($($t:ty => $dtype:expr),* $(,)?) => {$(
        impl RowValue for $t {
            const DTYPE: DType = $dtype;
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}

element!(i64 => DType::I64, u16 => DType::U16, f32 => DType::F32, u8 => DType::U8);

/// One batch's tensors, by name: a ring slot's (`SlotWriter::batch_tensors`) or
/// [`BatchBuffers`] laid out by [`BatchSchema::tensors`](super::BatchSchema::tensors)
/// (`bench`, `peek`, embedders).
#[derive(Debug, Default)]
pub struct BatchTensors<'a> {
    /// Indexed by `TensorIndex as usize`; `None` where the batch has no such tensor.
    tensors: [Option<&'a mut [u8]>; TensorIndex::ALL.len()],
}

impl<'a> BatchTensors<'a> {
    /// The tensors of `(name, bytes)` pairs, e.g. a slot's tensor table. A name ringfeed does
    /// not write is left alone (its bytes stay as they are).
    pub fn from_named<'n>(tensors: impl IntoIterator<Item = (&'n str, &'a mut [u8])>) -> Self {
        let mut out = BatchTensors::default();
        for (name, bytes) in tensors {
            if let Some(t) = TensorIndex::from_name(name) {
                out.tensors[t as usize] = Some(bytes);
            }
        }
        out
    }

    /// Tensor `t`'s bytes; `None` when this batch does not carry it.
    pub fn tensor_mut(&mut self, t: TensorIndex) -> Option<&mut [u8]> {
        self.tensors[t as usize].as_deref_mut()
    }

    /// The `images` tensor's bytes (empty if the batch had none, which a ring never has).
    pub fn images_mut(&mut self) -> &mut [u8] {
        self.tensor_mut(TensorIndex::Images).unwrap_or_default()
    }

    /// Tensor `t` as rows of `T`; `None` when this batch does not carry it.
    ///
    /// # Panics
    /// If `T` is not `t`'s element type (a programming error, not a data error).
    pub fn rows_mut<T: RowValue>(&mut self, t: TensorIndex) -> Option<Rows<'_, T>> {
        assert_eq!(
            t.dtype(),
            Some(T::DTYPE),
            "tensor `{}` is not written as {:?}",
            t.name(),
            T::DTYPE
        );
        Some(Rows {
            bytes: self.tensor_mut(t)?,
            element: PhantomData,
        })
    }

    /// Writes `values` into tensor `t`'s rows, first row first; a tensor the batch does not
    /// carry is skipped. Rows beyond `values` keep their bytes.
    pub fn write_rows<T: RowValue>(&mut self, t: TensorIndex, values: impl IntoIterator<Item = T>) {
        if let Some(mut rows) = self.rows_mut::<T>(t) {
            rows.write(values);
        }
    }
}

/// A one-dimensional tensor's bytes seen as rows of `T`.
#[derive(Debug)]
pub struct Rows<'t, T> {
    bytes: &'t mut [u8],
    element: PhantomData<T>,
}

impl<T: RowValue> Rows<'_, T> {
    /// Rows in the tensor.
    pub fn len(&self) -> usize {
        self.bytes.len() / T::DTYPE.size()
    }

    /// Whether the tensor has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets row `row` to `value`.
    ///
    /// # Panics
    /// If `row` is not below [`len`](Self::len).
    pub fn set(&mut self, row: usize, value: T) {
        let size = T::DTYPE.size();
        value.write_le(&mut self.bytes[row * size..(row + 1) * size]);
    }

    /// Writes `values` into the rows, first row first (at most [`len`](Self::len) of them).
    pub fn write(&mut self, values: impl IntoIterator<Item = T>) {
        for (out, value) in self.bytes.chunks_exact_mut(T::DTYPE.size()).zip(values) {
            value.write_le(out);
        }
    }
}

/// One batch's tensors in memory, laid out by a [`BatchSchema`]: what `bench`, `peek` and an
/// embedder fill with `Pipeline::fill_batch` when no ring is involved.
#[derive(Debug, Clone)]
pub struct BatchBuffers {
    /// `(name, bytes)` of each tensor, in the schema's order.
    tensors: Vec<(&'static str, Vec<u8>)>,
}

impl BatchBuffers {
    /// Zeroed buffers for one batch of `schema`.
    pub fn new(schema: &BatchSchema) -> BatchBuffers {
        BatchBuffers {
            tensors: TensorIndex::ALL
                .into_iter()
                .filter(|&t| schema.has(t))
                .zip(schema.tensors())
                .map(|(t, spec)| {
                    let bytes = spec.shape.iter().product::<u64>() as usize * spec.dtype.size();
                    (t.name(), vec![0u8; bytes])
                })
                .collect(),
        }
    }

    /// The tensors, to fill.
    pub fn tensors(&mut self) -> BatchTensors<'_> {
        BatchTensors::from_named(
            self.tensors
                .iter_mut()
                .map(|(name, bytes)| (*name, bytes.as_mut_slice())),
        )
    }

    /// Tensor `t`'s bytes; `None` when the schema has no such tensor.
    pub fn get(&self, t: TensorIndex) -> Option<&[u8]> {
        self.tensors
            .iter()
            .find(|(name, _)| *name == t.name())
            .map(|(_, bytes)| bytes.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_dtypes_match_the_elements() {
        for t in TensorIndex::ALL {
            assert_eq!(TensorIndex::from_name(t.name()), Some(t));
        }
        assert_eq!(TensorIndex::from_name("bogus"), None);
        assert_eq!(TensorIndex::Labels.dtype(), Some(<i64 as RowValue>::DTYPE));
        assert_eq!(TensorIndex::Source.dtype(), Some(<u16 as RowValue>::DTYPE));
        assert_eq!(TensorIndex::Weights.dtype(), Some(<f32 as RowValue>::DTYPE));
        assert_eq!(TensorIndex::Valid.dtype(), Some(<u8 as RowValue>::DTYPE));
    }

    #[test]
    fn rows_are_written_little_endian_by_name_and_unknown_tensors_are_left_alone() {
        let (mut images, mut labels, mut extra) = ([0u8; 6], [0u8; 24], [7u8; 3]);
        let mut t = BatchTensors::from_named([
            ("images", &mut images[..]),
            ("labels", &mut labels[..]),
            ("not-ours", &mut extra[..]),
        ]);
        t.images_mut().fill(9);
        t.write_rows(TensorIndex::Labels, [1i64, -2]);
        let mut rows = t.rows_mut::<i64>(TensorIndex::Labels).unwrap();
        assert_eq!(rows.len(), 3);
        rows.set(2, 0x0102);
        // Absent tensors: nothing to write, no panic.
        t.write_rows(TensorIndex::Weights, [1.0f32]);
        assert!(t.tensor_mut(TensorIndex::Valid).is_none());
        assert_eq!(images, [9; 6]);
        assert_eq!(&labels[..8], &1i64.to_le_bytes());
        assert_eq!(&labels[8..16], &(-2i64).to_le_bytes());
        assert_eq!(&labels[16..], &0x0102i64.to_le_bytes());
        assert_eq!(extra, [7; 3]);
    }

    #[test]
    #[should_panic(expected = "not written as")]
    fn a_wrong_element_type_is_a_programming_error() {
        let mut labels = [0u8; 8];
        let mut t = BatchTensors::from_named([("labels", &mut labels[..])]);
        t.write_rows(TensorIndex::Labels, [1.0f32]);
    }
}
