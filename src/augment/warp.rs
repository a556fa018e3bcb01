//! Rotation and zoom about the image centre (one affine warp, same output size), bilinear
//! sampling, constant fill outside the source. torchvision's convention: positive angles turn
//! the picture counter-clockwise; the centre is the middle of the pixel grid.

/// Warps `src` (`width × height` RGB8) into `dst`, rotating by `degrees` and zooming by
/// `zoom` (> 1 enlarges).
pub(crate) fn rotate_zoom(
    src: &[u8],
    dst: &mut [u8],
    width: u32,
    height: u32,
    degrees: f64,
    zoom: f64,
    fill: [u8; 3],
) {
    let (w, h) = (width as usize, height as usize);
    let (cx, cy) = ((width as f64 - 1.0) / 2.0, (height as f64 - 1.0) / 2.0);
    let (sin, cos) = degrees.to_radians().sin_cos();
    // Inverse map: output pixel → source position (rotate by −angle, divide by zoom).
    let (a, b) = (cos / zoom, -sin / zoom);
    let (c, d) = (sin / zoom, cos / zoom);
    for y in 0..h {
        let dy = y as f64 - cy;
        for x in 0..w {
            let dx = x as f64 - cx;
            let sx = a * dx + b * dy + cx;
            let sy = c * dx + d * dy + cy;
            let out = &mut dst[(y * w + x) * 3..(y * w + x) * 3 + 3];
            out.copy_from_slice(&bilinear(src, w, h, sx, sy, fill));
        }
    }
}

fn bilinear(src: &[u8], w: usize, h: usize, x: f64, y: f64, fill: [u8; 3]) -> [u8; 3] {
    if !(x > -1.0 && y > -1.0 && x < w as f64 && y < h as f64) {
        return fill;
    }
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let (x0, y0) = (x0 as isize, y0 as isize);
    let px = |xi: isize, yi: isize, c: usize| -> f64 {
        if xi < 0 || yi < 0 || xi >= w as isize || yi >= h as isize {
            f64::from(fill[c])
        } else {
            f64::from(src[(yi as usize * w + xi as usize) * 3 + c])
        }
    };
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let top = px(x0, y0, c) * (1.0 - fx) + px(x0 + 1, y0, c) * fx;
        let bottom = px(x0, y0 + 1, c) * (1.0 - fx) + px(x0 + 1, y0 + 1, c) * fx;
        *o = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarter_turn_is_exact_and_identity_is_identity() {
        // 3×3 with distinct values; 90° counter-clockwise moves the top-right to top-left.
        let src: Vec<u8> = (0..27).collect();
        let mut dst = vec![0u8; 27];
        rotate_zoom(&src, &mut dst, 3, 3, 0.0, 1.0, [0; 3]);
        assert_eq!(dst, src);
        rotate_zoom(&src, &mut dst, 3, 3, 90.0, 1.0, [0; 3]);
        assert_eq!(&dst[0..3], &src[6..9]); // top-left ← top-right
        assert_eq!(&dst[12..15], &src[12..15]); // centre fixed
    }

    #[test]
    fn zoom_out_fills_borders() {
        let src = vec![100u8; 10 * 10 * 3];
        let mut dst = vec![0u8; 300];
        rotate_zoom(&src, &mut dst, 10, 10, 0.0, 0.5, [7, 8, 9]);
        assert_eq!(&dst[0..3], &[7, 8, 9]);
        assert_eq!(
            &dst[(5 * 10 + 5) * 3..(5 * 10 + 5) * 3 + 3],
            &[100, 100, 100]
        );
    }
}
