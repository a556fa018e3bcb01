//! EXIF orientation: finding the Orientation tag (0x0112) in a JPEG's APP1 segment, and the
//! pixel mapping each of the eight orientations asks for.
//!
//! The parser reads only the markers before the first scan and only IFD0; anything malformed
//! means "no orientation" (1), never an error: orientation is a hint, not image data.

use super::Rect;

/// The EXIF orientation of an image: how the stored pixels must be turned for display.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Orientation {
    /// 1: stored as displayed.
    #[default]
    Normal,
    /// 2: mirrored left-right.
    FlipH,
    /// 3: rotated 180°.
    Rotate180,
    /// 4: mirrored top-bottom.
    FlipV,
    /// 5: mirrored along the main diagonal (transposed).
    Transpose,
    /// 6: must be rotated 90° clockwise for display.
    Rotate90,
    /// 7: mirrored along the anti-diagonal.
    Transverse,
    /// 8: must be rotated 270° clockwise (90° counter-clockwise) for display.
    Rotate270,
}

impl Orientation {
    /// The orientation for an EXIF tag value; unknown values mean [`Orientation::Normal`].
    pub fn from_exif(value: u16) -> Orientation {
        match value {
            2 => Orientation::FlipH,
            3 => Orientation::Rotate180,
            4 => Orientation::FlipV,
            5 => Orientation::Transpose,
            6 => Orientation::Rotate90,
            7 => Orientation::Transverse,
            8 => Orientation::Rotate270,
            _ => Orientation::Normal,
        }
    }

    /// Whether width and height trade places for display.
    pub fn swaps_axes(self) -> bool {
        matches!(
            self,
            Orientation::Transpose
                | Orientation::Rotate90
                | Orientation::Transverse
                | Orientation::Rotate270
        )
    }

    /// Displayed `(width, height)` of an image stored as `width × height`.
    pub fn display_dims(self, width: u32, height: u32) -> (u32, u32) {
        if self.swaps_axes() {
            (height, width)
        } else {
            (width, height)
        }
    }

    /// The stored pixel `(x, y)` shown at displayed position `(dx, dy)` of an image stored as
    /// `width × height`.
    pub(crate) fn source_of(self, dx: u32, dy: u32, width: u32, height: u32) -> (u32, u32) {
        let (w1, h1) = (width - 1, height - 1);
        match self {
            Orientation::Normal => (dx, dy),
            Orientation::FlipH => (w1 - dx, dy),
            Orientation::Rotate180 => (w1 - dx, h1 - dy),
            Orientation::FlipV => (dx, h1 - dy),
            Orientation::Transpose => (dy, dx),
            Orientation::Rotate90 => (dy, h1 - dx),
            Orientation::Transverse => (w1 - dy, h1 - dx),
            Orientation::Rotate270 => (w1 - dy, dx),
        }
    }

    /// The displayed position of stored pixel `(sx, sy)` of an image stored as
    /// `width × height`: the inverse of [`Orientation::source_of`].
    pub(crate) fn display_of(self, sx: u32, sy: u32, width: u32, height: u32) -> (u32, u32) {
        let (w1, h1) = (width - 1, height - 1);
        match self {
            Orientation::Normal => (sx, sy),
            Orientation::FlipH => (w1 - sx, sy),
            Orientation::Rotate180 => (w1 - sx, h1 - sy),
            Orientation::FlipV => (sx, h1 - sy),
            Orientation::Transpose => (sy, sx),
            Orientation::Rotate90 => (h1 - sy, sx),
            Orientation::Transverse => (h1 - sy, w1 - sx),
            Orientation::Rotate270 => (sy, w1 - sx),
        }
    }

    /// The stored rectangle that displays as `shown` (clipped to the displayed image) for an
    /// image stored as `width × height`; `None` when `shown` misses the image. Every
    /// orientation is a flip or a transpose, so mapping two opposite corners is exact.
    pub(crate) fn stored_rect(self, shown: Rect, width: u32, height: u32) -> Option<Rect> {
        let (dw, dh) = self.display_dims(width, height);
        let clipped = clip(shown, dw, dh)?;
        let (ax, ay) = self.source_of(clipped.x, clipped.y, width, height);
        let (bx, by) = self.source_of(
            clipped.x + clipped.width - 1,
            clipped.y + clipped.height - 1,
            width,
            height,
        );
        Some(span(ax, ay, bx, by))
    }

    /// The displayed rectangle showing `stored` (a rectangle inside the `width × height`
    /// stored image).
    pub(crate) fn displayed_rect(self, stored: Rect, width: u32, height: u32) -> Rect {
        let (ax, ay) = self.display_of(stored.x, stored.y, width, height);
        let (bx, by) = self.display_of(
            stored.x + stored.width - 1,
            stored.y + stored.height - 1,
            width,
            height,
        );
        span(ax, ay, bx, by)
    }
}

/// `r` cut to a `width × height` image, or `None` when nothing is left.
fn clip(r: Rect, width: u32, height: u32) -> Option<Rect> {
    let x1 = r.x.saturating_add(r.width).min(width);
    let y1 = r.y.saturating_add(r.height).min(height);
    (r.x < x1 && r.y < y1).then(|| Rect {
        x: r.x,
        y: r.y,
        width: x1 - r.x,
        height: y1 - r.y,
    })
}

/// The rectangle whose opposite corner pixels are `(ax, ay)` and `(bx, by)`.
fn span(ax: u32, ay: u32, bx: u32, by: u32) -> Rect {
    Rect {
        x: ax.min(bx),
        y: ay.min(by),
        width: ax.abs_diff(bx) + 1,
        height: ay.abs_diff(by) + 1,
    }
}

/// Writes `src` (RGB8, stored `width × height`) into `dst` as displayed.
pub(crate) fn apply(orientation: Orientation, src: &[u8], width: u32, height: u32, dst: &mut [u8]) {
    let (dw, dh) = orientation.display_dims(width, height);
    let stride = width as usize * 3;
    for dy in 0..dh {
        let row = &mut dst[dy as usize * dw as usize * 3..][..dw as usize * 3];
        for (dx, px) in row.chunks_exact_mut(3).enumerate() {
            let (sx, sy) = orientation.source_of(dx as u32, dy, width, height);
            let at = sy as usize * stride + sx as usize * 3;
            px.copy_from_slice(&src[at..at + 3]);
        }
    }
}

/// The orientation stored in a JPEG's EXIF segment, or [`Orientation::Normal`].
pub(crate) fn jpeg_orientation(bytes: &[u8]) -> Orientation {
    jpeg_exif_tiff(bytes)
        .and_then(tiff_orientation)
        .map_or(Orientation::Normal, Orientation::from_exif)
}

/// The TIFF payload of the first `Exif\0\0` APP1 segment before the first scan.
fn jpeg_exif_tiff(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut at = 2usize;
    loop {
        // Markers may be preceded by fill bytes 0xFF.
        while *bytes.get(at)? == 0xFF && *bytes.get(at + 1)? == 0xFF {
            at += 1;
        }
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        if marker == 0xDA || marker == 0xD9 {
            return None; // start of scan / end of image: no EXIF before the pixels
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            at += 2;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([
            *bytes.get(at + 2)?,
            *bytes.get(at + 3)?,
        ]));
        if len < 2 {
            return None;
        }
        let payload = bytes.get(at + 4..at + 2 + len)?;
        if marker == 0xE1 && payload.starts_with(b"Exif\0\0") {
            return Some(&payload[6..]);
        }
        at += 2 + len;
    }
}

/// The Orientation (0x0112) value of IFD0 in a TIFF structure.
pub(crate) fn tiff_orientation(tiff: &[u8]) -> Option<u16> {
    let big_endian = match tiff.get(..4)? {
        [b'M', b'M', 0, 42] => true,
        [b'I', b'I', 42, 0] => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b = tiff.get(at..at + 2)?;
        Some(if big_endian {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b = tiff.get(at..at + 4)?;
        let b = [b[0], b[1], b[2], b[3]];
        Some(if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let ifd = u32_at(4)? as usize;
    let count = usize::from(u16_at(ifd)?);
    for i in 0..count {
        let entry = ifd + 2 + i * 12;
        if u16_at(entry)? == 0x0112 {
            // Type SHORT (3), count 1: the value sits in the first two bytes of the field.
            return (u16_at(entry + 2)? == 3)
                .then(|| u16_at(entry + 8))
                .flatten();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_with_exif(tiff: &[u8]) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE1];
        let len = (2 + 6 + tiff.len()) as u16;
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(b"Exif\0\0");
        v.extend_from_slice(tiff);
        v.extend_from_slice(&[0xFF, 0xDA, 0, 2]);
        v
    }

    fn tiff(big_endian: bool, value: u16) -> Vec<u8> {
        let mut t = Vec::new();
        type Writers = (fn(u16) -> [u8; 2], fn(u32) -> [u8; 4]);
        let (w16, w32): Writers = if big_endian {
            t.extend_from_slice(b"MM\0*");
            (u16::to_be_bytes, u32::to_be_bytes)
        } else {
            t.extend_from_slice(b"II*\0");
            (u16::to_le_bytes, u32::to_le_bytes)
        };
        t.extend_from_slice(&w32(8));
        t.extend_from_slice(&w16(1));
        t.extend_from_slice(&w16(0x0112));
        t.extend_from_slice(&w16(3));
        t.extend_from_slice(&w32(1));
        t.extend_from_slice(&w16(value));
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&w32(0));
        t
    }

    #[test]
    fn reads_orientation_in_both_byte_orders() {
        for be in [true, false] {
            for v in 1..=8 {
                let o = jpeg_orientation(&jpeg_with_exif(&tiff(be, v)));
                assert_eq!(o, Orientation::from_exif(v), "big endian {be}, value {v}");
            }
        }
    }

    #[test]
    fn malformed_exif_means_normal() {
        let good = jpeg_with_exif(&tiff(false, 6));
        for cut in 0..good.len() {
            // Never panics on a truncated segment; a cut segment yields Normal or the value.
            let _ = jpeg_orientation(&good[..cut]);
        }
        assert_eq!(jpeg_orientation(b"not a jpeg"), Orientation::Normal);
        assert_eq!(jpeg_orientation(&[]), Orientation::Normal);
    }

    const ALL: [Orientation; 8] = [
        Orientation::Normal,
        Orientation::FlipH,
        Orientation::Rotate180,
        Orientation::FlipV,
        Orientation::Transpose,
        Orientation::Rotate90,
        Orientation::Transverse,
        Orientation::Rotate270,
    ];

    #[test]
    fn display_of_inverts_source_of_and_rects_map_both_ways() {
        let (w, h) = (5, 3);
        for o in ALL {
            let (dw, dh) = o.display_dims(w, h);
            for dy in 0..dh {
                for dx in 0..dw {
                    let (sx, sy) = o.source_of(dx, dy, w, h);
                    assert_eq!(o.display_of(sx, sy, w, h), (dx, dy), "{o:?}");
                }
            }
            let shown = Rect {
                x: 1,
                y: 0,
                width: 2,
                height: dh,
            };
            let stored = o.stored_rect(shown, w, h).unwrap();
            assert_eq!(stored.width * stored.height, 2 * dh, "{o:?}");
            assert_eq!(o.displayed_rect(stored, w, h), shown, "{o:?}");
        }
        let off = Rect {
            x: 9,
            y: 0,
            width: 1,
            height: 1,
        };
        assert_eq!(Orientation::Rotate90.stored_rect(off, w, h), None);
    }

    #[test]
    fn orientation_mapping_round_trips_a_tiny_image() {
        // 2×1 image: red, green. Rotate90 displays it 1×2 with red on top.
        let src = [255, 0, 0, 0, 255, 0];
        let mut dst = [0u8; 6];
        apply(Orientation::Rotate90, &src, 2, 1, &mut dst);
        assert_eq!(dst, [255, 0, 0, 0, 255, 0]);
        apply(Orientation::Rotate270, &src, 2, 1, &mut dst);
        assert_eq!(dst, [0, 255, 0, 255, 0, 0]);
        apply(Orientation::FlipH, &src, 2, 1, &mut dst);
        assert_eq!(dst, [0, 255, 0, 255, 0, 0]);
    }
}
