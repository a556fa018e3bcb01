//! The ring's wire format (docs/ring-format.md §5), owned here and nowhere else: constants,
//! field offsets, state codes, the layout types and their errors, and the readers every role
//! shares. The producer, its attach service, the consumer and the observer all depend on this
//! module; it depends on none of them (only on the `memory` and `slot` helpers, for the live
//! counters).
//!
//! # Brief overview
//!
//! - this file: constants, byte offsets of every table entry (`hdr`, `lane`, `slot`,
//!   `consumer`), [`DType`] and the element types that view it, [`RingSpec`] / [`Layout`],
//!   [`ProducerState`] codes, [`FormatError`] / [`SpecError`], and the `Io { name, what,
//!   source }` shape every role's error enum shares (`IoStep`);
//! - `plan`: [`plan`](fn@plan) lays out a [`RingSpec`], [`encode_control`] writes the initial control
//!   region (the producer's side);
//! - `validate`: [`validate_header`] checks a header against a file size (pure, safe, fuzzed by
//!   the tests) and `read_layout` reads one from a ring's file descriptor (every reader's side);
//! - `stats`: [`RingStats`] / [`LaneStats`] and the reader of the live counters, the
//!   `producer_state` and the `last_error` fields of a mapped control region.
//!
//! Laying out and validating are pure and safe: [`validate_header`] takes plain bytes, so it
//! can be fed arbitrary corruptions without any mapping.

use std::io;

use thiserror::Error;

pub(crate) mod lane_page;
mod plan;
mod stats;
#[cfg(test)]
mod tests;
mod validate;

pub use plan::{encode_control, plan};
pub(crate) use stats::{decode_last_error, encode_last_error, read_state, read_stats};
pub use stats::{LaneStats, RingStats};
pub(crate) use validate::read_layout;
pub use validate::validate_header;

/// `RINGFEED` in ASCII: the first eight bytes of every ring.
pub const MAGIC: [u8; 8] = *b"RINGFEED";
/// The layout major version this code implements.
pub const VERSION_MAJOR: u16 = 2;
/// The layout minor version this code writes.
pub const VERSION_MINOR: u16 = 0;
/// Size of the fixed header.
pub const HEADER_BYTES: u32 = 512;
/// Page size every region boundary is aligned to.
pub const PAGE: u64 = 4096;
/// Most tensors a schema may have.
pub const MAX_TENSORS: usize = 16;
/// Bytes of one tensor table entry.
pub const TENSOR_ENTRY_BYTES: u64 = 64;
/// Bytes of one lane table entry.
pub const LANE_ENTRY_BYTES: u64 = 128;
/// Bytes of one slot table entry.
pub const SLOT_ENTRY_BYTES: u64 = 64;
/// Bytes of one consumer table entry.
pub const CONSUMER_ENTRY_BYTES: u64 = 64;
/// Alignment of every tensor inside a slot.
pub const TENSOR_ALIGN: u64 = 64;
/// Header flag bit 0: incomplete last batches are dropped (otherwise padded).
pub const FLAG_DROP_LAST: u32 = 1;
/// Header flag bit 1: images are NHWC (otherwise NCHW).
pub const FLAG_NHWC: u32 = 2;
/// Header flag bit 2: the daemon selects samples per epoch (`[selection]`): epochs may be
/// shorter than `batches_per_epoch`; the lane table's `plan_*` fields give each one's length.
pub const FLAG_SELECTION: u32 = 4;
/// Header flag bit 3 (since 1.3): an on-demand (evaluation) ring. A lane produces only while
/// its consumer has asked for a pass (a `PASS` feedback frame, or an attach with `resume`);
/// every pass is the same batches in the same order, published with slot `epoch` = the pass.
pub const FLAG_ON_DEMAND: u32 = 8;
/// Longest ring name (it must fit the header's 32-byte `name` field).
pub const MAX_NAME_LEN: usize = 32;
/// Bytes of the `last_error` header field.
pub const LAST_ERROR_BYTES: usize = 256;

/// Byte offsets of header fields (§5.1).
pub(crate) mod hdr {
    pub(crate) const MAGIC: usize = 0;
    pub(crate) const VERSION_MAJOR: usize = 8;
    pub(crate) const VERSION_MINOR: usize = 10;
    pub(crate) const HEADER_BYTES: usize = 12;
    pub(crate) const CONTROL_BYTES: usize = 16;
    pub(crate) const FILE_BYTES: usize = 24;
    pub(crate) const GENERATION: usize = 32;
    pub(crate) const PRODUCER_PID: usize = 40;
    pub(crate) const PRODUCER_STATE: usize = 44;
    pub(crate) const START_UNIX_NS: usize = 48;
    pub(crate) const HEARTBEAT_MONO_NS: usize = 56;
    pub(crate) const LANE_COUNT: usize = 64;
    pub(crate) const SLOTS_PER_LANE: usize = 68;
    pub(crate) const SLOT_STRIDE: usize = 72;
    pub(crate) const DATA_OFFSET: usize = 80;
    pub(crate) const TENSOR_COUNT: usize = 88;
    pub(crate) const TENSOR_TABLE: usize = 92;
    pub(crate) const LANE_TABLE: usize = 96;
    pub(crate) const SLOT_TABLE: usize = 100;
    pub(crate) const CONSUMER_TABLE: usize = 104;
    pub(crate) const CONSUMER_CAPACITY: usize = 108;
    pub(crate) const BATCH_SIZE: usize = 112;
    pub(crate) const FLAGS: usize = 116;
    pub(crate) const BATCHES_PER_EPOCH: usize = 120;
    pub(crate) const EPOCHS: usize = 128;
    pub(crate) const SEED: usize = 136;
    pub(crate) const SAMPLES_PER_EPOCH: usize = 144;
    // 152: reserved in 2.0 (1.x `release_any`; each attach has an eventfd doorbell now).
    pub(crate) const WORLD_SIZE: usize = 156;
    pub(crate) const SAMPLES_OK: usize = 160;
    pub(crate) const SAMPLES_SKIPPED: usize = 168;
    pub(crate) const PRODUCER_WAIT_NS: usize = 176;
    pub(crate) const BATCHES_PUBLISHED: usize = 184;
    pub(crate) const LAST_ERROR: usize = 192;
    pub(crate) const MEAN: usize = 448;
    pub(crate) const STD: usize = 464;
    pub(crate) const NAME: usize = 480;
}

/// Byte offsets inside a tensor table entry (§5.2).
mod tensor_entry {
    pub(super) const NAME: usize = 0;
    pub(super) const DTYPE: usize = 16;
    pub(super) const RANK: usize = 20;
    pub(super) const SHAPE: usize = 24;
    pub(super) const OFFSET: usize = 56;
}

/// Byte offsets inside a lane table entry (§5.3).
pub(crate) mod lane {
    pub(crate) const PUBLISH_SEQ: u64 = 0;
    // 4: reserved in 2.0 (1.x `release_seq`).
    pub(crate) const CONSUMER_PID: u64 = 8;
    pub(crate) const STREAM: u64 = 12;
    pub(crate) const NEXT_SEQ: u64 = 16;
    pub(crate) const PUBLISHED: u64 = 24;
    pub(crate) const RELEASED: u64 = 32;
    pub(crate) const CONSUMER_WAIT_NS: u64 = 40;
    pub(crate) const PRODUCER_WAIT_NS: u64 = 48;
    pub(crate) const EPOCH: u64 = 56;
    pub(crate) const INDEX: u64 = 64;
    pub(crate) const PLAN_EPOCH: u64 = 72;
    pub(crate) const PLAN_BATCHES: u64 = 80;
    pub(crate) const PLAN_KEPT: u64 = 88;
    pub(crate) const PLAN_PRUNED: u64 = 96;
    pub(crate) const RANK: u64 = 104;
    pub(crate) const RANK_SAMPLES: u64 = 112;
}

/// Byte offsets inside a slot table entry (§5.4).
pub(crate) mod slot {
    pub(crate) const STATE: u64 = 0;
    // 4 (1.x `holder_pid`) and 48 (1.2 `holder_token`): reserved in 2.0.
    pub(crate) const SEQ: u64 = 8;
    pub(crate) const EPOCH: u64 = 16;
    pub(crate) const INDEX: u64 = 24;
    pub(crate) const COUNT: u64 = 32;
    pub(crate) const FLAGS: u64 = 36;
    pub(crate) const PUBLISHED_MONO_NS: u64 = 40;
}

/// Byte offsets inside a consumer table entry (§5.5).
pub(crate) mod consumer {
    pub(crate) const PID: u64 = 0;
    pub(crate) const LANE: u64 = 4;
    pub(crate) const ATTACH_UNIX_NS: u64 = 8;
    pub(crate) const HEARTBEAT_MONO_NS: u64 = 16;
    pub(crate) const TAKEN: u64 = 24;
    /// (2.0) Batches released by the current attach: the producer's copy of its lane page's
    /// `released`, so that `held = taken − released` (statistics only).
    pub(crate) const RELEASED: u64 = 32;
}

/// Element type of a tensor, with its on-disk code (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `u8`, code 1.
    U8,
    /// `i32`, code 2.
    I32,
    /// `i64`, code 3.
    I64,
    /// IEEE half precision, code 4.
    F16,
    /// bfloat16, code 5.
    BF16,
    /// `f32`, code 6.
    F32,
    /// `u16`, code 7 (format 1.1): e.g. the `source` stream index of a mixture.
    U16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 | DType::U16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 => 8,
        }
    }

    /// The code stored in the tensor table.
    pub fn code(self) -> u32 {
        match self {
            DType::U8 => 1,
            DType::I32 => 2,
            DType::I64 => 3,
            DType::F16 => 4,
            DType::BF16 => 5,
            DType::F32 => 6,
            DType::U16 => 7,
        }
    }

    /// The dtype with this tensor-table code, if any.
    pub fn from_code(code: u32) -> Option<DType> {
        Some(match code {
            1 => DType::U8,
            2 => DType::I32,
            3 => DType::I64,
            4 => DType::F16,
            5 => DType::BF16,
            6 => DType::F32,
            7 => DType::U16,
            _ => return None,
        })
    }
}

/// One tensor of the batch schema, as the producer asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// 1–16 ASCII bytes, unique within the schema.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Full shape including the batch dimension: `shape[0]` must equal the ring's batch size;
    /// 1–4 dimensions, each ≥ 1.
    pub shape: Vec<u64>,
}

/// Everything the producer needs to create a ring.
#[derive(Debug, Clone, PartialEq)]
pub struct RingSpec {
    /// Ring name: 1–32 characters from `[A-Za-z0-9._-]`, not starting with `.`.
    pub name: String,
    /// Number of lanes (one per local rank), ≥ 1.
    pub lanes: u32,
    /// Slots per lane, ≥ 1.
    pub slots_per_lane: u32,
    /// Samples per batch, ≥ 1.
    pub batch_size: u32,
    /// The batch schema, 1–16 tensors.
    pub tensors: Vec<TensorSpec>,
    /// Whether incomplete last batches are dropped (otherwise padded).
    pub drop_last: bool,
    /// Whether images are NHWC (otherwise NCHW).
    pub nhwc: bool,
    /// The daemon selects samples per epoch ([`FLAG_SELECTION`]).
    pub selection: bool,
    /// An on-demand (evaluation) ring ([`FLAG_ON_DEMAND`]): lanes produce passes only when
    /// asked.
    pub on_demand: bool,
    /// Batches per epoch per lane; 0 when unknown.
    pub batches_per_epoch: u64,
    /// Epochs to produce; 0 = unbounded.
    pub epochs: u64,
    /// The run's seed.
    pub seed: u64,
    /// Dataset size; 0 when unknown.
    pub samples_per_epoch: u64,
    /// Ranks in the whole job (1.3); 0 when unknown.
    pub world_size: u32,
    /// Global rank of lane 0 (1.3): lane `l` serves rank `first_rank + l`.
    pub first_rank: u32,
    /// Samples in one epoch's order (the dataset, or a mixture's `samples-per-epoch`), for
    /// each lane's `rank_samples`; 0 when unknown.
    pub epoch_samples: u64,
    /// Normalisation mean per channel.
    pub mean: [f32; 4],
    /// Normalisation std per channel (all 0 = not normalised).
    pub std: [f32; 4],
}

impl RingSpec {
    /// A ring of `lanes` lanes of `slots_per_lane` slots, each holding one batch of
    /// `batch_size` samples in `tensors`; everything else unknown, off or zero (pad, NCHW, no
    /// selection, unbounded epochs, not normalised). Set other fields with struct update
    /// syntax: `RingSpec { drop_last: true, ..RingSpec::new(…) }`.
    pub fn new(
        name: impl Into<String>,
        lanes: u32,
        slots_per_lane: u32,
        batch_size: u32,
        tensors: Vec<TensorSpec>,
    ) -> RingSpec {
        RingSpec {
            name: name.into(),
            lanes,
            slots_per_lane,
            batch_size,
            tensors,
            drop_last: false,
            nhwc: false,
            selection: false,
            on_demand: false,
            batches_per_epoch: 0,
            epochs: 0,
            seed: 0,
            samples_per_epoch: 0,
            world_size: 0,
            first_rank: 0,
            epoch_samples: 0,
            mean: [0.0; 4],
            std: [0.0; 4],
        }
    }
}

/// Where one tensor lies inside every slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Full shape, batch dimension first.
    pub shape: Vec<u64>,
    /// Byte offset inside a slot (a multiple of 64).
    pub offset: u64,
    /// Byte length: product(shape) × dtype size.
    pub bytes: u64,
}

/// A validated ring layout: every offset and size a view needs, plus the header's
/// configuration fields. Produced by [`plan`] (producer) or [`validate_header`] (consumer).
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Ring name from the header.
    pub name: String,
    /// Producer generation (non-zero).
    pub generation: u64,
    /// Size of the header.
    pub header_bytes: u32,
    /// Number of lanes.
    pub lane_count: u32,
    /// Slots per lane.
    pub slots_per_lane: u32,
    /// Bytes per slot (a multiple of 4096).
    pub slot_stride: u64,
    /// Start of the data region (a multiple of 4096) = size of the control region.
    pub data_offset: u64,
    /// Total size of the ring file.
    pub file_bytes: u64,
    /// Offset of the tensor table.
    pub tensor_table_offset: u32,
    /// Offset of the lane table.
    pub lane_table_offset: u32,
    /// Offset of the slot table.
    pub slot_table_offset: u32,
    /// Offset of the consumer table.
    pub consumer_table_offset: u32,
    /// Entries in the consumer table.
    pub consumer_capacity: u32,
    /// Samples per batch.
    pub batch_size: u32,
    /// Header flags ([`FLAG_DROP_LAST`], [`FLAG_NHWC`]).
    pub flags: u32,
    /// Batches per epoch per lane (0 = unknown).
    pub batches_per_epoch: u64,
    /// Epochs (0 = unbounded).
    pub epochs: u64,
    /// Seed.
    pub seed: u64,
    /// Dataset size (0 = unknown).
    pub samples_per_epoch: u64,
    /// Ranks in the whole job (1.3; 0 = unknown, e.g. a producer before 1.3).
    pub world_size: u32,
    /// Global rank of lane 0 (1.3; meaningful only when `world_size` is not 0).
    pub first_rank: u32,
    /// Each lane's `rank_samples` (1.3; see [`rank_share`]); 0 = unknown.
    pub lane_samples: Vec<u64>,
    /// Normalisation mean.
    pub mean: [f32; 4],
    /// Normalisation std.
    pub std: [f32; 4],
    /// The batch schema.
    pub tensors: Vec<TensorLayout>,
}

impl Layout {
    /// Index of the tensor called `name`.
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Offset of lane `lane`'s entry in the lane table.
    pub(crate) fn lane_entry(&self, lane: u32) -> u64 {
        u64::from(self.lane_table_offset) + u64::from(lane) * LANE_ENTRY_BYTES
    }

    /// Global slot number of `(lane, slot)`.
    fn slot_number(&self, lane: u32, slot: u32) -> u64 {
        u64::from(lane) * u64::from(self.slots_per_lane) + u64::from(slot)
    }

    /// Offset of the slot table entry of `(lane, slot)`.
    pub(crate) fn slot_entry(&self, lane: u32, slot: u32) -> u64 {
        u64::from(self.slot_table_offset) + self.slot_number(lane, slot) * SLOT_ENTRY_BYTES
    }

    /// Offset of `(lane, slot)`'s data relative to the start of the data region.
    pub(crate) fn slot_data(&self, lane: u32, slot: u32) -> u64 {
        self.slot_number(lane, slot) * self.slot_stride
    }

    /// Offset of lane `lane`'s entry in the consumer table.
    pub(crate) fn consumer_entry(&self, lane: u32) -> u64 {
        u64::from(self.consumer_table_offset) + u64::from(lane) * CONSUMER_ENTRY_BYTES
    }

    /// Whether images are NHWC.
    pub fn nhwc(&self) -> bool {
        self.flags & FLAG_NHWC != 0
    }

    /// Whether the daemon selects samples per epoch ([`FLAG_SELECTION`]).
    pub fn selection(&self) -> bool {
        self.flags & FLAG_SELECTION != 0
    }

    /// Whether this is an on-demand (evaluation) ring ([`FLAG_ON_DEMAND`]).
    pub fn on_demand(&self) -> bool {
        self.flags & FLAG_ON_DEMAND != 0
    }

    /// Whether incomplete last batches are dropped.
    pub fn drop_last(&self) -> bool {
        self.flags & FLAG_DROP_LAST != 0
    }

    /// Global rank lane `lane` serves (1.3); `None` when the producer did not say
    /// (`world_size` 0: a producer before 1.3).
    pub fn lane_rank(&self, lane: u32) -> Option<u32> {
        (self.world_size > 0).then(|| self.first_rank.saturating_add(lane))
    }
}

/// Distinct (non-padding) samples global rank `rank` receives in an epoch of `epoch_len`
/// samples that keeps every one (the lane table's `rank_samples`, 1.3): the epoch's order is
/// dealt `batch_size` at a time to the ranks in turn, so every rank has `q × batch_size` from
/// the `q` whole global batches plus its part of the last, partial one (none with
/// `drop_last`). 0 when the epoch length or world size is unknown (0).
pub fn rank_share(
    epoch_len: u64,
    batch_size: u32,
    world_size: u32,
    rank: u32,
    drop_last: bool,
) -> u64 {
    let (n, b, w) = (epoch_len, u64::from(batch_size), u64::from(world_size));
    if n == 0 || w == 0 || b == 0 || u64::from(rank) >= w {
        return 0;
    }
    let global = b * w;
    let whole = n / global * b;
    if drop_last {
        return whole;
    }
    whole + (n % global).saturating_sub(u64::from(rank) * b).min(b)
}

/// A header or control region that does not describe a ring this reader can safely map.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer bytes than the header or the tables need.
    #[error("ring header truncated: {have} bytes available, {need} needed ({what})")]
    Truncated {
        /// Bytes given.
        have: u64,
        /// Bytes needed.
        need: u64,
        /// What needed them.
        what: &'static str,
    },
    /// The first eight bytes are not `RINGFEED`.
    #[error("not a ringfeed ring: magic is {found:?}, expected \"RINGFEED\"")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A major version this reader does not implement.
    #[error(
        "version_major: ring layout version {major}.x is not supported (this reader implements {VERSION_MAJOR}.x)"
    )]
    UnsupportedVersion {
        /// The header's major version.
        major: u16,
    },
    /// A header field with an impossible value.
    #[error("ring header field `{field}` = {value}: {reason}")]
    Field {
        /// Field name as in the format document.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Why it is refused.
        reason: String,
    },
    /// A tensor table entry with an impossible value.
    #[error("tensor table entry {index} ({name:?}) field `{field}`: {reason}")]
    Tensor {
        /// Entry index.
        index: usize,
        /// The entry's name as far as it could be read.
        name: String,
        /// Field name as in the format document.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A slot whose `state` is not 0–2 (`FREE`, `WRITING`, `READY`; 2.0 has no `HELD`).
    #[error("slot {slot} of lane {lane} has invalid state {state}")]
    SlotState {
        /// Lane.
        lane: u32,
        /// Slot within the lane.
        slot: u32,
        /// The state word found.
        state: u32,
    },
}

/// Why a [`RingSpec`] cannot be laid out.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpecError {
    /// A field of the spec is out of range.
    #[error("ring spec `{field}`: {reason}")]
    Field {
        /// Field name.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A tensor of the schema is invalid.
    #[error("ring spec tensor {name:?}: {reason}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The ring would exceed 64-bit sizes.
    #[error("ring spec: sizes overflow ({what})")]
    Overflow {
        /// Which computation overflowed.
        what: &'static str,
    },
}

pub(super) fn round_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v / align * align)
}

pub(super) fn tensor_bytes(dtype: DType, shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
}

/// `producer_state` values (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerState {
    /// Setting up; not yet accepting consumers.
    Starting,
    /// Serving batches.
    Serving,
    /// Every epoch produced; ready slots remain valid.
    Finished,
    /// Clean shutdown.
    Stopped,
    /// Failed; see `last_error`.
    Failed,
}

impl ProducerState {
    /// The header code.
    pub fn code(self) -> u32 {
        match self {
            ProducerState::Starting => 0,
            ProducerState::Serving => 1,
            ProducerState::Finished => 2,
            ProducerState::Stopped => 3,
            ProducerState::Failed => 4,
        }
    }

    /// The state with this header code.
    pub fn from_code(code: u32) -> Option<ProducerState> {
        Some(match code {
            0 => ProducerState::Starting,
            1 => ProducerState::Serving,
            2 => ProducerState::Finished,
            3 => ProducerState::Stopped,
            4 => ProducerState::Failed,
            _ => return None,
        })
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Element types a tensor can be viewed as: plain data valid for every bit pattern.
pub trait Element: Copy + sealed::Sealed {
    /// The dtype this element type reads.
    const DTYPE: DType;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    };
}
element!(u8, U8);
element!(i32, I32);
element!(i64, I64);
element!(half::f16, F16);
element!(half::bf16, BF16);
element!(f32, F32);

/// The `Io { name, what, source }` variant every ring role's error enum has (creating,
/// attaching, observing): the ring's name, the step that failed and the OS error.
pub(crate) trait IoStep: Sized {
    /// The enum's `Io` variant.
    fn io(name: String, what: &'static str, source: io::Error) -> Self;
}

/// A converter of an OS error into ring `name`'s `Io` error for step `what` (for `map_err`).
pub(crate) fn io_step<E: IoStep>(name: &str, what: &'static str) -> impl FnOnce(io::Error) -> E {
    let name = name.to_owned();
    move |source| E::io(name, what, source)
}
