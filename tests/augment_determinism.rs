//! Randomness keyed by (seed, epoch, sample id): the same key gives the same bytes whatever
//! the thread count or order, and different keys give different augmentations.

use std::path::Path;

use rayon::prelude::*;
use ringfeed::augment::{
    AugmentConfig, Augmenter, ColorJitterConfig, FlipConfig, GaussianBlurConfig, GrayscaleConfig,
    Jitter, NormalizeConfig, RandomResizedCropConfig, RandomScaleConfig, RotateConfig, SampleKey,
    Size,
};

fn fixtures() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    [
        "coffee_420.jpg",
        "chelsea_444.jpg",
        "rocket_progressive.jpg",
        "astronaut_rgb.png",
        "coffee_orient6.jpg",
    ]
    .iter()
    .map(|n| std::fs::read(dir.join(n)).unwrap())
    .collect()
}

/// Every operation on, so every random stream is exercised.
fn full_config() -> AugmentConfig {
    AugmentConfig {
        random_resized_crop: Some(RandomResizedCropConfig {
            size: Size::Square(48),
            scale: [0.08, 1.0],
            ratio: [0.75, 4.0 / 3.0],
        }),
        horizontal_flip: Some(FlipConfig { p: 0.5 }),
        vertical_flip: Some(FlipConfig { p: 0.2 }),
        rotate: Some(RotateConfig {
            degrees: [-20.0, 20.0],
            fill: [0, 0, 0],
            p: 0.7,
        }),
        random_scale: Some(RandomScaleConfig {
            range: [0.8, 1.2],
            p: 0.5,
        }),
        color_jitter: Some(ColorJitterConfig {
            brightness: Some(Jitter::Amount(0.4)),
            contrast: Some(Jitter::Amount(0.4)),
            saturation: Some(Jitter::Amount(0.4)),
            hue: Some(Jitter::Amount(0.1)),
            p: 0.8,
        }),
        grayscale: Some(GrayscaleConfig { p: 0.2 }),
        gaussian_blur: Some(GaussianBlurConfig {
            kernel: 5,
            sigma: [0.1, 2.0],
            p: 0.5,
        }),
        normalize: Some(NormalizeConfig {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }),
        ..AugmentConfig::default()
    }
}

const SAMPLES: u64 = 64;

/// Processes samples 0..SAMPLES (cycling the fixtures) on a pool of `threads` threads,
/// one Scratch per rayon worker, and returns all output bytes in sample order.
fn run(aug: &Augmenter, inputs: &[Vec<u8>], threads: usize, epoch: u64) -> Vec<Vec<u8>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        (0..SAMPLES)
            .into_par_iter()
            .map_init(
                || aug.scratch(),
                |scratch, id| {
                    let mut out = vec![0u8; aug.sample_bytes()];
                    let bytes = &inputs[id as usize % inputs.len()];
                    let key = SampleKey {
                        seed: 1234,
                        epoch,
                        sample_id: id,
                    };
                    aug.process(bytes, key, &mut out, scratch).unwrap();
                    out
                },
            )
            .collect()
    })
}

#[test]
fn same_output_for_1_2_and_8_threads() {
    let aug = Augmenter::new(&full_config()).unwrap();
    let inputs = fixtures();
    let one = run(&aug, &inputs, 1, 0);
    assert_eq!(one, run(&aug, &inputs, 2, 0), "2 threads differ from 1");
    assert_eq!(one, run(&aug, &inputs, 8, 0), "8 threads differ from 1");
}

#[test]
fn same_key_same_bytes_across_scratches_and_order() {
    let aug = Augmenter::new(&full_config()).unwrap();
    let inputs = fixtures();
    let forward = run(&aug, &inputs, 1, 3);
    // Reverse order with one reused scratch: state left over from other samples must not leak.
    let mut scratch = aug.scratch();
    for id in (0..SAMPLES).rev() {
        let mut out = vec![0u8; aug.sample_bytes()];
        let key = SampleKey {
            seed: 1234,
            epoch: 3,
            sample_id: id,
        };
        aug.process(
            &inputs[id as usize % inputs.len()],
            key,
            &mut out,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(out, forward[id as usize], "sample {id}");
    }
}

#[test]
fn different_keys_give_different_augmentations() {
    let aug = Augmenter::new(&full_config()).unwrap();
    let inputs = fixtures();
    let epoch0 = run(&aug, &inputs, 2, 0);
    let epoch1 = run(&aug, &inputs, 2, 1);
    let same = epoch0.iter().zip(&epoch1).filter(|(a, b)| a == b).count();
    assert_eq!(same, 0, "{same} samples unchanged between epochs");
    // Within an epoch, the 13 uses of each fixture are all different crops.
    for i in 0..inputs.len() {
        for j in (i + inputs.len()..SAMPLES as usize).step_by(inputs.len()) {
            assert_ne!(epoch0[i], epoch0[j], "samples {i} and {j}");
        }
    }
}

#[test]
fn enabling_one_operation_leaves_the_others_draws_alone() {
    // Crop and flip draws come from their own streams: adding grayscale (whose draw happens,
    // with p = 0 so its effect does not) must not change any crop or flip.
    let base = AugmentConfig {
        random_resized_crop: full_config().random_resized_crop,
        horizontal_flip: Some(FlipConfig { p: 0.5 }),
        output: ringfeed::augment::OutputConfig {
            dtype: ringfeed::augment::OutDType::U8,
            ..Default::default()
        },
        ..AugmentConfig::default()
    };
    let with_gray = AugmentConfig {
        grayscale: Some(GrayscaleConfig { p: 0.0 }),
        ..base.clone()
    };
    let a = Augmenter::new(&base).unwrap();
    let b = Augmenter::new(&with_gray).unwrap();
    let inputs = fixtures();
    assert_eq!(run(&a, &inputs, 1, 0), run(&b, &inputs, 1, 0));
}

/// Each automatic augmentation policy, with random erasing: the draws are keyed like every
/// other operation's.
fn policy_configs() -> Vec<(&'static str, AugmentConfig)> {
    use ringfeed::augment::{
        AutoAugmentConfig, AutoAugmentPolicy, ErasingValue, RandAugmentConfig, RandomErasingConfig,
        TrivialAugmentConfig,
    };
    let base = AugmentConfig {
        random_resized_crop: full_config().random_resized_crop,
        horizontal_flip: Some(FlipConfig { p: 0.5 }),
        normalize: full_config().normalize,
        random_erasing: Some(RandomErasingConfig {
            p: 0.5,
            scale: [0.02, 0.33],
            ratio: [0.3, 3.3],
            value: ErasingValue::Named("random".into()),
        }),
        ..AugmentConfig::default()
    };
    vec![
        (
            "rand-augment",
            AugmentConfig {
                rand_augment: Some(RandAugmentConfig {
                    n: 2,
                    m: 9,
                    m_std: 0.5,
                    bins: 11,
                    fill: [0, 0, 0],
                }),
                ..base.clone()
            },
        ),
        (
            "trivial-augment",
            AugmentConfig {
                trivial_augment: Some(TrivialAugmentConfig {
                    bins: 31,
                    fill: [124, 116, 104],
                }),
                ..base.clone()
            },
        ),
        (
            "auto-augment",
            AugmentConfig {
                auto_augment: Some(AutoAugmentConfig {
                    policy: AutoAugmentPolicy::Imagenet,
                    fill: [0, 0, 0],
                }),
                color_jitter: full_config().color_jitter,
                ..base
            },
        ),
    ]
}

#[test]
fn policies_and_erasing_same_output_for_1_2_and_8_threads() {
    let inputs = fixtures();
    for (name, cfg) in policy_configs() {
        let aug = Augmenter::new(&cfg).unwrap();
        let one = run(&aug, &inputs, 1, 0);
        assert_eq!(
            one,
            run(&aug, &inputs, 2, 0),
            "{name}: 2 threads differ from 1"
        );
        assert_eq!(
            one,
            run(&aug, &inputs, 8, 0),
            "{name}: 8 threads differ from 1"
        );
        // A new epoch draws new operations for every sample.
        let other = run(&aug, &inputs, 2, 1);
        let same = one.iter().zip(&other).filter(|(a, b)| a == b).count();
        assert_eq!(same, 0, "{name}: {same} samples unchanged between epochs");
    }
}

/// A policy leaves the crop and flip draws alone (their own streams), and its operations do
/// change samples: with the crop fixed, a policy that can only apply Identity would not.
#[test]
fn policies_leave_crop_and_flip_draws_alone() {
    let inputs = fixtures();
    for (name, cfg) in policy_configs() {
        let plain = AugmentConfig {
            rand_augment: None,
            trivial_augment: None,
            auto_augment: None,
            random_erasing: None,
            color_jitter: None,
            ..cfg.clone()
        };
        let with = Augmenter::new(&cfg).unwrap();
        let without = Augmenter::new(&plain).unwrap();
        let mut changed = 0;
        for id in 0..SAMPLES {
            let key = SampleKey {
                seed: 5,
                epoch: 0,
                sample_id: id,
            };
            let input = &inputs[id as usize % inputs.len()];
            let mut a = vec![0u8; with.sample_bytes()];
            let mut b = vec![0u8; without.sample_bytes()];
            let pa = with
                .process_traced(input, key, &mut a, &mut with.scratch())
                .unwrap();
            let pb = without
                .process_traced(input, key, &mut b, &mut without.scratch())
                .unwrap();
            assert_eq!(
                (pa.crop_area, pa.crop_aspect, pa.hflip),
                (pb.crop_area, pb.crop_aspect, pb.hflip),
                "{name} sample {id}"
            );
            changed += usize::from(a != b);
        }
        assert!(
            changed > SAMPLES as usize / 2,
            "{name}: only {changed} changed"
        );
    }
}
