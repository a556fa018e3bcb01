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
//! (half to even), constant fill outside the source. The flips before the policy are pending
//! too ([`OpScratch::flip`]): every other operation commutes with them, so the warp reads
//! through them and the write applies any left, and a flipped sample costs no extra pass.
//!
//! Speed without changing a value: the hot loops avoid float-to-integer casts and
//! `round`/`floor`, which on baseline x86-64 are library calls or NaN-checking branches that
//! keep the compiler from vectorising (rounding is an add-and-subtract of 1.5 · 2^23,
//! [`to_u8`] a compare); sums of floored lumas are integers and add up exactly in integers;
//! products known to be exact are tabulated per value (luma terms) or per luma (colour).
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
    /// Pending flips `[horizontal, vertical]`: the image the operations mean is the stored one
    /// flipped so. Only the geometric operations read pixels by position; they read through the
    /// flips (and leave none pending), every other operation commutes with them.
    pub(crate) flip: [bool; 2],
    /// A warp's per-column grid terms, then one row's source indices (reused).
    grid: Vec<[f32; 2]>,
    index: Vec<i32>,
    /// One row's lumas, one per value (colour).
    lumas: Vec<f32>,
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

/// `clamp(0, 255).to(uint8)`: truncation toward zero (NaN gives 0, as `as u8` does). Written
/// without a float-to-integer conversion, whose NaN and overflow checks keep the compiler from
/// vectorising the loops that call it: rounded to nearest ([`round_ties_even`]), then one down
/// where that rounded up.
#[allow(clippy::manual_clamp)] // `clamp` keeps NaN, which `max` turns into 0 as the cast did
fn to_u8(x: f32) -> u8 {
    let x = x.max(0.0).min(255.0);
    let (rounded, i) = round_ties_even(x);
    (if rounded > x { i - 1 } else { i }) as u8
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
        Op::Color => color(img, w, magnitude, scratch),
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
    // Two sets of counters, alternating pixels: neighbouring pixels often share a value, and
    // incrementing one counter twice in a row waits for the first store.
    let mut two = [[[0u32; 256]; 3]; 2];
    let mut pairs = img.chunks_exact(6);
    for p in &mut pairs {
        two[0][0][usize::from(p[0])] += 1;
        two[0][1][usize::from(p[1])] += 1;
        two[0][2][usize::from(p[2])] += 1;
        two[1][0][usize::from(p[3])] += 1;
        two[1][1][usize::from(p[4])] += 1;
        two[1][2][usize::from(p[5])] += 1;
    }
    for p in pairs.remainder().chunks_exact(3) {
        for c in 0..3 {
            two[0][c][usize::from(p[c])] += 1;
        }
    }
    let [mut raw, second] = two;
    for (r, s) in raw.iter_mut().zip(&second) {
        for (a, b) in r.iter_mut().zip(s) {
            *a += b;
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

/// torchvision's luma in f32 (`rgb_to_grayscale`: `0.2989 r + 0.587 g + 0.114 b`, summed in
/// that order) of pixels read through `lut`, as per-channel tables of the rounded products:
/// `luma(p) = floor(t[0][r] + t[1][g] + t[2][b])`.
fn luma_terms(lut: Option<&Lut>) -> [[f32; 256]; 3] {
    let weights = [0.2989f32, 0.587, 0.114];
    std::array::from_fn(|c| {
        std::array::from_fn(|v| {
            let x = lut.map_or(v as u8, |t| t[c][v]);
            weights[c] * f32::from(x)
        })
    })
}

/// The floored luma of one pixel from [`luma_terms`]. The sum is ≥ 0, where truncation is
/// `floor` (and, unlike `floor`, needs no library call on baseline x86-64).
fn luma_floor(terms: &[[f32; 256]; 3], p: &[u8]) -> u8 {
    (terms[0][usize::from(p[0])] + terms[1][usize::from(p[1])] + terms[2][usize::from(p[2])]) as u8
}

/// Mean of the floored luma of `img` read through `lut` (contrast's blend target).
fn mean_luma(img: &[u8], lut: Option<&Lut>) -> f32 {
    let terms = luma_terms(lut);
    // The floored lumas are integers: their sum is exact in u64, as it was in f64.
    let sum: u64 = img
        .chunks_exact(3)
        .map(|p| u64::from(luma_floor(&terms, p)))
        .sum();
    (sum as f64 / (img.len() / 3).max(1) as f64) as f32
}

/// Saturation blend with each pixel's luma (`adjust_saturation`). Row by row: the lumas first
/// (one per value, so the blend is a flat loop the compiler vectorises), then the blend.
fn color(img: &mut [u8], w: usize, magnitude: f32, scratch: &mut OpScratch) {
    // A pending table is applied first (a colour blend right after a per-value operation).
    scratch.materialise(img);
    let terms = luma_terms(None);
    let (ratio, alpha) = blend_weights(magnitude);
    let alpha = f64::from(alpha);
    let lumas = &mut scratch.lumas;
    for row in img.chunks_exact_mut(w * 3) {
        lumas.clear();
        lumas.extend(row.chunks_exact(3).flat_map(|p| {
            let l = f32::from(luma_floor(&terms, p));
            [l, l, l]
        }));
        for (v, &l) in row.iter_mut().zip(lumas.iter()) {
            // `blend(x, ratio, l, alpha)`, spelled out: `alpha · l` is exact in f64.
            *v = to_u8((alpha * f64::from(l) + f64::from(f32::from(*v) * ratio)) as f32);
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
    let alpha = f64::from(alpha);
    let row = w * 3;
    // The interior values of a row: `n` of them from byte 3, each with its eight neighbours
    // at ±3 (a pixel left/right) in the rows above, here and below.
    let n = row - 6;
    for y in 1..h - 1 {
        let taps = |r: usize, dx: usize| &tmp[r * row + dx..r * row + dx + n];
        let (a0, a1, a2) = (taps(y - 1, 0), taps(y - 1, 3), taps(y - 1, 6));
        let (h0, h1, h2) = (taps(y, 0), taps(y, 3), taps(y, 6));
        let (b0, b1, b2) = (taps(y + 1, 0), taps(y + 1, 3), taps(y + 1, 6));
        let out = &mut img[y * row + 3..y * row + 3 + n];
        for i in 0..n {
            // torch sums the nine taps (1/13, centre 5/13) in f32 and rounds. Exactly:
            // S/13 with S an integer, which is never within 1/26 of a half (13 is odd), far
            // more than f32's rounding error: the integer sum rounds the same.
            let s = u32::from(a0[i])
                + u32::from(a1[i])
                + u32::from(a2[i])
                + u32::from(h0[i])
                + 5 * u32::from(h1[i])
                + u32::from(h2[i])
                + u32::from(b0[i])
                + u32::from(b1[i])
                + u32::from(b2[i]);
            let blurred = (2 * s + 13) / 26;
            let v = i32::from(h1[i]);
            // `view.add_(blurred.sub_(view), alpha)`: a fused multiply-add (see `fma`; the
            // difference is a small integer, exact in every type).
            out[i] = to_u8((f64::from(blurred as i32 - v) * alpha + f64::from(v)) as f32);
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
    let (x_max, y_max) = (wf32 - 1.0, hf32 - 1.0);
    let [hflip, vflip] = std::mem::take(&mut scratch.flip);
    // Rows that read rows: consecutive output pixels read consecutive source pixels.
    let runs = !hflip && matches!(op, Op::ShearX | Op::TranslateX | Op::TranslateY);
    // The pixel grid's x coordinates, once (torch's `linspace`); the same values per row.
    scratch.grid.clear();
    scratch.grid.extend((0..w).map(|x| {
        let bx = linspace((1.0 - wf32) * 0.5, (wf32 - 1.0) * 0.5, w as u32, x as u32);
        [bx * r[0], bx * r[3]]
    }));
    scratch.index.resize(w, 0);
    let (last_x, last_y) = (w as i32 - 1, h as i32 - 1);
    let lut = scratch.lut.take();
    let dst = &mut scratch.other;
    dst.resize(w * h * 3, 0);
    for (y, out_row) in dst.chunks_exact_mut(w * 3).enumerate() {
        let by = linspace((1.0 - hf32) * 0.5, (hf32 - 1.0) * 0.5, h as u32, y as u32);
        let (row_x, row_y) = (by * r[1], by * r[4]);
        // Source positions first (a loop of plain arithmetic the compiler vectorises), then
        // the reads.
        let stride = w as i32;
        for (index, &[px, py]) in scratch.index.iter_mut().zip(&scratch.grid) {
            // Same operations and order as `_affine_grid` + `grid_sample`'s unnormalisation.
            let gx = px + row_x + r[2];
            let gy = py + row_y + r[5];
            let (ix, mut col) = round_ties_even(((gx + 1.0) * wf32 - 1.0) * 0.5);
            let (iy, mut row) = round_ties_even(((gy + 1.0) * hf32 - 1.0) * 0.5);
            let inside = ix >= 0.0 && iy >= 0.0 && ix <= x_max && iy <= y_max;
            // Outside, the integers are meaningless: wrapping arithmetic, then dropped.
            if hflip {
                col = last_x.wrapping_sub(col);
            }
            if vflip {
                row = last_y.wrapping_sub(row);
            }
            *index = if inside {
                row.wrapping_mul(stride).wrapping_add(col)
            } else {
                -1
            };
        }
        gather(img, &scratch.index, lut.as_deref(), fill, runs, out_row);
    }
    std::mem::swap(img, dst);
}

/// `x` rounded to the nearest integer, ties to even, as `f32::round_ties_even` (which on
/// baseline x86-64 is a library call per value), and that integer as an `i32`. Adding
/// 1.5 · 2^23 rounds in the default rounding mode and is exact for |x| < 2^22, where the sum's
/// low mantissa bits are the integer (read without a conversion, which would branch on NaN and
/// overflow). Beyond, the float stays beyond ±2^22 − 2 (or is the same infinity or NaN), so a
/// warp still finds it outside any image (at most 16384 pixels a side) and ignores the integer.
fn round_ties_even(x: f32) -> (f32, i32) {
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x + MAGIC;
    (
        shifted - MAGIC,
        (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32),
    )
}

/// One output row of a warp: pixel `index[i]` of `img` (read through `lut`), or `fill` where
/// the index is negative. `runs`: the indices mostly count up by one (copied a run at a time).
fn gather(
    img: &[u8],
    index: &[i32],
    lut: Option<&Lut>,
    fill: [u8; 3],
    runs: bool,
    out_row: &mut [u8],
) {
    match lut {
        None if !runs => {
            for (out, &i) in out_row.chunks_exact_mut(3).zip(index) {
                match usize::try_from(i) {
                    Ok(i) => out.copy_from_slice(&img[i * 3..i * 3 + 3]),
                    Err(_) => out.copy_from_slice(&fill),
                }
            }
        }
        None => {
            // Runs of consecutive source pixels (a translation's or horizontal shear's rows)
            // are copied at once.
            let mut x = 0;
            while x < index.len() {
                let first = index[x];
                let mut end = x + 1;
                if first < 0 {
                    while end < index.len() && index[end] < 0 {
                        end += 1;
                    }
                    for out in out_row[x * 3..end * 3].chunks_exact_mut(3) {
                        out.copy_from_slice(&fill);
                    }
                } else {
                    while end < index.len() && index[end] == first + (end - x) as i32 {
                        end += 1;
                    }
                    let s = first as usize * 3;
                    out_row[x * 3..end * 3].copy_from_slice(&img[s..s + (end - x) * 3]);
                }
                x = end;
            }
        }
        Some(t) => {
            for (out, &i) in out_row.chunks_exact_mut(3).zip(index) {
                match usize::try_from(i) {
                    Ok(i) => {
                        let s = &img[i * 3..i * 3 + 3];
                        out[0] = t[0][usize::from(s[0])];
                        out[1] = t[1][usize::from(s[1])];
                        out[2] = t[2][usize::from(s[2])];
                    }
                    Err(_) => out.copy_from_slice(&fill),
                }
            }
        }
    }
}

/// torch's `rot90(k)` fast path of `F.rotate` (counter-clockwise quarter turns), reading
/// through the pending flips and table.
fn rot90(img: &mut Vec<u8>, w: usize, h: usize, k: u32, scratch: &mut OpScratch) {
    let [hflip, vflip] = std::mem::take(&mut scratch.flip);
    if k == 0 && !hflip && !vflip {
        return;
    }
    let lut = scratch.lut.take();
    let dst = &mut scratch.other;
    dst.resize(w * h * 3, 0);
    scratch.index.resize(w, 0);
    for (y, out_row) in dst.chunks_exact_mut(w * 3).enumerate() {
        for (x, index) in scratch.index.iter_mut().enumerate() {
            let (mut sx, mut sy) = match k {
                0 => (x, y),
                1 => (w - 1 - y, x),
                2 => (w - 1 - x, h - 1 - y),
                _ => (y, h - 1 - x),
            };
            if hflip {
                sx = w - 1 - sx;
            }
            if vflip {
                sy = h - 1 - sy;
            }
            *index = (sy * w + sx) as i32;
        }
        gather(img, &scratch.index, lut.as_deref(), [0; 3], false, out_row);
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

    /// Each operation on an image with flips pending (and a table) gives the image it gives
    /// on the flipped image: the flips ride along until a warp reads through them.
    #[test]
    fn operations_read_through_pending_flips() {
        use crate::augment::flip_in_place;
        let cases = [
            (Op::Identity, 0.0),
            (Op::ShearX, 0.3),
            (Op::ShearY, -0.2),
            (Op::TranslateX, 5.0),
            (Op::TranslateY, -3.0),
            (Op::Rotate, 25.0),
            (Op::Rotate, 90.0),
            (Op::Rotate, 180.0),
            (Op::Rotate, 0.0),
            (Op::Brightness, 0.4),
            (Op::Color, -0.5),
            (Op::Contrast, 0.6),
            (Op::Sharpness, 0.9),
            (Op::Posterize, 3.0),
            (Op::Solarize, 0.4),
            (Op::AutoContrast, 0.0),
            (Op::Equalize, 0.0),
            (Op::Invert, 0.0),
        ];
        for (w, h) in [(23, 17), (16, 16)] {
            let img: Vec<u8> = (0..w * h * 3).map(|i| (i * 71 % 253) as u8).collect();
            for (op, m) in cases {
                for flip in [[true, false], [false, true], [true, true]] {
                    let mut want = img.clone();
                    flip_in_place(&mut want, w, h, flip[0], flip[1]);
                    let mut s = OpScratch::default();
                    apply(Op::Brightness, 0.2, &mut want, w, h, [1, 2, 3], &mut s);
                    apply(op, m, &mut want, w, h, [1, 2, 3], &mut s);
                    s.materialise(&mut want);

                    let mut got = img.clone();
                    let mut s = OpScratch {
                        flip,
                        ..OpScratch::default()
                    };
                    apply(Op::Brightness, 0.2, &mut got, w, h, [1, 2, 3], &mut s);
                    apply(op, m, &mut got, w, h, [1, 2, 3], &mut s);
                    s.materialise(&mut got);
                    flip_in_place(&mut got, w, h, s.flip[0], s.flip[1]);
                    assert_eq!(got, want, "{op:?} {m} {w}x{h} flips {flip:?}");
                }
            }
        }
    }

    /// The add-and-subtract rounding equals `round_ties_even` on halves, near-halves and
    /// integers across the range a warp meets, and stays outside any image beyond it.
    #[test]
    fn fast_rounding_is_ties_to_even() {
        let mut x = -40000.0f32;
        while x < 40000.0 {
            for v in [
                x,
                x + 0.5,
                x - 0.5,
                x + 0.49999997,
                x + 0.50000006,
                x + 0.25,
            ] {
                let want = v.round_ties_even();
                assert_eq!(round_ties_even(v), (want, want as i32), "{v}");
            }
            x += 0.75;
        }
        for v in [4194304.0f32, 1e9, f32::MAX, f32::INFINITY] {
            assert!(round_ties_even(v).0 > 16384.0, "{v}");
            assert!(round_ties_even(-v).0 < 0.0, "{v}");
        }
        assert!(round_ties_even(f32::NAN).0.is_nan());
    }

    /// The branch-free conversion equals `clamp(0, 255) as u8` everywhere it can be called.
    #[test]
    fn to_u8_truncates_like_a_cast() {
        let mut x = -3.0f32;
        while x < 260.0 {
            for v in [x, x.next_up(), x.next_down(), x + 0.5] {
                assert_eq!(to_u8(v), v.clamp(0.0, 255.0) as u8, "{v}");
            }
            x += 0.125;
        }
        for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30] {
            assert_eq!(to_u8(v), v.clamp(0.0, 255.0) as u8, "{v}");
        }
    }

    #[test]
    fn linspace_matches_torch_endpoints() {
        assert_eq!(linspace(0.0, 30.0, 31, 0), 0.0);
        assert_eq!(linspace(0.0, 30.0, 31, 30), 30.0);
        assert_eq!(linspace(0.0, 135.0, 31, 20), 90.0);
        assert_eq!(linspace(1.0, 0.0, 11, 10), 0.0);
    }
}
