//! Geometry planning: which source pixels map onto which output pixels, for random resized
//! crop (torchvision's algorithm) and for resize → center crop. Pure arithmetic on sizes; the
//! resampling itself is in `resample.rs`.

use rand_chacha::ChaCha8Rng;

use super::key::{below_one_draw, uniform};
use crate::decode::Rect;

/// How the shorter side or the whole size is set by `resize`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ResizeSpec {
    Shorter(u32),
    Exact { height: u32, width: u32 },
}

/// The checked geometric plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Geometry {
    /// torchvision `RandomResizedCrop`: integer crop box, then resize to the output.
    RandomResizedCrop {
        height: u32,
        width: u32,
        scale: [f64; 2],
        log_ratio: [f64; 2],
    },
    /// Optional `Resize`, then optional `CenterCrop` (at least one fixes the size).
    ResizeCrop {
        resize: Option<ResizeSpec>,
        crop: Option<(u32, u32)>,
    },
}

/// One sample's mapping from source pixels to output pixels. Source coordinates are
/// full-resolution displayed pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sampling {
    /// The source pixels the resampler may read; its edges act as image edges.
    pub(crate) view: Rect,
    /// The source box `[x, y, width, height]` that maps onto `dst` (fractional).
    pub(crate) src_box: [f64; 4],
    /// The output rectangle written; outside it (zero padding of a large center crop) is 0.
    pub(crate) dst: Rect,
}

impl Geometry {
    /// Output `(height, width)` for an image of any size, or `None` when not fixed.
    pub(crate) fn output_size(&self) -> Option<(u32, u32)> {
        match *self {
            Geometry::RandomResizedCrop { height, width, .. } => Some((height, width)),
            Geometry::ResizeCrop { crop: Some(c), .. } => Some(c),
            Geometry::ResizeCrop {
                resize: Some(ResizeSpec::Exact { height, width }),
                crop: None,
            } => Some((height, width)),
            Geometry::ResizeCrop { .. } => None,
        }
    }

    /// Plans one sample for a `width × height` source (draws from `rng` for random crops).
    pub(crate) fn sampling(&self, width: u32, height: u32, rng: &mut ChaCha8Rng) -> Sampling {
        match *self {
            Geometry::RandomResizedCrop {
                height: out_h,
                width: out_w,
                scale,
                log_ratio,
            } => {
                let crop = random_resized_crop(width, height, scale, log_ratio, rng);
                Sampling {
                    view: crop,
                    src_box: [
                        f64::from(crop.x),
                        f64::from(crop.y),
                        f64::from(crop.width),
                        f64::from(crop.height),
                    ],
                    dst: Rect {
                        x: 0,
                        y: 0,
                        width: out_w,
                        height: out_h,
                    },
                }
            }
            Geometry::ResizeCrop { resize, crop } => resize_crop(width, height, resize, crop),
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area and log-uniform
/// aspect ratio, then a center crop clamped to the ratio range. Python's `round` (ties to
/// even) is kept so that the integer boxes match torchvision's for the same draws.
pub(crate) fn random_resized_crop(
    width: u32,
    height: u32,
    scale: [f64; 2],
    log_ratio: [f64; 2],
    rng: &mut ChaCha8Rng,
) -> Rect {
    let (w_f, h_f) = (f64::from(width), f64::from(height));
    let area = w_f * h_f;
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_ratio[0], log_ratio[1]).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && h > 0.0 && w <= w_f && h <= h_f {
            let (w, h) = (w as u32, h as u32);
            let y = below_one_draw(rng, u64::from(height - h) + 1) as u32;
            let x = below_one_draw(rng, u64::from(width - w) + 1) as u32;
            return Rect {
                x,
                y,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = w_f / h_f;
    let (min_ratio, max_ratio) = (log_ratio[0].exp(), log_ratio[1].exp());
    let (w, h) = if in_ratio < min_ratio {
        (
            width,
            ((w_f / min_ratio).round_ties_even() as u32).clamp(1, height),
        )
    } else if in_ratio > max_ratio {
        (
            ((h_f * max_ratio).round_ties_even() as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    Rect {
        x: (width - w) / 2,
        y: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// Resize (torchvision's output-size rule: the longer side is truncated) then center crop
/// (torchvision's rounding, zero padding per axis when the crop is larger).
fn resize_crop(
    width: u32,
    height: u32,
    resize: Option<ResizeSpec>,
    crop: Option<(u32, u32)>,
) -> Sampling {
    let (rw, rh) = match resize {
        None => (width, height),
        Some(ResizeSpec::Exact { height, width }) => (width, height),
        Some(ResizeSpec::Shorter(s)) => {
            let (short, long) = (width.min(height), width.max(height));
            let new_long = ((u64::from(s) * u64::from(long)) / u64::from(short)) as u32;
            if width <= height {
                (s, new_long.max(1))
            } else {
                (new_long.max(1), s)
            }
        }
    };
    let (ch, cw) = crop.unwrap_or((rh, rw));
    let (dst_x, dst_w, start_x, len_x) = crop_axis(rw, cw);
    let (dst_y, dst_h, start_y, len_y) = crop_axis(rh, ch);
    let sx = f64::from(width) / f64::from(rw);
    let sy = f64::from(height) / f64::from(rh);
    let src_box = [
        f64::from(start_x) * sx,
        f64::from(start_y) * sy,
        f64::from(len_x) * sx,
        f64::from(len_y) * sy,
    ];
    Sampling {
        view: support_view(src_box, sx, sy, width, height),
        src_box,
        dst: Rect {
            x: dst_x,
            y: dst_y,
            width: dst_w,
            height: dst_h,
        },
    }
}

/// One axis of a center crop of `crop` from `size`:
/// `(dst offset, dst length, start in resized image, length in resized image)`.
fn crop_axis(size: u32, crop: u32) -> (u32, u32, u32, u32) {
    if crop > size {
        ((crop - size) / 2, size, 0, size)
    } else {
        // torchvision: int(round((size - crop) / 2.0)), Python rounding.
        let start = (f64::from(size - crop) / 2.0).round_ties_even() as u32;
        (0, crop, start, crop)
    }
}

/// The source pixels an antialiased bilinear resize of `src_box` reads: the box widened by
/// the filter's support (1 output pixel = `scale` source pixels when downscaling) plus a
/// guard pixel, clipped to the image.
fn support_view(src_box: [f64; 4], sx: f64, sy: f64, width: u32, height: u32) -> Rect {
    let mx = sx.max(1.0).ceil() + 2.0;
    let my = sy.max(1.0).ceil() + 2.0;
    let x0 = (src_box[0] - mx).floor().max(0.0) as u32;
    let y0 = (src_box[1] - my).floor().max(0.0) as u32;
    let x1 = ((src_box[0] + src_box[2] + mx).ceil() as u32).min(width);
    let y1 = ((src_box[1] + src_box[3] + my).ceil() as u32).min(height);
    Rect {
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::key::{SampleKey, Stream};

    fn rrc() -> Geometry {
        Geometry::RandomResizedCrop {
            height: 224,
            width: 224,
            scale: [0.08, 1.0],
            log_ratio: [(3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln()],
        }
    }

    #[test]
    fn random_crops_stay_inside_and_respect_ranges() {
        for id in 0..2000 {
            let mut rng = SampleKey {
                seed: 5,
                epoch: 0,
                sample_id: id,
            }
            .rng(Stream::Crop);
            let (w, h) = (300 + (id as u32 % 7) * 50, 200 + (id as u32 % 5) * 80);
            let s = rrc().sampling(w, h, &mut rng);
            let c = s.view;
            assert!(c.width >= 1 && c.height >= 1 && c.x + c.width <= w && c.y + c.height <= h);
            let area = f64::from(c.width * c.height) / f64::from(w * h);
            assert!((0.07..=1.0 + 1e-9).contains(&area), "area {area}");
        }
    }

    #[test]
    fn fallback_is_center_crop_clamped_to_ratio() {
        // A 1000×10 strip never fits a 3/4..4/3 crop of ≥ 8% area: fallback to h = 10,
        // w = round(10 × 4/3) = 13, centred.
        let mut rng = SampleKey {
            seed: 0,
            epoch: 0,
            sample_id: 0,
        }
        .rng(Stream::Crop);
        let r = random_resized_crop(
            1000,
            10,
            [0.5, 1.0],
            [(0.75f64).ln(), (4.0f64 / 3.0).ln()],
            &mut rng,
        );
        assert_eq!((r.x, r.y, r.width, r.height), ((1000 - 13) / 2, 0, 13, 10));
    }

    #[test]
    fn resize_shorter_then_center_crop_matches_torchvision_arithmetic() {
        // 240×160 → shorter 128 → 192×128; crop 112 → start x = 40, y = 8.
        let g = Geometry::ResizeCrop {
            resize: Some(ResizeSpec::Shorter(128)),
            crop: Some((112, 112)),
        };
        let mut rng = SampleKey {
            seed: 0,
            epoch: 0,
            sample_id: 0,
        }
        .rng(Stream::Crop);
        let s = g.sampling(240, 160, &mut rng);
        assert_eq!(
            s.dst,
            Rect {
                x: 0,
                y: 0,
                width: 112,
                height: 112
            }
        );
        let k = 240.0 / 192.0;
        assert_eq!(s.src_box, [40.0 * k, 8.0 * 1.25, 112.0 * k, 112.0 * 1.25]);
        assert!(s.view.x <= 48 && s.view.x + s.view.width >= 190);
    }

    #[test]
    fn oversized_center_crop_pads() {
        let g = Geometry::ResizeCrop {
            resize: None,
            crop: Some((20, 50)),
        };
        let mut rng = SampleKey {
            seed: 0,
            epoch: 0,
            sample_id: 0,
        }
        .rng(Stream::Crop);
        let s = g.sampling(30, 40, &mut rng);
        assert_eq!(
            s.dst,
            Rect {
                x: 10,
                y: 0,
                width: 30,
                height: 20
            }
        );
        assert_eq!(s.src_box, [0.0, 10.0, 30.0, 20.0]);
    }
}
