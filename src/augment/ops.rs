//! The operations of the automatic augmentation policies (`policy.rs`), with torchvision v2's
//! definitions for uint8 tensors, on the small RGB8 output image.
//!
//! # Brief overview
//!
//! Per-value operations (brightness, posterize, solarize, invert, and contrast, autocontrast,
//! equalize once their image statistics are known) do not touch the image: they compose into a
//! pending per-channel table ([`Lut`]). The next operation that needs real pixels reads them
//! through the table (the warp of the geometric operations, the colour blend), and a table still
//! pending at the end is folded into the output pass (`write.rs`), so a chain such as
//! `Solarize → Posterize` costs one statistics-free pass: the final write.
//!
//! Geometric operations (shear, translate, rotate) are one nearest-neighbour affine warp with
//! torchvision's inverse matrix, pixel grid (`_affine_grid`) and `grid_sample` rounding
//! (half to even), constant fill outside the source.
//!
//! # Against torchvision (`tests::operations_match_torchvision`)
//!
//! All 33 reference cases (every operation, signed magnitudes, custom fills, square and
//! non-square quarter turns) are bit-identical to torchvision 0.29's outputs. The arithmetic
//! follows torch's to the rounding: warp positions in f32 as `_affine_grid` + `grid_sample`
//! compute them (half to even), `_blend`'s weights rounded from Python floats and its `add`
//! with `alpha` a fused multiply-add. Two sums are not torch's: contrast's mean luma is summed in
//! f64 (torch sums f32 pairwise) and the warp's three-term dot product is not a batched matrix
//! product; on other images either could move a value across a rounding boundary (then by
//! one level or one pixel), which the test would report.

/// One operation of the policies' search spaces (torchvision's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
    Invert,
}

impl Op {
    /// torchvision's name of the operation (captions, traces).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Identity => "Identity",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateX => "TranslateX",
            Op::TranslateY => "TranslateY",
            Op::Rotate => "Rotate",
            Op::Brightness => "Brightness",
            Op::Color => "Color",
            Op::Contrast => "Contrast",
            Op::Sharpness => "Sharpness",
            Op::Posterize => "Posterize",
            Op::Solarize => "Solarize",
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
            Op::Invert => "Invert",
        }
    }
}

/// A pending per-channel value map (`table[c][v]`), identity when `None`.
pub(crate) type Lut = [[u8; 256]; 3];

/// The identity table.
pub(crate) fn identity_lut() -> Lut {
    let mut t = [[0u8; 256]; 3];
    for row in t.iter_mut() {
        for (v, e) in row.iter_mut().enumerate() {
            *e = v as u8;
        }
    }
    t
}

/// Buffers an operation chain reuses (one per worker, inside `Scratch`).
#[derive(Debug, Default)]
pub(crate) struct OpScratch {
    /// Second image for warps and sharpness.
    pub(crate) other: Vec<u8>,
    /// Pending table, `None` while identity.
    pub(crate) lut: Option<Box<Lut>>,
}

impl OpScratch {
    fn lut_mut(&mut self) -> &mut Lut {
        self.lut.get_or_insert_with(|| Box::new(identity_lut()))
    }

    /// Composes `f` (per channel, per value) after the pending table.
    fn then(&mut self, f: impl Fn(usize, u8) -> u8) {
        let lut = self.lut_mut();
        for (c, row) in lut.iter_mut().enumerate() {
            for e in row.iter_mut() {
                *e = f(c, *e);
            }
        }
    }

    /// Applies the pending table to `img` in place (when it is not the identity).
    pub(crate) fn materialise(&mut self, img: &mut [u8]) {
        if let Some(lut) = self.lut.take() {
            for p in img.chunks_exact_mut(3) {
                for c in 0..3 {
                    p[c] = lut[c][usize::from(p[c])];
                }
            }
        }
    }
}

/// `clamp(0, 255).to(uint8)`: truncation toward zero.
fn to_u8(x: f32) -> u8 {
    x.clamp(0.0, 255.0) as u8
}

/// torch's `linspace(start, end, steps)[i]` in f32 (its CPU kernel's two halves).
pub(crate) fn linspace(start: f32, end: f32, steps: u32, i: u32) -> f32 {
    if steps <= 1 {
        return start;
    }
    let step = (end - start) / (steps - 1) as f32;
    if i < steps / 2 {
        start + step * i as f32
    } else {
        end - step * (steps - 1 - i) as f32
    }
}

/// Applies `op` with `magnitude` (torchvision's signed magnitude; bits for posterize, a
/// fraction of 255 for solarize) to the `w × h` RGB8 image `img`, composing into
/// `scratch.lut` where the operation is per value. `fill` is the colour of pixels warped in
/// from outside.
pub(crate) fn apply(
    op: Op,
    magnitude: f32,
    img: &mut Vec<u8>,
    w: usize,
    h: usize,
    fill: [u8; 3],
    scratch: &mut OpScratch,
) {
    match op {
        Op::Identity => {}
        Op::ShearX | Op::ShearY | Op::TranslateX | Op::TranslateY | Op::Rotate => {
            geometric(op, magnitude, img, w, h, fill, scratch)
        }
        Op::Brightness => {
            let f = 1.0 + magnitude;
            scratch.then(|_, v| to_u8(f32::from(v) * f));
        }
        Op::Color => color(img, magnitude, scratch),
        Op::Contrast => {
            let mean = mean_luma(img, scratch.lut.as_deref());
            let (ratio, alpha) = blend_weights(magnitude);
            scratch.then(|_, v| to_u8(blend(f32::from(v), ratio, mean, alpha)));
        }
        Op::Sharpness => {
            scratch.materialise(img);
            sharpness(img, w, h, magnitude, &mut scratch.other);
        }
        Op::Posterize => {
            let bits = magnitude as u32;
            let mask = (((1u32 << bits) - 1) << (8 - bits)) as u8;
            scratch.then(|_, v| v & mask);
        }
        Op::Solarize => {
            let threshold = (255.0 * f64::from(magnitude)) as f32;
            scratch.then(|_, v| {
                if f32::from(v) >= threshold {
                    255 - v
                } else {
                    v
                }
            });
        }
        Op::AutoContrast => {
            let hist = histograms(img, scratch.lut.as_deref());
            let mut maps = [[0u8; 256]; 3];
            for (c, map) in maps.iter_mut().enumerate() {
                let lo = hist[c].iter().position(|&n| n > 0).unwrap_or(0) as f32;
                let hi = hist[c].iter().rposition(|&n| n > 0).unwrap_or(0) as f32;
                let (min, inv_scale) = if hi == lo {
                    (0.0, 1.0)
                } else {
                    (lo, (hi - lo) * (1.0f64 / 255.0) as f32)
                };
                for (v, m) in map.iter_mut().enumerate() {
                    *m = to_u8((v as f32 - min) / inv_scale);
                }
            }
            scratch.then(|c, v| maps[c][usize::from(v)]);
        }
        Op::Equalize => {
            let hist = histograms(img, scratch.lut.as_deref());
            let mut maps = [[0u8; 256]; 3];
            let mut equalised = [false; 3];
            for (c, map) in maps.iter_mut().enumerate() {
                let total: u32 = hist[c].iter().sum();
                let last = hist[c].iter().rposition(|&n| n > 0).unwrap_or(0);
                let step = (total - hist[c][last]) / 255;
                if step == 0 {
                    continue; // torchvision returns such a channel unchanged
                }
                equalised[c] = true;
                let mut cum = 0u32;
                map[0] = 0;
                for v in 1..256 {
                    cum += hist[c][v - 1];
                    map[v] = ((cum + step / 2) / step).min(255) as u8;
                }
            }
            scratch.then(|c, v| {
                if equalised[c] {
                    maps[c][usize::from(v)]
                } else {
                    v
                }
            });
        }
        Op::Invert => scratch.then(|_, v| 255 - v),
    }
}

/// torchvision's `_blend` weights for factor `1 + magnitude`: the factor is a Python float, so
/// `1 - factor` is computed in f64 before torch rounds each scalar to f32.
fn blend_weights(magnitude: f32) -> (f32, f32) {
    let factor = 1.0 + f64::from(magnitude);
    (factor as f32, (1.0 - factor) as f32)
}

/// `image1.mul(ratio).add_(image2, alpha)`: torch's vectorised `add` with `alpha` is a fused
/// multiply-add.
fn blend(x: f32, ratio: f32, y: f32, alpha: f32) -> f32 {
    fma(alpha, y, x * ratio)
}

/// `a · b + c` rounded once to f32, as a fused multiply-add does. The f32 product is exact in
/// f64, so only the f64 sum rounds before the final rounding: it equals the fused result
/// except when that sum lands exactly on an f32 rounding midpoint, which pixel-scale values
/// never meet in practice. Portable builds have no FMA instruction, and `f32::mul_add` would
/// then call a slow software routine on every pixel.
fn fma(a: f32, b: f32, c: f32) -> f32 {
    (f64::from(a) * f64::from(b) + f64::from(c)) as f32
}

/// Per-channel histograms of `img` read through `lut`.
fn histograms(img: &[u8], lut: Option<&Lut>) -> [[u32; 256]; 3] {
    let mut raw = [[0u32; 256]; 3];
    for p in img.chunks_exact(3) {
        for c in 0..3 {
            raw[c][usize::from(p[c])] += 1;
        }
    }
    let Some(lut) = lut else { return raw };
    let mut mapped = [[0u32; 256]; 3];
    for c in 0..3 {
        for v in 0..256 {
            mapped[c][usize::from(lut[c][v])] += raw[c][v];
        }
    }
    mapped
}

/// torchvision's luma in f32 (`rgb_to_grayscale`), floored as for uint8 images.
fn luma_floor(r: u8, g: u8, b: u8) -> f32 {
    (0.2989 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b)).floor()
}

/// Mean of the floored luma of `img` read through `lut` (contrast's blend target).
fn mean_luma(img: &[u8], lut: Option<&Lut>) -> f32 {
    let id = identity_lut();
    let t = lut.unwrap_or(&id);
    let sum: f64 = img
        .chunks_exact(3)
        .map(|p| {
            f64::from(luma_floor(
                t[0][usize::from(p[0])],
                t[1][usize::from(p[1])],
                t[2][usize::from(p[2])],
            ))
        })
        .sum();
    (sum / (img.len() / 3).max(1) as f64) as f32
}

/// Saturation blend with each pixel's luma (`adjust_saturation`), reading through the pending
/// table in the same pass.
fn color(img: &mut [u8], magnitude: f32, scratch: &mut OpScratch) {
    let lut = scratch.lut.take();
    let id = identity_lut();
    let t = lut.as_deref().unwrap_or(&id);
    let (ratio, alpha) = blend_weights(magnitude);
    for p in img.chunks_exact_mut(3) {
        let (r, g, b) = (
            t[0][usize::from(p[0])],
            t[1][usize::from(p[1])],
            t[2][usize::from(p[2])],
        );
        let l = luma_floor(r, g, b);
        for (v, x) in p.iter_mut().zip([r, g, b]) {
            *v = to_u8(blend(f32::from(x), ratio, l, alpha));
        }
    }
}

/// `adjust_sharpness`: blend with the 3×3 smoothing (1s around a 5, over 13) on interior
/// pixels; the one-pixel border is kept.
fn sharpness(img: &mut [u8], w: usize, h: usize, magnitude: f32, tmp: &mut Vec<u8>) {
    if w <= 2 || h <= 2 {
        return;
    }
    tmp.clear();
    tmp.extend_from_slice(img);
    let (_, alpha) = blend_weights(magnitude);
    let row = w * 3;
    for y in 1..h - 1 {
        let (above, here, below) = (
            &tmp[(y - 1) * row..y * row],
            &tmp[y * row..(y + 1) * row],
            &tmp[(y + 1) * row..(y + 2) * row],
        );
        let out = &mut img[y * row..(y + 1) * row];
        for i in 3..row - 3 {
            // torch sums the nine taps (1/13, centre 5/13) in f32 and rounds. Exactly:
            // S/13 with S an integer, which is never within 1/26 of a half (13 is odd), far
            // more than f32's rounding error: the integer sum rounds the same.
            let s = u32::from(above[i - 3])
                + u32::from(above[i])
                + u32::from(above[i + 3])
                + u32::from(here[i - 3])
                + 5 * u32::from(here[i])
                + u32::from(here[i + 3])
                + u32::from(below[i - 3])
                + u32::from(below[i])
                + u32::from(below[i + 3]);
            let blurred = ((2 * s + 13) / 26) as f32;
            let v = f32::from(here[i]);
            // `view.add_(blurred.sub_(view), alpha)`: a fused multiply-add.
            out[i] = to_u8(fma(blurred - v, alpha, v));
        }
    }
}

/// torchvision's `_get_inverse_affine_matrix` (f64), for a centre relative to the image's.
fn inverse_affine(center: [f64; 2], angle: f64, translate: [f64; 2], shear: [f64; 2]) -> [f64; 6] {
    let rot = angle.to_radians();
    let (sx, sy) = (shear[0].to_radians(), shear[1].to_radians());
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

/// Shear, translate or rotate by `magnitude` as torchvision's policies call `F.affine` and
/// `F.rotate` (nearest, same size).
fn geometric(
    op: Op,
    magnitude: f32,
    img: &mut Vec<u8>,
    w: usize,
    h: usize,
    fill: [u8; 3],
    scratch: &mut OpScratch,
) {
    let m = f64::from(magnitude);
    let (wf, hf) = (w as f64, h as f64);
    let matrix = match op {
        Op::ShearX => inverse_affine(
            [-wf * 0.5, -hf * 0.5],
            0.0,
            [0.0, 0.0],
            [m.atan().to_degrees(), 0.0],
        ),
        Op::ShearY => inverse_affine(
            [-wf * 0.5, -hf * 0.5],
            0.0,
            [0.0, 0.0],
            [0.0, m.atan().to_degrees()],
        ),
        Op::TranslateX => inverse_affine([0.0, 0.0], 0.0, [m.trunc(), 0.0], [0.0, 0.0]),
        Op::TranslateY => inverse_affine([0.0, 0.0], 0.0, [0.0, m.trunc()], [0.0, 0.0]),
        _ => {
            let angle = m.rem_euclid(360.0);
            let quarter = if angle == 0.0 {
                Some(0)
            } else if angle == 180.0 {
                Some(2)
            } else if w == h && (angle == 90.0 || angle == 270.0) {
                Some(if angle == 90.0 { 1 } else { 3 })
            } else {
                None
            };
            if let Some(k) = quarter {
                rot90(img, w, h, k, scratch);
                return;
            }
            inverse_affine([0.0, 0.0], -angle, [0.0, 0.0], [0.0, 0.0])
        }
    };
    let lut = scratch.lut.take();
    let id = identity_lut();
    let t = lut.as_deref().unwrap_or(&id);
    let theta = matrix.map(|x| x as f32);
    let (sx, sy) = ((0.5 * wf) as f32, (0.5 * hf) as f32);
    let r = [
        theta[0] / sx,
        theta[1] / sx,
        theta[2] / sx,
        theta[3] / sy,
        theta[4] / sy,
        theta[5] / sy,
    ];
    let (wf32, hf32) = (w as f32, h as f32);
    // The pixel grid's x coordinates, once (torch's `linspace`); the same values per row.
    let xs: Vec<[f32; 2]> = (0..w)
        .map(|x| {
            let bx = linspace((1.0 - wf32) * 0.5, (wf32 - 1.0) * 0.5, w as u32, x as u32);
            [bx * r[0], bx * r[3]]
        })
        .collect();
    let dst = &mut scratch.other;
    dst.clear();
    dst.resize(w * h * 3, 0);
    for (y, out_row) in dst.chunks_exact_mut(w * 3).enumerate() {
        let by = linspace((1.0 - hf32) * 0.5, (hf32 - 1.0) * 0.5, h as u32, y as u32);
        let (row_x, row_y) = (by * r[1], by * r[4]);
        for (out, &[px, py]) in out_row.chunks_exact_mut(3).zip(&xs) {
            // Same operations and order as `_affine_grid` + `grid_sample`'s unnormalisation.
            let gx = px + row_x + r[2];
            let gy = py + row_y + r[5];
            let ix = (((gx + 1.0) * wf32 - 1.0) * 0.5).round_ties_even();
            let iy = (((gy + 1.0) * hf32 - 1.0) * 0.5).round_ties_even();
            if ix >= 0.0 && iy >= 0.0 && ix <= wf32 - 1.0 && iy <= hf32 - 1.0 {
                let s = (iy as usize * w + ix as usize) * 3;
                out[0] = t[0][usize::from(img[s])];
                out[1] = t[1][usize::from(img[s + 1])];
                out[2] = t[2][usize::from(img[s + 2])];
            } else {
                out.copy_from_slice(&fill);
            }
        }
    }
    std::mem::swap(img, dst);
}

/// torch's `rot90(k)` fast path of `F.rotate` (counter-clockwise quarter turns).
fn rot90(img: &mut Vec<u8>, w: usize, h: usize, k: u32, scratch: &mut OpScratch) {
    if k == 0 {
        return;
    }
    let dst = &mut scratch.other;
    dst.clear();
    dst.resize(w * h * 3, 0);
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = match k {
                1 => (w - 1 - y, x),
                2 => (w - 1 - x, h - 1 - y),
                _ => (y, h - 1 - x),
            };
            dst[(y * w + x) * 3..][..3].copy_from_slice(&img[(sy * w + sx) * 3..][..3]);
        }
    }
    std::mem::swap(img, dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::policy::RAND_OPS;

    /// torchvision's reference outputs (`scripts/policy_reference.py`) for every operation on
    /// fixed magnitudes, compared pixel by pixel.
    #[test]
    fn operations_match_torchvision() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/policy");
        let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
        let input = std::fs::read(dir.join("input.rgb")).unwrap();
        let mut checked = 0;
        for line in cases
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (file, name, magnitude, w, h) = (
                f[0],
                f[1],
                f[2].parse::<f32>().unwrap(),
                f[3].parse::<usize>().unwrap(),
                f[4].parse::<usize>().unwrap(),
            );
            let fill = [
                f[5].parse::<u8>().unwrap(),
                f[6].parse().unwrap(),
                f[7].parse().unwrap(),
            ];
            let max_diff: u8 = f[8].parse().unwrap();
            let max_share: f64 = f[9].parse().unwrap();
            let op = (RAND_OPS.iter().copied().chain([Op::Invert]))
                .find(|o| o.name() == name)
                .unwrap();
            let expected = std::fs::read(dir.join(file)).unwrap();
            let mut img = input[..w * h * 3].to_vec();
            let mut scratch = OpScratch::default();
            apply(op, magnitude, &mut img, w, h, fill, &mut scratch);
            scratch.materialise(&mut img);
            let diffs: Vec<u8> = img
                .iter()
                .zip(&expected)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let worst = diffs.iter().copied().max().unwrap();
            let share = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
            assert!(
                worst <= max_diff && share <= max_share,
                "{file} ({name} {magnitude}): max diff {worst} (allowed {max_diff}), \
                 {share:.4} of values differ (allowed {max_share})"
            );
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} cases");
    }

    /// The table gives the same image as applying each per-value operation at once.
    #[test]
    fn fused_table_equals_step_by_step() {
        let w = 17;
        let h = 11;
        let img: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let chain = [
            (Op::Brightness, 0.4),
            (Op::Solarize, 0.6),
            (Op::Posterize, 5.0),
            (Op::Contrast, -0.3),
            (Op::AutoContrast, 0.0),
            (Op::Rotate, 20.0),
            (Op::Equalize, 0.0),
            (Op::Invert, 0.0),
            (Op::Color, 0.5),
        ];
        let mut fused = img.clone();
        let mut s = OpScratch::default();
        for (op, m) in chain {
            apply(op, m, &mut fused, w, h, [9, 8, 7], &mut s);
        }
        s.materialise(&mut fused);
        let mut stepped = img.clone();
        for (op, m) in chain {
            let mut s = OpScratch::default();
            apply(op, m, &mut stepped, w, h, [9, 8, 7], &mut s);
            s.materialise(&mut stepped);
        }
        assert_eq!(fused, stepped);
    }

    #[test]
    fn linspace_matches_torch_endpoints() {
        assert_eq!(linspace(0.0, 30.0, 31, 0), 0.0);
        assert_eq!(linspace(0.0, 30.0, 31, 30), 30.0);
        assert_eq!(linspace(0.0, 135.0, 31, 20), 90.0);
        assert_eq!(linspace(1.0, 0.0, 11, 10), 0.0);
    }
}
