//! The antialiased resize from decoded pixels to the output size: Pillow's `resize(BILINEAR,
//! box=…)` (the triangle filter, widened by the scale factor when downscaling, that
//! torchvision's `antialias=True` also uses), in fixed point, allocation-free once warm.
//!
//! # Brief overview
//!
//! [`Resampler`] keeps the per-axis coefficient tables (`coefficients.rs`) and a few small
//! buffers between calls. The image is processed in strips of [`STRIP`] output rows:
//!
//! 1. vertical pass: each output row of the strip is a weighted sum of whole source rows —
//!    contiguous bytes, which the compiler vectorises;
//! 2. the strip's rows are interleaved so that the [`STRIP`] pixels of one column lie side
//!    by side, which turns the horizontal pass into the same contiguous multiply-add over
//!    [`LANES`] bytes per tap;
//! 3. horizontal pass, rounded to `u8`, then copied into the output rows.
//!
//! Every product `(pixel << 8 | 128) × weight` keeps its high 16 bits (SSE2's `pmulhuw`, eight
//! lanes per instruction on baseline x86-64), so pixels are summed in 1/64 grey levels in
//! 16-bit accumulators. Both passes round to `u8` like Pillow's; Pillow runs the horizontal
//! pass first and keeps more fractional bits, so results may differ from it by one grey level
//! where a value lies near a rounding boundary (two at downscales of a few hundred taps per
//! pixel, e.g. a 12-megapixel PNG straight to 16×12; the tests pin both bounds).

mod coefficients;

use coefficients::{Axis, PRECISION};

use super::SampleError;
use crate::decode::Rect;

/// Output rows resampled together (the width of the interleaved horizontal pass).
const STRIP: usize = 8;

/// Lanes of one interleaved column of a strip: each pixel padded to 4 lanes, which keeps the
/// column a power of two wide so the compiler keeps it in whole vector registers.
const LANES: usize = STRIP * 4;

/// Lanes per vectorised block of the vertical pass.
const BLOCK: usize = 32;

/// Fractional bits of the accumulators: the high half of `(pixel << 8) × weight` with
/// [`PRECISION`]-bit weights. 255 × 64 plus rounding fits a `u16`.
const ACC_BITS: u32 = PRECISION + 8 - 16;

/// A reusable antialiased bilinear resampler for RGB8 images. Its coefficient tables and
/// intermediate buffers grow on demand and are kept, so once it has seen the largest sizes
/// of a workload it allocates nothing.
#[derive(Debug, Default)]
pub struct Resampler {
    horizontal: Axis,
    vertical: Axis,
    /// One strip after the vertical pass, row by row.
    rows: Vec<u8>,
    /// The same strip, column by column.
    columns: Vec<u8>,
    /// The strip after the horizontal pass, column by column.
    filtered: Vec<u8>,
}

fn resize_error(message: String) -> SampleError {
    SampleError::Resize { message }
}

/// `(pixel + ½) × weight` in [`ACC_BITS`] fixed point, truncated: the high half of
/// `(pixel << 8 | 128) × weight`. Summed over weights that add up to one, the halves make
/// the rounding-to-nearest offset. (The `| 128` also keeps the shift inside the product: the
/// compiler would otherwise fold `(p << 8) × w >> 16` into `p × w >> 8`, a 32-bit multiply.)
#[inline(always)]
fn product(pixel: u8, weight: u16) -> u16 {
    let wide = (u16::from(pixel) << 8) | 128;
    ((u32::from(wide) * u32::from(weight)) >> 16) as u16
}

/// Starting value of an accumulator over `taps` products: half a unit per product, which
/// cancels their truncation on average.
fn rounding(taps: usize) -> u16 {
    (taps / 2) as u16
}

/// An accumulator rounded to a byte.
#[inline(always)]
fn to_u8(acc: u16) -> u8 {
    (acc >> ACC_BITS).min(255) as u8
}

/// `out[j] = Σ_k weights[k] × src[first + k × stride + j]`, rounded, for `j < out.len()`.
#[inline(never)]
fn vertical_row(src: &[u8], first: usize, stride: usize, weights: &[u16], out: &mut [u8]) {
    let start = rounding(weights.len());
    let mut blocks = out.chunks_exact_mut(BLOCK);
    let mut x = first;
    for block in &mut blocks {
        let mut acc = [start; BLOCK];
        for (k, &w) in weights.iter().enumerate() {
            let row: &[u8; BLOCK] = src[x + k * stride..][..BLOCK]
                .try_into()
                .expect("BLOCK bytes");
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(product(p, w));
            }
        }
        for (o, a) in block.iter_mut().zip(acc) {
            *o = to_u8(a);
        }
        x += BLOCK;
    }
    let tail = blocks.into_remainder();
    let mut acc = [start; BLOCK];
    let acc = &mut acc[..tail.len()];
    for (k, &w) in weights.iter().enumerate() {
        for (a, &p) in acc.iter_mut().zip(&src[x + k * stride..][..tail.len()]) {
            *a = a.wrapping_add(product(p, w));
        }
    }
    for (o, &a) in tail.iter_mut().zip(acc.iter()) {
        *o = to_u8(a);
    }
}

/// Writes the strip's [`STRIP`] `rows` (each `row_bytes` long; rows past the image's end
/// hold stale data whose results are never stored) column by column into `columns`.
///
/// Pixels move four bytes at a time (one load, one store): the fourth byte, the next
/// pixel's red, lands in the padding lane, whose result is never used. All [`STRIP`] rows
/// are moved per column, so the inner loop has a fixed length and unrolls.
#[inline(never)]
fn interleave(rows: &[u8], row_bytes: usize, columns: &mut [u8]) {
    let mut split = rows.chunks_exact(row_bytes);
    let rows: [&[u8]; STRIP] = std::array::from_fn(|_| split.next().unwrap_or_default());
    let last = row_bytes / 3 - 1;
    for (x, column) in columns[..last * LANES].chunks_exact_mut(LANES).enumerate() {
        for (lanes, row) in column.chunks_exact_mut(4).zip(rows) {
            lanes.copy_from_slice(&row[x * 3..x * 3 + 4]);
        }
    }
    let column = &mut columns[last * LANES..][..LANES];
    for (lanes, row) in column.chunks_exact_mut(4).zip(rows) {
        lanes[..3].copy_from_slice(&row[last * 3..last * 3 + 3]);
    }
}

/// The horizontal pass of one interleaved strip: `filtered` receives each output column's
/// [`LANES`] bytes (all of them, padding included, so the compiler keeps the lanes together
/// in vector registers).
#[inline(never)]
fn horizontal_strip(columns: &[u8], h: &Axis, col0: u32, filtered: &mut [u8]) {
    let start_acc = rounding(h.taps);
    let starts = h.starts.iter();
    let weights = h.weights.chunks_exact(h.taps);
    for ((&start, weights), out) in starts.zip(weights).zip(filtered.chunks_exact_mut(LANES)) {
        let start = (start - col0) as usize;
        let mut acc = [start_acc; LANES];
        for (k, &w) in weights.iter().enumerate() {
            let column: &[u8; LANES] = columns[(start + k) * LANES..][..LANES]
                .try_into()
                .expect("LANES bytes");
            for (a, &p) in acc.iter_mut().zip(column) {
                *a = a.wrapping_add(product(p, w));
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = to_u8(a);
        }
    }
}

/// Copies the first `n` rows of a filtered strip (column by column, [`LANES`] bytes per
/// column, `width` columns) into `out`, rows `out_stride` bytes apart.
///
/// Pixels move four bytes at a time, left to right: each one's fourth byte is overwritten
/// by the next pixel; the last pixel of a row moves three. Full strips move all [`STRIP`]
/// rows per column in a loop of fixed length, which unrolls.
#[inline(never)]
fn deinterleave(filtered: &[u8], n: usize, width: usize, out: &mut [u8], out_stride: usize) {
    let last = width - 1;
    if n == STRIP {
        let mut split = out.chunks_mut(out_stride);
        let mut rows: [&mut [u8]; STRIP] = std::array::from_fn(|_| {
            let row = split.next().unwrap_or_default();
            &mut row[..width * 3]
        });
        for (x, column) in filtered[..last * LANES].chunks_exact(LANES).enumerate() {
            for (lanes, row) in column.chunks_exact(4).zip(rows.iter_mut()) {
                row[x * 3..x * 3 + 4].copy_from_slice(lanes);
            }
        }
        let column = &filtered[last * LANES..][..LANES];
        for (lanes, row) in column.chunks_exact(4).zip(rows.iter_mut()) {
            row[last * 3..].copy_from_slice(&lanes[..3]);
        }
        return;
    }
    for r in 0..n {
        let lane = r * 4;
        let row = &mut out[r * out_stride..][..width * 3];
        for (x, column) in filtered[..last * LANES].chunks_exact(LANES).enumerate() {
            row[x * 3..x * 3 + 4].copy_from_slice(&column[lane..lane + 4]);
        }
        row[last * 3..].copy_from_slice(&filtered[last * LANES + lane..][..3]);
    }
}

impl Resampler {
    /// An empty resampler; its buffers grow on first use.
    pub fn new() -> Resampler {
        Resampler::default()
    }

    /// Resamples `src_box` (`[x, y, width, height]` in pixels, relative to `view`, a window
    /// of the `width × height` RGB8 `pixels`) onto `dst` of the `out_width × out_height`
    /// RGB8 image `out`, like Pillow's `resize((dst.width, dst.height), BILINEAR,
    /// box=src_box)` on the view. Output pixels outside `dst` are set to 0.
    ///
    /// Errors (instead of panicking) when a buffer is smaller than its size says or a
    /// rectangle lies outside its image.
    #[allow(clippy::too_many_arguments)]
    pub fn resample(
        &mut self,
        pixels: &[u8],
        width: u32,
        height: u32,
        view: Rect,
        src_box: [f64; 4],
        out: &mut [u8],
        out_width: u32,
        out_height: u32,
        dst: Rect,
    ) -> Result<(), SampleError> {
        check_arguments(
            pixels, width, height, view, src_box, out, out_width, out_height, dst,
        )?;
        let out_len = out_width as usize * out_height as usize * 3;
        let out = &mut out[..out_len];
        if dst.width == 0 || dst.height == 0 {
            out.fill(0);
            return Ok(());
        }
        if dst.x != 0 || dst.y != 0 || dst.width != out_width || dst.height != out_height {
            out.fill(0);
        }
        let [bx, by, bw, bh] = src_box;
        self.horizontal
            .compute(view.width, bx, bw, dst.width, width);
        self.vertical
            .compute(view.height, by, bh, dst.height, height);

        // Only the columns the horizontal pass reads go through the vertical pass.
        let h = &self.horizontal;
        let col0 = h.starts[0];
        let cols = (h.starts[h.starts.len() - 1] - col0) as usize + h.taps;
        let row_bytes = cols * 3;
        // Buffers are grown for the whole source width, not just this crop's, so that once
        // the largest image of a workload has been seen no crop of it allocates.
        for (buffer, len, largest) in [
            (
                &mut self.rows,
                STRIP * row_bytes,
                STRIP * width as usize * 3,
            ),
            (&mut self.columns, cols * LANES, width as usize * LANES),
        ] {
            buffer.clear();
            buffer.reserve(largest);
            buffer.resize(len, 0);
        }
        self.filtered.resize(dst.width as usize * LANES, 0);

        let stride = width as usize * 3;
        let origin = (view.y as usize) * stride + (view.x + col0) as usize * 3;
        let out_stride = out_width as usize * 3;
        let v = &self.vertical;
        for strip in (0..dst.height as usize).step_by(STRIP) {
            let n = STRIP.min(dst.height as usize - strip);
            let rows = &mut self.rows[..n * row_bytes];
            for (r, row) in rows.chunks_exact_mut(row_bytes).enumerate() {
                let y = strip + r;
                let first = origin + v.starts[y] as usize * stride;
                let weights = &v.weights[y * v.taps..][..v.taps];
                vertical_row(pixels, first, stride, weights, row);
            }
            interleave(&self.rows, row_bytes, &mut self.columns);
            let filtered = &mut self.filtered[..dst.width as usize * LANES];
            horizontal_strip(&self.columns, h, col0, filtered);
            let first_out = (dst.y as usize + strip) * out_stride + dst.x as usize * 3;
            deinterleave(
                filtered,
                n,
                dst.width as usize,
                &mut out[first_out..],
                out_stride,
            );
        }
        Ok(())
    }
}

/// The argument checks of [`Resampler::resample`].
#[allow(clippy::too_many_arguments)]
fn check_arguments(
    pixels: &[u8],
    width: u32,
    height: u32,
    view: Rect,
    src_box: [f64; 4],
    out: &[u8],
    out_width: u32,
    out_height: u32,
    dst: Rect,
) -> Result<(), SampleError> {
    let inside = |r: Rect, w: u32, h: u32| {
        u64::from(r.x) + u64::from(r.width) <= u64::from(w)
            && u64::from(r.y) + u64::from(r.height) <= u64::from(h)
    };
    if (pixels.len() as u64) < u64::from(width) * u64::from(height) * 3 {
        return Err(resize_error(format!(
            "{} source bytes for a {width}×{height} RGB image",
            pixels.len()
        )));
    }
    if (out.len() as u64) < u64::from(out_width) * u64::from(out_height) * 3 {
        return Err(resize_error(format!(
            "{} output bytes for a {out_width}×{out_height} RGB image",
            out.len()
        )));
    }
    if view.width == 0 || view.height == 0 || !inside(view, width, height) {
        return Err(resize_error(format!(
            "view {view:?} empty or outside the {width}×{height} image"
        )));
    }
    if !inside(dst, out_width, out_height) {
        return Err(resize_error(format!(
            "destination {dst:?} outside the {out_width}×{out_height} output"
        )));
    }
    let [bx, by, bw, bh] = src_box;
    let fits = |start: f64, len: f64, size: u32| {
        start.is_finite()
            && len.is_finite()
            && start >= 0.0
            && len >= 0.0
            && start + len <= f64::from(size) + 1e-9
    };
    if !fits(bx, bw, view.width) || !fits(by, bh, view.height) {
        return Err(resize_error(format!(
            "source box {src_box:?} outside the {}×{} view",
            view.width, view.height
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic test image: smooth gradients plus pseudo-random texture.
    fn image(width: u32, height: u32) -> Vec<u8> {
        let mut state = 0x9e37_79b9_u32 ^ (width * 31 + height);
        (0..width * height * 3)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let (x, y) = ((i / 3) % width, (i / 3) / width);
                let smooth = (x * 255 / width.max(1) + y * 97 / height.max(1)) % 256;
                ((smooth + (state % 64)) % 256) as u8
            })
            .collect()
    }

    fn full(width: u32, height: u32) -> Rect {
        Rect {
            x: 0,
            y: 0,
            width,
            height,
        }
    }

    /// Pillow's resample in f64 without any intermediate rounding: `(first input, weights)`
    /// per output pixel of one axis.
    fn reference_axis(in_size: u32, box0: f64, len: f64, out: u32) -> Vec<(usize, Vec<f64>)> {
        let scale = len / f64::from(out);
        let support = scale.max(1.0);
        (0..out)
            .map(|i| {
                let center = box0 + (f64::from(i) + 0.5) * scale;
                let min = ((center - support + 0.5) as i64).max(0) as usize;
                let max = ((center + support + 0.5) as i64).min(i64::from(in_size)) as usize;
                let w: Vec<f64> = (min..max)
                    .map(|x| {
                        let d = ((x as f64 - center + 0.5) / support).abs();
                        if d < 1.0 {
                            1.0 - d
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let total: f64 = w.iter().sum();
                (min, w.iter().map(|w| w / total).collect())
            })
            .collect()
    }

    fn reference(pixels: &[u8], width: u32, view: Rect, src_box: [f64; 4], dst: Rect) -> Vec<u8> {
        let [bx, by, bw, bh] = src_box;
        let xs = reference_axis(view.width, bx, bw, dst.width);
        let ys = reference_axis(view.height, by, bh, dst.height);
        let px = |x: usize, y: usize, c: usize| {
            let (x, y) = (x + view.x as usize, y + view.y as usize);
            f64::from(pixels[(y * width as usize + x) * 3 + c])
        };
        let mut out = Vec::new();
        for (y0, wy) in &ys {
            for (x0, wx) in &xs {
                for c in 0..3 {
                    let mut v = 0.0;
                    for (j, wy) in wy.iter().enumerate() {
                        for (i, wx) in wx.iter().enumerate() {
                            v += wy * wx * px(x0 + i, y0 + j, c);
                        }
                    }
                    out.push(v.round().clamp(0.0, 255.0) as u8);
                }
            }
        }
        out
    }

    fn ours(
        pixels: &[u8],
        width: u32,
        height: u32,
        view: Rect,
        src_box: [f64; 4],
        dst: Rect,
    ) -> Vec<u8> {
        let mut out = vec![0xAA; (dst.width * dst.height * 3) as usize];
        Resampler::new()
            .resample(
                pixels,
                width,
                height,
                view,
                src_box,
                &mut out,
                dst.width,
                dst.height,
                full(dst.width, dst.height),
            )
            .expect("valid arguments");
        out
    }

    /// The largest difference from the reference when a `w × h` test image is resized whole
    /// to `ow × oh`.
    fn worst_whole_image_error(w: u32, h: u32, ow: u32, oh: u32) -> u8 {
        let pixels = image(w, h);
        let src_box = [0.0, 0.0, f64::from(w), f64::from(h)];
        let got = ours(&pixels, w, h, full(w, h), src_box, full(ow, oh));
        let want = reference(&pixels, w, full(w, h), src_box, full(ow, oh));
        got.iter()
            .zip(&want)
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap_or(0)
    }

    fn assert_within_one(got: &[u8], want: &[u8], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let worst = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap_or(0);
        assert!(worst <= 1, "{what}: off by {worst}");
    }

    /// Hundreds of taps per output pixel (a 12-megapixel PNG to 16×12): each tap's product
    /// is truncated to 1/64 of a grey level, so the error can reach two levels here.
    #[test]
    fn extreme_downscales_stay_within_two_levels() {
        let worst = worst_whole_image_error(4000, 3000, 16, 12);
        assert!(worst <= 2, "off by {worst}");
    }

    #[test]
    fn identity_size_copies_the_view() {
        let pixels = image(23, 17);
        let view = Rect {
            x: 3,
            y: 2,
            width: 15,
            height: 11,
        };
        let got = ours(&pixels, 23, 17, view, [0.0, 0.0, 15.0, 11.0], full(15, 11));
        let want: Vec<u8> = (2..13)
            .flat_map(|y| pixels[(y * 23 + 3) * 3..(y * 23 + 18) * 3].to_vec())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn downscales_and_upscales_match_an_f64_reference_within_one() {
        for (w, h, ow, oh) in [
            (64, 48, 20, 15),
            (300, 260, 224, 224),
            (97, 131, 224, 224),
            (9, 7, 31, 23),
            (40, 40, 40, 17),
            (460, 400, 37, 41),
            // No DCT scaling for PNG/WebP: a large picture straight to a CIFAR-size output.
            (2000, 1500, 32, 24),
            (1500, 2000, 224, 224),
        ] {
            let worst = worst_whole_image_error(w, h, ow, oh);
            assert!(worst <= 1, "{w}×{h} → {ow}×{oh}: off by {worst}");
        }
    }

    #[test]
    fn crop_box_offsets_inside_a_view_match_the_reference() {
        let (w, h) = (120, 90);
        let pixels = image(w, h);
        let view = Rect {
            x: 17,
            y: 9,
            width: 80,
            height: 70,
        };
        for src_box in [
            [0.0, 0.0, 80.0, 70.0],
            [12.5, 7.25, 50.0, 41.5],
            [30.0, 20.0, 50.0, 50.0],
            [0.3, 68.0, 79.7, 2.0],
        ] {
            let got = ours(&pixels, w, h, view, src_box, full(33, 29));
            let want = reference(&pixels, w, view, src_box, full(33, 29));
            assert_within_one(&got, &want, &format!("box {src_box:?}"));
        }
    }

    #[test]
    fn destination_window_is_filled_and_its_border_zeroed() {
        let pixels = image(50, 40);
        let src_box = [0.0, 0.0, 50.0, 40.0];
        let dst = Rect {
            x: 3,
            y: 5,
            width: 20,
            height: 9,
        };
        let (ow, oh) = (27, 16);
        let mut out = vec![0xAA; (ow * oh * 3) as usize];
        Resampler::new()
            .resample(
                &pixels,
                50,
                40,
                full(50, 40),
                src_box,
                &mut out,
                ow,
                oh,
                dst,
            )
            .expect("valid arguments");
        let alone = ours(&pixels, 50, 40, full(50, 40), src_box, full(20, 9));
        for y in 0..oh {
            for x in 0..ow {
                let at = ((y * ow + x) * 3) as usize;
                let inside = (3..23).contains(&x) && (5..14).contains(&y);
                let want = if inside {
                    let i = (((y - 5) * 20 + (x - 3)) * 3) as usize;
                    alone[i..i + 3].to_vec()
                } else {
                    vec![0; 3]
                };
                assert_eq!(out[at..at + 3], want[..], "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn one_pixel_edges() {
        let colour = [12u8, 200, 77];
        // 1×1 source onto any size: every output pixel is its colour.
        let got = ours(&colour, 1, 1, full(1, 1), [0.0, 0.0, 1.0, 1.0], full(5, 3));
        assert!(got.chunks_exact(3).all(|p| p == colour));
        // One row or column, and one output pixel.
        for (w, h, ow, oh) in [(7, 1, 3, 1), (1, 9, 1, 4), (13, 11, 1, 1), (1, 1, 1, 1)] {
            let worst = worst_whole_image_error(w, h, ow, oh);
            assert!(worst <= 1, "{w}×{h} → {ow}×{oh}: off by {worst}");
        }
    }

    #[test]
    fn a_flat_image_stays_flat_at_every_scale() {
        for (w, ow) in [(460, 224), (100, 224), (224, 224), (3000, 224), (2, 224)] {
            let pixels: Vec<u8> = [255u8, 0, 128].repeat((w * w) as usize);
            let box_ = [0.0, 0.0, f64::from(w), f64::from(w)];
            let got = ours(&pixels, w, w, full(w, w), box_, full(ow, ow));
            assert!(
                got.chunks_exact(3).all(|p| p == [255, 0, 128]),
                "{w} → {ow}"
            );
        }
    }

    #[test]
    fn inconsistent_arguments_are_errors_not_panics() {
        let pixels = image(10, 10);
        let mut out = vec![0; 4 * 4 * 3];
        let mut r = Resampler::new();
        let mut run = |pixels: &[u8], view: Rect, src_box: [f64; 4], dst: Rect| {
            r.resample(pixels, 10, 10, view, src_box, &mut out, 4, 4, dst)
        };
        let b = [0.0, 0.0, 10.0, 10.0];
        assert!(run(&pixels[..299], full(10, 10), b, full(4, 4)).is_err());
        assert!(run(&pixels, full(11, 10), b, full(4, 4)).is_err());
        assert!(run(&pixels, full(0, 10), b, full(4, 4)).is_err());
        assert!(run(&pixels, full(10, 10), [5.0, 0.0, 6.0, 10.0], full(4, 4)).is_err());
        assert!(run(&pixels, full(10, 10), [f64::NAN, 0.0, 1.0, 1.0], full(4, 4)).is_err());
        assert!(run(&pixels, full(10, 10), b, full(5, 4)).is_err());
        assert!(run(&pixels, full(10, 10), b, full(4, 4)).is_ok());
    }

    #[test]
    fn reuse_across_sizes_gives_the_same_bytes_as_a_fresh_resampler() {
        let mut shared = Resampler::new();
        for (w, h, ow, oh) in [(300, 200, 224, 224), (20, 30, 7, 5), (120, 90, 64, 64)] {
            let pixels = image(w, h);
            let src_box = [1.5, 2.0, f64::from(w) - 3.0, f64::from(h) - 2.0];
            let mut out = vec![0; (ow * oh * 3) as usize];
            shared
                .resample(
                    &pixels,
                    w,
                    h,
                    full(w, h),
                    src_box,
                    &mut out,
                    ow,
                    oh,
                    full(ow, oh),
                )
                .expect("valid arguments");
            assert_eq!(out, ours(&pixels, w, h, full(w, h), src_box, full(ow, oh)));
        }
    }
}
