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
//! where a value lies near a rounding boundary.

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

/// Writes the strip's `rows` (each `row_bytes` long) column by column into `columns`.
///
/// Pixels move four bytes at a time (one load, one store): the fourth byte, the next
/// pixel's red, lands in the padding lane, whose result is never used.
#[inline(never)]
fn interleave(rows: &[u8], row_bytes: usize, columns: &mut [u8]) {
    let last = row_bytes / 3 - 1;
    for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
        let lane = r * 4;
        for (column, pixel) in columns
            .chunks_exact_mut(LANES)
            .zip(row.windows(4).step_by(3))
        {
            column[lane..lane + 4].copy_from_slice(pixel);
        }
        columns[last * LANES + lane..][..3].copy_from_slice(&row[last * 3..]);
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
/// by the next pixel; the last pixel of a row moves three.
#[inline(never)]
fn deinterleave(filtered: &[u8], n: usize, width: usize, out: &mut [u8], out_stride: usize) {
    let last = width - 1;
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
        self.horizontal.compute(view.width, bx, bw, dst.width);
        self.vertical.compute(view.height, by, bh, dst.height);

        // Only the columns the horizontal pass reads go through the vertical pass.
        let h = &mut self.horizontal;
        let col0 = h.starts[0];
        let cols = (h.starts[h.starts.len() - 1] - col0) as usize + h.taps;
        let row_bytes = cols * 3;
        self.rows.resize(STRIP * row_bytes, 0);
        self.columns.resize(cols * LANES, 0);
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
            interleave(rows, row_bytes, &mut self.columns);
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
