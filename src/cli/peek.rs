//! `ringfeed peek`: a PNG grid of one batch's images, each with its label and sample id, to see
//! what the trainer is fed.
//!
//! # Brief overview
//!
//! Two sources: a running ring, where [`Observer::peek`] copies a published batch without
//! taking it from the trainer (a seqlock copy, see there), or a configuration file, where the
//! pipeline fills one batch into memory with no daemon ([`Pipeline::fill_batch`]). Either way
//! [`render_grid`] un-normalises the images with the mean/std and draws the grid, each image
//! captioned ([`super::caption`]) with its class name — from `--classes FILE`, `[source]
//! classes`, the ImageFolder's directories or a `classes.txt` beside the shards — or its label
//! number when no name is known, and its sample id.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use image::{Rgb, RgbImage};
use ringfeed::batch::{BatchBuffers, TensorIndex};
use ringfeed::pipeline::{Cursor, Pipeline};
use ringfeed::ring::{DType, Observer, RuntimeDir};

use super::caption::{
    dataset_classes, draw_text, label_text, read_classes, text_width, Classes, LINE_H,
};
use super::common::{resolve_plan, PlanArgs};

/// Flags of `ringfeed peek`.
#[derive(Debug, Args)]
pub(crate) struct PeekArgs {
    /// Ring to copy a published batch from (ignored with --config or --shards, which render
    /// a batch from that dataset instead).
    #[arg(default_value = "default")]
    ring: String,
    /// Lane to copy from (ring mode), or whose rank's batch to render (config mode).
    #[arg(long, default_value_t = 0)]
    lane: u32,
    /// PNG file to write.
    #[arg(long, value_name = "PNG")]
    out: PathBuf,
    /// Seconds to wait for a published batch (ring mode).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Epoch of the batch to render (config mode).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Batch index within the epoch (config mode).
    #[arg(long, default_value_t = 0)]
    index: u64,
    /// Class names, one per line (line i names label i), to caption the images with. Default
    /// in config mode: `[source] classes`, the ImageFolder's directories, or `classes.txt`
    /// beside the first shard; without any, labels show as numbers.
    #[arg(long, value_name = "FILE")]
    classes: Option<PathBuf>,
    /// Render a batch straight from a configuration, without a daemon: pass --config FILE
    /// (and any serve flag).
    #[command(flatten)]
    plan: PlanArgs,
}

/// One batch's tensors, as [`render_grid`] needs them.
#[derive(Debug, Clone)]
pub(crate) struct BatchImages<'a> {
    /// The `images` tensor's bytes.
    pub(crate) images: &'a [u8],
    /// Its element type.
    pub(crate) dtype: DType,
    /// Channels, height, width of one image.
    pub(crate) chw: (u32, u32, u32),
    /// `[B, H, W, C]` rather than `[B, C, H, W]`.
    pub(crate) nhwc: bool,
    /// Normalisation mean per channel (0..1 scale).
    pub(crate) mean: [f32; 4],
    /// Normalisation std per channel; all 0 means not normalised.
    pub(crate) std: [f32; 4],
    /// `labels` (i64 little-endian bytes).
    pub(crate) labels: &'a [u8],
    /// `sample_ids` (i64 little-endian bytes).
    pub(crate) ids: &'a [u8],
    /// Class names (label `i` is `classes[i]`), when known.
    pub(crate) classes: Option<&'a [String]>,
    /// `targets` (f32 little-endian bytes, `[B, classes]`) and its number of classes, when
    /// the batch was mixed (`mixup` / `cutmix`): captions then show both classes and weights.
    pub(crate) targets: Option<(&'a [u8], usize)>,
}

/// Writes the grid of a ring's published batch, or of a batch rendered from a configuration.
pub(crate) fn run(args: PeekArgs) -> anyhow::Result<ExitCode> {
    // `--shards` names a dataset as `--config` does: render from it (with the built-in
    // configuration) rather than silently reading a running ring.
    let grid = if !args.plan.config.is_empty() || args.plan.shards.is_some() {
        from_config(&args)?
    } else {
        from_ring(&args)?
    };
    grid.save_with_format(&args.out, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "ringfeed: wrote {} ({}×{})",
        args.out.display(),
        grid.width(),
        grid.height()
    );
    Ok(ExitCode::SUCCESS)
}

fn from_ring(args: &PeekArgs) -> anyhow::Result<RgbImage> {
    let classes = args
        .classes
        .as_deref()
        .map(|path| anyhow::Ok((read_classes(path)?, path.display().to_string())))
        .transpose()?;
    say_classes(classes.as_ref());
    let dir = RuntimeDir::from_env()?;
    let observer = Observer::open(&dir, &args.ring)?;
    let layout = observer.layout();
    let batch = observer.peek(args.lane, Duration::from_secs_f64(args.timeout.max(0.0)))?;
    let index = |name: &str| {
        layout
            .tensor_index(name)
            .with_context(|| format!("ring '{}' has no tensor {name:?}", args.ring))
    };
    let (img, lab, ids) = (index("images")?, index("labels")?, index("sample_ids")?);
    let t = &layout.tensors[img];
    anyhow::ensure!(
        t.shape.len() == 4,
        "tensor 'images' has rank {}, not 4",
        t.shape.len()
    );
    let dims = |i: usize| u32::try_from(t.shape[i]).context("image dimension too large");
    let chw = if layout.nhwc() {
        (dims(3)?, dims(1)?, dims(2)?)
    } else {
        (dims(1)?, dims(2)?, dims(3)?)
    };
    eprintln!(
        "ringfeed: lane {} seq {} epoch {} batch {} ({} samples)",
        batch.lane, batch.seq, batch.epoch, batch.index, batch.count
    );
    render_grid(&BatchImages {
        images: &batch.tensors[img],
        dtype: t.dtype,
        chw,
        nhwc: layout.nhwc(),
        mean: layout.mean,
        std: layout.std,
        labels: &batch.tensors[lab],
        ids: &batch.tensors[ids],
        classes: classes.as_ref().map(|(names, _)| names.as_slice()),
        targets: layout.tensor_index("targets").and_then(|at| {
            let classes = *layout.tensors[at].shape.get(1)?;
            Some((&batch.tensors[at][..], usize::try_from(classes).ok()?))
        }),
    })
}

/// Tells where the captions' class names come from, or that labels show as numbers.
fn say_classes(classes: Option<&Classes>) {
    match classes {
        Some((names, from)) => eprintln!(
            "ringfeed: captions show class names ({} from {from})",
            names.len()
        ),
        None => eprintln!("ringfeed: captions show label numbers (no class names: see --classes)"),
    }
}

fn from_config(args: &PeekArgs) -> anyhow::Result<RgbImage> {
    let pipeline = Pipeline::from_plan(resolve_plan(&args.plan)?)?;
    let plan = pipeline.plan();
    let classes = match &args.classes {
        Some(path) => Some((read_classes(path)?, path.display().to_string())),
        None => dataset_classes(plan.source(), plan.base_dir(), pipeline.dataset())?,
    };
    say_classes(classes.as_ref());
    let schema = pipeline.schema();
    let mut batch = BatchBuffers::new(schema);
    let mut ids = Vec::new();
    let cursor = Cursor {
        epoch: args.epoch,
        index: args.index,
    };
    let rank = plan.ranks().rank(args.lane);
    pipeline.fill_batch(cursor, rank, &mut batch.tensors(), &mut ids)?;
    let tensor = |t| batch.get(t).unwrap_or_default();
    render_grid(&BatchImages {
        images: tensor(TensorIndex::Images),
        dtype: schema.image_dtype,
        chw: schema.chw,
        nhwc: schema.nhwc,
        mean: schema.mean,
        std: schema.std,
        labels: tensor(TensorIndex::Labels),
        ids: tensor(TensorIndex::SampleIds),
        classes: classes.as_ref().map(|(names, _)| names.as_slice()),
        targets: batch
            .get(TensorIndex::Targets)
            .zip(schema.targets)
            .map(|(bytes, n)| (bytes, n as usize)),
    })
}

/// Element `i` of a tensor of `dtype` as f32.
fn element(bytes: &[u8], dtype: DType, i: usize) -> f32 {
    let at = |n: usize| &bytes[i * n..i * n + n];
    match dtype {
        DType::U8 => f32::from(bytes[i]),
        DType::F16 => half::f16::from_le_bytes([at(2)[0], at(2)[1]]).to_f32(),
        DType::BF16 => half::bf16::from_le_bytes([at(2)[0], at(2)[1]]).to_f32(),
        DType::F32 => f32::from_le_bytes(at(4).try_into().unwrap_or([0; 4])),
        DType::I32 => i32::from_le_bytes(at(4).try_into().unwrap_or([0; 4])) as f32,
        DType::U16 => f32::from(u16::from_le_bytes([at(2)[0], at(2)[1]])),
        DType::I64 => i64::from_le_bytes(at(8).try_into().unwrap_or([0; 8])) as f32,
    }
}

/// The 0–255 pixel value a stored element stands for: `u8` is the pixel itself; floats are
/// `(v / 255 - mean) / std` when normalised (std ≠ 0), else `v / 255`.
pub(crate) fn unnormalise(x: f32, dtype: DType, mean: f32, std: f32) -> u8 {
    let v = match dtype {
        DType::U8 => x,
        _ if std != 0.0 => (x * std + mean) * 255.0,
        _ => x * 255.0,
    };
    v.round().clamp(0.0, 255.0) as u8
}

fn i64_at(bytes: &[u8], i: usize) -> i64 {
    bytes
        .get(i * 8..i * 8 + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i64::from_le_bytes)
}

/// Gap between tiles, in pixels.
const GAP: u32 = 4;
/// Height of the caption strip under each tile: two lines (class, sample id).
const CAPTION_H: u32 = 2 * LINE_H + 2;
/// Characters a caption line has room for at least (tiles narrower than that are widened).
const MIN_CAPTION_CHARS: usize = 8;

/// A grid of the batch's images (as many columns as the square root of the batch size), each
/// with its class name or label (first line, white) and sample id (second line, grey) under
/// it.
pub(crate) fn render_grid(b: &BatchImages<'_>) -> anyhow::Result<RgbImage> {
    let (c, h, w) = b.chw;
    anyhow::ensure!(c >= 1 && h >= 1 && w >= 1, "empty image shape {c}×{h}×{w}");
    let per_image = c as usize * h as usize * w as usize;
    let count = b.images.len() / (per_image * b.dtype.size());
    anyhow::ensure!(count >= 1, "the batch holds no image");
    let cols = (count as f64).sqrt().ceil() as u32;
    let rows = (count as u32).div_ceil(cols);
    let tile_w = w.max(text_width(MIN_CAPTION_CHARS));
    let (cell_w, cell_h) = (tile_w + GAP, h + CAPTION_H + GAP);
    let mut grid = RgbImage::from_pixel(cols * cell_w + GAP, rows * cell_h + GAP, Rgb([0, 0, 0]));
    let channel = |k: usize| k.min(c as usize - 1);
    for n in 0..count {
        let (x0, y0) = (
            GAP + (n as u32 % cols) * cell_w,
            GAP + (n as u32 / cols) * cell_h,
        );
        for y in 0..h as usize {
            for x in 0..w as usize {
                let mut px = [0u8; 3];
                for (k, p) in px.iter_mut().enumerate() {
                    let ch = channel(k);
                    let i = n * per_image
                        + if b.nhwc {
                            (y * w as usize + x) * c as usize + ch
                        } else {
                            (ch * h as usize + y) * w as usize + x
                        };
                    *p = unnormalise(
                        element(b.images, b.dtype, i),
                        b.dtype,
                        b.mean[ch],
                        b.std[ch],
                    );
                }
                grid.put_pixel(x0 + x as u32, y0 + y as u32, Rgb(px));
            }
        }
        let ty = y0 + h + 1;
        let caption = b
            .targets
            .and_then(|(t, classes)| {
                let row = t.get(n * classes * 4..(n + 1) * classes * 4)?;
                mixed_caption(row, b.classes)
            })
            .unwrap_or_else(|| label_text(i64_at(b.labels, n), b.classes));
        draw_text(&mut grid, x0, ty, tile_w, &caption, Rgb([255, 255, 255]));
        draw_text(
            &mut grid,
            x0,
            ty + LINE_H,
            tile_w,
            &format!("#{}", i64_at(b.ids, n)),
            Rgb([150, 150, 150]),
        );
    }
    Ok(grid)
}

/// The caption of a mixed row of `targets` (f32 little-endian): its two heaviest classes with
/// their weights, `"cat .62+dog .38"`; `None` when only one class stands above the smoothing
/// floor (an unmixed row, or one mixed with its own class).
fn mixed_caption(row: &[u8], classes: Option<&[String]>) -> Option<String> {
    let values: Vec<f32> = row
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let floor = values.iter().copied().fold(f32::INFINITY, f32::min);
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let (&first, &second) = (order.first()?, order.get(1)?);
    if values[second] - floor <= 1e-6 {
        return None;
    }
    let weight = |v: f32| {
        let w = format!("{v:.2}");
        w.strip_prefix('0').map(str::to_owned).unwrap_or(w)
    };
    Some(format!(
        "{} {}+{} {}",
        label_text(first as i64, classes),
        weight(values[first]),
        label_text(second as i64, classes),
        weight(values[second])
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_rows_caption_both_classes() {
        let row = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let names = ["cat".to_owned(), "dog".to_owned(), "owl".to_owned()];
        assert_eq!(
            mixed_caption(&row(&[0.05, 0.3, 0.65]), Some(&names)).as_deref(),
            Some("owl .65+dog .30")
        );
        assert_eq!(
            mixed_caption(&row(&[0.05, 0.3, 0.65]), None).as_deref(),
            Some("2 .65+1 .30")
        );
        // Smoothing alone (one class above the floor) is not a mix.
        assert_eq!(mixed_caption(&row(&[0.05, 0.9, 0.05]), Some(&names)), None);
    }

    #[test]
    fn unnormalise_inverts_the_writer() {
        let (mean, std) = (0.485f32, 0.229f32);
        for v in [0u8, 1, 77, 128, 254, 255] {
            let stored = (f32::from(v) / 255.0 - mean) / std;
            assert_eq!(unnormalise(stored, DType::F32, mean, std), v);
        }
        assert_eq!(unnormalise(0.5, DType::F32, 0.0, 0.0), 128);
        assert_eq!(unnormalise(200.0, DType::U8, 0.5, 0.25), 200);
        assert_eq!(unnormalise(-9.0, DType::F32, 0.5, 0.25), 0);
    }

    fn grid(labels: &[i64], classes: Option<&[String]>) -> RgbImage {
        // Two 1-channel 2×2 u8 images, NCHW: one black, one white.
        let images = [0u8, 0, 0, 0, 255, 255, 255, 255];
        let labels: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids: Vec<u8> = [10i64, 11].iter().flat_map(|v| v.to_le_bytes()).collect();
        render_grid(&BatchImages {
            images: &images,
            dtype: DType::U8,
            chw: (1, 2, 2),
            nhwc: false,
            mean: [0.0; 4],
            std: [0.0; 4],
            labels: &labels,
            ids: &ids,
            classes,
            targets: None,
        })
        .unwrap()
    }

    /// The first caption line (white) and the second (grey) of tile `n` of a 2×2-image grid.
    fn caption_lines(g: &RgbImage, n: u32, tile_w: u32) -> (RgbImage, RgbImage) {
        let x = GAP + n * (tile_w + GAP);
        let line = |y| image::imageops::crop_imm(g, x, y, tile_w, LINE_H).to_image();
        (line(GAP + 2 + 1), line(GAP + 2 + 1 + LINE_H))
    }

    #[test]
    fn grid_holds_every_image_and_its_caption() {
        let g = grid(&[3, 7], None);
        let tile_w = text_width(MIN_CAPTION_CHARS);
        assert_eq!(g.width(), 2 * (tile_w + GAP) + GAP);
        assert_eq!(g.height(), 2 + CAPTION_H + 2 * GAP);
        assert_eq!(g.get_pixel(GAP, GAP), &Rgb([0, 0, 0]));
        assert_eq!(
            g.get_pixel(2 * GAP + tile_w + 1, GAP + 1),
            &Rgb([255, 255, 255])
        );
        // Each tile's label is drawn in white on its first caption line and its id in grey on
        // the second; the two tiles' captions differ ("3" and "7", "#10" and "#11").
        let brightest = |img: &RgbImage| img.pixels().map(|p| p.0[0]).max().unwrap();
        let (label0, id0) = caption_lines(&g, 0, tile_w);
        let (label1, id1) = caption_lines(&g, 1, tile_w);
        assert!(brightest(&label0) > 200 && brightest(&label1) > 200);
        assert!(
            (100..=150).contains(&brightest(&id0)),
            "{}",
            brightest(&id0)
        );
        assert_ne!(label0, label1);
        assert_ne!(id0, id1);
    }

    #[test]
    fn captions_show_class_names_when_known() {
        let tile_w = text_width(MIN_CAPTION_CHARS);
        let names = ["cat", "dog", "owl", "bat"].map(str::to_owned);
        let named = grid(&[3, 7], Some(&names));
        let numbered = grid(&[3, 7], None);
        // Label 3 is "bat"; label 7 has no name and stays a number.
        assert_ne!(
            caption_lines(&named, 0, tile_w).0,
            caption_lines(&numbered, 0, tile_w).0
        );
        assert_eq!(
            caption_lines(&named, 1, tile_w).0,
            caption_lines(&numbered, 1, tile_w).0
        );
        let mut expected = RgbImage::new(tile_w, LINE_H);
        draw_text(&mut expected, 0, 0, tile_w, "bat", Rgb([255, 255, 255]));
        assert_eq!(caption_lines(&named, 0, tile_w).0, expected);
    }
}
