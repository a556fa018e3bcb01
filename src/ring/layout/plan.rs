//! Laying out a ring: [`plan`] turns a [`RingSpec`] into a [`Layout`], [`encode_control`]
//! writes the initial control region the producer maps (§5).

use super::{
    hdr, lane, rank_share, round_up, tensor_bytes, tensor_entry, Layout, RingSpec, SpecError,
    TensorLayout, CONSUMER_ENTRY_BYTES, FLAG_DROP_LAST, FLAG_NHWC, FLAG_ON_DEMAND, FLAG_SELECTION,
    HEADER_BYTES, LANE_ENTRY_BYTES, MAGIC, MAX_NAME_LEN, MAX_TENSORS, PAGE, SLOT_ENTRY_BYTES,
    TENSOR_ALIGN, TENSOR_ENTRY_BYTES, VERSION_MAJOR, VERSION_MINOR,
};

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
