//! Augment stage: encoded bytes + [`SampleKey`] → one sample's final tensor values, written
//! straight into the caller's slice (a slot of the shared-memory ring).
//!
//! # Brief overview
//!
//! [`Augmenter::new`] checks an [`AugmentConfig`] once into a plan; [`Augmenter::process`]
//! then runs, per sample:
//!
//! 1. probe the header (size, EXIF orientation; pixel limit) — `decode`;
//! 2. draw the geometry (random resized crop, or resize → center crop) — `geometry.rs`;
//! 3. decode only the source region the geometry reads, at the smallest sufficient JPEG DCT
//!    scale (EXIF-rotated JPEGs too: the region is mapped onto stored pixels) — `decode`;
//! 4. antialiased bilinear resize of that region to the output size — `resample.rs`;
//! 5. on the small output image: rotation/zoom (`warp.rs`), an automatic augmentation policy
//!    — RandAugment, TrivialAugmentWide or AutoAugment (`policy.rs`, operations in `ops.rs`) —,
//!    colour jitter and grayscale (`color.rs`), Gaussian blur (`blur.rs`);
//! 6. flips, normalisation, dtype and layout in one table-driven pass into the output slice —
//!    `write.rs` (a policy's pending per-value operations are folded into its table);
//! 7. random erasing on the normalised output (`erase.rs`).
//!
//! Flips are applied last, where they cost nothing: every later operation commutes with a
//! flip except rotation, whose angle is mirrored instead. With a policy (whose shears and
//! translations do not commute with flips) the flips come before it, where torchvision's
//! recipes apply them: left pending, the policy's warps read through them and the write
//! applies them when no warp did (`ops.rs`). Randomness comes only from the
//! [`SampleKey`], one stream per operation (`key.rs`). Buffers live in a per-worker
//! [`Scratch`], so JPEG samples allocate nothing once it has warmed up.
//!
//! # What is promised (and tested)
//!
//! - Semantics are torchvision's: `RandomResizedCrop` crops an integer box and then resizes it
//!   (the resampler never reads outside the box); `Resize` + `CenterCrop` resample the whole
//!   image and keep the centre (the resampler reads around the box, as a full resize would).
//! - Against Pillow's `resize(BILINEAR, reducing_gap=None)` + crop + flips: max abs error
//!   ≤ 2/255 and mean ≤ 0.5/255 on pixels before normalisation (`tests/augment_golden.rs`).
//! - ROI decoding changes nothing for random resized crops (bit-identical) and at most 1/255
//!   for resize + center crop. DCT scaling (`dct-scaling`, used only when the crop keeps ≥ 2×
//!   the output's pixels per side) is an approximation: mean abs error ≤ 3/255 in the tests.
//! - Output bytes depend only on the input bytes, the plan and the [`SampleKey`]: identical
//!   on 1, 2 or 8 threads, in any order (`tests/augment_determinism.rs`).
//! - Each policy operation matches torchvision v2's on fixed magnitudes (`ops::tests`, reference
//!   outputs from `scripts/policy_reference.py`; differences listed in `ops.rs`).
//! - Normalised values are computed like torchvision's, in f32: `(v / 255 - mean) / std`,
//!   then rounded to nearest-even for f16/bf16.
#![forbid(unsafe_code)]

mod blur;
mod color;
mod config;
mod erase;
mod error;
mod geometry;
pub(crate) mod key;
mod ops;
mod policy;
mod resample;
mod warp;
mod write;

pub use config::{
    AugmentConfig, AutoAugmentConfig, AutoAugmentPolicy, CenterCropConfig, ColorJitterConfig,
    ErasingValue, FlipConfig, GaussianBlurConfig, GrayscaleConfig, Jitter, Layout, MixConfig,
    NormalizeConfig, OutDType, OutputConfig, RandAugmentConfig, RandomErasingConfig,
    RandomResizedCropConfig, RandomScaleConfig, RepeatedAugmentConfig, ResizeConfig, RotateConfig,
    Size, TrivialAugmentConfig,
};
pub use error::{AugmentConfigError, SampleError};
pub use key::SampleKey;
pub use resample::Resampler;

use crate::decode::{DecodeRequest, Decoder, Rect};
use erase::Eraser;
use geometry::{Geometry, ResizeSpec};
use key::{chance, uniform, Stream};
use ops::OpScratch;
use policy::Policy;
use write::Writer;

/// Checked colour-jitter ranges.
#[derive(Clone, Debug, PartialEq)]
struct JitterPlan {
    brightness: Option<[f64; 2]>,
    contrast: Option<[f64; 2]>,
    saturation: Option<[f64; 2]>,
    hue: Option<[f64; 2]>,
    p: f64,
}

/// The random parameters one sample was generated with ([`Augmenter::process_traced`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SampleParams {
    /// Share of the source image's area the crop covers (1.0 for a whole image).
    pub crop_area: f32,
    /// Width / height of the cropped source region.
    pub crop_aspect: f32,
    /// Flipped left-right.
    pub hflip: bool,
    /// Flipped top-bottom.
    pub vflip: bool,
    /// Rotation in degrees (0 when not rotated).
    pub rotation: f32,
    /// Zoom factor of `random-scale` (1 when not applied).
    pub zoom: f32,
    /// Brightness factor, when colour jitter applied one.
    pub brightness: Option<f32>,
    /// Contrast factor, when applied.
    pub contrast: Option<f32>,
    /// Saturation factor, when applied.
    pub saturation: Option<f32>,
    /// Hue shift, when applied.
    pub hue: Option<f32>,
    /// The policy's operations with their signed magnitudes (torchvision's names), in order.
    pub policy_ops: Vec<(&'static str, f32)>,
    /// The rectangle random erasing overwrote: `[top, left, height, width]`.
    pub erased: Option<[u32; 4]>,
}

/// A checked augmentation plan; cheap to share between worker threads (`&Augmenter`).
#[derive(Clone, Debug)]
pub struct Augmenter {
    geometry: Geometry,
    height: u32,
    width: u32,
    max_pixels: u64,
    roi_decode: bool,
    dct_scaling: bool,
    horizontal_flip: Option<f64>,
    vertical_flip: Option<f64>,
    rotate: Option<RotateConfig>,
    random_scale: Option<RandomScaleConfig>,
    jitter: Option<JitterPlan>,
    grayscale: Option<f64>,
    blur: Option<GaussianBlurConfig>,
    policy: Option<Policy>,
    eraser: Option<Eraser>,
    output: OutputConfig,
    mean_std: Option<([f32; 3], [f32; 3])>,
    writer: Writer,
}

/// Per-worker reusable state: the decoder (libjpeg-turbo handle and buffers), the resampler
/// (coefficient tables and buffers) and the intermediate images. Create one per worker thread
/// with [`Augmenter::scratch`].
pub struct Scratch {
    decoder: Decoder,
    resampler: Resampler,
    small: Vec<u8>,
    small2: Vec<u8>,
    blur_tmp: Vec<f32>,
    blur_kernel: Vec<f32>,
    ops: OpScratch,
    write_table: Vec<[u8; 4]>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl Scratch {
    /// Scratch for `augmenter`'s plan.
    pub fn new(augmenter: &Augmenter) -> Scratch {
        Scratch {
            decoder: Decoder::new(augmenter.max_pixels),
            resampler: Resampler::new(),
            small: Vec::new(),
            small2: Vec::new(),
            blur_tmp: Vec::new(),
            blur_kernel: Vec::new(),
            ops: OpScratch::default(),
            write_table: Vec::new(),
        }
    }
}

/// An `[augment]` key's value refused for `problem` (shared by the batch-level mixing checks).
pub(crate) fn invalid(key: &'static str, problem: impl Into<String>) -> AugmentConfigError {
    AugmentConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// `p` when it is a probability, else an error naming `key`.
pub(crate) fn check_p(key: &'static str, p: f64) -> Result<f64, AugmentConfigError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(invalid(
            key,
            format!("probability must be in [0, 1], got {p}"),
        ))
    }
}

fn check_range(
    key: &'static str,
    [lo, hi]: [f64; 2],
    min: f64,
    max: f64,
) -> Result<[f64; 2], AugmentConfigError> {
    if lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi && hi <= max {
        Ok([lo, hi])
    } else {
        Err(invalid(
            key,
            format!("needs {min} <= min <= max <= {max}, got [{lo}, {hi}]"),
        ))
    }
}

fn check_size(key: &'static str, size: Size) -> Result<(u32, u32), AugmentConfigError> {
    let (h, w) = size.height_width();
    if h == 0 || w == 0 || h > 16384 || w > 16384 {
        return Err(invalid(
            key,
            format!("sizes must be 1..=16384, got {h}x{w} (height x width)"),
        ));
    }
    Ok((h, w))
}

fn jitter_range(
    key: &'static str,
    jitter: Option<Jitter>,
) -> Result<Option<[f64; 2]>, AugmentConfigError> {
    match jitter {
        None => Ok(None),
        Some(Jitter::Amount(x)) if x.is_finite() && x >= 0.0 => {
            Ok(Some([(1.0 - x).max(0.0), 1.0 + x]))
        }
        Some(Jitter::Amount(x)) => Err(invalid(key, format!("amount must be >= 0, got {x}"))),
        Some(Jitter::Range(r)) => check_range(key, r, 0.0, f64::MAX).map(Some),
    }
}

fn hue_range(jitter: Option<Jitter>) -> Result<Option<[f64; 2]>, AugmentConfigError> {
    const KEY: &str = "color-jitter.hue";
    match jitter {
        None => Ok(None),
        Some(Jitter::Amount(x)) if (0.0..=0.5).contains(&x) => Ok(Some([-x, x])),
        Some(Jitter::Amount(x)) => Err(invalid(KEY, format!("must be in [0, 0.5], got {x}"))),
        Some(Jitter::Range(r)) => check_range(KEY, r, -0.5, 0.5).map(Some),
    }
}

impl Augmenter {
    /// Checks `cfg` into a plan. Errors name the key and the allowed values.
    pub fn new(cfg: &AugmentConfig) -> Result<Augmenter, AugmentConfigError> {
        if cfg.max_pixels == 0 {
            return Err(invalid("max-pixels", "must be at least 1"));
        }
        let geometry = Self::geometry(cfg)?;
        let (height, width) = geometry
            .output_size()
            .ok_or(AugmentConfigError::NoFixedSize)?;
        let horizontal_flip = cfg
            .horizontal_flip
            .as_ref()
            .map(|f| check_p("horizontal-flip.p", f.p))
            .transpose()?;
        let vertical_flip = cfg
            .vertical_flip
            .as_ref()
            .map(|f| check_p("vertical-flip.p", f.p))
            .transpose()?;
        if let Some(r) = &cfg.rotate {
            check_range("rotate.degrees", r.degrees, -360.0, 360.0)?;
            check_p("rotate.p", r.p)?;
        }
        if let Some(s) = &cfg.random_scale {
            check_range("random-scale.range", s.range, 1e-3, 1e3)?;
            check_p("random-scale.p", s.p)?;
        }
        let jitter = cfg
            .color_jitter
            .as_ref()
            .map(|j| -> Result<JitterPlan, AugmentConfigError> {
                Ok(JitterPlan {
                    brightness: jitter_range("color-jitter.brightness", j.brightness)?,
                    contrast: jitter_range("color-jitter.contrast", j.contrast)?,
                    saturation: jitter_range("color-jitter.saturation", j.saturation)?,
                    hue: hue_range(j.hue)?,
                    p: check_p("color-jitter.p", j.p)?,
                })
            })
            .transpose()?;
        let grayscale = cfg
            .grayscale
            .as_ref()
            .map(|g| check_p("grayscale.p", g.p))
            .transpose()?;
        if let Some(b) = &cfg.gaussian_blur {
            if b.kernel % 2 == 0 || b.kernel > 255 {
                return Err(invalid(
                    "gaussian-blur.kernel",
                    format!("must be odd and <= 255, got {}", b.kernel),
                ));
            }
            check_range("gaussian-blur.sigma", b.sigma, 1e-6, 1e3)?;
            check_p("gaussian-blur.p", b.p)?;
        }
        let channels = cfg.output.channels;
        if channels != 1 && channels != 3 {
            return Err(invalid(
                "output.channels",
                format!("must be 3 (RGB) or 1 (luma), got {channels}"),
            ));
        }
        let mean_std = match &cfg.normalize {
            None => None,
            // With u8 output the pixels stay raw and mean/std only travel in the ring's header,
            // for the client to normalise on the device (`batch.cuda(normalize=True)`).
            Some(n) => {
                let c = channels as usize;
                if n.mean.len() != c || n.std.len() != c {
                    return Err(invalid(
                        "normalize",
                        format!(
                            "mean and std need {c} values (output.channels), got {} and {}",
                            n.mean.len(),
                            n.std.len()
                        ),
                    ));
                }
                if n.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
                    || n.mean.iter().any(|m| !m.is_finite())
                {
                    return Err(invalid(
                        "normalize",
                        "std must be finite and > 0, mean finite",
                    ));
                }
                let spread = |v: &[f32]| {
                    if c == 1 {
                        [v[0]; 3]
                    } else {
                        [v[0], v[1], v[2]]
                    }
                };
                Some((spread(&n.mean), spread(&n.std)))
            }
        };
        let policy = Self::policy(cfg)?;
        if let Some(r) = &cfg.repeated_augment {
            if !(1..=64).contains(&r.count) {
                return Err(invalid(
                    "repeated-augment.count",
                    format!("must be 1..=64, got {}", r.count),
                ));
            }
        }
        let eraser = cfg
            .random_erasing
            .as_ref()
            .map(|e| -> Result<Eraser, AugmentConfigError> {
                if cfg.output.dtype == OutDType::U8 {
                    return Err(invalid(
                        "random-erasing",
                        "needs a float output.dtype (f32, f16, bf16): erasing happens after \
                         normalisation, which u8 output leaves to the device",
                    ));
                }
                let ratio = check_range("random-erasing.ratio", e.ratio, 1e-6, 1e6)?;
                let fill = match &e.value {
                    ErasingValue::Named(n) if n == "random" => erase::Fill::Random,
                    ErasingValue::Named(n) => {
                        return Err(invalid(
                            "random-erasing.value",
                            format!("must be \"random\" or a list of numbers, got \"{n}\""),
                        ))
                    }
                    ErasingValue::Values(v)
                        if (v.len() == 1 || v.len() == channels as usize)
                            && v.iter().all(|x| x.is_finite()) =>
                    {
                        erase::Fill::Values(std::array::from_fn(|c| v[c.min(v.len() - 1)]))
                    }
                    ErasingValue::Values(v) => {
                        return Err(invalid(
                            "random-erasing.value",
                            format!(
                                "needs 1 or {channels} finite values (output.channels), got {v:?}"
                            ),
                        ))
                    }
                };
                Ok(Eraser {
                    p: check_p("random-erasing.p", e.p)?,
                    scale: check_range("random-erasing.scale", e.scale, 0.0, 1.0)?,
                    log_ratio: [ratio[0].ln(), ratio[1].ln()],
                    fill,
                })
            })
            .transpose()?;
        let writer = Writer::new(
            cfg.output.dtype,
            cfg.output.layout,
            channels as usize,
            mean_std.as_ref().map(|(m, s)| (&m[..], &s[..])),
        );
        Ok(Augmenter {
            geometry,
            height,
            width,
            max_pixels: cfg.max_pixels,
            roi_decode: cfg.roi_decode,
            dct_scaling: cfg.dct_scaling,
            horizontal_flip,
            vertical_flip,
            rotate: cfg.rotate.clone(),
            random_scale: cfg.random_scale.clone(),
            jitter,
            grayscale,
            blur: cfg.gaussian_blur.clone(),
            policy,
            eraser,
            output: cfg.output.clone(),
            mean_std,
            writer,
        })
    }

    /// The one automatic augmentation policy configured, checked.
    fn policy(cfg: &AugmentConfig) -> Result<Option<Policy>, AugmentConfigError> {
        let keys = [
            (cfg.rand_augment.is_some(), "rand-augment"),
            (cfg.trivial_augment.is_some(), "trivial-augment"),
            (cfg.auto_augment.is_some(), "auto-augment"),
        ];
        let mut set = keys.iter().filter(|k| k.0).map(|k| k.1);
        if let (Some(first), Some(second)) = (set.next(), set.next()) {
            return Err(AugmentConfigError::Conflict { first, second });
        }
        let check_bins = |key: &'static str, bins: u32| {
            if (2..=1000).contains(&bins) {
                Ok(bins)
            } else {
                Err(invalid(key, format!("must be 2..=1000, got {bins}")))
            }
        };
        if let Some(r) = &cfg.rand_augment {
            let bins = check_bins("rand-augment.bins", r.bins)?;
            if r.m >= bins {
                return Err(invalid(
                    "rand-augment.m",
                    format!("must be below bins ({bins}), got {}", r.m),
                ));
            }
            if r.n > 16 {
                return Err(invalid(
                    "rand-augment.n",
                    format!("must be 0..=16, got {}", r.n),
                ));
            }
            if !(r.m_std.is_finite() && r.m_std >= 0.0) {
                return Err(invalid(
                    "rand-augment.m-std",
                    format!("must be finite and >= 0, got {}", r.m_std),
                ));
            }
            return Ok(Some(Policy::Rand {
                n: r.n,
                m: r.m,
                m_std: r.m_std,
                bins,
                fill: r.fill,
            }));
        }
        if let Some(t) = &cfg.trivial_augment {
            return Ok(Some(Policy::TrivialWide {
                bins: check_bins("trivial-augment.bins", t.bins)?,
                fill: t.fill,
            }));
        }
        Ok(cfg.auto_augment.as_ref().map(|a| match a.policy {
            AutoAugmentPolicy::Imagenet => Policy::AutoImagenet { fill: a.fill },
        }))
    }

    fn geometry(cfg: &AugmentConfig) -> Result<Geometry, AugmentConfigError> {
        if let Some(rrc) = &cfg.random_resized_crop {
            for (present, other) in [
                (cfg.resize.is_some(), "resize"),
                (cfg.center_crop.is_some(), "center-crop"),
            ] {
                if present {
                    return Err(AugmentConfigError::Conflict {
                        first: "random-resized-crop",
                        second: other,
                    });
                }
            }
            let (height, width) = check_size("random-resized-crop.size", rrc.size)?;
            let scale = check_range("random-resized-crop.scale", rrc.scale, 1e-9, 1.0)?;
            let ratio = check_range("random-resized-crop.ratio", rrc.ratio, 1e-6, 1e6)?;
            return Ok(Geometry::RandomResizedCrop {
                height,
                width,
                scale,
                log_ratio: [ratio[0].ln(), ratio[1].ln()],
            });
        }
        let resize = cfg
            .resize
            .as_ref()
            .map(|r| -> Result<ResizeSpec, AugmentConfigError> {
                let (h, w) = check_size("resize.size", r.size)?;
                Ok(match r.size {
                    Size::Square(_) => ResizeSpec::Shorter(h),
                    Size::HeightWidth(_) => ResizeSpec::Exact {
                        height: h,
                        width: w,
                    },
                })
            })
            .transpose()?;
        let crop = cfg
            .center_crop
            .as_ref()
            .map(|c| check_size("center-crop.size", c.size))
            .transpose()?;
        Ok(Geometry::ResizeCrop { resize, crop })
    }

    /// `(channels, height, width)` of one output sample.
    pub fn output_shape(&self) -> (u32, u32, u32) {
        (self.output.channels, self.height, self.width)
    }

    /// Output element type.
    pub fn out_dtype(&self) -> OutDType {
        self.output.dtype
    }

    /// Whether samples are laid out channels-last (`[H, W, C]`).
    pub fn nhwc(&self) -> bool {
        self.output.layout == Layout::Nhwc
    }

    /// Bytes of one output sample (`C × H × W × dtype size`).
    pub fn sample_bytes(&self) -> usize {
        self.writer.sample_bytes(self.width, self.height)
    }

    /// Per-channel `(mean, std)` on the 0..1 scale when normalising (a single output channel
    /// repeats its values), for tools that undo the normalisation. With `u8` output the
    /// pixels are written raw and these values are only published in the ring's header, for
    /// clients that normalise on the device.
    pub fn mean_std(&self) -> Option<([f32; 3], [f32; 3])> {
        self.mean_std
    }

    /// Whether `other` writes exactly the output this augmenter writes (size, dtype, layout,
    /// channels, normalisation), so both can fill rows of one ring; else what differs.
    pub fn same_output(&self, other: &Augmenter) -> Result<(), String> {
        let mine = (
            self.output_shape(),
            self.out_dtype(),
            self.nhwc(),
            self.mean_std,
        );
        let theirs = (
            other.output_shape(),
            other.out_dtype(),
            other.nhwc(),
            other.mean_std,
        );
        if mine == theirs {
            Ok(())
        } else {
            Err(format!(
                "(channels, height, width) {:?} dtype {:?} nhwc {} normalize {:?} differs from \
                 [augment]'s {:?} {:?} {} {:?}",
                theirs.0, theirs.1, theirs.2, theirs.3, mine.0, mine.1, mine.2, mine.3
            ))
        }
    }

    /// Scratch for this plan (one per worker thread).
    pub fn scratch(&self) -> Scratch {
        Scratch::new(self)
    }

    /// Decodes `bytes` and writes the augmented sample into `out` (exactly
    /// [`Augmenter::sample_bytes`] bytes, in the configured layout). Randomness comes only
    /// from `key`: the same bytes and key give the same output bytes on any thread.
    pub fn process(
        &self,
        bytes: &[u8],
        key: SampleKey,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<(), SampleError> {
        self.process_traced(bytes, key, out, scratch).map(|_| ())
    }

    /// [`process`](Self::process), also returning the random parameters the sample was
    /// generated with (for evaluating augmentations against reported losses).
    pub fn process_traced(
        &self,
        bytes: &[u8],
        key: SampleKey,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<SampleParams, SampleError> {
        let expected = self.sample_bytes();
        if out.len() != expected {
            return Err(SampleError::OutputSize {
                expected,
                got: out.len(),
            });
        }
        let (w, h) = (self.width, self.height);
        let info = scratch.decoder.probe(bytes)?;
        let sampling = self
            .geometry
            .sampling(info.width, info.height, &mut key.rng(Stream::Crop));
        let request = self.decode_request(&info, &sampling);
        let px = scratch.decoder.decode(bytes, &info, request)?;

        // Map the plan (full-resolution displayed pixels) onto the decoded window.
        let fx = f64::from(px.full_width) / f64::from(info.width);
        let fy = f64::from(px.full_height) / f64::from(info.height);
        let v = sampling.view;
        let x0 = ((f64::from(v.x) * fx).floor() as u32).clamp(px.left, px.left + px.width - 1);
        let y0 = ((f64::from(v.y) * fy).floor() as u32).clamp(px.top, px.top + px.height - 1);
        let x1 = ((f64::from(v.x + v.width) * fx).ceil() as u32).clamp(x0 + 1, px.left + px.width);
        let y1 = ((f64::from(v.y + v.height) * fy).ceil() as u32).clamp(y0 + 1, px.top + px.height);
        let view = Rect {
            x: x0 - px.left,
            y: y0 - px.top,
            width: x1 - x0,
            height: y1 - y0,
        };
        let [bx, by, bw, bh] = sampling.src_box;
        let bx = (bx * fx - f64::from(x0)).clamp(0.0, f64::from(view.width));
        let by = (by * fy - f64::from(y0)).clamp(0.0, f64::from(view.height));
        let src_box = [
            bx,
            by,
            (bw * fx).min(f64::from(view.width) - bx),
            (bh * fy).min(f64::from(view.height) - by),
        ];
        let len = w as usize * h as usize * 3;
        scratch.small.resize(len, 0);
        scratch.resampler.resample(
            px.data,
            px.width,
            px.height,
            view,
            src_box,
            &mut scratch.small,
            w,
            h,
            sampling.dst,
        )?;

        let hflip = self
            .horizontal_flip
            .is_some_and(|p| chance(&mut key.rng(Stream::HorizontalFlip), p));
        let vflip = self
            .vertical_flip
            .is_some_and(|p| chance(&mut key.rng(Stream::VerticalFlip), p));
        // A policy's shears and translations do not commute with flips: the policy sees the
        // flipped image. Its operations read through pending flips (`ops::OpScratch::flip`),
        // so the flips cost a pass only before a rotation or zoom.
        let early_flip = self.policy.is_some() && (hflip || vflip);
        let pending = early_flip && self.rotate.is_none() && self.random_scale.is_none();
        if early_flip && !pending {
            flip_in_place(
                &mut scratch.small[..len],
                w as usize,
                h as usize,
                hflip,
                vflip,
            );
        }
        scratch.ops.flip = [pending && hflip, pending && vflip];
        let mut params = self.post_geometry(key, !early_flip && hflip != vflip, scratch);
        // Flips still to apply: the late ones, or those the policy left pending.
        let [hflip_out, vflip_out] = if early_flip {
            std::mem::take(&mut scratch.ops.flip)
        } else {
            [hflip, vflip]
        };
        match scratch.ops.lut.take() {
            Some(map) => self.writer.write_mapped(
                &mut scratch.small[..len],
                w,
                h,
                hflip_out,
                vflip_out,
                &map,
                &mut scratch.write_table,
                out,
            ),
            None => self
                .writer
                .write(&scratch.small[..len], w, h, hflip_out, vflip_out, out),
        }
        if let Some(e) = &self.eraser {
            let (c, _, _) = self.output_shape();
            params.erased = e
                .apply(
                    key,
                    out,
                    c as usize,
                    h as usize,
                    w as usize,
                    self.output.dtype,
                    self.output.layout,
                )
                .map(|(t, l, eh, ew)| [t as u32, l as u32, eh as u32, ew as u32]);
        }
        let source_area = f64::from(info.width) * f64::from(info.height);
        params.crop_area = (sampling.src_box[2] * sampling.src_box[3] / source_area) as f32;
        params.crop_aspect = (sampling.src_box[2] / sampling.src_box[3]) as f32;
        params.hflip = hflip;
        params.vflip = vflip;
        Ok(params)
    }

    /// Region and DCT scale to decode: the plan's view, at the largest reduction that leaves
    /// the source box at least twice the output size per side (so the antialiased resize
    /// still averages several source pixels per output pixel).
    fn decode_request(
        &self,
        info: &crate::decode::ImageInfo,
        sampling: &geometry::Sampling,
    ) -> DecodeRequest {
        if !self.roi_decode || !info.supports_roi() {
            return DecodeRequest::FULL;
        }
        let scale = if self.dct_scaling {
            DecodeRequest::largest_scale(
                sampling.src_box[2] as u32,
                sampling.src_box[3] as u32,
                2.0 * f64::from(sampling.dst.width),
                2.0 * f64::from(sampling.dst.height),
            )
        } else {
            crate::decode::Scale::ONE
        };
        DecodeRequest {
            region: Some(sampling.view),
            scale,
        }
    }

    /// Rotation/zoom, the policy, colour jitter, grayscale and blur on the output-size image in
    /// `scratch.small`. `mirrored`: exactly one flip will be applied afterwards, so the
    /// rotation turns the other way. The policy may leave a table and flips pending in
    /// `scratch.ops` (for the write) when nothing after it reads pixels.
    fn post_geometry(&self, key: SampleKey, mirrored: bool, scratch: &mut Scratch) -> SampleParams {
        let mut params = SampleParams::default();
        let (w, h) = (self.width, self.height);
        let len = w as usize * h as usize * 3;
        let mut degrees = 0.0;
        let mut fill = [0u8; 3];
        if let Some(r) = &self.rotate {
            let mut rng = key.rng(Stream::Rotate);
            if chance(&mut rng, r.p) {
                degrees = uniform(&mut rng, r.degrees[0], r.degrees[1]);
                if mirrored {
                    degrees = -degrees;
                }
            }
            fill = r.fill;
        }
        let mut zoom = 1.0;
        if let Some(s) = &self.random_scale {
            let mut rng = key.rng(Stream::Scale);
            if chance(&mut rng, s.p) {
                zoom = uniform(&mut rng, s.range[0], s.range[1]);
            }
        }
        if degrees != 0.0 || zoom != 1.0 {
            scratch.small2.resize(len, 0);
            warp::rotate_zoom(
                &scratch.small[..len],
                &mut scratch.small2[..len],
                w,
                h,
                degrees,
                zoom,
                fill,
            );
            std::mem::swap(&mut scratch.small, &mut scratch.small2);
        }
        params.rotation = degrees as f32;
        params.zoom = zoom as f32;
        if let Some(policy) = &self.policy {
            scratch.small.truncate(len);
            params.policy_ops = policy.apply(
                key,
                &mut scratch.small,
                w as usize,
                h as usize,
                &mut scratch.ops,
            );
            // Later operations read real pixels; else the pending table and flips ride on the
            // write.
            if self.jitter.is_some() || self.grayscale.is_some() || self.blur.is_some() {
                scratch.ops.materialise(&mut scratch.small[..len]);
                let [hflip, vflip] = std::mem::take(&mut scratch.ops.flip);
                flip_in_place(
                    &mut scratch.small[..len],
                    w as usize,
                    h as usize,
                    hflip,
                    vflip,
                );
            }
        }
        let img = &mut scratch.small[..len];
        if let Some(j) = &self.jitter {
            let mut rng = key.rng(Stream::ColorJitter);
            if chance(&mut rng, j.p) {
                // All four factors are drawn (fixed order) whether configured or not, so
                // enabling one never changes another's value.
                let mut draw = |r: Option<[f64; 2]>| {
                    let u = uniform(&mut rng, 0.0, 1.0);
                    r.map(|[lo, hi]| (lo + (hi - lo) * u) as f32)
                };
                let (b, c, s, hue) = (
                    draw(j.brightness),
                    draw(j.contrast),
                    draw(j.saturation),
                    draw(j.hue),
                );
                params.brightness = b;
                params.contrast = c;
                params.saturation = s;
                params.hue = hue;
                if let Some(b) = b {
                    color::brightness(img, b);
                }
                if let Some(c) = c {
                    color::contrast(img, c);
                }
                if let Some(s) = s {
                    color::saturation(img, s);
                }
                if let Some(hue) = hue {
                    color::hue(img, hue);
                }
            }
        }
        if let Some(p) = self.grayscale {
            if chance(&mut key.rng(Stream::Grayscale), p) {
                color::grayscale(img);
            }
        }
        if let Some(b) = &self.blur {
            let mut rng = key.rng(Stream::Blur);
            if chance(&mut rng, b.p) {
                let sigma = uniform(&mut rng, b.sigma[0], b.sigma[1]);
                blur::gaussian_blur(
                    img,
                    w,
                    h,
                    b.kernel,
                    sigma,
                    &mut scratch.blur_tmp,
                    &mut scratch.blur_kernel,
                );
            }
        }
        params
    }
}

/// Flips the `w × h` RGB8 image in place.
fn flip_in_place(img: &mut [u8], w: usize, h: usize, hflip: bool, vflip: bool) {
    if hflip {
        for row in img.chunks_exact_mut(w * 3) {
            // Reversing the bytes reverses the pixels and each pixel's channels: swap back.
            row.reverse();
            for p in row.chunks_exact_mut(3) {
                p.swap(0, 2);
            }
        }
    }
    if vflip {
        for y in 0..h / 2 {
            let (top, bottom) = img.split_at_mut((h - 1 - y) * w * 3);
            top[y * w * 3..(y + 1) * w * 3].swap_with_slice(&mut bottom[..w * 3]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/coffee_420.jpg"
        ))
        .unwrap()
    }

    fn run(cfg: &AugmentConfig) -> Vec<u8> {
        let aug = Augmenter::new(cfg).unwrap();
        let mut out = vec![0u8; aug.sample_bytes()];
        let key = SampleKey {
            seed: 0,
            epoch: 0,
            sample_id: 0,
        };
        aug.process(&fixture(), key, &mut out, &mut aug.scratch())
            .unwrap();
        out
    }

    /// Flips are applied last with the rotation mirrored; the result must equal flipping
    /// first and rotating after, as the configured order says.
    #[test]
    fn late_flip_with_mirrored_rotation_equals_flip_then_rotate() {
        let base = AugmentConfig {
            center_crop: Some(CenterCropConfig {
                size: Size::HeightWidth([40, 60]),
            }),
            output: OutputConfig {
                dtype: OutDType::U8,
                layout: Layout::Nhwc,
                channels: 3,
            },
            ..AugmentConfig::default()
        };
        let plain = run(&base);
        let (w, h) = (60usize, 40usize);
        for (hflip, vflip) in [(true, false), (false, true), (true, true)] {
            let cfg = AugmentConfig {
                horizontal_flip: hflip.then_some(FlipConfig { p: 1.0 }),
                vertical_flip: vflip.then_some(FlipConfig { p: 1.0 }),
                rotate: Some(RotateConfig {
                    degrees: [17.0, 17.0],
                    fill: [1, 2, 3],
                    p: 1.0,
                }),
                ..base.clone()
            };
            let got = run(&cfg);
            let mut flipped = vec![0u8; plain.len()];
            for y in 0..h {
                for x in 0..w {
                    let sx = if hflip { w - 1 - x } else { x };
                    let sy = if vflip { h - 1 - y } else { y };
                    flipped[(y * w + x) * 3..][..3]
                        .copy_from_slice(&plain[(sy * w + sx) * 3..][..3]);
                }
            }
            let mut expected = vec![0u8; plain.len()];
            warp::rotate_zoom(&flipped, &mut expected, 60, 40, 17.0, 1.0, [1, 2, 3]);
            assert_eq!(got, expected, "hflip {hflip} vflip {vflip}");
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    /// Bad policy and erasing values are refused naming the key.
    #[test]
    fn bad_policy_and_erasing_values_name_their_key() {
        let base = AugmentConfig {
            center_crop: Some(CenterCropConfig {
                size: Size::Square(8),
            }),
            ..AugmentConfig::default()
        };
        let rand = |m, bins, m_std| RandAugmentConfig {
            n: 2,
            m,
            m_std,
            bins,
            fill: [0; 3],
        };
        let erasing = |value| RandomErasingConfig {
            p: 0.25,
            scale: [0.02, 0.33],
            ratio: [0.3, 3.3],
            value,
        };
        let cases = [
            (
                AugmentConfig {
                    rand_augment: Some(rand(9, 31, 0.0)),
                    trivial_augment: Some(TrivialAugmentConfig {
                        bins: 31,
                        fill: [0; 3],
                    }),
                    ..base.clone()
                },
                "rand-augment cannot be combined with trivial-augment",
            ),
            (
                AugmentConfig {
                    rand_augment: Some(rand(31, 31, 0.0)),
                    ..base.clone()
                },
                "rand-augment.m",
            ),
            (
                AugmentConfig {
                    rand_augment: Some(rand(9, 31, -1.0)),
                    ..base.clone()
                },
                "rand-augment.m-std",
            ),
            (
                AugmentConfig {
                    trivial_augment: Some(TrivialAugmentConfig {
                        bins: 1,
                        fill: [0; 3],
                    }),
                    ..base.clone()
                },
                "trivial-augment.bins",
            ),
            (
                AugmentConfig {
                    random_erasing: Some(erasing(ErasingValue::default())),
                    output: OutputConfig {
                        dtype: OutDType::U8,
                        ..OutputConfig::default()
                    },
                    ..base.clone()
                },
                "random-erasing: needs a float output.dtype",
            ),
            (
                AugmentConfig {
                    random_erasing: Some(erasing(ErasingValue::Named("noise".into()))),
                    ..base.clone()
                },
                "random-erasing.value",
            ),
            (
                AugmentConfig {
                    random_erasing: Some(erasing(ErasingValue::Values(vec![1.0, 2.0]))),
                    ..base.clone()
                },
                "random-erasing.value",
            ),
        ];
        for (cfg, want) in cases {
            let err = Augmenter::new(&cfg).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    /// With a policy, the output equals: crop, flip, then the policy's operations one by one
    /// on real pixels, then the write. Checks the early flip and the table folded into the
    /// write (u8 and normalised f32, both layouts, one channel).
    #[test]
    fn fused_policy_equals_flip_then_operations_then_write() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/coffee_420.jpg"
        ))
        .unwrap();
        let base = AugmentConfig {
            center_crop: Some(CenterCropConfig {
                size: Size::HeightWidth([36, 52]),
            }),
            output: OutputConfig {
                dtype: OutDType::U8,
                layout: Layout::Nhwc,
                channels: 3,
            },
            ..AugmentConfig::default()
        };
        let plain = Augmenter::new(&base).unwrap();
        let mut pixels = vec![0u8; plain.sample_bytes()];
        let key0 = SampleKey {
            seed: 0,
            epoch: 0,
            sample_id: 0,
        };
        plain
            .process(&bytes, key0, &mut pixels, &mut plain.scratch())
            .unwrap();
        let normalize = NormalizeConfig {
            mean: vec![0.5, 0.4, 0.3],
            std: vec![0.2, 0.25, 0.3],
        };
        for (dtype, layout, channels) in [
            (OutDType::U8, Layout::Nhwc, 3),
            (OutDType::F32, Layout::Nchw, 3),
            (OutDType::F32, Layout::Nhwc, 1),
        ] {
            let cfg = AugmentConfig {
                horizontal_flip: Some(FlipConfig { p: 0.5 }),
                vertical_flip: Some(FlipConfig { p: 0.5 }),
                trivial_augment: Some(TrivialAugmentConfig {
                    bins: 31,
                    fill: [3, 2, 1],
                }),
                normalize: (dtype != OutDType::U8).then(|| NormalizeConfig {
                    mean: normalize.mean[..channels as usize].to_vec(),
                    std: normalize.std[..channels as usize].to_vec(),
                }),
                output: OutputConfig {
                    dtype,
                    layout,
                    channels,
                },
                ..base.clone()
            };
            let aug = Augmenter::new(&cfg).unwrap();
            let mut scratch = aug.scratch();
            for id in 0..40 {
                let key = SampleKey {
                    seed: 9,
                    epoch: 0,
                    sample_id: id,
                };
                let mut got = vec![0u8; aug.sample_bytes()];
                let params = aug
                    .process_traced(&bytes, key, &mut got, &mut scratch)
                    .unwrap();
                let mut img = pixels.clone();
                flip_in_place(&mut img, 52, 36, params.hflip, params.vflip);
                let mut ops = OpScratch::default();
                let trace = aug
                    .policy
                    .as_ref()
                    .unwrap()
                    .apply(key, &mut img, 52, 36, &mut ops);
                assert_eq!(trace, params.policy_ops);
                ops.materialise(&mut img);
                let mut want = vec![0u8; aug.sample_bytes()];
                aug.writer.write(&img, 52, 36, false, false, &mut want);
                assert_eq!(
                    got, want,
                    "{dtype:?} {layout:?} {channels} sample {id} {trace:?}"
                );
            }
        }
    }
}

#[cfg(test)]
mod thread_tests {
    /// Workers own a `Scratch` (possibly built on another thread) and share `&Augmenter`.
    #[test]
    fn scratch_is_send_and_augmenter_is_sync() {
        fn send<T: Send>() {}
        fn sync<T: Sync + Send>() {}
        send::<super::Scratch>();
        sync::<super::Augmenter>();
    }
}
