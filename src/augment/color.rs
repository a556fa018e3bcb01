//! Colour operations on the small RGB8 output image, torchvision's definitions computed in
//! f32 and rounded back to u8 after each operation (as torchvision does for uint8 tensors):
//!
//! - brightness `b`: `x · b`
//! - contrast `c`: blend with the mean luma `m`: `m + c · (x − m)`
//! - saturation `s`: blend with each pixel's luma `l`: `l + s · (x − l)`
//! - hue `h`: rotate the HSV hue by `h` turns
//!
//! Jitter order is fixed (brightness, contrast, saturation, hue); torchvision shuffles it per
//! call, which would cost a random permutation and make outputs harder to reason about.

/// Luma in f32 with torchvision's weights (`rgb_to_grayscale`).
fn luma_f(r: f32, g: f32, b: f32) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

fn to_u8(x: f32) -> u8 {
    x.round().clamp(0.0, 255.0) as u8
}

/// Multiplies every value by `factor`.
pub(crate) fn brightness(rgb: &mut [u8], factor: f32) {
    for v in rgb.iter_mut() {
        *v = to_u8(f32::from(*v) * factor);
    }
}

/// Blends with the image's mean luma.
pub(crate) fn contrast(rgb: &mut [u8], factor: f32) {
    let pixels = (rgb.len() / 3).max(1);
    let sum: f32 = rgb
        .chunks_exact(3)
        .map(|p| luma_f(f32::from(p[0]), f32::from(p[1]), f32::from(p[2])).floor())
        .sum();
    let mean = sum / pixels as f32;
    for v in rgb.iter_mut() {
        *v = to_u8(mean + factor * (f32::from(*v) - mean));
    }
}

/// Blends each pixel with its luma.
pub(crate) fn saturation(rgb: &mut [u8], factor: f32) {
    for p in rgb.chunks_exact_mut(3) {
        let l = luma_f(f32::from(p[0]), f32::from(p[1]), f32::from(p[2])).floor();
        for v in p.iter_mut() {
            *v = to_u8(l + factor * (f32::from(*v) - l));
        }
    }
}

/// Sets every pixel to its luma (three equal channels).
pub(crate) fn grayscale(rgb: &mut [u8]) {
    for p in rgb.chunks_exact_mut(3) {
        p.fill(super::write::luma(p[0], p[1], p[2]));
    }
}

/// Rotates the hue by `shift` turns (`-0.5..=0.5`).
pub(crate) fn hue(rgb: &mut [u8], shift: f32) {
    for p in rgb.chunks_exact_mut(3) {
        let (r, g, b) = (
            f32::from(p[0]) / 255.0,
            f32::from(p[1]) / 255.0,
            f32::from(p[2]) / 255.0,
        );
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta == 0.0 {
            continue; // grey: hue undefined, unchanged
        }
        let s = delta / max;
        let mut h = if max == r {
            ((g - b) / delta).rem_euclid(6.0)
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        h = (h + shift).rem_euclid(1.0);
        let (r, g, b) = hsv_to_rgb(h, s, max);
        p[0] = to_u8(r * 255.0);
        p[1] = to_u8(g * 255.0);
        p[2] = to_u8(b * 255.0);
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match (i as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_factors_change_nothing() {
        let orig: Vec<u8> = (0..=255u8).chain(0..=255).chain(0..=255).collect();
        let mut x = orig.clone();
        brightness(&mut x, 1.0);
        contrast(&mut x, 1.0);
        saturation(&mut x, 1.0);
        hue(&mut x, 0.0);
        let max = x
            .iter()
            .zip(&orig)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max <= 1, "max change {max}");
    }

    #[test]
    fn extreme_factors() {
        let mut x = vec![10, 200, 30, 90, 90, 90];
        saturation(&mut x, 0.0);
        assert_eq!(x[0], x[1]);
        assert_eq!(x[1], x[2]);
        let mut x = vec![10, 200, 30];
        brightness(&mut x, 0.0);
        assert_eq!(x, [0, 0, 0]);
        let mut x = vec![255, 0, 0];
        hue(&mut x, 1.0 / 3.0);
        assert_eq!(x, [0, 255, 0]);
        hue(&mut x, -1.0 / 3.0);
        assert_eq!(x, [255, 0, 0]);
    }
}
