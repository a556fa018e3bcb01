//! Whole-stage behaviour on awkward and bad inputs, the output contract, and configuration
//! errors.

use std::path::Path;

use ringfeed::augment::{
    AugmentConfig, AugmentConfigError, Augmenter, Layout, NormalizeConfig, OutDType, OutputConfig,
    RandomResizedCropConfig, ResizeConfig, SampleError, SampleKey, Size,
};
use ringfeed::decode::DecodeError;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn rrc(size: u32) -> AugmentConfig {
    AugmentConfig {
        random_resized_crop: Some(RandomResizedCropConfig {
            size: Size::Square(size),
            scale: [0.08, 1.0],
            ratio: [0.75, 4.0 / 3.0],
        }),
        normalize: Some(NormalizeConfig {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }),
        ..AugmentConfig::default()
    }
}

const KEY: SampleKey = SampleKey {
    seed: 1,
    epoch: 0,
    sample_id: 7,
};

fn process(aug: &Augmenter, name: &str) -> Result<Vec<u8>, SampleError> {
    let mut out = vec![0u8; aug.sample_bytes()];
    aug.process(&fixture(name), KEY, &mut out, &mut aug.scratch())
        .map(|()| out)
}

#[test]
fn every_supported_kind_of_image_produces_a_sample() {
    let aug = Augmenter::new(&rrc(32)).unwrap();
    for name in [
        "coffee_420.jpg",
        "chelsea_444.jpg",
        "rocket_progressive.jpg",
        "coffee_gray.jpg",
        "chelsea_cmyk.jpg",
        "coffee_orient6.jpg",
        "one_pixel.jpg",
        "astronaut_rgb.png",
        "astronaut_palette.png",
        "astronaut_gray_alpha.png",
        "rgb16.png",
        "one_pixel.png",
        "coffee_lossless.webp",
    ] {
        let out = process(&aug, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let values: Vec<f32> = out
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert!(
            values
                .iter()
                .all(|v| v.is_finite() && (-2.2..=2.7).contains(v)),
            "{name}"
        );
    }
}

#[test]
fn one_pixel_image_fills_the_output_with_its_colour() {
    let cfg = AugmentConfig {
        output: OutputConfig {
            dtype: OutDType::U8,
            layout: Layout::Nhwc,
            channels: 3,
        },
        normalize: None,
        ..rrc(8)
    };
    let aug = Augmenter::new(&cfg).unwrap();
    let out = process(&aug, "one_pixel.png").unwrap();
    assert!(
        out.chunks_exact(3).all(|p| p == [10, 20, 30]),
        "{:?}",
        &out[..6]
    );
}

#[test]
fn bad_inputs_are_sample_errors() {
    let aug = Augmenter::new(&rrc(32)).unwrap();
    assert!(matches!(
        process(&aug, "truncated.jpg"),
        Err(SampleError::Decode(DecodeError::Corrupt { .. }))
    ));
    assert!(matches!(
        process(&aug, "random.bin"),
        Err(SampleError::Decode(DecodeError::UnknownFormat { .. }))
    ));
    assert!(matches!(
        process(&aug, "unknown.gif"),
        Err(SampleError::Decode(DecodeError::UnknownFormat { .. }))
    ));
    for bomb in ["bomb.jpg", "bomb.png"] {
        match process(&aug, bomb) {
            Err(SampleError::TooLarge {
                width: 60000,
                height: 60000,
                limit,
            }) => {
                assert_eq!(limit, 64_000_000)
            }
            other => panic!("{bomb}: {other:?}"),
        }
    }
    let mut out = vec![0u8; aug.sample_bytes()];
    let empty = aug.process(&[], KEY, &mut out, &mut aug.scratch());
    assert!(matches!(
        empty,
        Err(SampleError::Decode(DecodeError::Empty))
    ));
    let mut short = vec![0u8; aug.sample_bytes() - 1];
    let err = aug.process(
        &fixture("coffee_420.jpg"),
        KEY,
        &mut short,
        &mut aug.scratch(),
    );
    assert!(matches!(err, Err(SampleError::OutputSize { .. })));
}

#[test]
fn output_shape_dtype_and_bytes() {
    let cases = [
        (OutDType::F32, Layout::Nchw, 3, 4),
        (OutDType::F16, Layout::Nhwc, 3, 2),
        (OutDType::Bf16, Layout::Nchw, 1, 2),
    ];
    for (dtype, layout, channels, size) in cases {
        let mut cfg = rrc(20);
        cfg.output = OutputConfig {
            dtype,
            layout,
            channels,
        };
        if channels == 1 {
            cfg.normalize = Some(NormalizeConfig {
                mean: vec![0.5],
                std: vec![0.25],
            });
        }
        let aug = Augmenter::new(&cfg).unwrap();
        assert_eq!(aug.output_shape(), (channels, 20, 20));
        assert_eq!(aug.sample_bytes(), channels as usize * 400 * size);
        assert_eq!(aug.out_dtype(), dtype);
        assert_eq!(aug.nhwc(), layout == Layout::Nhwc);
        process(&aug, "coffee_420.jpg").unwrap();
    }
    let aug = Augmenter::new(&rrc(20)).unwrap();
    let (mean, std) = aug.mean_std().unwrap();
    assert_eq!((mean[0], std[2]), (0.485, 0.225));
}

#[test]
fn config_parses_from_toml_and_rejects_unknown_keys() {
    let cfg: AugmentConfig = toml::from_str(
        r#"
        max-pixels = 1000000
        random-resized-crop = { size = 224, scale = [0.35, 1.0] }
        horizontal-flip = { p = 0.5 }
        color-jitter = { brightness = 0.4, hue = [-0.1, 0.05] }
        normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }
        output = { dtype = "bf16", layout = "nhwc" }
        "#,
    )
    .unwrap();
    let aug = Augmenter::new(&cfg).unwrap();
    assert_eq!(aug.output_shape(), (3, 224, 224));
    assert_eq!(aug.out_dtype(), OutDType::Bf16);
    let err = toml::from_str::<AugmentConfig>("random-resize-crop = { size = 3 }").unwrap_err();
    assert!(err.to_string().contains("random-resize-crop"), "{err}");
    let err = toml::from_str::<AugmentConfig>("output = { dtype = \"f64\" }").unwrap_err();
    assert!(err.to_string().contains("bf16"), "{err}");
}

#[test]
fn invalid_plans_name_the_key() {
    let check = |cfg: AugmentConfig, key: &str| {
        let err = Augmenter::new(&cfg).unwrap_err();
        assert!(err.to_string().contains(key), "{err} should name {key}");
    };
    let mut cfg = rrc(10);
    cfg.random_resized_crop.as_mut().unwrap().scale = [0.5, 0.1];
    check(cfg, "random-resized-crop.scale");
    let mut cfg = rrc(10);
    cfg.output.channels = 2;
    check(cfg, "output.channels");
    // u8 output with normalize is a valid plan since the client may normalise on the device:
    // the pixels stay raw and mean/std are only published for the ring's header.
    let mut cfg = rrc(10);
    cfg.output.dtype = OutDType::U8;
    let u8_plan = Augmenter::new(&cfg).expect("u8 + normalize");
    assert_eq!(u8_plan.out_dtype(), OutDType::U8);
    assert!(u8_plan.mean_std().is_some());
    let mut cfg = rrc(10);
    cfg.normalize.as_mut().unwrap().std[1] = 0.0;
    check(cfg, "normalize");
    let mut cfg = rrc(10);
    cfg.resize = Some(ResizeConfig {
        size: Size::Square(5),
    });
    check(cfg, "resize");
    let cfg = AugmentConfig {
        resize: Some(ResizeConfig {
            size: Size::Square(5),
        }),
        ..AugmentConfig::default()
    };
    assert!(matches!(
        Augmenter::new(&cfg),
        Err(AugmentConfigError::NoFixedSize)
    ));
}
