//! Hostile and unusual images (issue #6): each fixture is decoded correctly, checked against
//! values known independently of the decoder, or refused with the typed error that names the
//! reason; and the daemon skips the refused ones, counting and naming them, while it serves
//! the rest. The fixtures are made by `tests/fixtures/make_fixtures.py`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{drain, jpeg, lane_options, serve_finite, small_config, tar};
use ringfeed::augment::{
    AugmentConfig, Augmenter, RandomResizedCropConfig, SampleError, SampleKey, Size,
};
use ringfeed::decode::{decode, DecodeError, DecodeRequest, Decoder, RgbImage, DEFAULT_MAX_PIXELS};
use ringfeed::ring::Consumer;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn decoded(name: &str) -> RgbImage {
    decode(&fixture(name), DEFAULT_MAX_PIXELS).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn refused(name: &str) -> DecodeError {
    match decode(&fixture(name), DEFAULT_MAX_PIXELS) {
        Ok(img) => panic!("{name} decoded to {}x{}", img.width, img.height),
        Err(e) => e,
    }
}

fn pixel(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    let at = (y * img.width + x) as usize * 3;
    img.data[at..at + 3].try_into().unwrap()
}

/// A 32×32 random-resized-crop augmenter with the default pixel limit.
fn augmenter() -> Augmenter {
    Augmenter::new(&AugmentConfig {
        random_resized_crop: Some(RandomResizedCropConfig {
            size: Size::Square(32),
            scale: [0.08, 1.0],
            ratio: [0.75, 4.0 / 3.0],
        }),
        ..AugmentConfig::default()
    })
    .unwrap()
}

fn augment(aug: &Augmenter, name: &str) -> Result<Vec<u8>, SampleError> {
    let mut out = vec![0u8; aug.sample_bytes()];
    let key = SampleKey {
        seed: 3,
        epoch: 0,
        sample_id: 11,
    };
    aug.process(&fixture(name), key, &mut out, &mut aug.scratch())
        .map(|()| out)
}

/// `jpegtran -arithmetic` keeps the DCT coefficients, so the arithmetic-coded files decode to
/// exactly the pixels of their Huffman-coded originals, sequential and progressive.
#[test]
fn arithmetic_coded_jpegs_decode_like_their_huffman_originals() {
    for (arith, original) in [
        ("coffee_arith.jpg", "coffee_420.jpg"),
        ("rocket_arith_progressive.jpg", "rocket_progressive.jpg"),
    ] {
        let (a, o) = (decoded(arith), decoded(original));
        assert_eq!((a.width, a.height), (o.width, o.height), "{arith}");
        assert!(a.data == o.data, "{arith} differs from {original}");
    }
}

/// 16-bit grey: each sample is `x·1301 + y·29 + 5` (make_fixtures.py); RGB8 keeps its high byte.
#[test]
fn sixteen_bit_grey_png_keeps_the_high_byte() {
    let img = decoded("gray16.png");
    assert_eq!((img.width, img.height), (48, 32));
    for y in 0..32 {
        for x in 0..48 {
            let v = (x * 1301 + y * 29 + 5) >> 8;
            assert_eq!(pixel(&img, x, y), [v as u8; 3], "({x}, {y})");
        }
    }
}

/// The PLTE entries of a PNG (colour, in palette order).
fn png_palette(png: &[u8]) -> Vec<[u8; 3]> {
    let mut at = 8;
    while at + 8 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        if &png[at + 4..at + 8] == b"PLTE" {
            return png[at + 8..at + 8 + len]
                .chunks_exact(3)
                .map(|c| [c[0], c[1], c[2]])
                .collect();
        }
        at += 12 + len;
    }
    panic!("no PLTE chunk");
}

/// Palette with tRNS: alpha is dropped (not composited), so every pixel is a palette colour,
/// the transparent entries included.
#[test]
fn palette_png_with_transparency_gives_the_palette_colours() {
    let bytes = fixture("palette_trns.png");
    let palette = png_palette(&bytes);
    assert_eq!(palette.len(), 16);
    let img = decoded("palette_trns.png");
    assert_eq!((img.width, img.height), (32, 32));
    let mut used = std::collections::BTreeSet::new();
    for px in img.data.chunks_exact(3) {
        let px: [u8; 3] = px.try_into().unwrap();
        let index = palette.iter().position(|&c| c == px);
        used.insert(index.unwrap_or_else(|| panic!("{px:?} is not a palette colour")));
    }
    assert!(used.len() > 8, "only palette entries {used:?} used");
    assert!(used.contains(&0) && used.contains(&1), "{used:?}");
}

/// A real 1×100000 image is under the pixel limit: it decodes (row y has value y % 251) and
/// augments into a normal sample.
#[test]
fn one_by_hundred_thousand_png_decodes_and_augments() {
    let img = decoded("tall_1x100000.png");
    assert_eq!((img.width, img.height), (1, 100_000));
    for y in [0, 1, 250, 251, 99_999] {
        assert_eq!(pixel(&img, 0, y), [(y % 251) as u8; 3], "row {y}");
    }
    let aug = augmenter();
    let out = augment(&aug, "tall_1x100000.png").unwrap();
    assert_eq!(out.len(), aug.sample_bytes());
}

/// One pixel images decode to their one colour and still make a full-size sample.
#[test]
fn one_pixel_images_decode_and_augment() {
    let aug = augmenter();
    for (name, colour, tolerance) in [
        ("one_pixel.png", [10, 20, 30], 0),
        ("one_pixel.jpg", [200, 30, 90], 3),
    ] {
        let img = decoded(name);
        assert_eq!((img.width, img.height), (1, 1), "{name}");
        let got = pixel(&img, 0, 0);
        for c in 0..3 {
            assert!(got[c].abs_diff(colour[c]) <= tolerance, "{name}: {got:?}");
        }
        let out = augment(&aug, name).unwrap();
        assert_eq!(out.len(), aug.sample_bytes(), "{name}");
    }
}

/// Tiny files declaring the largest sizes their formats allow are refused from the header,
/// with the declared size and the limit, before any pixel memory is allocated.
#[test]
fn declared_giant_images_are_refused_as_too_large() {
    for (name, width, height) in [
        ("bomb_png_max.png", 2_147_483_647, 2_147_483_647),
        ("bomb.jpg", 60_000, 60_000),
        ("bomb.png", 60_000, 60_000),
    ] {
        match refused(name) {
            DecodeError::TooLarge {
                width: w,
                height: h,
                limit,
            } => assert_eq!((w, h, limit), (width, height, DEFAULT_MAX_PIXELS), "{name}"),
            other => panic!("{name}: {other}"),
        }
        let probe = Decoder::new(DEFAULT_MAX_PIXELS).probe(&fixture(name));
        assert!(
            matches!(probe, Err(DecodeError::TooLarge { .. })),
            "{name}: {probe:?}"
        );
        let err = augment(&augmenter(), name).unwrap_err();
        assert!(err.to_string().contains("max-pixels"), "{name}: {err}");
    }
}

/// Over JPEG's 65500-pixel maximum, libjpeg-turbo refuses the header itself: corrupt, with
/// its reason in the message.
#[test]
fn jpeg_over_the_format_maximum_is_refused_as_corrupt() {
    match refused("bomb_65535.jpg") {
        DecodeError::Corrupt { message } => {
            assert!(
                message.contains("Maximum supported image dimension"),
                "{message}"
            )
        }
        other => panic!("bomb_65535.jpg: {other}"),
    }
    let err = augment(&augmenter(), "bomb_65535.jpg").unwrap_err();
    assert!(err.to_string().contains("65500"), "{err}");
}

/// Regression: a JPEG whose header failed to parse left the worker's libjpeg-turbo instance
/// mid-header, and the next valid JPEG failed with "two SOI markers" (found by
/// `daemon_skips_hostile_images_with_the_reason`: good samples after a hostile one were
/// skipped). The decoder now starts a fresh instance after an error.
#[test]
fn a_refused_jpeg_does_not_break_the_next_one() {
    let good = fixture("coffee_420.jpg");
    let want = decoded("coffee_420.jpg");
    let mut decoder = Decoder::new(DEFAULT_MAX_PIXELS);
    let aug = augmenter();
    let mut scratch = aug.scratch();
    let mut out = vec![0u8; aug.sample_bytes()];
    let key = SampleKey {
        seed: 1,
        epoch: 0,
        sample_id: 0,
    };
    for bad in [
        "zero_height.jpg",
        "bomb_65535.jpg",
        "truncated.jpg",
        "bomb.jpg",
    ] {
        let bytes = fixture(bad);
        if let Ok(info) = decoder.probe(&bytes) {
            assert!(
                decoder.decode(&bytes, &info, DecodeRequest::FULL).is_err(),
                "{bad}"
            );
        }
        let info = decoder
            .probe(&good)
            .unwrap_or_else(|e| panic!("after {bad}: {e}"));
        let px = decoder.decode(&good, &info, DecodeRequest::FULL).unwrap();
        assert!(px.data == want.data, "after {bad}");

        assert!(
            aug.process(&bytes, key, &mut out, &mut scratch).is_err(),
            "{bad}"
        );
        aug.process(&good, key, &mut out, &mut scratch)
            .unwrap_or_else(|e| panic!("augment after {bad}: {e}"));
    }
}

/// A zero width or height is malformed, not an empty image.
#[test]
fn zero_dimensions_are_corrupt() {
    for name in ["zero_width.png", "zero_height.jpg"] {
        let err = refused(name);
        assert!(matches!(err, DecodeError::Corrupt { .. }), "{name}: {err}");
    }
}

/// The daemon skips refused images, naming each with its reason in the log, and serves only the
/// good samples.
#[test]
fn daemon_skips_hostile_images_with_the_reason() {
    let data = tempfile::tempdir().unwrap();
    let runtime = common::RuntimeTmp::new();
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..16u32 {
        members.push((format!("good_{i:02}.jpg"), jpeg(48, 40, i)));
        members.push((format!("good_{i:02}.cls"), b"5".to_vec()));
    }
    for name in ["bomb_65535.jpg", "bomb_png_max.png", "zero_height.jpg"] {
        let (key, ext) = name.split_once('.').unwrap();
        members.push((format!("x_{key}.{ext}"), fixture(name)));
        members.push((format!("x_{key}.cls"), b"9".to_vec()));
    }
    std::fs::write(data.path().join("shard-000000.tar"), tar(&members)).unwrap();
    let spec = format!("{}/shard-000000.tar", data.path().display());
    let config = small_config(data.path(), &spec, "hostile");
    let extra = ["--batch-size", "4", "--max-skip-fraction", "0.5"];
    let mut daemon = serve_finite(runtime.path(), &config, "1", &extra);
    let consumer = Consumer::attach_with(&lane_options(runtime.path(), "hostile", 0)).unwrap();
    drain(&consumer, |batch| {
        let labels = batch.tensor::<i64>("labels").unwrap();
        assert!(labels.iter().all(|&l| l == 5), "a refused image was served");
    });
    // Detach, as a trainer does at its end: the daemon exits at once (it would otherwise
    // linger for an attached consumer, ring-format §7).
    drop(consumer);
    let status = daemon.wait(Duration::from_secs(60));
    let log = daemon.log.join("\n");
    assert!(status.success(), "{status}\n{log}");
    for needle in [
        "x_bomb_65535.jpg",
        "65500",
        "x_bomb_png_max.png",
        "x_zero_height.jpg",
        "max-pixels",
    ] {
        assert!(
            log.contains(needle),
            "log does not mention {needle}:\n{log}"
        );
    }
}
