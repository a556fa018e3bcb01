//! Random erasing (torchvision `RandomErasing`, timm `RandomErasing(mode="pixel")`) on the
//! normalised output sample, in its final dtype and layout: the last step, as in those
//! libraries (after `Normalize`).

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::config::{Layout, OutDType};
use super::key::{below, chance, uniform, SampleKey, Stream};

/// What erased elements become.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fill {
    /// A standard normal value per element: rand_distr's ziggurat `StandardNormal` on the
    /// sample's erasing stream, one draw and a table lookup per value (a logarithm or
    /// exponential only in the rare tail and wedge cases) instead of Box–Muller's logarithm
    /// and sine/cosine per pair, which cost `policy.toml` about 95 µs per sample on average.
    Random,
    /// One value per channel.
    Values([f32; 3]),
}

/// A checked `random-erasing` plan.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Eraser {
    pub(crate) p: f64,
    pub(crate) scale: [f64; 2],
    pub(crate) log_ratio: [f64; 2],
    pub(crate) fill: Fill,
}

/// The erased rectangle: `(top, left, height, width)`.
pub(crate) type Rect = (usize, usize, usize, usize);

impl Eraser {
    /// Draws the rectangle for an `h × w` image as torchvision does: up to 10 tries of a
    /// random area and log-uniform aspect ratio, the first that fits strictly inside; `None`
    /// when not applied or no try fits.
    pub(crate) fn draw(&self, rng: &mut ChaCha8Rng, h: usize, w: usize) -> Option<Rect> {
        if !chance(rng, self.p) {
            return None;
        }
        let area = (h * w) as f64;
        for _ in 0..10 {
            let erase_area = area * uniform(rng, self.scale[0], self.scale[1]);
            let aspect = uniform(rng, self.log_ratio[0], self.log_ratio[1]).exp();
            let eh = (erase_area * aspect).sqrt().round() as usize;
            let ew = (erase_area / aspect).sqrt().round() as usize;
            if !(eh < h && ew < w) {
                continue;
            }
            let top = below(rng, (h - eh + 1) as u64) as usize;
            let left = below(rng, (w - ew + 1) as u64) as usize;
            return Some((top, left, eh, ew));
        }
        None
    }

    /// Erases in `out`, one sample of `channels × h × w` elements of `dtype` in `layout`.
    /// Returns the rectangle erased, if any.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &self,
        key: SampleKey,
        out: &mut [u8],
        channels: usize,
        h: usize,
        w: usize,
        dtype: OutDType,
        layout: Layout,
    ) -> Option<Rect> {
        let mut rng = key.rng(Stream::Erase);
        let rect = self.draw(&mut rng, h, w)?;
        let (top, left, eh, ew) = rect;
        // Values are drawn channel by channel, row by row ([C, h, w] as torchvision's), by the
        // ziggurat method; a row is drawn and written a few dozen values at a time.
        let mut values = [0f32; 64];
        for c in 0..channels {
            for y in top..top + eh {
                for x in (left..left + ew).step_by(values.len()) {
                    let values = &mut values[..(left + ew - x).min(64)];
                    match &self.fill {
                        Fill::Random => {
                            for v in values.iter_mut() {
                                let x: f64 = StandardNormal.sample(&mut rng);
                                *v = x as f32;
                            }
                        }
                        Fill::Values(fill) => values.fill(fill[c]),
                    }
                    let (first, step) = match layout {
                        Layout::Nchw => ((c * h + y) * w + x, 1),
                        Layout::Nhwc => ((y * w + x) * channels + c, channels),
                    };
                    match dtype {
                        OutDType::F32 => write_row(out, first, step, values, f32::to_le_bytes),
                        OutDType::F16 => write_row(out, first, step, values, |v| {
                            half::f16::from_f32(v).to_le_bytes()
                        }),
                        OutDType::Bf16 => write_row(out, first, step, values, |v| {
                            half::bf16::from_f32(v).to_le_bytes()
                        }),
                        // Refused when the plan is checked (pixels are normalised on the device).
                        OutDType::U8 => unreachable!("random-erasing with u8 output"),
                    }
                }
            }
        }
        Some(rect)
    }
}

/// Writes `values` as `N`-byte elements at element indices `first`, `first + step`, … of
/// `out`.
fn write_row<const N: usize>(
    out: &mut [u8],
    first: usize,
    step: usize,
    values: &[f32],
    encode: impl Fn(f32) -> [u8; N],
) {
    let span = &mut out[first * N..];
    for (at, &v) in span.chunks_exact_mut(N).step_by(step).zip(values) {
        at.copy_from_slice(&encode(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eraser(p: f64, fill: Fill) -> Eraser {
        Eraser {
            p,
            scale: [0.02, 0.33],
            log_ratio: [0.3f64.ln(), 3.3f64.ln()],
            fill,
        }
    }

    fn key(id: u64) -> SampleKey {
        SampleKey {
            seed: 7,
            epoch: 1,
            sample_id: id,
        }
    }

    /// Areas and aspect ratios stay in range, rectangles inside the image, and p is honoured.
    #[test]
    fn rectangles_follow_torchvisions_ranges() {
        let e = eraser(0.25, Fill::Random);
        let (h, w) = (32, 48);
        let mut hits = 0;
        for id in 0..4000 {
            if let Some((top, left, eh, ew)) = e.draw(&mut key(id).rng(Stream::Erase), h, w) {
                hits += 1;
                assert!(top + eh <= h && left + ew <= w && eh > 0 && ew > 0);
                let share = (eh * ew) as f64 / (h * w) as f64;
                assert!((0.005..0.45).contains(&share), "{share}");
            }
        }
        // A few draws find no fitting rectangle in 10 tries, so slightly under p.
        assert!((850..=1100).contains(&hits), "{hits}");
    }

    /// Constant values land only inside the rectangle, per channel, in both layouts; random
    /// values look standard normal.
    #[test]
    fn erases_the_rectangle_only() {
        let (c, h, w) = (3, 20, 30);
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let e = eraser(1.0, Fill::Values([1.5, -2.0, 0.25]));
            let mut out = vec![0u8; c * h * w * 4];
            let (top, left, eh, ew) = e
                .apply(key(3), &mut out, c, h, w, OutDType::F32, layout)
                .unwrap();
            let vals: Vec<f32> = out
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let i = match layout {
                            Layout::Nchw => (ch * h + y) * w + x,
                            Layout::Nhwc => (y * w + x) * c + ch,
                        };
                        let inside = (top..top + eh).contains(&y) && (left..left + ew).contains(&x);
                        let want = if inside { [1.5, -2.0, 0.25][ch] } else { 0.0 };
                        assert_eq!(vals[i], want, "{layout:?} c{ch} y{y} x{x}");
                    }
                }
            }
        }
        let e = eraser(1.0, Fill::Random);
        let mut out = vec![0u8; c * 64 * 64 * 4];
        e.apply(key(5), &mut out, c, 64, 64, OutDType::F32, Layout::Nchw)
            .unwrap();
        let vals: Vec<f64> = out
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
            .filter(|v| *v != 0.0)
            .collect();
        let n = vals.len() as f64;
        let mean = vals.iter().sum::<f64>() / n;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!(
            n > 200.0 && mean.abs() < 0.15 && (var - 1.0).abs() < 0.2,
            "{n} {mean} {var}"
        );
    }
}
