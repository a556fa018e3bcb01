//! PNG and WebP through the `image` crate: header probing and decoding into RGB8, whatever the
//! stored colour type (gray, gray+alpha, RGBA, palette, 16-bit). Alpha is dropped (not
//! composited) and 16-bit samples keep their high byte, as Pillow's `convert("RGB")` does for
//! RGB data.

use std::io::Cursor;

use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::{ColorType, ImageDecoder};

use super::{DecodeError, ImageFormat, Orientation};

/// Stored size and EXIF orientation of a PNG or WebP image.
pub(crate) struct Header {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) orientation: Orientation,
}

fn codec_error(err: image::ImageError) -> DecodeError {
    match err {
        image::ImageError::Unsupported(e) => DecodeError::Unsupported {
            what: e.to_string(),
        },
        other => DecodeError::Corrupt {
            message: other.to_string(),
        },
    }
}

/// Reads the header only: no pixel data is decoded or allocated.
pub(crate) fn probe(format: ImageFormat, bytes: &[u8]) -> Result<Header, DecodeError> {
    fn header(mut d: impl ImageDecoder) -> Header {
        let (width, height) = d.dimensions();
        let orientation = d.orientation().map_or(Orientation::Normal, |o| {
            Orientation::from_exif(o.to_exif().into())
        });
        Header {
            width,
            height,
            orientation,
        }
    }
    match format {
        ImageFormat::Png => match PngDecoder::new(Cursor::new(bytes)) {
            Ok(decoder) => Ok(header(decoder)),
            // The image crate refuses a huge declared size from the header (its own memory
            // limit); report that size, so the caller refuses it as too large for its limit.
            Err(image::ImageError::Limits(e)) => {
                png_declared_size(bytes).ok_or(DecodeError::Unsupported {
                    what: e.to_string(),
                })
            }
            Err(e) => Err(codec_error(e)),
        },
        ImageFormat::WebP => Ok(header(
            WebPDecoder::new(Cursor::new(bytes)).map_err(codec_error)?,
        )),
        ImageFormat::Jpeg => Err(DecodeError::Internal {
            message: "JPEG routed to the image crate".to_owned(),
        }),
    }
}

/// Width and height from a PNG's IHDR chunk (which the signature must be followed by).
fn png_declared_size(bytes: &[u8]) -> Option<Header> {
    let be = |at: usize| Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    (bytes.get(12..16)? == b"IHDR").then_some(())?;
    Some(Header {
        width: be(16)?,
        height: be(20)?,
        orientation: Orientation::Normal,
    })
}

/// Decodes the whole image into `rgb` (resized to `width * height * 3`), using `raw` for the
/// stored colour type when that is not RGB8. Returns the stored `(width, height)`.
pub(crate) fn decode_rgb(
    format: ImageFormat,
    bytes: &[u8],
    raw: &mut Vec<u8>,
    rgb: &mut Vec<u8>,
) -> Result<(u32, u32), DecodeError> {
    match format {
        ImageFormat::Png => decode_with(
            PngDecoder::new(Cursor::new(bytes)).map_err(codec_error)?,
            raw,
            rgb,
        ),
        ImageFormat::WebP => decode_with(
            WebPDecoder::new(Cursor::new(bytes)).map_err(codec_error)?,
            raw,
            rgb,
        ),
        ImageFormat::Jpeg => Err(DecodeError::Internal {
            message: "JPEG routed to the image crate".to_owned(),
        }),
    }
}

fn decode_with(
    decoder: impl ImageDecoder,
    raw: &mut Vec<u8>,
    rgb: &mut Vec<u8>,
) -> Result<(u32, u32), DecodeError> {
    let (width, height) = decoder.dimensions();
    let colour = decoder.color_type();
    let pixels = width as usize * height as usize;
    let rgb = super::grown(rgb, pixels * 3);
    if colour == ColorType::Rgb8 {
        decoder.read_image(rgb).map_err(codec_error)?;
        return Ok((width, height));
    }
    let raw = super::grown(raw, decoder.total_bytes() as usize);
    decoder.read_image(raw).map_err(codec_error)?;
    let channels = usize::from(colour.channel_count());
    match colour {
        ColorType::L8 | ColorType::La8 | ColorType::Rgba8 => {
            for (src, dst) in raw.chunks_exact(channels).zip(rgb.chunks_exact_mut(3)) {
                if channels >= 3 {
                    dst.copy_from_slice(&src[..3]);
                } else {
                    dst.fill(src[0]);
                }
            }
        }
        ColorType::L16 | ColorType::La16 | ColorType::Rgb16 | ColorType::Rgba16 => {
            let high = |s: &[u8]| (u16::from_ne_bytes([s[0], s[1]]) >> 8) as u8;
            for (src, dst) in raw.chunks_exact(channels * 2).zip(rgb.chunks_exact_mut(3)) {
                if channels >= 3 {
                    for c in 0..3 {
                        dst[c] = high(&src[c * 2..]);
                    }
                } else {
                    dst.fill(high(src));
                }
            }
        }
        other => {
            return Err(DecodeError::Unsupported {
                what: format!("colour type {other:?}"),
            })
        }
    }
    Ok((width, height))
}
