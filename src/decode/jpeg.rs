//! JPEG decoding on top of [`turbo`](super::turbo): choosing the aligned region to decode,
//! CMYK/YCCK → RGB, and which libjpeg warnings are fatal.

use super::turbo::{JpegHeader, PixelFormat, Region, Scale, TurboHandle};
use super::{DecodeError, Rect};

/// The part of the scaled image that a decode wrote, tightly packed RGB8.
pub(crate) struct Decoded {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) left: u32,
    pub(crate) top: u32,
}

/// Extra columns decoded right of a region (see [`aligned_region`]).
const RIGHT_MARGIN: u32 = 8;

/// The scaled-image region covering `rect` (given in unscaled pixels), its left edge moved
/// down to a multiple of the scaled iMCU width as libjpeg-turbo requires; `None` when that is
/// the whole image or cropping is not possible.
pub(crate) fn aligned_region(header: &JpegHeader, scale: Scale, rect: Rect) -> Option<Region> {
    let mcu = scale.apply(header.mcu_width?);
    let (sw, sh) = (scale.apply(header.width), scale.apply(header.height));
    let to_scaled_floor =
        |v: u32| (u64::from(v) * u64::from(scale.num) / u64::from(scale.denom)) as u32;
    let x0 = to_scaled_floor(rect.x).min(sw.saturating_sub(1));
    let y0 = to_scaled_floor(rect.y).min(sh.saturating_sub(1));
    // libjpeg's fancy upsampling treats the region's edges as image edges, which changes the
    // first and last chroma-interpolated columns; decoding a few columns more keeps the
    // requested ones identical to a full decode.
    let x1 = (scale.apply(rect.x.saturating_add(rect.width)) + RIGHT_MARGIN).clamp(x0 + 1, sw);
    let y1 = scale
        .apply(rect.y.saturating_add(rect.height))
        .clamp(y0 + 1, sh);
    // Same at the left edge: at least one decoded column of context left of the region.
    let x0 = x0.saturating_sub(1) / mcu * mcu;
    if x0 == 0 && y0 == 0 && x1 == sw && y1 == sh {
        return None;
    }
    Some(Region {
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    })
}

/// Decodes `region` (or all) of the `scale`d JPEG into `rgb`, using `cmyk` as the staging
/// buffer for CMYK/YCCK images. `read_header` must have been called on `bytes` just before.
pub(crate) fn decode(
    turbo: &mut TurboHandle,
    bytes: &[u8],
    header: &JpegHeader,
    scale: Scale,
    region: Option<Region>,
    rgb: &mut Vec<u8>,
    cmyk: &mut Vec<u8>,
) -> Result<Decoded, DecodeError> {
    let (left, top, width, height) = match region {
        Some(r) => (r.x, r.y, r.width, r.height),
        None => (0, 0, scale.apply(header.width), scale.apply(header.height)),
    };
    let pixels = width as usize * height as usize;
    rgb.resize(pixels * 3, 0);
    let warning = if header.is_cmyk {
        cmyk.resize(pixels * 4, 0);
        let warning = turbo.decompress(bytes, header, scale, region, PixelFormat::Cmyk, cmyk)?;
        cmyk_to_rgb(cmyk, rgb);
        warning
    } else {
        turbo.decompress(bytes, header, scale, region, PixelFormat::Rgb, rgb)?
    };
    if let Some(message) = warning {
        // A truncated file decodes with its missing rows grey: that is corrupt data, not an
        // image. Other warnings (extraneous bytes, odd markers) leave the pixels intact.
        if message.contains("Premature end") {
            return Err(DecodeError::Corrupt { message });
        }
    }
    Ok(Decoded {
        width,
        height,
        left,
        top,
    })
}

/// CMYK as stored by Adobe applications (inverted: 255 = no ink), which is what nearly every
/// CMYK JPEG holds and what Pillow assumes; same formula as Pillow's `cmyk2rgb`.
fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (src, dst) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        let k = u32::from(src[3]);
        for c in 0..3 {
            dst[c] = ((u32::from(src[c]) * k + 127) / 255) as u8;
        }
    }
}
