//! Region and DCT-scaled decoding of JPEGs in every EXIF orientation: the decoder maps the
//! displayed region onto stored pixels, decodes only those and turns them upright, which must
//! give exactly the pixels of a full decode, turned upright and then cropped.

use std::path::Path;

use ringfeed::decode::{
    decode_request, DecodeRequest, Decoder, Orientation, Rect, RgbImage, Scale, DEFAULT_MAX_PIXELS,
};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture exists")
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

fn crop(img: &RgbImage, r: Rect) -> Vec<u8> {
    let mut out = Vec::new();
    for y in r.y..r.y + r.height {
        let at = (y * img.width + r.x) as usize * 3;
        out.extend_from_slice(&img.data[at..at + r.width as usize * 3]);
    }
    out
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
