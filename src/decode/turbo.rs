//! The only file that calls libjpeg-turbo's C API (TurboJPEG 3): a handle per worker and three
//! checked operations on it (read the header, decompress a scaled region, report errors).
//!
//! Every `unsafe` block here is an FFI call whose pointer arguments are derived from live Rust
//! slices whose lengths were checked against what the C function will touch.
//!
//! The crate denies `unsafe_code`; this file allows it, for these FFI calls.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_ulong, CStr};
use std::ptr::NonNull;

use turbojpeg_sys as tj;

use super::DecodeError;

/// A DCT-domain scaling factor `num / denom` that libjpeg-turbo supports (1/8 … 1/1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    /// Numerator.
    pub num: u32,
    /// Denominator.
    pub denom: u32,
}

impl Scale {
    /// No scaling (libjpeg-turbo wants 1/1, not 8/8, to take its unscaled fast path).
    pub const ONE: Scale = Scale { num: 1, denom: 1 };

    /// The size of a dimension of `full` pixels at this scale (libjpeg-turbo's `TJSCALED`).
    pub fn apply(self, full: u32) -> u32 {
        ((u64::from(full) * u64::from(self.num)).div_ceil(u64::from(self.denom))) as u32
    }
}

/// Colour layout of the pixels libjpeg-turbo writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PixelFormat {
    Rgb,
    Cmyk,
}

impl PixelFormat {
    pub(crate) fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Rgb => 3,
            PixelFormat::Cmyk => 4,
        }
    }

    fn tj(self) -> c_int {
        match self {
            PixelFormat::Rgb => tj::TJPF_TJPF_RGB,
            PixelFormat::Cmyk => tj::TJPF_TJPF_CMYK,
        }
    }
}

/// What `tj3DecompressHeader` tells about a JPEG.
#[derive(Clone, Copy, Debug)]
pub(crate) struct JpegHeader {
    pub(crate) width: u32,
    pub(crate) height: u32,
    /// Width of an iMCU in unscaled pixels; `None` for subsampling TurboJPEG cannot name
    /// (cropping is then not offered).
    pub(crate) mcu_width: Option<u32>,
    /// CMYK and YCCK JPEGs cannot be converted to RGB by libjpeg; they are decoded as CMYK.
    pub(crate) is_cmyk: bool,
}

/// A region of the scaled image, left edge a multiple of the scaled iMCU width.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub(crate) x: u32,
    pub(crate) y: u32,
    pub(crate) width: u32,
    pub(crate) height: u32,
}

/// iMCU width per `TJSAMP` value (444, 422, 420, gray, 440, 411, 441). `turbojpeg.h` defines
/// this table `static`, so the library does not export it.
const MCU_WIDTH: [u32; 7] = [8, 16, 16, 8, 8, 32, 8];

/// An owned TurboJPEG decompressor instance (one per worker), freed on drop.
pub(crate) struct TurboHandle {
    handle: NonNull<std::ffi::c_void>,
}

// SAFETY: a TurboJPEG instance holds no thread-local state; it is owned by exactly one
// `TurboHandle`, and all calls take `&mut self`, so it is only ever used by one thread at a time.
unsafe impl Send for TurboHandle {}

impl TurboHandle {
    /// Creates a decompressor refusing images over `max_pixels` (defence in depth: callers also
    /// check the header).
    pub(crate) fn new(max_pixels: u64) -> Result<TurboHandle, DecodeError> {
        // SAFETY: tj3Init has no preconditions; it returns NULL on failure, checked below.
        let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        let handle = NonNull::new(raw).ok_or(DecodeError::Init)?;
        let this = TurboHandle { handle };
        let limit = c_int::try_from(max_pixels).unwrap_or(c_int::MAX);
        // SAFETY: the handle is a live decompressor; tj3Set only stores an integer parameter.
        let rc = unsafe {
            tj::tj3Set(
                this.handle.as_ptr(),
                tj::TJPARAM_TJPARAM_MAXPIXELS as c_int,
                limit,
            )
        };
        if rc != 0 {
            return Err(this.error());
        }
        Ok(this)
    }

    /// Reads the JPEG header; must precede every [`TurboHandle::decompress`] of `bytes`.
    pub(crate) fn read_header(&mut self, bytes: &[u8]) -> Result<JpegHeader, DecodeError> {
        // SAFETY: `bytes` is a live slice; TurboJPEG reads at most `bytes.len()` bytes from it.
        let rc = unsafe {
            tj::tj3DecompressHeader(self.handle.as_ptr(), bytes.as_ptr(), bytes.len() as c_ulong)
        };
        if rc != 0 {
            return Err(self.error());
        }
        let width = self.get(tj::TJPARAM_TJPARAM_JPEGWIDTH);
        let height = self.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT);
        let subsamp = self.get(tj::TJPARAM_TJPARAM_SUBSAMP);
        let colorspace = self.get(tj::TJPARAM_TJPARAM_COLORSPACE);
        let precision = self.get(tj::TJPARAM_TJPARAM_PRECISION);
        if width <= 0 || height <= 0 {
            return Err(DecodeError::Corrupt {
                message: format!("JPEG header declares {width}x{height} pixels"),
            });
        }
        // TurboJPEG reports success, keeping the previous image's parameters, for a stream
        // with no frame header: trust its figures only when the bytes carry the same ones.
        if super::markers::frame_size(bytes) != Some((width as u32, height as u32)) {
            return Err(DecodeError::Corrupt {
                message: "no JPEG frame header (SOF) before the first scan".to_owned(),
            });
        }
        if precision != 8 {
            return Err(DecodeError::Unsupported {
                what: format!("{precision}-bit JPEG"),
            });
        }
        let mcu_width = usize::try_from(subsamp)
            .ok()
            .and_then(|s| MCU_WIDTH.get(s).copied());
        Ok(JpegHeader {
            width: width as u32,
            height: height as u32,
            mcu_width,
            is_cmyk: colorspace == tj::TJCS_TJCS_CMYK as c_int
                || colorspace == tj::TJCS_TJCS_YCCK as c_int,
        })
    }

    /// Decompresses `region` (or the whole image) of the `scale`d image into `out` as tightly
    /// packed rows. Call [`TurboHandle::read_header`] on the same bytes first.
    ///
    /// Returns the libjpeg warning, if any (the image was still decoded).
    pub(crate) fn decompress(
        &mut self,
        bytes: &[u8],
        header: &JpegHeader,
        scale: Scale,
        region: Option<Region>,
        format: PixelFormat,
        out: &mut [u8],
    ) -> Result<Option<String>, DecodeError> {
        let factor = tj::tjscalingfactor {
            num: scale.num as c_int,
            denom: scale.denom as c_int,
        };
        // SAFETY: live handle; the factor is passed by value and validated by TurboJPEG.
        if unsafe { tj::tj3SetScalingFactor(self.handle.as_ptr(), factor) } != 0 {
            return Err(self.error());
        }
        let (width, height) = match region {
            Some(r) => (r.width, r.height),
            None => (scale.apply(header.width), scale.apply(header.height)),
        };
        let tj_region = match region {
            Some(r) => tj::tjregion {
                x: r.x as c_int,
                y: r.y as c_int,
                w: r.width as c_int,
                h: r.height as c_int,
            },
            None => tj::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            },
        };
        // The region must be set after every header read: reading a header resets it.
        // SAFETY: live handle whose header was read; the region is passed by value and
        // validated against the scaled image by TurboJPEG.
        if unsafe { tj::tj3SetCroppingRegion(self.handle.as_ptr(), tj_region) } != 0 {
            return Err(self.error());
        }
        let pitch = width as usize * format.bytes_per_pixel();
        let needed = pitch * height as usize;
        if out.len() < needed {
            return Err(DecodeError::Internal {
                message: format!("decode buffer holds {} bytes, {needed} needed", out.len()),
            });
        }
        // SAFETY: `bytes` is read up to its length; TurboJPEG writes `height` rows of `pitch`
        // bytes (the region's or scaled image's size, computed as TurboJPEG does) into `out`,
        // which was checked above to hold at least `pitch * height` bytes.
        let rc = unsafe {
            tj::tj3Decompress8(
                self.handle.as_ptr(),
                bytes.as_ptr(),
                bytes.len() as c_ulong,
                out.as_mut_ptr(),
                pitch as c_int,
                format.tj(),
            )
        };
        if rc == 0 {
            return Ok(None);
        }
        // SAFETY: live handle; returns an integer.
        let code = unsafe { tj::tj3GetErrorCode(self.handle.as_ptr()) };
        let message = self.message();
        if code == tj::TJERR_TJERR_WARNING as c_int {
            Ok(Some(message))
        } else {
            Err(DecodeError::Corrupt { message })
        }
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: live handle; tj3Get reads an integer parameter.
        unsafe { tj::tj3Get(self.handle.as_ptr(), param as c_int) }
    }

    fn message(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a pointer to a NUL-terminated string owned by the
        // instance, valid until the next call on it; it is copied out at once.
        let ptr = unsafe { tj::tj3GetErrorStr(self.handle.as_ptr()) };
        if ptr.is_null() {
            return "unknown libjpeg-turbo error".to_owned();
        }
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }

    fn error(&self) -> DecodeError {
        DecodeError::Corrupt {
            message: self.message(),
        }
    }
}

impl Drop for TurboHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init, is owned by self and is destroyed exactly once.
        unsafe { tj::tj3Destroy(self.handle.as_ptr()) }
    }
}
