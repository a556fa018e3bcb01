//! The antialiased resize from decoded pixels to the output size, via fast_image_resize's
//! convolution with the bilinear filter (the same triangle filter, widened by the scale
//! factor when downscaling, that Pillow's `resize(BILINEAR)` and torchvision's
//! `antialias=True` use).

use fast_image_resize::images::{CroppedImage, CroppedImageMut, Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::SampleError;
use crate::decode::Rect;

fn resize_error(err: impl std::fmt::Display) -> SampleError {
    SampleError::Resize {
        message: err.to_string(),
    }
}

/// Resamples `src_box` (relative to `view`, a window of the `width × height` RGB8 `pixels`)
/// onto `dst` of the `out_width × out_height` RGB8 image `out`. Output pixels outside `dst`
/// are set to 0.
#[allow(clippy::too_many_arguments)]
pub(crate) fn resample(
    resizer: &mut Resizer,
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
    let src = ImageRef::new(width, height, pixels, PixelType::U8x3).map_err(resize_error)?;
    let src =
        CroppedImage::new(&src, view.x, view.y, view.width, view.height).map_err(resize_error)?;
    let [bx, by, bw, bh] = src_box;
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(bx, by, bw, bh);
    let mut dst_image =
        Image::from_slice_u8(out_width, out_height, out, PixelType::U8x3).map_err(resize_error)?;
    if dst.x == 0 && dst.y == 0 && dst.width == out_width && dst.height == out_height {
        resizer
            .resize(&src, &mut dst_image, &options)
            .map_err(resize_error)
    } else {
        dst_image.buffer_mut().fill(0);
        let mut window = CroppedImageMut::new(&mut dst_image, dst.x, dst.y, dst.width, dst.height)
            .map_err(resize_error)?;
        resizer
            .resize(&src, &mut window, &options)
            .map_err(resize_error)
    }
}
