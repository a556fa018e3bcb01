//! The captions of `ringfeed peek`: text drawn with `ab_glyph` in the bundled DejaVu Sans Mono
//! (`assets/fonts/`, licence beside it), and the class names a label is shown as.

use std::path::{Path, PathBuf};

use ab_glyph::{point, Font as _, FontRef, PxScale, ScaleFont as _};
use anyhow::Context as _;
use image::{Rgb, RgbImage};
use ringfeed::source::{ClassNames, Mixture, SourceConfig};

/// DejaVu Sans Mono 2.37, unmodified (Bitstream Vera licence, `assets/fonts/LICENSE-DejaVu.txt`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
/// Pixel height the captions are drawn at.
const FONT_PX: f32 = 12.0;
/// Height of one caption line, in pixels.
pub(crate) const LINE_H: u32 = 14;
/// Largest classes file read (ImageNet-21k's names take about 1 MB).
const MAX_CLASSES_FILE: u64 = 16 << 20;

/// The bundled font.
fn font() -> FontRef<'static> {
    FontRef::try_from_slice(FONT).expect("the bundled font parses")
}

/// Width of `chars` characters of the (monospaced) caption font, in whole pixels.
pub(crate) fn text_width(chars: usize) -> u32 {
    let font = font();
    let scaled = font.as_scaled(PxScale::from(FONT_PX));
    (scaled.h_advance(scaled.glyph_id('0')) * chars as f32).ceil() as u32
}

/// Draws `text` with its top-left corner at `(x, y)`, clipped to `max_w` pixels: a name too
/// long for the tile ends in `…`. Anti-aliased over whatever is below.
pub(crate) fn draw_text(
    img: &mut RgbImage,
    x: u32,
    y: u32,
    max_w: u32,
    text: &str,
    color: Rgb<u8>,
) {
    let font = font();
    let scaled = font.as_scaled(PxScale::from(FONT_PX));
    let advance = scaled.h_advance(scaled.glyph_id('0'));
    let fits = (max_w as f32 / advance).floor() as usize;
    let chars: Vec<char> = text.chars().collect();
    let shown: Vec<char> = if chars.len() > fits && fits > 0 {
        chars[..fits - 1].iter().copied().chain(['…']).collect()
    } else {
        chars.into_iter().take(fits).collect()
    };
    let baseline = y as f32 + scaled.ascent();
    for (i, c) in shown.into_iter().enumerate() {
        let glyph = scaled
            .glyph_id(c)
            .with_scale_and_position(FONT_PX, point(x as f32 + i as f32 * advance, baseline));
        let Some(outline) = font.outline_glyph(glyph) else {
            continue; // a space
        };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let px = bounds.min.x as i64 + i64::from(gx);
            let py = bounds.min.y as i64 + i64::from(gy);
            let inside = px >= i64::from(x)
                && px < i64::from(x + max_w)
                && py >= 0
                && (px as u64) < u64::from(img.width())
                && (py as u64) < u64::from(img.height());
            if inside {
                let under = img.get_pixel_mut(px as u32, py as u32);
                for (u, c) in under.0.iter_mut().zip(color.0) {
                    let a = coverage.clamp(0.0, 1.0);
                    *u = (f32::from(*u) * (1.0 - a) + f32::from(c) * a).round() as u8;
                }
            }
        });
    }
}

/// How a label is captioned: its class name when one is known, else the number.
pub(crate) fn label_text(label: i64, classes: Option<&[String]>) -> String {
    usize::try_from(label)
        .ok()
        .and_then(|i| classes?.get(i))
        .filter(|name| !name.is_empty())
        .cloned()
        .unwrap_or_else(|| label.to_string())
}

/// Reads a classes file: one name per line, line `i` naming label `i`.
pub(crate) fn read_classes(path: &Path) -> anyhow::Result<Vec<String>> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CLASSES_FILE).read_to_string(&mut text))
        .with_context(|| format!("cannot read the class names in {}", path.display()))?;
    Ok(text.lines().map(|l| l.trim().to_owned()).collect())
}

/// Class names and where they came from (for the log).
pub(crate) type Classes = (Vec<String>, String);

/// The class names of a dataset, first found of: `[source] classes` (a list, or a file
/// relative to `base_dir`), the ImageFolder's directory names, a `classes.txt` beside the
/// first shard. `None` when none is known.
pub(crate) fn dataset_classes(
    source: &SourceConfig,
    base_dir: &Path,
    dataset: &Mixture,
) -> anyhow::Result<Option<Classes>> {
    match &source.classes {
        Some(ClassNames::List(names)) => {
            return Ok(Some((names.clone(), "[source] classes".to_owned())))
        }
        Some(ClassNames::File(path)) => {
            let path = base_dir.join(path);
            let names = read_classes(&path).context("[source] classes")?;
            return Ok(Some((names, path.display().to_string())));
        }
        None => {}
    }
    if let Some(names) = dataset.class_names() {
        return Ok(Some((
            names.to_vec(),
            "the ImageFolder's directories".to_owned(),
        )));
    }
    let beside: Option<PathBuf> = dataset
        .shard_paths()
        .first()
        .and_then(|shard| shard.parent())
        .map(|dir| dir.join("classes.txt"));
    match beside {
        Some(path) if path.is_file() => {
            let names = read_classes(&path)?;
            Ok(Some((names, path.display().to_string())))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_show_their_class_name_when_known() {
        let names = ["cat".to_owned(), "dog".to_owned(), String::new()];
        assert_eq!(label_text(1, Some(&names)), "dog");
        assert_eq!(label_text(2, Some(&names)), "2"); // an empty name
        assert_eq!(label_text(3, Some(&names)), "3"); // past the list
        assert_eq!(label_text(-1, Some(&names)), "-1");
        assert_eq!(label_text(0, None), "0");
    }

    #[test]
    fn text_is_drawn_inside_its_box_and_distinguishes_glyphs() {
        let draw = |text: &str, max_w: u32| {
            let mut img = RgbImage::new(80, 20);
            draw_text(&mut img, 2, 2, max_w, text, Rgb([255, 255, 255]));
            img
        };
        let lit = |img: &RgbImage| {
            img.enumerate_pixels()
                .filter(|(_, _, p)| p.0[0] > 128)
                .map(|(x, y, _)| (x, y))
                .collect::<Vec<_>>()
        };
        let cat = lit(&draw("cat", 60));
        assert!(!cat.is_empty());
        assert!(cat
            .iter()
            .all(|&(x, y)| (2..62).contains(&x) && (2..2 + LINE_H).contains(&y)));
        assert_ne!(lit(&draw("1", 60)), lit(&draw("7", 60)));
        assert_ne!(lit(&draw("0", 60)), lit(&draw("8", 60)));
        // Too long for its box: clipped to it, ending in an ellipsis.
        let long = lit(&draw("hubble_deep_field", 30));
        assert!(long.iter().all(|&(x, _)| x < 32), "{long:?}");
        assert_eq!(
            draw("abcd", 4 * text_width(1)),
            draw("abcd", 4 * text_width(1) + 1)
        );
    }

    #[test]
    fn classes_files_give_one_name_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("classes.txt");
        std::fs::write(&path, "astronaut\ncat \n\ncoffee\n").unwrap();
        assert_eq!(
            read_classes(&path).unwrap(),
            ["astronaut", "cat", "", "coffee"]
        );
        let err = read_classes(&dir.path().join("missing.txt")).unwrap_err();
        assert!(format!("{err:#}").contains("missing.txt"), "{err:#}");
    }
}
