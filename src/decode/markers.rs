//! A minimal walk over JPEG markers up to the frame header (SOFn), independent of libjpeg.
//!
//! TurboJPEG's `tj3DecompressHeader` returns success *without updating its parameters* when a
//! stream holds no frame header (it treats it as a "tables-only" stream), so a reused handle
//! would report the previous image's size and decode stale state. Checking that the bytes
//! really carry a frame header — and that its size is the one TurboJPEG reports — closes that
//! hole.

/// The size a JPEG's first frame header declares, or `None` if no frame header comes before
/// the first scan, the end of the image or the end of the bytes.
pub(crate) fn frame_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut pos = 2;
    loop {
        if *bytes.get(pos)? != 0xFF {
            return None;
        }
        // Fill bytes: any number of 0xFF before the marker code.
        while *bytes.get(pos + 1)? == 0xFF {
            pos += 1;
        }
        let marker = *bytes.get(pos + 1)?;
        pos += 2;
        match marker {
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            // Start of scan or end of image before any frame header.
            0xD9 | 0xDA => return None,
            _ => {}
        }
        let length = usize::from(u16::from_be_bytes([*bytes.get(pos)?, *bytes.get(pos + 1)?]));
        if length < 2 {
            return None;
        }
        // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let frame = bytes.get(pos + 2..pos + 7)?;
            let height = u32::from(u16::from_be_bytes([frame[1], frame[2]]));
            let width = u32::from(u16::from_be_bytes([frame[3], frame[4]]));
            return Some((width, height));
        }
        pos += length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(marker: u8, payload: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        s.extend_from_slice(payload);
        s
    }

    #[test]
    fn finds_the_frame_header_after_other_segments() {
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
        jpeg.extend(segment(0xDB, &[0u8; 65]));
        jpeg.extend([0xFF, 0xFF]); // fill bytes, then the marker's own 0xFF
        jpeg.extend(segment(0xC2, &[8, 0x01, 0x2C, 0x02, 0x58, 3]));
        assert_eq!(frame_size(&jpeg), Some((600, 300)));
    }

    #[test]
    fn streams_without_a_frame_header_have_no_size() {
        assert_eq!(frame_size(b""), None);
        assert_eq!(frame_size(b"\xff\xd8"), None);
        assert_eq!(
            frame_size(b"\xff\xd8\xff\xe0 this is not a jpeg at all"),
            None
        );
        let mut tables_only = vec![0xFF, 0xD8];
        tables_only.extend(segment(0xC4, &[0u8; 20]));
        tables_only.extend([0xFF, 0xD9]);
        assert_eq!(frame_size(&tables_only), None);
        let mut scan_first = vec![0xFF, 0xD8];
        scan_first.extend(segment(0xDA, &[0u8; 10]));
        assert_eq!(frame_size(&scan_first), None);
        assert_eq!(frame_size(b"\x89PNG\r\n\x1a\n"), None);
    }

    /// Regression: a decoder reused after a good JPEG must not decode a frame-less stream
    /// with the previous image's parameters.
    #[test]
    fn a_reused_decoder_refuses_a_stream_without_frame_header() {
        use image::ImageEncoder as _;
        let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut good = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut good, 90)
            .write_image(img.as_raw(), 40, 30, image::ExtendedColorType::Rgb8)
            .unwrap();
        let mut decoder = crate::decode::Decoder::new(crate::decode::DEFAULT_MAX_PIXELS);
        let info = decoder.probe(&good).unwrap();
        decoder
            .decode(&good, &info, crate::decode::DecodeRequest::FULL)
            .unwrap();
        let garbage = b"\xff\xd8\xff\xe0 this is not a jpeg at all";
        assert!(decoder.probe(garbage).is_err());
    }
}
