//! The `[augment]` table of the configuration, as serde data. Checked once by
//! [`Augmenter::new`](super::Augmenter::new); nothing here is validated.
//!
//! ```toml
//! [augment]
//! max-pixels = 64000000          # decode limit (decompression bombs)
//! roi-decode = true              # JPEG: decode only the region the crop reads
//! dct-scaling = true             # JPEG DCT-domain downscaling when the crop is ≥ 2× the output
//! random-resized-crop = { size = 224, scale = [0.08, 1.0], ratio = [0.75, 1.3333333] }
//! horizontal-flip = { p = 0.5 }
//! normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }
//! output = { dtype = "f32", layout = "nchw", channels = 3 }
//! ```

use serde::{Deserialize, Serialize};

/// A size: one number for a square, or `[height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// `size × size`.
    Square(u32),
    /// `[height, width]`.
    HeightWidth([u32; 2]),
}

impl Size {
    /// `(height, width)`.
    pub fn height_width(self) -> (u32, u32) {
        match self {
            Size::Square(s) => (s, s),
            Size::HeightWidth([h, w]) => (h, w),
        }
    }
}

/// A jitter amount: `x` means the range `[max(0, 1 - x), 1 + x]` (or `[-x, x]` for hue), or an
/// explicit `[min, max]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Jitter {
    /// Symmetric amount.
    Amount(f64),
    /// Explicit `[min, max]`.
    Range([f64; 2]),
}

/// Configuration of the augmentation stage (the `[augment]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AugmentConfig {
    /// Images with more pixels than this are refused from their header (default 64,000,000).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Decode only the region of a JPEG that the geometry reads (default true). Output is
    /// identical either way (see `tests/augment_golden.rs`); off only for comparisons.
    #[serde(default = "default_true")]
    pub roi_decode: bool,
    /// Let libjpeg-turbo downscale in the DCT domain (1/2, 1/4, 1/8) when the scaled crop still
    /// has at least twice the output's pixels per side (default true). Faster for large photos;
    /// output then differs slightly from a full-resolution decode.
    #[serde(default = "default_true")]
    pub dct_scaling: bool,
    /// torchvision `RandomResizedCrop`.
    #[serde(default)]
    pub random_resized_crop: Option<RandomResizedCropConfig>,
    /// torchvision `Resize` (antialiased bilinear).
    #[serde(default)]
    pub resize: Option<ResizeConfig>,
    /// torchvision `CenterCrop` (zero padding when larger than the image).
    #[serde(default)]
    pub center_crop: Option<CenterCropConfig>,
    /// torchvision `RandomHorizontalFlip`.
    #[serde(default)]
    pub horizontal_flip: Option<FlipConfig>,
    /// torchvision `RandomVerticalFlip`.
    #[serde(default)]
    pub vertical_flip: Option<FlipConfig>,
    /// Random rotation about the centre, same size, bilinear, constant fill.
    #[serde(default)]
    pub rotate: Option<RotateConfig>,
    /// Random zoom about the centre, same size, bilinear, constant fill (shares the rotation's
    /// fill and warp).
    #[serde(default)]
    pub random_scale: Option<RandomScaleConfig>,
    /// torchvision `ColorJitter`, applied in the fixed order brightness, contrast, saturation,
    /// hue.
    #[serde(default)]
    pub color_jitter: Option<ColorJitterConfig>,
    /// torchvision `RandomGrayscale` (three equal channels).
    #[serde(default)]
    pub grayscale: Option<GrayscaleConfig>,
    /// torchvision `GaussianBlur`, applied with probability `p`.
    #[serde(default)]
    pub gaussian_blur: Option<GaussianBlurConfig>,
    /// torchvision `Normalize` on values scaled to 0..1: `(x / 255 - mean) / std`.
    #[serde(default)]
    pub normalize: Option<NormalizeConfig>,
    /// Output tensor element type, layout and channels.
    #[serde(default)]
    pub output: OutputConfig,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            max_pixels: default_max_pixels(),
            roi_decode: true,
            dct_scaling: true,
            random_resized_crop: None,
            resize: None,
            center_crop: None,
            horizontal_flip: None,
            vertical_flip: None,
            rotate: None,
            random_scale: None,
            color_jitter: None,
            grayscale: None,
            gaussian_blur: None,
            normalize: None,
            output: OutputConfig::default(),
        }
    }
}

fn default_max_pixels() -> u64 {
    crate::decode::DEFAULT_MAX_PIXELS
}

fn default_true() -> bool {
    true
}

fn default_half() -> f64 {
    0.5
}

fn default_one() -> f64 {
    1.0
}

/// `random-resized-crop`: crop a random area and aspect ratio, resize to `size`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RandomResizedCropConfig {
    /// Output size.
    pub size: Size,
    /// Range of the crop's area as a fraction of the image (default `[0.08, 1.0]`).
    #[serde(default = "default_rrc_scale")]
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio w/h, drawn log-uniformly (default `[3/4, 4/3]`).
    #[serde(default = "default_rrc_ratio")]
    pub ratio: [f64; 2],
}

fn default_rrc_scale() -> [f64; 2] {
    [0.08, 1.0]
}

fn default_rrc_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}

/// `resize`: shorter side to `size` (keeping the aspect ratio), or exactly `[height, width]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResizeConfig {
    /// One number: the shorter side; `[height, width]`: exact size.
    pub size: Size,
}

/// `center-crop`: the central `size` region.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CenterCropConfig {
    /// Output size.
    pub size: Size,
}

/// `horizontal-flip` / `vertical-flip`: a table `{ p = 0.5 }`, or the bare probability
/// (`horizontal-flip = 0.5`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", remote = "Self")]
pub struct FlipConfig {
    /// Probability of flipping (default 0.5).
    #[serde(default = "default_half")]
    pub p: f64,
}

impl Serialize for FlipConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        FlipConfig::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for FlipConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = FlipConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a probability (e.g. 0.5) or a table { p = 0.5 }")
            }
            fn visit_f64<E>(self, p: f64) -> Result<FlipConfig, E> {
                Ok(FlipConfig { p })
            }
            fn visit_i64<E>(self, p: i64) -> Result<FlipConfig, E> {
                Ok(FlipConfig { p: p as f64 })
            }
            fn visit_u64<E>(self, p: u64) -> Result<FlipConfig, E> {
                Ok(FlipConfig { p: p as f64 })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FlipConfig, A::Error> {
                FlipConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_any(Either)
    }
}

/// `rotate`: rotate by a random angle (degrees, counter-clockwise) drawn from `degrees`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RotateConfig {
    /// `[min, max]` angle in degrees.
    pub degrees: [f64; 2],
    /// RGB value (0..255) of pixels rotated in from outside (default black).
    #[serde(default)]
    pub fill: [u8; 3],
    /// Probability of rotating (default 1).
    #[serde(default = "default_one")]
    pub p: f64,
}

/// `random-scale`: zoom by a factor drawn from `range` (> 1 zooms in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RandomScaleConfig {
    /// `[min, max]` zoom factor.
    pub range: [f64; 2],
    /// Probability of zooming (default 1).
    #[serde(default = "default_one")]
    pub p: f64,
}

/// `color-jitter`: brightness, contrast, saturation (factors around 1) and hue (shift in
/// turns, within `[-0.5, 0.5]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ColorJitterConfig {
    /// Brightness factor amount or range.
    #[serde(default)]
    pub brightness: Option<Jitter>,
    /// Contrast factor amount or range.
    #[serde(default)]
    pub contrast: Option<Jitter>,
    /// Saturation factor amount or range.
    #[serde(default)]
    pub saturation: Option<Jitter>,
    /// Hue shift amount (≤ 0.5) or range.
    #[serde(default)]
    pub hue: Option<Jitter>,
    /// Probability of applying the jitter at all (default 1).
    #[serde(default = "default_one")]
    pub p: f64,
}

/// `grayscale`: replace the image by its luma in all three channels with probability `p`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GrayscaleConfig {
    /// Probability (default 0.1, as torchvision).
    #[serde(default = "default_gray_p")]
    pub p: f64,
}

fn default_gray_p() -> f64 {
    0.1
}

/// `gaussian-blur`: separable Gaussian, reflect padding, sigma drawn from `sigma`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GaussianBlurConfig {
    /// Odd kernel size.
    pub kernel: u32,
    /// `[min, max]` sigma in pixels (default `[0.1, 2.0]`).
    #[serde(default = "default_sigma")]
    pub sigma: [f64; 2],
    /// Probability (default 0.5).
    #[serde(default = "default_half")]
    pub p: f64,
}

fn default_sigma() -> [f64; 2] {
    [0.1, 2.0]
}

/// `normalize`: per-channel mean and standard deviation, on the 0..1 scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NormalizeConfig {
    /// Per-channel mean (one value per output channel).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation (one value per output channel, > 0).
    pub std: Vec<f32>,
}

/// Output tensor element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDType {
    /// Raw pixels 0..255 (no normalisation).
    U8,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single (default).
    #[default]
    F32,
}

impl OutDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutDType::U8 => 1,
            OutDType::F16 | OutDType::Bf16 => 2,
            OutDType::F32 => 4,
        }
    }
}

/// Output tensor layout per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Channels first: `[C, H, W]` (default).
    #[default]
    Nchw,
    /// Channels last: `[H, W, C]`.
    Nhwc,
}

/// `output`: how the final values are stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutputConfig {
    /// Element type (default `f32`).
    #[serde(default)]
    pub dtype: OutDType,
    /// Layout (default `nchw`).
    #[serde(default)]
    pub layout: Layout,
    /// 3 (RGB, default) or 1 (luma).
    #[serde(default = "default_channels")]
    pub channels: u32,
}

fn default_channels() -> u32 {
    3
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dtype: OutDType::F32,
            layout: Layout::Nchw,
            channels: 3,
        }
    }
}
