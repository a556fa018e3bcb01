//! Reading a ring's layout: [`validate_header`] checks a header and its tables against the
//! file's size (§5.6), pure and total; `read_layout` reads them from a ring's descriptor
//! without mapping it, for the consumer and the observer alike.

use std::fs::File;

use super::{
    hdr, lane, tensor_bytes, tensor_entry, DType, FormatError, Layout, TensorLayout,
    CONSUMER_ENTRY_BYTES, HEADER_BYTES, LANE_ENTRY_BYTES, MAGIC, MAX_TENSORS, PAGE,
    SLOT_ENTRY_BYTES, TENSOR_ALIGN, TENSOR_ENTRY_BYTES, VERSION_MAJOR,
};

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

/// Largest control region a reader will read before validating it.
const MAX_CONTROL_BYTES: u64 = 64 << 20;

/// Reads and validates the control region of `file` (size `file_len`) without mapping it.
pub(crate) fn read_layout(file: &File, file_len: u64) -> Result<Layout, FormatError> {
    let mut head = vec![0u8; 512.min(file_len) as usize];
    let _ = rustix::io::pread(file, &mut head, 0);
    let data_offset = head
        .get(hdr::DATA_OFFSET..hdr::DATA_OFFSET + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let want = data_offset
        .min(file_len)
        .min(MAX_CONTROL_BYTES)
        .max(head.len() as u64);
    let mut control = vec![0u8; want as usize];
    let mut got = 0;
    while got < control.len() {
        match rustix::io::pread(file, &mut control[got..], got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    control.truncate(got);
    validate_header(&control, file_len)
}
