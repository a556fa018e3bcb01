//! Per-axis filter coefficients of the antialiased bilinear resize, computed like Pillow's
//! `precompute_coeffs` (triangle filter of support 1, widened by the scale factor when
//! downscaling, weights normalised per output pixel) and stored in fixed point with a fixed
//! number of taps per output pixel, so the passes run fixed-stride loops.

/// Fractional bits of the fixed-point weights. Weights (of the triangle filter, never
/// negative) are at most 1.0, so they fit a `u16`, which the passes multiply in 16-bit lanes.
pub(super) const PRECISION: u32 = 14;

/// The coefficients of one axis: output pixel `i` is `Σ weights[i * taps + k] ×
/// input[starts[i] + k]` for `k < taps`. Buffers are reused from one call to the next.
#[derive(Debug, Default)]
pub(super) struct Axis {
    /// First input pixel read by each output pixel.
    pub(super) starts: Vec<u32>,
    /// `taps` weights per output pixel (zero where the filter does not reach).
    pub(super) weights: Vec<u16>,
    /// Weights per output pixel (at least 1, at most the input size).
    pub(super) taps: usize,
}

/// Pillow's bilinear (triangle) filter.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Geometry of the filter for one axis.
struct Filter {
    box0: f64,
    scale: f64,
    support: f64,
    inv_filter_scale: f64,
    in_size: u32,
}

impl Filter {
    fn new(in_size: u32, box0: f64, box_len: f64, out_size: u32) -> Filter {
        let scale = box_len / f64::from(out_size);
        let filter_scale = scale.max(1.0);
        Filter {
            box0,
            scale,
            support: filter_scale,
            inv_filter_scale: 1.0 / filter_scale,
            in_size,
        }
    }

    /// Weight (before normalising) of input pixel `x` for an output pixel centred on `center`.
    fn tap(&self, center: f64, x: u32) -> f64 {
        triangle((f64::from(x) - center + 0.5) * self.inv_filter_scale)
    }

    /// Centre of output pixel `i` in input coordinates, and the input pixels `[min, max)` it
    /// reads: Pillow's rounding, clamped to the input, less the pixels at either end whose
    /// weight is zero (Pillow multiplies those by 0).
    fn bounds(&self, i: u32) -> (f64, u32, u32) {
        let center = self.box0 + (f64::from(i) + 0.5) * self.scale;
        let clamp = |v: f64| (v.trunc().max(0.0) as u64).min(u64::from(self.in_size)) as u32;
        let mut min = clamp(center - self.support + 0.5);
        let mut max = clamp(center + self.support + 0.5).max(min);
        while min < max && self.tap(center, min) == 0.0 {
            min += 1;
        }
        while min < max && self.tap(center, max - 1) == 0.0 {
            max -= 1;
        }
        (center, min, max)
    }
}

impl Axis {
    /// Coefficients for resampling `[box0, box0 + box_len)` of an axis of `in_size` (≥ 1)
    /// pixels onto `out_size` (≥ 1) pixels. The weight table is grown to fit any input of up
    /// to `largest_in` pixels, so that once the largest image of a workload has been seen,
    /// no smaller crop of it allocates.
    pub(super) fn compute(
        &mut self,
        in_size: u32,
        box0: f64,
        box_len: f64,
        out_size: u32,
        largest_in: u32,
    ) {
        let filter = Filter::new(in_size, box0, box_len, out_size);
        // First pass: each window's first pixel (kept in `starts`) and the widest window.
        self.starts.clear();
        let mut taps = 1;
        for i in 0..out_size {
            let (_, min, max) = filter.bounds(i);
            self.starts.push(min);
            taps = taps.max((max - min) as usize);
        }
        self.taps = taps;
        self.weights.clear();
        // A window of half-width `support` covers at most ⌈2 × support⌉ + 1 pixels.
        let widest =
            (2.0 * (f64::from(largest_in) / f64::from(out_size)).max(1.0)).ceil() as usize + 1;
        self.weights
            .reserve(out_size as usize * widest.min(largest_in.max(in_size) as usize).max(taps));
        self.weights.resize(out_size as usize * taps, 0);
        let slots = self.weights.chunks_exact_mut(taps);
        for ((i, weights), start) in (0..out_size).zip(slots).zip(&mut self.starts) {
            let (center, min, max) = filter.bounds(i);
            // Slide the window left where it would run past the input's end; the weights
            // then start further in.
            *start = min.min(in_size - taps as u32);
            let offset = (min - *start) as usize;
            let tap = |x: u32| filter.tap(center, x);
            let total: f64 = (min..max).map(tap).sum();
            if total != 0.0 {
                let scale = f64::from(1u32 << PRECISION) / total;
                for (w, x) in weights[offset..].iter_mut().zip(min..max) {
                    // Round half up (weights are never negative), as Pillow does.
                    *w = (tap(x) * scale + 0.5) as u16;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(in_size: u32, box0: f64, box_len: f64, out_size: u32) -> Axis {
        let mut a = Axis::default();
        a.compute(in_size, box0, box_len, out_size, in_size);
        a
    }

    #[test]
    fn identity_is_one_tap_of_weight_one() {
        let a = axis(5, 0.0, 5.0, 5);
        assert_eq!(a.taps, 1);
        assert_eq!(a.starts, [0, 1, 2, 3, 4]);
        assert!(a.weights.iter().all(|&w| w == 1 << PRECISION));
    }

    #[test]
    fn halving_averages_pixel_pairs_with_their_neighbours() {
        // Pillow: support 2, centres at 1, 3, 5; weights ∝ triangle((x + 0.5 - c) / 2);
        // the last window slides left to stay inside the input.
        let a = axis(6, 0.0, 6.0, 3);
        assert_eq!(a.taps, 4);
        assert_eq!(a.starts, [0, 1, 2]);
        assert_eq!(a.weights[8], 0, "the last window slid left by one");
        let one = f64::from(1u32 << PRECISION);
        let first: Vec<f64> = a.weights[..4].iter().map(|&w| f64::from(w) / one).collect();
        // Output 0 is centred on 1.0 and reads inputs [0, 3) at distances 0.5, 0.5, 1.5
        // (÷ 2 → weights 0.75, 0.75, 0.25 before normalising).
        let sum = 0.75 + 0.75 + 0.25;
        for (w, e) in first.iter().zip([0.75 / sum, 0.75 / sum, 0.25 / sum, 0.0]) {
            assert!((w - e).abs() < 1e-4, "{first:?}");
        }
    }

    #[test]
    fn weights_sum_to_one_and_windows_stay_inside_the_input() {
        for (in_size, box0, len, out) in [
            (1, 0.0, 1.0, 7),
            (7, 0.0, 7.0, 1),
            (460, 13.25, 300.5, 224),
            (100, 0.0, 100.0, 224),
            (3, 0.5, 2.0, 2),
        ] {
            let a = axis(in_size, box0, len, out);
            assert_eq!(a.starts.len(), out as usize);
            for (i, w) in a.weights.chunks_exact(a.taps).enumerate() {
                assert!(a.starts[i] as usize + a.taps <= in_size as usize);
                let sum: i32 = w.iter().map(|&w| i32::from(w)).sum();
                assert!((sum - (1 << PRECISION)).abs() <= a.taps as i32, "{sum}");
            }
        }
    }
}
