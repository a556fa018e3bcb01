//! Automatic augmentation policies — RandAugment, TrivialAugmentWide, AutoAugment (ImageNet) —
//! with torchvision v2's operation sets, magnitude bins and signs. Each sample's choices come
//! from its own random stream (`Stream::Policy`), drawn in the order the operations run; the
//! operations themselves are in `ops.rs`.

use rand_chacha::ChaCha8Rng;

use super::key::{below_one_draw, normal, uniform, SampleKey, Stream};
use super::ops::{self, linspace, Op, OpScratch};

/// Which magnitude table an operation reads (torchvision's `_AUGMENTATION_SPACE`s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Space {
    /// RandAugment's and AutoAugment's.
    Standard,
    /// TrivialAugmentWide's wider ranges.
    Wide,
}

/// RandAugment's and TrivialAugmentWide's operations, in torchvision's order.
pub(super) const RAND_OPS: [Op; 14] = [
    Op::Identity,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
];

/// One step of an AutoAugment sub-policy: operation, probability, magnitude bin (of 10).
type Step = (Op, f64, u32);

/// torchvision's `AutoAugmentPolicy.IMAGENET` (25 sub-policies of two steps; the bin of
/// magnitude-free operations is unused).
const IMAGENET: [[Step; 2]; 25] = [
    [(Op::Posterize, 0.4, 8), (Op::Rotate, 0.6, 9)],
    [(Op::Solarize, 0.6, 5), (Op::AutoContrast, 0.6, 0)],
    [(Op::Equalize, 0.8, 0), (Op::Equalize, 0.6, 0)],
    [(Op::Posterize, 0.6, 7), (Op::Posterize, 0.6, 6)],
    [(Op::Equalize, 0.4, 0), (Op::Solarize, 0.2, 4)],
    [(Op::Equalize, 0.4, 0), (Op::Rotate, 0.8, 8)],
    [(Op::Solarize, 0.6, 3), (Op::Equalize, 0.6, 0)],
    [(Op::Posterize, 0.8, 5), (Op::Equalize, 1.0, 0)],
    [(Op::Rotate, 0.2, 3), (Op::Solarize, 0.6, 8)],
    [(Op::Equalize, 0.6, 0), (Op::Posterize, 0.4, 6)],
    [(Op::Rotate, 0.8, 8), (Op::Color, 0.4, 0)],
    [(Op::Rotate, 0.4, 9), (Op::Equalize, 0.6, 0)],
    [(Op::Equalize, 0.0, 0), (Op::Equalize, 0.8, 0)],
    [(Op::Invert, 0.6, 0), (Op::Equalize, 1.0, 0)],
    [(Op::Color, 0.6, 4), (Op::Contrast, 1.0, 8)],
    [(Op::Rotate, 0.8, 8), (Op::Color, 1.0, 2)],
    [(Op::Color, 0.8, 8), (Op::Solarize, 0.8, 7)],
    [(Op::Sharpness, 0.4, 7), (Op::Invert, 0.6, 0)],
    [(Op::ShearX, 0.6, 5), (Op::Equalize, 1.0, 0)],
    [(Op::Color, 0.4, 0), (Op::Equalize, 0.6, 0)],
    [(Op::Equalize, 0.4, 0), (Op::Solarize, 0.2, 4)],
    [(Op::Solarize, 0.6, 5), (Op::AutoContrast, 0.6, 0)],
    [(Op::Invert, 0.6, 0), (Op::Equalize, 1.0, 0)],
    [(Op::Color, 0.6, 4), (Op::Contrast, 1.0, 8)],
    [(Op::Equalize, 0.8, 0), (Op::Equalize, 0.6, 0)],
];

/// A checked policy.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Policy {
    /// RandAugment: `n` operations drawn uniformly, each at bin `m` of `bins` (with Gaussian
    /// noise of `m_std` bins, timm's `mstd`, clipped to the table).
    Rand {
        n: u32,
        m: u32,
        m_std: f64,
        bins: u32,
        fill: [u8; 3],
    },
    /// TrivialAugmentWide: one operation, one bin, both uniform.
    TrivialWide { bins: u32, fill: [u8; 3] },
    /// AutoAugment with the ImageNet sub-policies.
    AutoImagenet { fill: [u8; 3] },
}

/// Whether an operation's magnitude is signed (a coin decides the sign).
fn signed(op: Op) -> bool {
    !matches!(
        op,
        Op::Identity | Op::Posterize | Op::Solarize | Op::AutoContrast | Op::Equalize | Op::Invert
    )
}

/// The magnitude of `op` at bin `bin` of `bins` (a fractional bin interpolates the table
/// linearly), for a `w × h` image.
fn magnitude(op: Op, space: Space, bins: u32, bin: f64, w: usize, h: usize) -> f32 {
    let wide = space == Space::Wide;
    let end = match op {
        Op::ShearX | Op::ShearY => {
            if wide {
                0.99
            } else {
                0.3
            }
        }
        Op::TranslateX if wide => 32.0,
        Op::TranslateY if wide => 32.0,
        Op::TranslateX => (150.0 / 331.0 * w as f64) as f32,
        Op::TranslateY => (150.0 / 331.0 * h as f64) as f32,
        Op::Rotate => {
            if wide {
                135.0
            } else {
                30.0
            }
        }
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => {
            if wide {
                0.99
            } else {
                0.9
            }
        }
        Op::Posterize => {
            let per_bit = ((bins - 1) as f64 / if wide { 6.0 } else { 4.0 }) as f32;
            return (8.0 - bin as f32 / per_bit)
                .round_ties_even()
                .clamp(0.0, 8.0);
        }
        Op::Solarize => {
            return if bin.fract() == 0.0 {
                linspace(1.0, 0.0, bins, bin as u32)
            } else {
                (1.0 - bin / f64::from(bins - 1)) as f32
            };
        }
        Op::Identity | Op::AutoContrast | Op::Equalize | Op::Invert => return 0.0,
    };
    if bin.fract() == 0.0 {
        linspace(0.0, end, bins, bin as u32)
    } else {
        (f64::from(end) * bin / f64::from(bins - 1)) as f32
    }
}

/// Draws and applies one operation at `bin` (sign drawn when signed).
#[allow(clippy::too_many_arguments)]
fn run(
    op: Op,
    space: Space,
    bins: u32,
    bin: f64,
    rng: &mut ChaCha8Rng,
    img: &mut Vec<u8>,
    w: usize,
    h: usize,
    fill: [u8; 3],
    scratch: &mut OpScratch,
    trace: &mut Vec<(&'static str, f32)>,
) {
    let mut m = magnitude(op, space, bins, bin, w, h);
    if signed(op) && uniform(rng, 0.0, 1.0) < 0.5 {
        m = -m;
    }
    trace.push((op.name(), m));
    ops::apply(op, m, img, w, h, fill, scratch);
}

impl Policy {
    /// Applies the policy to the `w × h` RGB8 image `img` for the sample `key`; per-value
    /// operations may be left pending in `scratch.lut`. Returns the operations applied with
    /// their signed magnitudes (for traces and captions).
    pub(crate) fn apply(
        &self,
        key: SampleKey,
        img: &mut Vec<u8>,
        w: usize,
        h: usize,
        scratch: &mut OpScratch,
    ) -> Vec<(&'static str, f32)> {
        let mut rng = key.rng(Stream::Policy);
        let mut trace = Vec::new();
        match *self {
            Policy::Rand {
                n,
                m,
                m_std,
                bins,
                fill,
            } => {
                for _ in 0..n {
                    let op = RAND_OPS[below_one_draw(&mut rng, RAND_OPS.len() as u64) as usize];
                    let bin = if m_std > 0.0 {
                        (f64::from(m) + m_std * normal(&mut rng)).clamp(0.0, f64::from(bins - 1))
                    } else {
                        f64::from(m)
                    };
                    run(
                        op,
                        Space::Standard,
                        bins,
                        bin,
                        &mut rng,
                        img,
                        w,
                        h,
                        fill,
                        scratch,
                        &mut trace,
                    );
                }
            }
            Policy::TrivialWide { bins, fill } => {
                let op = RAND_OPS[below_one_draw(&mut rng, RAND_OPS.len() as u64) as usize];
                let bin = below_one_draw(&mut rng, u64::from(bins)) as f64;
                run(
                    op,
                    Space::Wide,
                    bins,
                    bin,
                    &mut rng,
                    img,
                    w,
                    h,
                    fill,
                    scratch,
                    &mut trace,
                );
            }
            Policy::AutoImagenet { fill } => {
                let sub = &IMAGENET[below_one_draw(&mut rng, IMAGENET.len() as u64) as usize];
                for &(op, p, bin) in sub {
                    if uniform(&mut rng, 0.0, 1.0) < p {
                        run(
                            op,
                            Space::Standard,
                            10,
                            f64::from(bin),
                            &mut rng,
                            img,
                            w,
                            h,
                            fill,
                            scratch,
                            &mut trace,
                        );
                    }
                }
            }
        }
        trace
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's tables at the defaults: RandAugment(magnitude=9) of 31 bins,
    /// TrivialAugmentWide's last bin, AutoAugment's 10 bins.
    #[test]
    fn magnitudes_are_torchvisions_bins() {
        let s = Space::Standard;
        assert!((magnitude(Op::Rotate, s, 31, 9.0, 224, 224) - 9.0).abs() < 1e-5);
        assert!((magnitude(Op::ShearX, s, 31, 9.0, 224, 224) - 0.09).abs() < 1e-6);
        assert_eq!(magnitude(Op::Posterize, s, 31, 9.0, 224, 224), 7.0);
        assert!((magnitude(Op::Solarize, s, 31, 9.0, 224, 224) - 0.7).abs() < 1e-6);
        // 150/331 of the width, at bin 9 of 31.
        let t = magnitude(Op::TranslateX, s, 31, 9.0, 200, 100);
        assert!((f64::from(t) - 150.0 / 331.0 * 200.0 * 0.3).abs() < 1e-3);
        let t = magnitude(Op::TranslateY, s, 31, 30.0, 200, 100);
        assert!((f64::from(t) - 150.0 / 331.0 * 100.0).abs() < 1e-3);
        let wd = Space::Wide;
        assert_eq!(magnitude(Op::Rotate, wd, 31, 30.0, 8, 8), 135.0);
        assert_eq!(magnitude(Op::Posterize, wd, 31, 30.0, 8, 8), 2.0);
        assert_eq!(magnitude(Op::TranslateX, wd, 31, 30.0, 8, 8), 32.0);
        assert_eq!(magnitude(Op::Posterize, s, 10, 8.0, 8, 8), 4.0);
        assert!((magnitude(Op::Rotate, s, 10, 9.0, 8, 8) - 30.0).abs() < 1e-5);
        // A fractional bin (m-std) interpolates.
        assert!((magnitude(Op::Rotate, s, 11, 9.5, 8, 8) - 28.5).abs() < 1e-5);
    }

    /// Every operation of each space is reachable, in roughly equal shares.
    #[test]
    fn rand_augment_draws_every_operation() {
        let policy = Policy::Rand {
            n: 1,
            m: 9,
            m_std: 0.5,
            bins: 31,
            fill: [0; 3],
        };
        let mut counts = std::collections::HashMap::new();
        let mut img = vec![128u8; 8 * 8 * 3];
        for id in 0..2800 {
            let key = SampleKey {
                seed: 3,
                epoch: 0,
                sample_id: id,
            };
            let mut s = OpScratch::default();
            for (name, _) in policy.apply(key, &mut img, 8, 8, &mut s) {
                *counts.entry(name).or_insert(0) += 1;
            }
        }
        assert_eq!(counts.len(), 14, "{counts:?}");
        assert!(
            counts.values().all(|&n| (120..=280).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn auto_augment_applies_sub_policy_steps_with_their_probability() {
        let policy = Policy::AutoImagenet { fill: [0; 3] };
        let mut applied = 0usize;
        let mut img = vec![100u8; 8 * 8 * 3];
        let n = 2000;
        for id in 0..n {
            let key = SampleKey {
                seed: 1,
                epoch: 2,
                sample_id: id,
            };
            applied += policy
                .apply(key, &mut img, 8, 8, &mut OpScratch::default())
                .len();
        }
        // Mean of all 50 steps' probabilities, times two steps per sample.
        let expected: f64 = IMAGENET.iter().flatten().map(|s| s.1).sum::<f64>() / 25.0;
        let got = applied as f64 / n as f64;
        assert!((got - expected).abs() < 0.08, "{got} vs {expected}");
    }
}
