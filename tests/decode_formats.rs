//! Decode stage against Pillow's decodes (tests/golden/decode, made by make_golden.py), region
//! decoding against full decoding (in every EXIF orientation: the displayed region is mapped
//! onto stored pixels, decoded, then turned upright), and bad inputs.

use std::path::{Path, PathBuf};

use ringfeed::decode::{
    decode, decode_request, DecodeError, DecodeRequest, Decoder, ImageFormat, Orientation, Rect,
    RgbImage, Scale, DEFAULT_MAX_PIXELS,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(root().join("fixtures").join(name)).expect("fixture exists")
}

fn golden(name: &str) -> RgbImage {
    let bytes = std::fs::read(root().join("golden/decode").join(format!("{name}.png"))).unwrap();
    decode(&bytes, DEFAULT_MAX_PIXELS).unwrap()
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Tolerance: both sides are libjpeg-turbo with the same (default) IDCT and upsampling, so JPEG
/// decodes must agree to within 1 level (CMYK → RGB rounding); PNG/WebP exactly.
#[test]
fn decodes_match_pillow() {
    let cases: &[(&str, u8)] = &[
        ("coffee_420.jpg", 1),
        ("chelsea_444.jpg", 1),
        ("rocket_progressive.jpg", 1),
        ("coffee_gray.jpg", 1),
        ("chelsea_cmyk.jpg", 1),
        ("coffee_orient6.jpg", 1),
        ("one_pixel.jpg", 1),
        ("astronaut_rgb.png", 0),
        ("astronaut_palette.png", 0),
        ("astronaut_gray_alpha.png", 0),
        ("rgb16.png", 0),
        ("one_pixel.png", 0),
        ("coffee_lossless.webp", 0),
    ];
    for &(name, tolerance) in cases {
        let ours =
            decode(&fixture(name), DEFAULT_MAX_PIXELS).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pillow = golden(name);
        assert_eq!(
            (ours.width, ours.height),
            (pillow.width, pillow.height),
            "{name}"
        );
        let diff = max_abs_diff(&ours.data, &pillow.data);
        assert!(
            diff <= tolerance,
            "{name}: max abs diff {diff} > {tolerance}"
        );
    }
}

#[test]
fn probe_reports_format_and_displayed_size() {
    let mut d = Decoder::new(DEFAULT_MAX_PIXELS);
    let info = d.probe(&fixture("coffee_orient6.jpg")).unwrap();
    assert_eq!(info.format, ImageFormat::Jpeg);
    assert_eq!(info.orientation, Orientation::Rotate90);
    assert_eq!((info.width, info.height), (240, 160));
    assert!(
        info.supports_roi(),
        "EXIF-rotated JPEGs decode by region too"
    );
    let info = d.probe(&fixture("coffee_lossless.webp")).unwrap();
    assert_eq!(
        (info.format, info.width, info.height),
        (ImageFormat::WebP, 60, 40)
    );
    let info = d.probe(&fixture("coffee_420.jpg")).unwrap();
    assert!(info.supports_roi());
}

/// Deterministic pseudo-random numbers for the region sweep (no RNG dependency needed).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn crop(img: &RgbImage, r: Rect) -> Vec<u8> {
    let mut out = Vec::new();
    for y in r.y..r.y + r.height {
        let at = (y * img.width + r.x) as usize * 3;
        out.extend_from_slice(&img.data[at..at + r.width as usize * 3]);
    }
    out
}

/// Region decoding is bit-identical to decoding everything and cropping, for 4:2:0, 4:4:4,
/// progressive, grayscale and CMYK JPEGs.
#[test]
fn region_decode_equals_full_decode_then_crop() {
    let mut state = 42u64;
    for name in [
        "coffee_420.jpg",
        "chelsea_444.jpg",
        "rocket_progressive.jpg",
        "coffee_gray.jpg",
        "chelsea_cmyk.jpg",
    ] {
        let bytes = fixture(name);
        let full = decode(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        for _ in 0..60 {
            let w = 1 + (splitmix(&mut state) % u64::from(full.width)) as u32;
            let h = 1 + (splitmix(&mut state) % u64::from(full.height)) as u32;
            let x = (splitmix(&mut state) % u64::from(full.width - w + 1)) as u32;
            let y = (splitmix(&mut state) % u64::from(full.height - h + 1)) as u32;
            let r = Rect {
                x,
                y,
                width: w,
                height: h,
            };
            let request = DecodeRequest {
                region: Some(r),
                scale: Scale::ONE,
            };
            let roi = decode_request(&bytes, DEFAULT_MAX_PIXELS, request).unwrap();
            assert_eq!((roi.width, roi.height), (w, h), "{name} {r:?}");
            assert!(
                roi.data == crop(&full, r),
                "{name}: region {r:?} differs from full decode"
            );
        }
    }
}

#[test]
fn region_decode_reports_its_window() {
    let bytes = fixture("coffee_420.jpg");
    let mut d = Decoder::new(DEFAULT_MAX_PIXELS);
    let info = d.probe(&bytes).unwrap();
    let region = Rect {
        x: 37,
        y: 20,
        width: 100,
        height: 50,
    };
    let px = d
        .decode(
            &bytes,
            &info,
            DecodeRequest {
                region: Some(region),
                scale: Scale::ONE,
            },
        )
        .unwrap();
    // 4:2:0 → 16-pixel iMCU: left edge aligned down to 32; rows exact; a few columns of
    // upsampling context on the right.
    assert_eq!((px.left, px.top, px.height), (32, 20, 50));
    assert!((137..=150).contains(&(px.left + px.width)), "{px:?}");
    assert_eq!((px.full_width, px.full_height), (240, 160));
}

#[test]
fn scaled_decode_has_libjpeg_dimensions() {
    let bytes = fixture("chelsea_444.jpg"); // 227 × 151
    for (denom, w, h) in [(2, 114, 76), (4, 57, 38), (8, 29, 19)] {
        let request = DecodeRequest {
            region: None,
            scale: Scale { num: 1, denom },
        };
        let img = decode_request(&bytes, DEFAULT_MAX_PIXELS, request).unwrap();
        assert_eq!((img.width, img.height), (w, h), "1/{denom}");
    }
    assert_eq!(
        DecodeRequest::largest_scale(1000, 800, 224.0, 224.0),
        Scale { num: 1, denom: 2 }
    );
    assert_eq!(
        DecodeRequest::largest_scale(2000, 2000, 224.0, 224.0),
        Scale { num: 1, denom: 8 }
    );
    assert_eq!(
        DecodeRequest::largest_scale(300, 300, 224.0, 224.0),
        Scale::ONE
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let err = |name: &str| decode(&fixture(name), DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err("truncated.jpg"), DecodeError::Corrupt { .. }));
    assert!(matches!(
        err("random.bin"),
        DecodeError::UnknownFormat { .. }
    ));
    assert!(matches!(
        err("unknown.gif"),
        DecodeError::UnknownFormat { .. }
    ));
    assert!(matches!(
        decode(&[], DEFAULT_MAX_PIXELS).unwrap_err(),
        DecodeError::Empty
    ));
    for bomb in ["bomb.jpg", "bomb.png"] {
        match err(bomb) {
            DecodeError::TooLarge {
                width,
                height,
                limit,
            } => {
                assert_eq!(
                    (width, height, limit),
                    (60000, 60000, DEFAULT_MAX_PIXELS),
                    "{bomb}"
                )
            }
            other => panic!("{bomb}: {other}"),
        }
    }
    // The message names the dimensions and the key that sets the limit.
    let message = err("bomb.jpg").to_string();
    assert!(
        message.contains("60000x60000") && message.contains("max-pixels"),
        "{message}"
    );
}

/// Every prefix of valid files, and bytes flipped in them, decode or fail with an error, never
/// a panic.
#[test]
fn damaged_inputs_never_panic() {
    for name in [
        "coffee_420.jpg",
        "rocket_progressive.jpg",
        "astronaut_palette.png",
        "coffee_lossless.webp",
    ] {
        let good = fixture(name);
        let step = (good.len() / 97).max(1);
        for cut in (0..good.len()).step_by(step) {
            let _ = decode(&good[..cut], DEFAULT_MAX_PIXELS);
        }
        let mut state = 9u64;
        for _ in 0..40 {
            let mut bad = good.clone();
            let at = (splitmix(&mut state) % bad.len() as u64) as usize;
            bad[at] ^= 1 << (splitmix(&mut state) % 8);
            let _ = decode(&bad, DEFAULT_MAX_PIXELS);
        }
    }
}

#[test]
fn small_limit_refuses_before_decoding() {
    let err = decode(&fixture("coffee_420.jpg"), 1000).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::TooLarge {
            width: 240,
            height: 160,
            limit: 1000
        }
    ));
}

/// `jpeg` with an APP1 EXIF segment declaring `orientation` inserted after SOI (big-endian
/// TIFF, one IFD0 entry).
fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding + next IFD = 0
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&(payload.len() as u16 + 2).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn every_orientation_supports_region_decoding() {
    let mut d = Decoder::new(DEFAULT_MAX_PIXELS);
    for value in 1..=8 {
        let bytes = with_orientation(&fixture("coffee_420.jpg"), value);
        let info = d.probe(&bytes).unwrap();
        assert_eq!(info.orientation, Orientation::from_exif(value));
        assert!(info.supports_roi(), "orientation {value}");
        let expected = if info.orientation.swaps_axes() {
            (160, 240)
        } else {
            (240, 160)
        };
        assert_eq!((info.width, info.height), expected, "orientation {value}");
    }
}

/// For each orientation and scale, 40 random displayed regions: bit-identical to the full
/// decode at that scale, turned upright, then cropped.
#[test]
fn oriented_region_decode_equals_full_decode_then_crop() {
    let mut state = 7u64;
    for source in [
        "coffee_420.jpg",
        "chelsea_444.jpg",
        "rocket_progressive.jpg",
    ] {
        for value in 1..=8 {
            let bytes = with_orientation(&fixture(source), value);
            for denom in [1, 2] {
                let scale = Scale { num: 1, denom };
                let full = decode_request(
                    &bytes,
                    DEFAULT_MAX_PIXELS,
                    DecodeRequest {
                        region: None,
                        scale,
                    },
                )
                .unwrap();
                let info = Decoder::new(DEFAULT_MAX_PIXELS).probe(&bytes).unwrap();
                let (sw, sh) = (info.width / denom, info.height / denom);
                for _ in 0..40 {
                    // A region in scaled displayed pixels, asked for in full-size pixels.
                    let w = 1 + (splitmix(&mut state) % u64::from(sw)) as u32;
                    let h = 1 + (splitmix(&mut state) % u64::from(sh)) as u32;
                    let x = (splitmix(&mut state) % u64::from(sw - w + 1)) as u32;
                    let y = (splitmix(&mut state) % u64::from(sh - h + 1)) as u32;
                    let scaled = Rect {
                        x,
                        y,
                        width: w,
                        height: h,
                    };
                    let region = Rect {
                        x: x * denom,
                        y: y * denom,
                        width: w * denom,
                        height: h * denom,
                    };
                    let roi = decode_request(
                        &bytes,
                        DEFAULT_MAX_PIXELS,
                        DecodeRequest {
                            region: Some(region),
                            scale,
                        },
                    )
                    .unwrap();
                    assert_eq!(
                        (roi.width, roi.height),
                        (scaled.width, scaled.height),
                        "{source} orientation {value} 1/{denom} {region:?}"
                    );
                    assert!(
                        roi.data == crop(&full, scaled),
                        "{source} orientation {value} 1/{denom}: region {region:?} differs"
                    );
                }
            }
        }
    }
}
