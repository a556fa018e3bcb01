//! Decode stage: encoded bytes → RGB8 pixels, decoding only the region and scale the
//! augmentation plan needs.
//!
//! # Brief overview
//!
//! - [`ImageFormat::detect`] recognises JPEG, PNG and WebP by their magic bytes.
//! - [`Decoder::probe`] reads only the header: displayed size (after EXIF orientation),
//!   format; images over the pixel limit are refused here, before anything is allocated.
//! - [`Decoder::decode`] decodes into the decoder's reusable buffer. For JPEGs it honours a
//!   [`DecodeRequest`]: a region of interest (libjpeg-turbo skips the columns outside it and
//!   the rows below it) and a DCT scaling factor, in any EXIF orientation: the displayed
//!   region is mapped onto stored pixels, decoded, then turned upright. The returned
//!   [`Pixels`] says which part of which scaled, upright image it holds, so callers map their
//!   coordinates through it.
//! - JPEG goes through libjpeg-turbo (`turbo.rs`, the decoder's only FFI and its only `unsafe`); PNG and WebP through
//!   the `image` crate (`codecs.rs`); EXIF orientation is parsed in `exif.rs`.

mod codecs;
mod error;
mod exif;
mod jpeg;
mod markers;
mod turbo;

pub use error::DecodeError;
pub use exif::Orientation;
pub use turbo::Scale;

use turbo::{JpegHeader, TurboHandle};

/// Default limit on decoded pixels (64 megapixels), a guard against decompression bombs.
pub const DEFAULT_MAX_PIXELS: u64 = 64_000_000;

/// An encoded image format, recognised from magic bytes (never from a file name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// JPEG (`FF D8 FF`).
    Jpeg,
    /// PNG (`89 50 4E 47 0D 0A 1A 0A`).
    Png,
    /// WebP (`RIFF .... WEBP`).
    WebP,
}

impl ImageFormat {
    /// The format of `bytes`, from their first bytes.
    pub fn detect(bytes: &[u8]) -> Result<ImageFormat, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Ok(ImageFormat::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Ok(ImageFormat::Png)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Ok(ImageFormat::WebP)
        } else {
            Err(DecodeError::UnknownFormat {
                head: bytes[..bytes.len().min(8)].to_vec(),
            })
        }
    }
}

/// A rectangle in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// What [`Decoder::probe`] learns from a header.
#[derive(Clone, Copy, Debug)]
pub struct ImageInfo {
    /// The format.
    pub format: ImageFormat,
    /// Displayed width (after EXIF orientation).
    pub width: u32,
    /// Displayed height (after EXIF orientation).
    pub height: u32,
    /// The EXIF orientation applied by [`Decoder::decode`].
    pub orientation: Orientation,
    jpeg: Option<JpegHeader>,
}

impl ImageInfo {
    /// Whether [`Decoder::decode`] can honour a region and a scale for this image (JPEGs, in
    /// any EXIF orientation); otherwise it decodes the whole image at full size.
    pub fn supports_roi(&self) -> bool {
        self.jpeg.is_some()
    }
}

/// Which part of an image to decode, and at which DCT scale.
#[derive(Clone, Copy, Debug)]
pub struct DecodeRequest {
    /// Region of interest in full-size displayed pixels; `None` for the whole image. The
    /// decoder may return more than this (the left edge is aligned to the JPEG's iMCU).
    pub region: Option<Rect>,
    /// DCT scaling factor; see [`DecodeRequest::largest_scale`].
    pub scale: Scale,
}

impl DecodeRequest {
    /// The whole image at full size.
    pub const FULL: DecodeRequest = DecodeRequest {
        region: None,
        scale: Scale::ONE,
    };

    /// The smallest of 1/8, 1/4, 1/2, 1/1 that keeps a `width × height` region at least
    /// `min_width × min_height` pixels after scaling.
    pub fn largest_scale(width: u32, height: u32, min_width: f64, min_height: f64) -> Scale {
        for denom in [8, 4, 2] {
            let s = Scale { num: 1, denom };
            if f64::from(width) / f64::from(denom) >= min_width
                && f64::from(height) / f64::from(denom) >= min_height
            {
                return s;
            }
        }
        Scale::ONE
    }
}

/// Decoded RGB8 pixels: a `width × height` window at (`left`, `top`) of the image scaled to
/// `full_width × full_height`.
#[derive(Debug)]
pub struct Pixels<'a> {
    /// Tightly packed RGB8 rows.
    pub data: &'a [u8],
    /// Width of `data` in pixels.
    pub width: u32,
    /// Height of `data` in pixels.
    pub height: u32,
    /// Left edge of `data` in the scaled image.
    pub left: u32,
    /// Top edge of `data` in the scaled image.
    pub top: u32,
    /// Width of the whole scaled image.
    pub full_width: u32,
    /// Height of the whole scaled image.
    pub full_height: u32,
    /// The DCT scale that was applied.
    pub scale: Scale,
}

/// A reusable decoder: one per worker thread. Holds the libjpeg-turbo instance and buffers, so
/// that decoding a JPEG allocates nothing once the buffers have grown to the largest image.
pub struct Decoder {
    max_pixels: u64,
    turbo: Option<TurboHandle>,
    rgb: Vec<u8>,
    aux: Vec<u8>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("max_pixels", &self.max_pixels)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder refusing images of more than `max_pixels` pixels.
    pub fn new(max_pixels: u64) -> Decoder {
        Decoder {
            max_pixels,
            turbo: None,
            rgb: Vec::new(),
            aux: Vec::new(),
        }
    }

    /// The pixel limit.
    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    fn turbo(&mut self) -> Result<&mut TurboHandle, DecodeError> {
        if self.turbo.is_none() {
            self.turbo = Some(TurboHandle::new(self.max_pixels)?);
        }
        self.turbo.as_mut().ok_or(DecodeError::Init)
    }

    /// Drops the libjpeg-turbo instance when `result` is an error, so the next image gets a
    /// fresh one: a header that fails to parse can leave the instance mid-header, and the next,
    /// valid JPEG then fails with "two SOI markers".
    fn forget_turbo_on_error<T>(
        &mut self,
        result: Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        if result.is_err() {
            self.turbo = None;
        }
        result
    }

    /// Reads the header of `bytes`; refuses images over the pixel limit with
    /// [`DecodeError::TooLarge`] before any pixel memory is allocated.
    pub fn probe(&mut self, bytes: &[u8]) -> Result<ImageInfo, DecodeError> {
        let format = ImageFormat::detect(bytes)?;
        let (stored_w, stored_h, orientation, jpeg) = match format {
            ImageFormat::Jpeg => {
                let header = self.turbo()?.read_header(bytes);
                let header = self.forget_turbo_on_error(header)?;
                (
                    header.width,
                    header.height,
                    exif::jpeg_orientation(bytes),
                    Some(header),
                )
            }
            ImageFormat::Png | ImageFormat::WebP => {
                let h = codecs::probe(format, bytes)?;
                (h.width, h.height, h.orientation, None)
            }
        };
        if u64::from(stored_w) * u64::from(stored_h) > self.max_pixels {
            return Err(DecodeError::TooLarge {
                width: stored_w,
                height: stored_h,
                limit: self.max_pixels,
            });
        }
        if stored_w == 0 || stored_h == 0 {
            return Err(DecodeError::Corrupt {
                message: format!("image declares {stored_w}x{stored_h} pixels"),
            });
        }
        let (width, height) = orientation.display_dims(stored_w, stored_h);
        Ok(ImageInfo {
            format,
            width,
            height,
            orientation,
            jpeg,
        })
    }

    /// Decodes `bytes` (whose header `info` came from [`Decoder::probe`]) as `request` asks,
    /// where supported (see [`ImageInfo::supports_roi`]); otherwise the whole image.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        info: &ImageInfo,
        request: DecodeRequest,
    ) -> Result<Pixels<'_>, DecodeError> {
        match info.jpeg {
            Some(header) => self.decode_jpeg(bytes, info, &header, request),
            None => {
                let (w, h) = codecs::decode_rgb(info.format, bytes, &mut self.aux, &mut self.rgb)?;
                let whole = Rect {
                    x: 0,
                    y: 0,
                    width: w,
                    height: h,
                };
                Ok(self.orient(info.orientation, whole, (w, h), Scale::ONE))
            }
        }
    }

    fn decode_jpeg(
        &mut self,
        bytes: &[u8],
        info: &ImageInfo,
        header: &JpegHeader,
        request: DecodeRequest,
    ) -> Result<Pixels<'_>, DecodeError> {
        let orientation = info.orientation;
        let scale = request.scale;
        // The request is in displayed pixels; libjpeg-turbo crops stored pixels.
        let region = request
            .region
            .and_then(|r| orientation.stored_rect(r, header.width, header.height))
            .and_then(|r| jpeg::aligned_region(header, scale, r));
        // Reading the header again resets the cropping region and makes the handle's state
        // belong to these bytes, whatever was probed in between.
        let turbo = self.turbo.as_mut().ok_or(DecodeError::Init)?;
        let decoded = turbo.read_header(bytes).and_then(|header| {
            jpeg::decode(
                turbo,
                bytes,
                &header,
                scale,
                region,
                &mut self.rgb,
                &mut self.aux,
            )
            .map(|out| (header, out))
        });
        let (header, out) = self.forget_turbo_on_error(decoded)?;
        let window = Rect {
            x: out.left,
            y: out.top,
            width: out.width,
            height: out.height,
        };
        let full = (scale.apply(header.width), scale.apply(header.height));
        Ok(self.orient(orientation, window, full, scale))
    }

    /// Turns the decoded `window` of a stored image of `full` (width, height) pixels, held in
    /// `self.rgb`, upright per `orientation` and describes it in displayed coordinates.
    fn orient(
        &mut self,
        orientation: Orientation,
        window: Rect,
        full: (u32, u32),
        scale: Scale,
    ) -> Pixels<'_> {
        let len = window.width as usize * window.height as usize * 3;
        if orientation != Orientation::Normal {
            grown(&mut self.aux, len);
            exif::apply(
                orientation,
                &self.rgb[..len],
                window.width,
                window.height,
                &mut self.aux[..len],
            );
            std::mem::swap(&mut self.rgb, &mut self.aux);
        }
        let shown = orientation.displayed_rect(window, full.0, full.1);
        let (full_width, full_height) = orientation.display_dims(full.0, full.1);
        Pixels {
            data: &self.rgb[..len],
            width: shown.width,
            height: shown.height,
            left: shown.x,
            top: shown.y,
            full_width,
            full_height,
            scale,
        }
    }
}

/// The first `len` bytes of `buf`, growing it when shorter. Never shrinks, so a worker's
/// buffers settle at the largest image and are not cleared again for smaller ones.
fn grown(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// A whole decoded image, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Tightly packed RGB8 rows.
    pub data: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Decodes the whole of `bytes` (JPEG, PNG or WebP) to upright RGB8 — a convenience for tools
/// and tests; workers keep a [`Decoder`] instead.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    decode_request(bytes, max_pixels, DecodeRequest::FULL)
}

/// Like [`decode`], with a region of interest and a scale; returns exactly the requested
/// region (clipped to the image), cut from what the decoder produced.
pub fn decode_request(
    bytes: &[u8],
    max_pixels: u64,
    request: DecodeRequest,
) -> Result<RgbImage, DecodeError> {
    let mut decoder = Decoder::new(max_pixels);
    let info = decoder.probe(bytes)?;
    let px = decoder.decode(bytes, &info, request)?;
    let want = match request.region {
        None => Rect {
            x: px.left,
            y: px.top,
            width: px.width,
            height: px.height,
        },
        Some(r) => {
            let s = px.scale;
            let x0 = (u64::from(r.x) * u64::from(s.num) / u64::from(s.denom)) as u32;
            let y0 = (u64::from(r.y) * u64::from(s.num) / u64::from(s.denom)) as u32;
            let x1 = s.apply(r.x + r.width).min(px.full_width);
            let y1 = s.apply(r.y + r.height).min(px.full_height);
            Rect {
                x: x0,
                y: y0,
                width: x1.saturating_sub(x0),
                height: y1.saturating_sub(y0),
            }
        }
    };
    let mut data = Vec::with_capacity(want.width as usize * want.height as usize * 3);
    for y in want.y..want.y + want.height {
        let row = (y - px.top) as usize * px.width as usize * 3;
        let from = row + (want.x - px.left) as usize * 3;
        data.extend_from_slice(&px.data[from..from + want.width as usize * 3]);
    }
    Ok(RgbImage {
        data,
        width: want.width,
        height: want.height,
    })
}
