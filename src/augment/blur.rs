//! Gaussian blur as torchvision's `gaussian_blur`: separable kernel of odd size `k`,
//! `exp(-x² / 2σ²)` normalised, reflect padding, computed in f32, rounded to u8.

/// Blurs the `width × height` RGB8 image `rgb` in place; `tmp` is reusable scratch.
pub(crate) fn gaussian_blur(
    rgb: &mut [u8],
    width: u32,
    height: u32,
    kernel_size: u32,
    sigma: f64,
    tmp: &mut Vec<f32>,
    kernel: &mut Vec<f32>,
) {
    let (w, h) = (width as usize, height as usize);
    let half = (kernel_size / 2) as isize;
    kernel.clear();
    kernel.extend((-half..=half).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32));
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    tmp.clear();
    tmp.resize(w * h * 3, 0.0);
    // Horizontal pass into tmp.
    for y in 0..h {
        let row = &rgb[y * w * 3..(y + 1) * w * 3];
        for x in 0..w {
            let mut acc = [0f32; 3];
            for (i, k) in kernel.iter().enumerate() {
                let sx = reflect(x as isize + i as isize - half, w);
                for c in 0..3 {
                    acc[c] += k * f32::from(row[sx * 3 + c]);
                }
            }
            tmp[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass back into rgb.
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0f32; 3];
            for (i, k) in kernel.iter().enumerate() {
                let sy = reflect(y as isize + i as isize - half, h);
                for c in 0..3 {
                    acc[c] += k * tmp[(sy * w + x) * 3 + c];
                }
            }
            for c in 0..3 {
                rgb[(y * w + x) * 3 + c] = acc[c].round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Reflect padding (`dcb|abcd|cba`), folded repeatedly so any kernel size is valid.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_indices() {
        let got: Vec<usize> = (-3..7).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
        assert_eq!(reflect(-5, 1), 0);
    }

    #[test]
    fn flat_image_stays_flat_and_mass_is_kept() {
        let mut img = vec![77u8; 5 * 4 * 3];
        let (mut t, mut k) = (Vec::new(), Vec::new());
        gaussian_blur(&mut img, 5, 4, 9, 2.0, &mut t, &mut k);
        assert!(img.iter().all(|&v| v == 77));
        let mut dot = vec![0u8; 7 * 7 * 3];
        dot[(3 * 7 + 3) * 3] = 255;
        gaussian_blur(&mut dot, 7, 7, 3, 1.0, &mut t, &mut k);
        assert!(dot[(3 * 7 + 3) * 3] < 255 && dot[(3 * 7 + 2) * 3] > 0);
    }
}
