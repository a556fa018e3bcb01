use super::*;
use rand::{Rng, SeedableRng};

pub(crate) fn image_spec(batch: u32) -> RingSpec {
    RingSpec {
        drop_last: true,
        batches_per_epoch: 10,
        epochs: 2,
        seed: 7,
        samples_per_epoch: 40,
        mean: [0.5, 0.4, 0.3, 0.0],
        std: [0.2, 0.2, 0.2, 0.0],
        ..RingSpec::new(
            "train",
            2,
            3,
            batch,
            vec![
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
        )
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
    check(&|b| b[8] = 1, n, "version 1");
    check(&|b| b[8] = 3, n, "version 3");
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
