//! Batch-level mixing — mixup and CutMix with timm `Mixup`'s semantics (`mode="batch"`) — and
//! the `targets` tensor it produces.
//!
//! # Brief overview
//!
//! [`Mixer::new`] checks the `[augment]` keys (`mixup`, `cutmix`, `mix-prob`, `switch-prob`,
//! `label-smoothing`) against `[source] num-classes`. Per batch, [`Mixer::draw`] decides from
//! the batch's own random stream (seed, epoch, rank, batch index) whether to mix, mixup or
//! CutMix, and λ ~ Beta(α, α); [`Mixer::apply`] mixes the filled `images` tensor in place, row
//! `i` with row `B − 1 − i` (timm's `x.flip(0)`), and [`Mixer::targets`] writes
//! `λ · smooth(label_i) + (1 − λ) · smooth(label_{B−1−i})`, each row summing to 1.
//!
//! CutMix's box is timm's `rand_bbox` (side `√(1 − λ)` of the image's, centre uniform, clipped)
//! and λ is corrected to the pasted area, as timm's `correct_lam`. Mixup of a `u8` tensor
//! (pixels normalised on the device) is rounded to the nearest level: normalisation is affine,
//! so mixing before it equals mixing after, up to that rounding.

use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::key::{batch_rng, below_one_draw, normal, uniform};
use crate::augment::{check_p, invalid, AugmentConfig, AugmentConfigError};
use crate::ring::DType;

/// A checked mixing plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixer {
    mixup_alpha: Option<f64>,
    cutmix_alpha: Option<f64>,
    mix_prob: f64,
    switch_prob: f64,
    smoothing: f64,
    num_classes: u32,
}

/// What one batch gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixParams {
    /// Weight of each row's own label (1 = not mixed).
    pub lam: f64,
    /// CutMix's pasted box `[y0, y1, x0, x1)` (half-open), when CutMix was chosen.
    pub cut: Option<[usize; 4]>,
}

/// The geometry of the `images` tensor a mixer works on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageGeometry {
    /// Element type.
    pub dtype: DType,
    /// Channels, height, width.
    pub chw: (usize, usize, usize),
    /// `[B, H, W, C]` rather than `[B, C, H, W]`.
    pub nhwc: bool,
}

fn gamma(rng: &mut ChaCha8Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = uniform(rng, f64::MIN_POSITIVE, 1.0);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = uniform(rng, f64::MIN_POSITIVE, 1.0);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Beta(`alpha`, `alpha`).
fn beta(rng: &mut ChaCha8Rng, alpha: f64) -> f64 {
    let a = gamma(rng, alpha);
    let b = gamma(rng, alpha);
    if a + b > 0.0 {
        a / (a + b)
    } else {
        0.5
    }
}

impl Mixer {
    /// The plan for `cfg`'s mixing keys, `None` when neither `mixup` nor `cutmix` is set.
    /// `num_classes` is `[source] num-classes`, required (it sizes `targets`).
    pub fn new(
        cfg: &AugmentConfig,
        num_classes: Option<u64>,
    ) -> Result<Option<Mixer>, AugmentConfigError> {
        let alpha = |key: &'static str, a: Option<f64>| -> Result<Option<f64>, _> {
            match a {
                Some(a) if !(a.is_finite() && a > 0.0) => {
                    Err(invalid(key, format!("must be finite and > 0, got {a}")))
                }
                other => Ok(other),
            }
        };
        let mixup_alpha = alpha("mixup.alpha", cfg.mixup.as_ref().map(|m| m.alpha))?;
        let cutmix_alpha = alpha("cutmix.alpha", cfg.cutmix.as_ref().map(|m| m.alpha))?;
        if mixup_alpha.is_none() && cutmix_alpha.is_none() {
            for (set, key) in [
                (cfg.mix_prob.is_some(), "mix-prob"),
                (cfg.switch_prob.is_some(), "switch-prob"),
                (cfg.label_smoothing.is_some(), "label-smoothing"),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "applies to batch mixing only: configure mixup and/or cutmix (without \
                         them, smooth labels in the loss, e.g. CrossEntropyLoss(label_smoothing))",
                    ));
                }
            }
            return Ok(None);
        }
        let num_classes = match num_classes {
            Some(n) if (2..=1 << 20).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "mixup",
                    format!("[source] num-classes must be 2..=1048576 to size targets, got {n}"),
                ))
            }
            None => {
                return Err(invalid(
                    "mixup",
                    "batch mixing needs [source] num-classes (the targets tensor is [batch, \
                     num-classes])",
                ))
            }
        };
        let smoothing = cfg.label_smoothing.unwrap_or(0.1);
        if !(0.0..1.0).contains(&smoothing) {
            return Err(invalid(
                "label-smoothing",
                format!("must be in [0, 1), got {smoothing}"),
            ));
        }
        Ok(Some(Mixer {
            mixup_alpha,
            cutmix_alpha,
            mix_prob: check_p("mix-prob", cfg.mix_prob.unwrap_or(1.0))?,
            switch_prob: check_p("switch-prob", cfg.switch_prob.unwrap_or(0.5))?,
            smoothing,
            num_classes,
        }))
    }

    /// Number of classes (the second dimension of `targets`).
    pub fn num_classes(&self) -> u32 {
        self.num_classes
    }

    /// Draws batch `index` of `rank` in `epoch`'s mixing for `h × w` images (timm's
    /// `_params_per_batch`, then `rand_bbox` for CutMix).
    pub fn draw(
        &self,
        seed: u64,
        epoch: u64,
        rank: u32,
        index: u64,
        h: usize,
        w: usize,
    ) -> MixParams {
        let mut rng = batch_rng(seed, epoch, rank, index);
        let unmixed = MixParams {
            lam: 1.0,
            cut: None,
        };
        if uniform(&mut rng, 0.0, 1.0) >= self.mix_prob {
            return unmixed;
        }
        let (cutmix, alpha) = match (self.mixup_alpha, self.cutmix_alpha) {
            (Some(m), Some(c)) => {
                if uniform(&mut rng, 0.0, 1.0) < self.switch_prob {
                    (true, c)
                } else {
                    (false, m)
                }
            }
            (Some(m), None) => (false, m),
            (None, Some(c)) => (true, c),
            (None, None) => return unmixed,
        };
        let lam = beta(&mut rng, alpha);
        if !cutmix {
            return MixParams { lam, cut: None };
        }
        let ratio = (1.0 - lam).sqrt();
        let (cut_h, cut_w) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
        let cy = below_one_draw(&mut rng, h as u64) as usize;
        let cx = below_one_draw(&mut rng, w as u64) as usize;
        let y0 = cy.saturating_sub(cut_h / 2);
        let y1 = (cy + cut_h / 2).min(h);
        let x0 = cx.saturating_sub(cut_w / 2);
        let x1 = (cx + cut_w / 2).min(w);
        let lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
        MixParams {
            lam,
            cut: Some([y0, y1, x0, x1]),
        }
    }

    /// Mixes the filled `images` tensor of `batch` rows in place. Row `i` pairs with row
    /// `batch - 1 - i`; the pairs are independent, so they are mixed in parallel on the
    /// current rayon pool (the bytes do not depend on how many threads it has).
    pub fn apply(&self, params: &MixParams, images: &mut [u8], geometry: ImageGeometry) {
        let (c, h, w) = geometry.chw;
        let size = geometry.dtype.size();
        let sample = c * h * w * size;
        let batch = images.len() / sample.max(1);
        if params.lam >= 1.0 || batch < 2 {
            return;
        }
        let pairs = batch / 2;
        let (head, rest) = images.split_at_mut(pairs * sample);
        let tail_start = (batch - 2 * pairs) * sample; // past the middle row of an odd batch
        let tail = &mut rest[tail_start..tail_start + pairs * sample];
        head.par_chunks_mut(sample)
            .zip(tail.par_chunks_mut(sample).rev())
            .for_each(|(a, b)| match params.cut {
                Some([y0, y1, x0, x1]) => {
                    // Pasting each other's box = swapping the boxes.
                    let (planes, row, px) = if geometry.nhwc {
                        (1, w * c * size, c * size)
                    } else {
                        (c, w * size, size)
                    };
                    for p in 0..planes {
                        for y in y0..y1 {
                            let start = p * h * row + y * row + x0 * px;
                            let end = start + (x1 - x0) * px;
                            a[start..end].swap_with_slice(&mut b[start..end]);
                        }
                    }
                }
                None => mix_values(a, b, params.lam, geometry.dtype),
            });
    }

    /// Writes `targets` (`f32 [B, num_classes]`, little-endian) for `labels` under `params`:
    /// timm's `mixup_target` (smoothed one-hot of each row's label and its partner's).
    pub fn targets(&self, params: &MixParams, labels: &[i64], out: &mut [u8]) {
        let n = self.num_classes as usize;
        let off = self.smoothing / n as f64;
        let on = 1.0 - self.smoothing + off;
        let batch = labels.len();
        for (i, row) in out.chunks_exact_mut(n * 4).take(batch).enumerate() {
            let own = labels[i] as usize;
            let partner = labels[batch - 1 - i] as usize;
            for (k, cell) in row.chunks_exact_mut(4).enumerate() {
                let y1 = if k == own { on } else { off };
                let y2 = if k == partner { on } else { off };
                let v = (y1 * params.lam + y2 * (1.0 - params.lam)) as f32;
                cell.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// `a, b ← λa + (1 − λ)b, λb + (1 − λ)a`, element by element in `dtype`.
fn mix_values(a: &mut [u8], b: &mut [u8], lam: f64, dtype: DType) {
    let lam = lam as f32;
    let mix = |x: f32, y: f32| (x * lam + y * (1.0 - lam), y * lam + x * (1.0 - lam));
    match dtype {
        DType::U8 => {
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = mix(f32::from(*x), f32::from(*y));
                (*x, *y) = (
                    p.round().clamp(0.0, 255.0) as u8,
                    q.round().clamp(0.0, 255.0) as u8,
                );
            }
        }
        DType::F32 => {
            for (x, y) in a.chunks_exact_mut(4).zip(b.chunks_exact_mut(4)) {
                let (p, q) = mix(
                    f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
                    f32::from_le_bytes([y[0], y[1], y[2], y[3]]),
                );
                x.copy_from_slice(&p.to_le_bytes());
                y.copy_from_slice(&q.to_le_bytes());
            }
        }
        DType::F16 => {
            for (x, y) in a.chunks_exact_mut(2).zip(b.chunks_exact_mut(2)) {
                let (p, q) = mix(
                    half::f16::from_le_bytes([x[0], x[1]]).to_f32(),
                    half::f16::from_le_bytes([y[0], y[1]]).to_f32(),
                );
                x.copy_from_slice(&half::f16::from_f32(p).to_le_bytes());
                y.copy_from_slice(&half::f16::from_f32(q).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (x, y) in a.chunks_exact_mut(2).zip(b.chunks_exact_mut(2)) {
                let (p, q) = mix(
                    half::bf16::from_le_bytes([x[0], x[1]]).to_f32(),
                    half::bf16::from_le_bytes([y[0], y[1]]).to_f32(),
                );
                x.copy_from_slice(&half::bf16::from_f32(p).to_le_bytes());
                y.copy_from_slice(&half::bf16::from_f32(q).to_le_bytes());
            }
        }
        // The images tensor is u8, f16, bf16 or f32 (the augmenter's output types).
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::MixConfig;

    fn mixer(mixup: Option<f64>, cutmix: Option<f64>, smoothing: f64) -> Mixer {
        let cfg = AugmentConfig {
            mixup: mixup.map(|alpha| MixConfig { alpha }),
            cutmix: cutmix.map(|alpha| MixConfig { alpha }),
            label_smoothing: Some(smoothing),
            ..AugmentConfig::default()
        };
        Mixer::new(&cfg, Some(10)).unwrap().unwrap()
    }

    #[test]
    fn beta_has_the_right_mean_and_spread() {
        let mut rng = batch_rng(1, 0, 0, 0);
        for alpha in [0.2, 0.8, 1.0, 3.0] {
            let n = 20_000;
            let xs: Vec<f64> = (0..n).map(|_| beta(&mut rng, alpha)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let want_var = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
            assert!((mean - 0.5).abs() < 0.01, "alpha {alpha}: mean {mean}");
            assert!(
                (var - want_var).abs() < 0.1 * want_var,
                "alpha {alpha}: {var} vs {want_var}"
            );
        }
    }

    #[test]
    fn targets_rows_sum_to_one_and_mix_partner_labels() {
        let m = mixer(Some(0.8), None, 0.1);
        let params = MixParams {
            lam: 0.7,
            cut: None,
        };
        let labels = [1i64, 4, 4, 9];
        let mut out = vec![0u8; 4 * 10 * 4];
        m.targets(&params, &labels, &mut out);
        let t: Vec<f32> = out
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (i, row) in t.chunks_exact(10).enumerate() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "row {i}");
        }
        // Row 0: 0.7 × smooth(1) + 0.3 × smooth(9); smooth: 0.91 on, 0.01 off.
        assert!((t[1] - (0.7 * 0.91 + 0.3 * 0.01)).abs() < 1e-6);
        assert!((t[9] - (0.7 * 0.01 + 0.3 * 0.91)).abs() < 1e-6);
        assert!((t[0] - 0.01).abs() < 1e-6);
    }

    #[test]
    fn mixup_and_cutmix_pair_row_i_with_its_mirror() {
        let geometry = ImageGeometry {
            dtype: DType::F32,
            chw: (3, 4, 6),
            nhwc: false,
        };
        let sample = 3 * 4 * 6;
        let batch = 3;
        let original: Vec<f32> = (0..batch * sample)
            .map(|i| (i / sample) as f32 * 10.0)
            .collect();
        let bytes: Vec<u8> = original.iter().flat_map(|v| v.to_le_bytes()).collect();
        let m = mixer(Some(1.0), Some(1.0), 0.0);
        let mut mixed = bytes.clone();
        m.apply(
            &MixParams {
                lam: 0.25,
                cut: None,
            },
            &mut mixed,
            geometry,
        );
        let got: Vec<f32> = mixed
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got[0], 0.25 * 0.0 + 0.75 * 20.0);
        assert_eq!(got[2 * sample], 0.25 * 20.0 + 0.75 * 0.0);
        assert_eq!(
            got[sample], 10.0,
            "the middle row of an odd batch is its own partner"
        );
        for layout_nhwc in [false, true] {
            let mut cut = bytes.clone();
            let g = ImageGeometry {
                nhwc: layout_nhwc,
                ..geometry
            };
            m.apply(
                &MixParams {
                    lam: 0.5,
                    cut: Some([1, 3, 2, 5]),
                },
                &mut cut,
                g,
            );
            let v: Vec<f32> = cut
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let pasted = v[..sample].iter().filter(|&&x| x == 20.0).count();
            assert_eq!(
                pasted,
                3 * 2 * 3,
                "nhwc {layout_nhwc}: box of 2 rows × 3 columns × 3"
            );
        }
    }

    #[test]
    fn draws_follow_probabilities_and_correct_lambda_to_the_box() {
        let m = Mixer {
            mix_prob: 0.5,
            ..mixer(Some(0.8), Some(1.0), 0.1)
        };
        let (mut mixed, mut cut) = (0, 0);
        for index in 0..2000 {
            let p = m.draw(3, 1, 0, index, 20, 30);
            assert_eq!(p, m.draw(3, 1, 0, index, 20, 30), "same batch, same draw");
            if p.lam < 1.0 || p.cut.is_some() {
                mixed += 1;
            }
            if let Some([y0, y1, x0, x1]) = p.cut {
                cut += 1;
                let area = ((y1 - y0) * (x1 - x0)) as f64 / 600.0;
                assert!((p.lam - (1.0 - area)).abs() < 1e-12);
            }
        }
        assert!((900..=1100).contains(&mixed), "{mixed}");
        assert!((400..=600).contains(&cut), "{cut}");
    }

    #[test]
    fn refuses_missing_classes_and_stray_keys() {
        let cfg = AugmentConfig {
            mixup: Some(MixConfig { alpha: 0.8 }),
            ..AugmentConfig::default()
        };
        let err = Mixer::new(&cfg, None).unwrap_err().to_string();
        assert!(err.contains("num-classes"), "{err}");
        let cfg = AugmentConfig {
            label_smoothing: Some(0.1),
            ..AugmentConfig::default()
        };
        let err = Mixer::new(&cfg, Some(10)).unwrap_err().to_string();
        assert!(err.contains("label-smoothing"), "{err}");
        let cfg = AugmentConfig {
            cutmix: Some(MixConfig { alpha: -1.0 }),
            ..AugmentConfig::default()
        };
        let err = Mixer::new(&cfg, Some(10)).unwrap_err().to_string();
        assert!(err.contains("cutmix.alpha"), "{err}");
    }
}
