//! The last pass: flips, channel selection, normalisation, element type and layout, done by
//! table lookup while writing each value once into the caller's output slice.

use super::config::{Layout, OutDType};

/// Luma as Pillow's `convert("L")` computes it (ITU-R 601-2, fixed point, rounded).
pub(crate) fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// Precomputed encoded bytes of every (channel, pixel value) pair.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    dtype: OutDType,
    layout: Layout,
    channels: usize,
    /// `channels × 256` entries, the first `dtype.size()` bytes of each used.
    lut: Vec<[u8; 4]>,
}

/// The value stored for pixel value `v` of a channel with `mean` and `std` (0..1 scale), as
/// torchvision computes it in f32: `(v / 255 - mean) / std`.
pub(crate) fn normalised(v: u8, mean: f32, std: f32) -> f32 {
    (f32::from(v) / 255.0 - mean) / std
}

impl Writer {
    /// A writer; `normalize` is per channel `(mean, std)`, `None` meaning values `v / 255`
    /// (floats) or raw pixels (`u8`).
    pub(crate) fn new(
        dtype: OutDType,
        layout: Layout,
        channels: usize,
        normalize: Option<(&[f32], &[f32])>,
    ) -> Writer {
        let mut lut = Vec::with_capacity(channels * 256);
        for c in 0..channels {
            let (mean, std) = normalize.map_or((0.0, 1.0), |(m, s)| (m[c], s[c]));
            for v in 0..=255u8 {
                let x = normalised(v, mean, std);
                let mut e = [0u8; 4];
                match dtype {
                    OutDType::U8 => e[0] = v,
                    OutDType::F16 => e[..2].copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                    OutDType::Bf16 => {
                        e[..2].copy_from_slice(&half::bf16::from_f32(x).to_le_bytes())
                    }
                    OutDType::F32 => e = x.to_le_bytes(),
                }
                lut.push(e);
            }
        }
        Writer {
            dtype,
            layout,
            channels,
            lut,
        }
    }

    /// Bytes of one `width × height` sample.
    pub(crate) fn sample_bytes(&self, width: u32, height: u32) -> usize {
        width as usize * height as usize * self.channels * self.dtype.size()
    }

    /// Writes the RGB8 image `rgb` (`width × height`), flipped as asked, into `out` (exactly
    /// [`Writer::sample_bytes`] long).
    pub(crate) fn write(
        &self,
        rgb: &[u8],
        width: u32,
        height: u32,
        hflip: bool,
        vflip: bool,
        out: &mut [u8],
    ) {
        self.write_with(&self.lut, rgb, width, height, hflip, vflip, out)
    }

    /// [`write`](Self::write) with the per-channel value map `map` applied first (a policy's
    /// pending per-value operations), folded into this pass's table: no extra pass over the
    /// image. `table` is reusable scratch. Not for one output channel (luma mixes channels):
    /// there `rgb` is mapped first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_mapped(
        &self,
        rgb: &mut [u8],
        width: u32,
        height: u32,
        hflip: bool,
        vflip: bool,
        map: &[[u8; 256]; 3],
        table: &mut Vec<[u8; 4]>,
        out: &mut [u8],
    ) {
        if self.channels == 1 {
            for p in rgb.chunks_exact_mut(3) {
                for c in 0..3 {
                    p[c] = map[c][usize::from(p[c])];
                }
            }
            return self.write(rgb, width, height, hflip, vflip, out);
        }
        table.clear();
        for (c, row) in map.iter().enumerate().take(self.channels) {
            table.extend(row.iter().map(|&v| self.lut[c * 256 + usize::from(v)]));
        }
        self.write_with(table, rgb, width, height, hflip, vflip, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_with(
        &self,
        lut: &[[u8; 4]],
        rgb: &[u8],
        width: u32,
        height: u32,
        hflip: bool,
        vflip: bool,
        out: &mut [u8],
    ) {
        match self.dtype.size() {
            1 => self.write_n::<1>(lut, rgb, width, height, hflip, vflip, out),
            2 => self.write_n::<2>(lut, rgb, width, height, hflip, vflip, out),
            _ => self.write_n::<4>(lut, rgb, width, height, hflip, vflip, out),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_n<const N: usize>(
        &self,
        lut: &[[u8; 4]],
        rgb: &[u8],
        width: u32,
        height: u32,
        hflip: bool,
        vflip: bool,
        out: &mut [u8],
    ) {
        let (w, h) = (width as usize, height as usize);
        let entry = |c: usize, v: u8| -> [u8; N] {
            let e = &lut[c * 256 + usize::from(v)];
            let mut out = [0u8; N];
            out.copy_from_slice(&e[..N]);
            out
        };
        let src_row = |y: usize| {
            let sy = if vflip { h - 1 - y } else { y };
            &rgb[sy * w * 3..(sy + 1) * w * 3]
        };
        let src_x = |x: usize| if hflip { w - 1 - x } else { x };
        match (self.layout, self.channels) {
            (Layout::Nchw, 3) => {
                let plane = w * h * N;
                let (r_plane, rest) = out.split_at_mut(plane);
                let (g_plane, b_plane) = rest.split_at_mut(plane);
                for y in 0..h {
                    let row = src_row(y);
                    let range = y * w * N..(y + 1) * w * N;
                    let (r, g, b) = (
                        &mut r_plane[range.clone()],
                        &mut g_plane[range.clone()],
                        &mut b_plane[range],
                    );
                    for x in 0..w {
                        let p = &row[src_x(x) * 3..src_x(x) * 3 + 3];
                        r[x * N..x * N + N].copy_from_slice(&entry(0, p[0]));
                        g[x * N..x * N + N].copy_from_slice(&entry(1, p[1]));
                        b[x * N..x * N + N].copy_from_slice(&entry(2, p[2]));
                    }
                }
            }
            (Layout::Nhwc, 3) => {
                for y in 0..h {
                    let row = src_row(y);
                    let dst = &mut out[y * w * 3 * N..(y + 1) * w * 3 * N];
                    for (x, d) in dst.chunks_exact_mut(3 * N).enumerate() {
                        let p = &row[src_x(x) * 3..src_x(x) * 3 + 3];
                        for c in 0..3 {
                            d[c * N..c * N + N].copy_from_slice(&entry(c, p[c]));
                        }
                    }
                }
            }
            // One channel: NCHW and NHWC are the same bytes.
            _ => {
                for y in 0..h {
                    let row = src_row(y);
                    let dst = &mut out[y * w * N..(y + 1) * w * N];
                    for (x, d) in dst.chunks_exact_mut(N).enumerate() {
                        let p = &row[src_x(x) * 3..src_x(x) * 3 + 3];
                        d.copy_from_slice(&entry(0, luma(p[0], p[1], p[2])));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_flips_place_values() {
        // 2×1 image: (1,2,3) (4,5,6).
        let rgb = [1, 2, 3, 4, 5, 6];
        let mut out = [0u8; 6];
        let w = Writer::new(OutDType::U8, Layout::Nchw, 3, None);
        w.write(&rgb, 2, 1, false, false, &mut out);
        assert_eq!(out, [1, 4, 2, 5, 3, 6]);
        w.write(&rgb, 2, 1, true, false, &mut out);
        assert_eq!(out, [4, 1, 5, 2, 6, 3]);
        let w = Writer::new(OutDType::U8, Layout::Nhwc, 3, None);
        w.write(&rgb, 2, 1, true, false, &mut out);
        assert_eq!(out, [4, 5, 6, 1, 2, 3]);
        let w = Writer::new(OutDType::U8, Layout::Nhwc, 3, None);
        w.write(&rgb, 1, 2, false, true, &mut out);
        assert_eq!(out, [4, 5, 6, 1, 2, 3]);
    }

    #[test]
    fn normalises_like_torchvision_in_each_dtype() {
        let mean = [0.485f32, 0.456, 0.406];
        let std = [0.229f32, 0.224, 0.225];
        let rgb = [0, 128, 255];
        let expect: Vec<f32> = (0..3)
            .map(|c| (rgb[c] as f32 / 255.0 - mean[c]) / std[c])
            .collect();
        let mut out = [0u8; 12];
        Writer::new(OutDType::F32, Layout::Nchw, 3, Some((&mean, &std)))
            .write(&rgb, 1, 1, false, false, &mut out);
        for c in 0..3 {
            let v = f32::from_le_bytes(out[c * 4..c * 4 + 4].try_into().unwrap());
            assert_eq!(v, expect[c]);
        }
        let mut out = [0u8; 6];
        Writer::new(OutDType::Bf16, Layout::Nchw, 3, Some((&mean, &std)))
            .write(&rgb, 1, 1, false, false, &mut out);
        for c in 0..3 {
            let v = half::bf16::from_le_bytes([out[c * 2], out[c * 2 + 1]]).to_f32();
            assert!((v - expect[c]).abs() <= expect[c].abs() / 128.0);
        }
        Writer::new(OutDType::F16, Layout::Nhwc, 3, None).write(&rgb, 1, 1, false, false, &mut out);
        let v = half::f16::from_le_bytes([out[2], out[3]]).to_f32();
        assert!((v - 128.0 / 255.0).abs() < 1e-3);
    }

    #[test]
    fn one_channel_is_pillow_luma() {
        let rgb = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 200, 30];
        let mut out = [0u8; 4];
        Writer::new(OutDType::U8, Layout::Nchw, 1, None).write(&rgb, 4, 1, false, false, &mut out);
        // Values from Pillow 13: Image.frombytes(...).convert("L").
        assert_eq!(out, [76, 150, 29, 124]);
    }
}
