//! The ring's binary layout (docs/ring-format.md §5): field offsets, planning a layout from a
//! [`RingSpec`], encoding the control region, and validating a header against a file size.
//!
//! Everything here is pure and safe: [`validate_header`] takes plain bytes, so it can be fed
//! arbitrary corruptions without any mapping.

use thiserror::Error;

/// `RINGFEED` in ASCII: the first eight bytes of every ring.
pub const MAGIC: [u8; 8] = *b"RINGFEED";
/// The layout major version this code implements.
pub const VERSION_MAJOR: u16 = 1;
/// The layout minor version this code writes.
pub const VERSION_MINOR: u16 = 3;
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
    pub(crate) const RELEASE_ANY: usize = 152;
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
    pub(crate) const RELEASE_SEQ: u64 = 4;
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
    pub(crate) const HOLDER_PID: u64 = 4;
    pub(crate) const SEQ: u64 = 8;
    pub(crate) const EPOCH: u64 = 16;
    pub(crate) const INDEX: u64 = 24;
    pub(crate) const COUNT: u64 = 32;
    pub(crate) const FLAGS: u64 = 36;
    pub(crate) const PUBLISHED_MONO_NS: u64 = 40;
    pub(crate) const HOLDER_TOKEN: u64 = 48;
}

/// Byte offsets inside a consumer table entry (§5.5).
pub(crate) mod consumer {
    pub(crate) const PID: u64 = 0;
    pub(crate) const LANE: u64 = 4;
    pub(crate) const ATTACH_UNIX_NS: u64 = 8;
    pub(crate) const HEARTBEAT_MONO_NS: u64 = 16;
    pub(crate) const TAKEN: u64 = 24;
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
    /// A slot whose `state` is not 0–3.
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

fn round_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v / align * align)
}

fn tensor_bytes(dtype: DType, shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
}

/// Lays out a ring for `spec`: tables after the header, slot data after the control region,
/// tensors one after another inside each slot, every boundary aligned as §5 requires.
pub fn plan(spec: &RingSpec, generation: u64) -> Result<Layout, SpecError> {
    let field = |field: &'static str, reason: &str| SpecError::Field {
        field,
        reason: reason.to_owned(),
    };
    if spec.name.is_empty() || spec.name.len() > MAX_NAME_LEN {
        return Err(field("name", "must be 1–32 characters"));
    }
    if spec.lanes == 0 {
        return Err(field("lanes", "must be ≥ 1"));
    }
    if spec.slots_per_lane == 0 {
        return Err(field("slots_per_lane", "must be ≥ 1"));
    }
    if spec.batch_size == 0 {
        return Err(field("batch_size", "must be ≥ 1"));
    }
    if spec.tensors.is_empty() || spec.tensors.len() > MAX_TENSORS {
        return Err(field("tensors", "must hold 1–16 tensors"));
    }
    if generation == 0 {
        return Err(field("generation", "must be non-zero"));
    }
    let mut tensors = Vec::with_capacity(spec.tensors.len());
    let mut cursor = 0u64;
    for t in &spec.tensors {
        let bad = |reason: String| SpecError::Tensor {
            name: t.name.clone(),
            reason,
        };
        if t.name.is_empty() || t.name.len() > 16 || !t.name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "name must be 1–16 printable ASCII bytes (0x21–0x7E)".into()
            ));
        }
        if spec.tensors.iter().filter(|o| o.name == t.name).count() > 1 {
            return Err(bad("name is not unique".into()));
        }
        if t.shape.is_empty() || t.shape.len() > 4 {
            return Err(bad(format!("rank {} is not 1–4", t.shape.len())));
        }
        if t.shape[0] != u64::from(spec.batch_size) {
            return Err(bad(format!(
                "shape[0] = {} must equal batch_size {}",
                t.shape[0], spec.batch_size
            )));
        }
        if t.shape.contains(&0) {
            return Err(bad("every dimension must be ≥ 1".into()));
        }
        let bytes = tensor_bytes(t.dtype, &t.shape).ok_or(SpecError::Overflow {
            what: "tensor bytes",
        })?;
        let offset = round_up(cursor, TENSOR_ALIGN).ok_or(SpecError::Overflow {
            what: "tensor offset",
        })?;
        cursor = offset
            .checked_add(bytes)
            .ok_or(SpecError::Overflow { what: "slot bytes" })?;
        tensors.push(TensorLayout {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            offset,
            bytes,
        });
    }
    let overflow = |what| SpecError::Overflow { what };
    let slot_stride = round_up(cursor.max(1), PAGE).ok_or(overflow("slot stride"))?;
    let lanes = u64::from(spec.lanes);
    let slots = lanes * u64::from(spec.slots_per_lane);
    // Tables are 64-byte aligned so every 64-bit word in them is naturally aligned.
    let tensor_table = u64::from(HEADER_BYTES);
    let lane_table = tensor_table + spec.tensors.len() as u64 * TENSOR_ENTRY_BYTES;
    let slot_table = lane_table + lanes * LANE_ENTRY_BYTES;
    let consumer_table = slot_table
        .checked_add(
            slots
                .checked_mul(SLOT_ENTRY_BYTES)
                .ok_or(overflow("slot table"))?,
        )
        .ok_or(overflow("slot table"))?;
    let tables_end = consumer_table
        .checked_add(lanes * CONSUMER_ENTRY_BYTES)
        .ok_or(overflow("consumer table"))?;
    let as_u32 = |v: u64, what| u32::try_from(v).map_err(|_| overflow(what));
    let data_offset = round_up(tables_end, PAGE).ok_or(overflow("control region"))?;
    let file_bytes = slots
        .checked_mul(slot_stride)
        .and_then(|d| d.checked_add(data_offset))
        .ok_or(overflow("file bytes"))?;
    Ok(Layout {
        name: spec.name.clone(),
        generation,
        header_bytes: HEADER_BYTES,
        lane_count: spec.lanes,
        slots_per_lane: spec.slots_per_lane,
        slot_stride,
        data_offset,
        file_bytes,
        tensor_table_offset: as_u32(tensor_table, "tensor table")?,
        lane_table_offset: as_u32(lane_table, "lane table")?,
        slot_table_offset: as_u32(slot_table, "slot table")?,
        consumer_table_offset: as_u32(consumer_table, "consumer table")?,
        consumer_capacity: spec.lanes,
        batch_size: spec.batch_size,
        flags: (u32::from(spec.drop_last) * FLAG_DROP_LAST)
            | (u32::from(spec.nhwc) * FLAG_NHWC)
            | (u32::from(spec.selection) * FLAG_SELECTION)
            | (u32::from(spec.on_demand) * FLAG_ON_DEMAND),
        batches_per_epoch: spec.batches_per_epoch,
        epochs: spec.epochs,
        seed: spec.seed,
        samples_per_epoch: spec.samples_per_epoch,
        world_size: spec.world_size,
        first_rank: spec.first_rank,
        lane_samples: (0..spec.lanes)
            .map(|l| {
                rank_share(
                    spec.epoch_samples,
                    spec.batch_size,
                    spec.world_size,
                    spec.first_rank.saturating_add(l),
                    spec.drop_last,
                )
            })
            .collect(),
        mean: spec.mean,
        std: spec.std,
        tensors,
    })
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Encodes the initial control region (`data_offset` bytes): the header with
/// `producer_state = STARTING` and the tensor table; lane, slot and consumer tables zero
/// (all slots `FREE`), except every lane's `next_seq = 1`.
pub fn encode_control(layout: &Layout, producer_pid: u32, start_unix_ns: u64) -> Vec<u8> {
    let mut b = vec![0u8; layout.data_offset as usize];
    put(&mut b, hdr::MAGIC, &MAGIC);
    put(&mut b, hdr::VERSION_MAJOR, &VERSION_MAJOR.to_le_bytes());
    put(&mut b, hdr::VERSION_MINOR, &VERSION_MINOR.to_le_bytes());
    put(
        &mut b,
        hdr::HEADER_BYTES,
        &layout.header_bytes.to_le_bytes(),
    );
    put(
        &mut b,
        hdr::CONTROL_BYTES,
        &layout.data_offset.to_le_bytes(),
    );
    put(&mut b, hdr::FILE_BYTES, &layout.file_bytes.to_le_bytes());
    put(&mut b, hdr::GENERATION, &layout.generation.to_le_bytes());
    put(&mut b, hdr::PRODUCER_PID, &producer_pid.to_le_bytes());
    put(&mut b, hdr::START_UNIX_NS, &start_unix_ns.to_le_bytes());
    put(&mut b, hdr::LANE_COUNT, &layout.lane_count.to_le_bytes());
    put(
        &mut b,
        hdr::SLOTS_PER_LANE,
        &layout.slots_per_lane.to_le_bytes(),
    );
    put(&mut b, hdr::SLOT_STRIDE, &layout.slot_stride.to_le_bytes());
    put(&mut b, hdr::DATA_OFFSET, &layout.data_offset.to_le_bytes());
    put(
        &mut b,
        hdr::TENSOR_COUNT,
        &(layout.tensors.len() as u32).to_le_bytes(),
    );
    put(
        &mut b,
        hdr::TENSOR_TABLE,
        &layout.tensor_table_offset.to_le_bytes(),
    );
    put(
        &mut b,
        hdr::LANE_TABLE,
        &layout.lane_table_offset.to_le_bytes(),
    );
    put(
        &mut b,
        hdr::SLOT_TABLE,
        &layout.slot_table_offset.to_le_bytes(),
    );
    put(
        &mut b,
        hdr::CONSUMER_TABLE,
        &layout.consumer_table_offset.to_le_bytes(),
    );
    put(
        &mut b,
        hdr::CONSUMER_CAPACITY,
        &layout.consumer_capacity.to_le_bytes(),
    );
    put(&mut b, hdr::BATCH_SIZE, &layout.batch_size.to_le_bytes());
    put(&mut b, hdr::FLAGS, &layout.flags.to_le_bytes());
    put(
        &mut b,
        hdr::BATCHES_PER_EPOCH,
        &layout.batches_per_epoch.to_le_bytes(),
    );
    put(&mut b, hdr::EPOCHS, &layout.epochs.to_le_bytes());
    put(&mut b, hdr::SEED, &layout.seed.to_le_bytes());
    put(
        &mut b,
        hdr::SAMPLES_PER_EPOCH,
        &layout.samples_per_epoch.to_le_bytes(),
    );
    for c in 0..4 {
        put(&mut b, hdr::MEAN + 4 * c, &layout.mean[c].to_le_bytes());
        put(&mut b, hdr::STD + 4 * c, &layout.std[c].to_le_bytes());
    }
    put(&mut b, hdr::NAME, layout.name.as_bytes());
    for (i, t) in layout.tensors.iter().enumerate() {
        let e = layout.tensor_table_offset as usize + i * TENSOR_ENTRY_BYTES as usize;
        put(&mut b, e + tensor_entry::NAME, t.name.as_bytes());
        put(
            &mut b,
            e + tensor_entry::DTYPE,
            &t.dtype.code().to_le_bytes(),
        );
        put(
            &mut b,
            e + tensor_entry::RANK,
            &(t.shape.len() as u32).to_le_bytes(),
        );
        for (d, dim) in t.shape.iter().enumerate() {
            put(&mut b, e + tensor_entry::SHAPE + 8 * d, &dim.to_le_bytes());
        }
        put(&mut b, e + tensor_entry::OFFSET, &t.offset.to_le_bytes());
    }
    put(&mut b, hdr::WORLD_SIZE, &layout.world_size.to_le_bytes());
    for l in 0..layout.lane_count {
        let at = (layout.lane_entry(l) + lane::NEXT_SEQ) as usize;
        put(&mut b, at, &1u64.to_le_bytes());
        if layout.world_size > 0 {
            let entry = layout.lane_entry(l) as usize;
            let rank = layout.first_rank + l;
            put(&mut b, entry + lane::RANK as usize, &rank.to_le_bytes());
            let share = layout.lane_samples.get(l as usize).copied().unwrap_or(0);
            put(
                &mut b,
                entry + lane::RANK_SAMPLES as usize,
                &share.to_le_bytes(),
            );
        }
    }
    b
}

/// Little-endian field reader over a byte slice whose length was checked first.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }
    fn u32(&self, at: usize) -> u32 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(w)
    }
    fn u64(&self, at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(w)
    }
    fn f32(&self, at: usize) -> f32 {
        f32::from_bits(self.u32(at))
    }
}

fn field_err(field: &'static str, value: u64, reason: impl Into<String>) -> FormatError {
    FormatError::Field {
        field,
        value,
        reason: reason.into(),
    }
}

/// Decodes a NUL-padded ASCII/UTF-8 name; `None` if non-empty bytes follow a NUL or the
/// bytes are not UTF-8.
fn padded_name(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    if bytes[end..].iter().any(|&c| c != 0) {
        return None;
    }
    std::str::from_utf8(&bytes[..end]).ok().map(str::to_owned)
}

/// Validates the control region of a ring against the file's size (§5.6) and returns its
/// layout. `bytes` is the start of the file: at least the 512-byte header, and at least up to
/// the end of the tables for a full validation (fewer bytes give [`FormatError::Truncated`]).
/// Pure and total: any input gives `Ok` or a [`FormatError`] naming the field, never a panic.
pub fn validate_header(bytes: &[u8], file_len: u64) -> Result<Layout, FormatError> {
    let have = bytes.len() as u64;
    let header = u64::from(HEADER_BYTES);
    if file_len < header || have < header {
        return Err(FormatError::Truncated {
            have: have.min(file_len),
            need: header,
            what: "header",
        });
    }
    let r = Reader(bytes);
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[..8]);
    if magic != MAGIC {
        return Err(FormatError::BadMagic { found: magic });
    }
    let major = r.u16(hdr::VERSION_MAJOR);
    if major != VERSION_MAJOR {
        return Err(FormatError::UnsupportedVersion { major });
    }
    let header_bytes = r.u32(hdr::HEADER_BYTES);
    if header_bytes < HEADER_BYTES {
        return Err(field_err(
            "header_bytes",
            header_bytes.into(),
            "must be ≥ 512",
        ));
    }
    let file_bytes = r.u64(hdr::FILE_BYTES);
    if file_bytes != file_len {
        return Err(field_err(
            "file_bytes",
            file_bytes,
            format!("differs from the file size {file_len}"),
        ));
    }
    let control_bytes = r.u64(hdr::CONTROL_BYTES);
    let data_offset = r.u64(hdr::DATA_OFFSET);
    if control_bytes != data_offset {
        return Err(field_err(
            "control_bytes",
            control_bytes,
            format!("differs from data_offset {data_offset}"),
        ));
    }
    if data_offset % PAGE != 0 || data_offset == 0 {
        return Err(field_err(
            "data_offset",
            data_offset,
            "must be a non-zero multiple of 4096",
        ));
    }
    if data_offset > file_bytes {
        return Err(field_err(
            "data_offset",
            data_offset,
            "lies beyond file_bytes",
        ));
    }
    if u64::from(header_bytes) > data_offset {
        return Err(field_err(
            "header_bytes",
            header_bytes.into(),
            "exceeds data_offset",
        ));
    }
    let generation = r.u64(hdr::GENERATION);
    if generation == 0 {
        return Err(field_err("generation", 0, "must be non-zero"));
    }
    let lane_count = r.u32(hdr::LANE_COUNT);
    let slots_per_lane = r.u32(hdr::SLOTS_PER_LANE);
    let tensor_count = r.u32(hdr::TENSOR_COUNT);
    let consumer_capacity = r.u32(hdr::CONSUMER_CAPACITY);
    let batch_size = r.u32(hdr::BATCH_SIZE);
    let slot_stride = r.u64(hdr::SLOT_STRIDE);
    if lane_count == 0 {
        return Err(field_err("lane_count", 0, "must be ≥ 1"));
    }
    if slots_per_lane == 0 {
        return Err(field_err("slots_per_lane", 0, "must be ≥ 1"));
    }
    if tensor_count == 0 || tensor_count as usize > MAX_TENSORS {
        return Err(field_err(
            "tensor_count",
            tensor_count.into(),
            "must be 1–16",
        ));
    }
    if consumer_capacity < lane_count {
        return Err(field_err(
            "consumer_capacity",
            consumer_capacity.into(),
            format!("must be ≥ lane_count {lane_count}"),
        ));
    }
    if batch_size == 0 {
        return Err(field_err("batch_size", 0, "must be ≥ 1"));
    }
    if slot_stride < PAGE || slot_stride % PAGE != 0 {
        return Err(field_err(
            "slot_stride",
            slot_stride,
            "must be a multiple of 4096, ≥ 4096",
        ));
    }
    let slots = u64::from(lane_count) * u64::from(slots_per_lane);
    let data_end = slots
        .checked_mul(slot_stride)
        .and_then(|d| d.checked_add(data_offset));
    match data_end {
        Some(end) if end <= file_bytes => {}
        _ => {
            return Err(field_err(
                "slot_stride",
                slot_stride,
                format!("{slots} slots of this stride do not fit in file_bytes {file_bytes}"),
            ))
        }
    }
    // Tables: (field, offset, entries, entry bytes); each within [header_bytes, data_offset),
    // 8-byte aligned (they hold 64-bit atomics), pairwise disjoint.
    let tables = [
        (
            "tensor_table_offset",
            r.u32(hdr::TENSOR_TABLE),
            u64::from(tensor_count),
            TENSOR_ENTRY_BYTES,
        ),
        (
            "lane_table_offset",
            r.u32(hdr::LANE_TABLE),
            u64::from(lane_count),
            LANE_ENTRY_BYTES,
        ),
        (
            "slot_table_offset",
            r.u32(hdr::SLOT_TABLE),
            slots,
            SLOT_ENTRY_BYTES,
        ),
        (
            "consumer_table_offset",
            r.u32(hdr::CONSUMER_TABLE),
            u64::from(consumer_capacity),
            CONSUMER_ENTRY_BYTES,
        ),
    ];
    let mut spans = [(0u64, 0u64); 4];
    for (i, &(name, offset, entries, size)) in tables.iter().enumerate() {
        let start = u64::from(offset);
        if start % 8 != 0 {
            return Err(field_err(name, start, "must be a multiple of 8"));
        }
        let end = entries.checked_mul(size).and_then(|n| n.checked_add(start));
        match end {
            Some(end) if start >= u64::from(header_bytes) && end <= data_offset => {
                spans[i] = (start, end)
            }
            _ => {
                return Err(field_err(
                    name,
                    start,
                    format!(
                    "table of {entries} × {size} bytes lies outside [header_bytes, data_offset)"
                ),
                ))
            }
        }
    }
    for i in 0..spans.len() {
        for j in i + 1..spans.len() {
            if spans[i].0 < spans[j].1 && spans[j].0 < spans[i].1 {
                return Err(field_err(
                    tables[j].0,
                    spans[j].0,
                    format!("overlaps the table at `{}`", tables[i].0),
                ));
            }
        }
    }
    let tables_end = spans.iter().map(|s| s.1).max().unwrap_or(0);
    if have < tables_end {
        return Err(FormatError::Truncated {
            have,
            need: tables_end,
            what: "tables",
        });
    }
    let tensor_table = spans[0].0 as usize;
    let mut tensors: Vec<TensorLayout> = Vec::with_capacity(tensor_count as usize);
    for index in 0..tensor_count as usize {
        let e = tensor_table + index * TENSOR_ENTRY_BYTES as usize;
        let raw_name = &bytes[e + tensor_entry::NAME..e + tensor_entry::NAME + 16];
        let shown = String::from_utf8_lossy(raw_name)
            .trim_end_matches('\0')
            .to_owned();
        let bad = |field: &'static str, reason: String| FormatError::Tensor {
            index,
            name: shown.clone(),
            field,
            reason,
        };
        let name = match padded_name(raw_name) {
            // Printable ASCII without spaces (1.3: names are shown in errors and logs).
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()) => n,
            _ => {
                return Err(bad(
                    "name",
                    "must be non-empty NUL-padded printable ASCII (0x21–0x7E)".into(),
                ))
            }
        };
        if tensors.iter().any(|t| t.name == name) {
            return Err(bad("name", "duplicates an earlier tensor".into()));
        }
        let code = r.u32(e + tensor_entry::DTYPE);
        let dtype =
            DType::from_code(code).ok_or_else(|| bad("dtype", format!("unknown code {code}")))?;
        let rank = r.u32(e + tensor_entry::RANK);
        if !(1..=4).contains(&rank) {
            return Err(bad("rank", format!("{rank} is not 1–4")));
        }
        let dims: Vec<u64> = (0..4)
            .map(|d| r.u64(e + tensor_entry::SHAPE + 8 * d))
            .collect();
        let (used, unused) = dims.split_at(rank as usize);
        if used[0] != u64::from(batch_size) {
            return Err(bad(
                "shape",
                format!(
                    "shape[0] = {} differs from batch_size {batch_size}",
                    used[0]
                ),
            ));
        }
        if used.contains(&0) || unused.iter().any(|&d| d != 0) {
            return Err(bad(
                "shape",
                format!("{dims:?}: used dims must be ≥ 1, unused 0"),
            ));
        }
        let offset = r.u64(e + tensor_entry::OFFSET);
        if offset % TENSOR_ALIGN != 0 {
            return Err(bad("offset", format!("{offset} is not a multiple of 64")));
        }
        let size = tensor_bytes(dtype, used);
        let end = size.and_then(|s| s.checked_add(offset));
        let (bytes_len, end) = match (size, end) {
            (Some(s), Some(end)) if end <= slot_stride => (s, end),
            _ => {
                return Err(bad(
                    "offset",
                    format!("tensor does not fit in slot_stride {slot_stride}"),
                ))
            }
        };
        if let Some(other) = tensors
            .iter()
            .find(|t| offset < t.offset + t.bytes && t.offset < end)
        {
            return Err(bad("offset", format!("overlaps tensor {:?}", other.name)));
        }
        tensors.push(TensorLayout {
            name,
            dtype,
            shape: used.to_vec(),
            offset,
            bytes: bytes_len,
        });
    }
    let name = padded_name(&bytes[hdr::NAME..hdr::NAME + 32])
        .ok_or_else(|| field_err("name", 0, "must be NUL-padded UTF-8"))?;
    // 1.3: 0 = unknown (an older producer wrote the reserved bytes as zero).
    let world_size = r.u32(hdr::WORLD_SIZE);
    let first_rank = if world_size == 0 {
        0
    } else {
        // The tables were checked to lie within `bytes` above.
        r.u32((u64::from(tables[1].1) + lane::RANK) as usize)
    };
    if world_size > 0 && u64::from(first_rank) + u64::from(lane_count) > u64::from(world_size) {
        return Err(field_err(
            "world_size",
            world_size.into(),
            format!("lanes serve ranks {first_rank}.. (lane_count {lane_count}) beyond it"),
        ));
    }
    let lane_samples = (0..u64::from(lane_count))
        .map(|l| {
            let entry = u64::from(tables[1].1) + l * LANE_ENTRY_BYTES;
            r.u64((entry + lane::RANK_SAMPLES) as usize)
        })
        .collect();
    let f4 = |at: usize| [r.f32(at), r.f32(at + 4), r.f32(at + 8), r.f32(at + 12)];
    Ok(Layout {
        name,
        generation,
        header_bytes,
        lane_count,
        slots_per_lane,
        slot_stride,
        data_offset,
        file_bytes,
        tensor_table_offset: tables[0].1,
        lane_table_offset: tables[1].1,
        slot_table_offset: tables[2].1,
        consumer_table_offset: tables[3].1,
        consumer_capacity,
        batch_size,
        flags: r.u32(hdr::FLAGS),
        batches_per_epoch: r.u64(hdr::BATCHES_PER_EPOCH),
        epochs: r.u64(hdr::EPOCHS),
        seed: r.u64(hdr::SEED),
        samples_per_epoch: r.u64(hdr::SAMPLES_PER_EPOCH),
        world_size,
        first_rank,
        lane_samples,
        mean: f4(hdr::MEAN),
        std: f4(hdr::STD),
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    pub(crate) fn image_spec(batch: u32) -> RingSpec {
        RingSpec {
            name: "train".into(),
            lanes: 2,
            slots_per_lane: 3,
            batch_size: batch,
            tensors: vec![
                TensorSpec {
                    name: "images".into(),
                    dtype: DType::F32,
                    shape: vec![batch.into(), 3, 8, 8],
                },
                TensorSpec {
                    name: "labels".into(),
                    dtype: DType::I64,
                    shape: vec![batch.into()],
                },
                TensorSpec {
                    name: "sample_ids".into(),
                    dtype: DType::I64,
                    shape: vec![batch.into()],
                },
            ],
            drop_last: true,
            nhwc: false,
            selection: false,
            on_demand: false,
            batches_per_epoch: 10,
            epochs: 2,
            seed: 7,
            samples_per_epoch: 40,
            world_size: 0,
            first_rank: 0,
            epoch_samples: 0,
            mean: [0.5, 0.4, 0.3, 0.0],
            std: [0.2, 0.2, 0.2, 0.0],
        }
    }

    fn encoded() -> (Layout, Vec<u8>) {
        let layout = plan(&image_spec(4), 99).unwrap();
        let bytes = encode_control(&layout, 1234, 5);
        (layout, bytes)
    }

    #[test]
    fn ranks_round_trip_and_a_zero_world_size_means_unknown() {
        let spec = RingSpec {
            world_size: 4,
            first_rank: 2,
            epoch_samples: 41,
            drop_last: false,
            ..image_spec(4)
        };
        let planned = plan(&spec, 9).unwrap();
        let bytes = encode_control(&planned, 1, 1);
        let v = validate_header(&bytes, planned.file_bytes).unwrap();
        assert_eq!(
            (v.world_size, v.lane_rank(0), v.lane_rank(1)),
            (4, Some(2), Some(3))
        );
        // 41 samples, global batch 16: two whole ones (8 each), then 9 left: rank 2 gets
        // positions 8..12 of the rest → 1 sample, rank 3 none.
        assert_eq!(v.lane_samples, vec![9, 8]);
        assert_eq!(rank_share(41, 4, 4, 0, false), 12);
        assert_eq!(rank_share(41, 4, 4, 0, true), 8);
        assert_eq!(
            (0..4).map(|r| rank_share(41, 4, 4, r, false)).sum::<u64>(),
            41
        );
        // An old producer wrote zeros: no rank is claimed.
        let (layout, old) = encoded();
        let v = validate_header(&old, layout.file_bytes).unwrap();
        assert_eq!((v.world_size, v.lane_rank(0)), (0, None));
        // A hostile header: lanes serving ranks past the world size.
        let mut forged = bytes.clone();
        forged[hdr::WORLD_SIZE..hdr::WORLD_SIZE + 4].copy_from_slice(&3u32.to_le_bytes());
        let e = validate_header(&forged, planned.file_bytes).map(|_| ());
        assert!(
            matches!(
                e,
                Err(FormatError::Field {
                    field: "world_size",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn plan_aligns_tensors_slots_and_tables() {
        let l = plan(&image_spec(4), 1).unwrap();
        assert_eq!(l.tensors[0].offset, 0);
        assert_eq!(l.tensors[0].bytes, 4 * 3 * 8 * 8 * 4);
        assert_eq!(l.tensors[1].offset, 3072);
        assert_eq!(l.tensors[2].offset, 3072 + 64);
        assert_eq!(l.slot_stride, 4096);
        assert_eq!(l.data_offset % PAGE, 0);
        assert_eq!(l.file_bytes, l.data_offset + 6 * 4096);
        assert!(l.tensor_table_offset.is_multiple_of(64) && l.slot_table_offset.is_multiple_of(64));
    }

    #[test]
    fn plan_refuses_bad_specs() {
        let mut s = image_spec(4);
        s.tensors[1].shape = vec![5];
        assert!(matches!(plan(&s, 1), Err(SpecError::Tensor { .. })));
        let mut s = image_spec(4);
        s.lanes = 0;
        assert!(matches!(
            plan(&s, 1),
            Err(SpecError::Field { field: "lanes", .. })
        ));
        let mut s = image_spec(4);
        s.tensors[2].name = "labels".into();
        assert!(matches!(plan(&s, 1), Err(SpecError::Tensor { .. })));
        let mut s = image_spec(4);
        s.tensors[0].shape = vec![4, u64::MAX, 2, 2];
        assert!(matches!(plan(&s, 1), Err(SpecError::Overflow { .. })));
    }

    #[test]
    fn encode_then_validate_round_trips() {
        let (layout, bytes) = encoded();
        assert_eq!(validate_header(&bytes, layout.file_bytes), Ok(layout));
    }

    fn set_u32(b: &mut [u8], at: usize, v: u32) {
        if at + 4 > b.len() {
            return;
        }
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u64(b: &mut [u8], at: usize, v: u64) {
        if at + 8 > b.len() {
            return;
        }
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn validate_names_the_broken_field() {
        let (l, good) = encoded();
        let check = |mutate: &dyn Fn(&mut Vec<u8>), file_len: u64, expect: &str| {
            let mut b = good.clone();
            mutate(&mut b);
            let err = validate_header(&b, file_len).unwrap_err();
            assert!(
                err.to_string().contains(expect),
                "{err} should mention {expect}"
            );
        };
        let n = l.file_bytes;
        check(&|b| b.truncate(100), n, "truncated");
        check(&|_| {}, 100, "truncated");
        check(&|b| b[0] = b'X', n, "magic");
        check(&|b| b[8] = 2, n, "version 2");
        check(&|_| {}, n - 4096, "file_bytes");
        check(&|b| set_u64(b, hdr::DATA_OFFSET, 4097), n, "control_bytes");
        check(&|b| set_u32(b, hdr::LANE_COUNT, 0), n, "lane_count");
        check(
            &|b| set_u32(b, hdr::LANE_COUNT, 1000),
            n,
            "consumer_capacity",
        );
        check(&|b| set_u32(b, hdr::TENSOR_COUNT, 17), n, "tensor_count");
        check(&|b| set_u64(b, hdr::SLOT_STRIDE, 8192), n, "slot_stride");
        check(&|b| set_u64(b, hdr::SLOT_STRIDE, 100), n, "slot_stride");
        check(
            &|b| set_u32(b, hdr::SLOT_TABLE, l.lane_table_offset),
            n,
            "overlaps",
        );
        check(
            &|b| set_u32(b, hdr::CONSUMER_TABLE, 4090),
            n,
            "consumer_table_offset",
        );
        check(&|b| set_u32(b, hdr::LANE_TABLE, 12), n, "lane_table_offset");
        let t0 = l.tensor_table_offset as usize;
        check(&|b| set_u32(b, t0 + 16, 9), n, "dtype");
        check(&|b| set_u32(b, t0 + 20, 5), n, "rank");
        check(&|b| set_u64(b, t0 + 24, 3), n, "batch_size");
        check(&|b| set_u64(b, t0 + 56, 64), n, "overlaps");
        check(&|b| set_u64(b, t0 + 56, 4032), n, "slot_stride");
        check(&|b| set_u64(b, t0 + 56, 8), n, "multiple of 64");
        check(&|b| b[t0] = 0, n, "name");
        check(&|b| set_u64(b, hdr::GENERATION, 0), n, "generation");
    }

    /// Property-style: thousands of random corruptions of a valid control region (byte
    /// flips, random words at field offsets, truncations, random file sizes) never panic, and
    /// whatever validates still satisfies the invariants the views rely on.
    #[test]
    fn random_corruptions_never_panic() {
        let (l, good) = encoded();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..4) {
                    0 => {
                        let at = rng.random_range(0..b.len().max(1));
                        if at >= b.len() {
                            continue;
                        }
                        b[at] ^= 1 << rng.random_range(0..8);
                    }
                    1 => {
                        let at = rng.random_range(0..(l.consumer_table_offset as usize / 4)) * 4;
                        let v: u32 = if rng.random_bool(0.5) {
                            rng.random()
                        } else {
                            rng.random_range(0..70_000)
                        };
                        set_u32(&mut b, at, v);
                    }
                    2 => {
                        let at = rng.random_range(0..(l.consumer_table_offset as usize / 8)) * 8;
                        set_u64(&mut b, at, rng.random::<u64>() >> rng.random_range(0..64));
                    }
                    _ => b.truncate(rng.random_range(0..b.len().max(1))),
                }
            }
            let file_len = if rng.random_bool(0.8) {
                l.file_bytes
            } else {
                rng.random_range(0..2 * l.file_bytes)
            };
            if let Ok(v) = validate_header(&b, file_len) {
                let slots = u64::from(v.lane_count) * u64::from(v.slots_per_lane);
                assert!(v.data_offset + slots * v.slot_stride <= file_len);
                assert!(v
                    .tensors
                    .iter()
                    .all(|t| t.offset + t.bytes <= v.slot_stride));
                assert!(
                    u64::from(v.consumer_table_offset) + u64::from(v.consumer_capacity) * 64
                        <= v.data_offset
                );
                assert!(u64::from(v.slot_table_offset) + slots * 64 <= v.data_offset);
            }
        }
    }
}
