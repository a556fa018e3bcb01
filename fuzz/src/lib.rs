//! Fuzz properties over ringfeed's parsers of untrusted bytes, one function per fuzz target.
//! Each takes arbitrary bytes and panics only when the library breaks a promise: a panic inside
//! the library, or a result that contradicts a cheap invariant. Errors are fine; they are what
//! bad input is for.
//!
//! The libFuzzer entry points (`fuzz_targets/`) only call these; `tests/fuzz_replay.rs` in the
//! main crate includes this file and runs the same checks over the committed seeds and crash
//! regressions with a plain `cargo test`, so it must depend on nothing but `ringfeed` and std.

use std::sync::OnceLock;

use ringfeed::augment::{AugmentConfig, Augmenter, RandomResizedCropConfig, SampleKey, Size};
use ringfeed::decode::{self, DecodeError};
use ringfeed::ring::layout::{encode_control, validate_header};
use ringfeed::source::index::{index_archive, parse_label, split_member_name};
use ringfeed::source::tar::{self, BLOCK};

/// Pixel limit for the decode target: small enough that a hostile header cannot make one run
/// allocate much (4 Mpx × 3 bytes = 12 MB), large enough for every seed.
pub const FUZZ_MAX_PIXELS: u64 = 4_000_000;

/// Offset of the `file_bytes` field in the ring header (docs/ring-format.md §5.1).
const FILE_BYTES_AT: usize = 24;

/// Largest control region the round trip re-encodes (`encode_control` allocates it).
const MAX_ROUND_TRIP_CONTROL: u64 = 1 << 20;

/// Ring header validation, as a consumer attaching to an untrusted ring file does it: the bytes
/// are the start of the file, and the file is as long as the header claims (so the checks past
/// the `file_bytes` comparison are reached), or as long as the bytes. A header that validates
/// re-encodes to a control region that validates to the same layout.
pub fn ring_header(data: &[u8]) {
    let declared = data
        .get(FILE_BYTES_AT..FILE_BYTES_AT + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    for file_len in [Some(data.len() as u64), declared].into_iter().flatten() {
        let Ok(layout) = validate_header(data, file_len) else {
            continue;
        };
        assert!(layout.data_offset <= layout.file_bytes);
        assert!(!layout.tensors.is_empty());
        for t in &layout.tensors {
            assert!(t.offset + t.bytes <= layout.slot_stride, "{t:?}");
        }
        if layout.data_offset <= MAX_ROUND_TRIP_CONTROL {
            let control = encode_control(&layout, 1, 1);
            let again = validate_header(&control, layout.file_bytes)
                .unwrap_or_else(|e| panic!("re-encoded header does not validate: {e}"));
            assert_eq!(control, encode_control(&again, 1, 1));
        }
    }
}

/// The tar walker and the shard indexers (plaintext and encrypted) over a shard held in memory:
/// errors, never panics;
/// every member and sample lies inside the shard; at most one member per 512-byte block.
pub fn tar_reader(data: &[u8]) {
    let len = data.len() as u64;
    let mut members = 0u64;
    for entry in tar::entries(data, len) {
        let Ok(entry) = entry else { break };
        members += 1;
        assert!(
            entry.header_offset + BLOCK <= entry.data_offset,
            "{entry:?}"
        );
        assert!(entry.data_offset + entry.size <= len, "{entry:?}");
        assert!(members <= len / BLOCK);
    }
    let (samples, _issues) = index_archive(data, len);
    for s in &samples {
        assert!(s.offset + s.size <= len, "{s:?}");
        assert!(!s.key.is_empty());
    }
    // The indexer of encrypted shards (its header is untrusted input too).
    if let Ok(Some((samples, _issues, info))) = ringfeed::source::crypt::index_sealed(data, len) {
        for s in &samples {
            assert!(s.offset + s.size <= len, "{s:?}");
        }
        if let Some(m) = info.manifest {
            assert!(m.offset + m.size <= len, "{m:?}");
        }
    }
}

/// The `.cls` label parser and the member-name splitter (which decides which bytes are a
/// sample's label): a parsed label prints back to itself; a split name never leaves the shard.
pub fn label(data: &[u8]) {
    if let Ok(label) = parse_label(data) {
        assert_eq!(parse_label(label.to_string().as_bytes()).ok(), Some(label));
    }
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((key, ext)) = split_member_name(name) {
        assert!(!key.starts_with('/') && !key.split('/').any(|c| c == ".."));
        assert!(name.ends_with(ext));
        assert!(!key.is_empty());
    }
}

/// The decode entry points with the pixel limit on: the whole-image decode tools use, and
/// [`Augmenter::process`] as the pipeline's workers call it (probe, then a region- and
/// DCT-scaled decode, then resize into one sample).
pub fn decode(data: &[u8]) {
    match decode::decode(data, FUZZ_MAX_PIXELS) {
        Ok(img) => {
            let (w, h) = (u64::from(img.width), u64::from(img.height));
            assert!(w >= 1 && h >= 1, "{w}x{h}");
            assert!(w * h <= FUZZ_MAX_PIXELS, "{w}x{h} over the limit");
            assert_eq!(img.data.len() as u64, w * h * 3);
        }
        Err(DecodeError::Internal { message }) => panic!("internal decode error: {message}"),
        Err(_) => {}
    }
    let aug = augmenter();
    let mut out = vec![0u8; aug.sample_bytes()];
    let key = SampleKey {
        seed: 7,
        epoch: 0,
        sample_id: data.len() as u64,
    };
    let _ = aug.process(data, key, &mut out, &mut aug.scratch());
}

fn augmenter() -> &'static Augmenter {
    static AUGMENTER: OnceLock<Augmenter> = OnceLock::new();
    AUGMENTER.get_or_init(|| {
        let cfg = AugmentConfig {
            max_pixels: FUZZ_MAX_PIXELS,
            random_resized_crop: Some(RandomResizedCropConfig {
                size: Size::Square(16),
                scale: [0.08, 1.0],
                ratio: [0.75, 4.0 / 3.0],
            }),
            ..AugmentConfig::default()
        };
        Augmenter::new(&cfg).expect("valid fuzz augment config")
    })
}
