//! The antialiased resize alone, A/B in the same run: ringfeed's [`Resampler`] against
//! fast_image_resize's bilinear convolution (the implementation it replaced), on real photos
//! cropped the way RandomResizedCrop 224 crops ~460×400 images (about 100 to 460 pixels per
//! side), resized to 224×224.

mod common;

use common::bench_images;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use ringfeed::augment::Resampler;
use ringfeed::decode::Rect;

const OUT: u32 = 224;

/// Crop sizes (width, height) spanning RandomResizedCrop's range on ~460×400 photos.
const CROPS: [(u32, u32); 8] = [
    (100, 120),
    (150, 130),
    (200, 260),
    (280, 240),
    (330, 300),
    (380, 400),
    (440, 360),
    (460, 400),
];

struct Case {
    pixels: Vec<u8>,
    width: u32,
    height: u32,
    view: Rect,
}

fn cases() -> Vec<Case> {
    let (_, images) = bench_images();
    let mut cases = Vec::new();
    for (i, bytes) in images.iter().take(8).enumerate() {
        let rgb = image::load_from_memory(bytes).expect("decodable").to_rgb8();
        let (width, height) = rgb.dimensions();
        let pixels = rgb.into_raw();
        let (cw, ch) = CROPS[i % CROPS.len()];
        for (cw, ch) in [(cw, ch), CROPS[(i + 3) % CROPS.len()]] {
            let (cw, ch) = (cw.min(width), ch.min(height));
            let view = Rect {
                x: (width - cw) / 2,
                y: (height - ch) / 2,
                width: cw,
                height: ch,
            };
            cases.push(Case {
                pixels: pixels.clone(),
                width,
                height,
                view,
            });
        }
    }
    cases
}

fn fir(resizer: &mut Resizer, case: &Case, out: &mut [u8]) {
    let src = ImageRef::new(case.width, case.height, &case.pixels, PixelType::U8x3).unwrap();
    let v = case.view;
    let src = CroppedImage::new(&src, v.x, v.y, v.width, v.height).unwrap();
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(0.0, 0.0, f64::from(v.width), f64::from(v.height));
    let mut dst = Image::from_slice_u8(OUT, OUT, out, PixelType::U8x3).unwrap();
    resizer.resize(&src, &mut dst, &options).unwrap();
}

fn ours(resampler: &mut Resampler, case: &Case, out: &mut [u8]) {
    let v = case.view;
    let dst = Rect {
        x: 0,
        y: 0,
        width: OUT,
        height: OUT,
    };
    let src_box = [0.0, 0.0, f64::from(v.width), f64::from(v.height)];
    resampler
        .resample(
            &case.pixels,
            case.width,
            case.height,
            v,
            src_box,
            out,
            OUT,
            OUT,
            dst,
        )
        .unwrap();
}

fn bench(c: &mut Criterion) {
    let cases = cases();
    let mut group = c.benchmark_group(format!("resample_to_224/{}crops", cases.len()));
    group.throughput(Throughput::Elements(cases.len() as u64));
    group.sample_size(30);
    let mut out = vec![0u8; (OUT * OUT * 3) as usize];
    let mut resizer = Resizer::new();
    group.bench_function("fast_image_resize", |b| {
        b.iter(|| {
            cases
                .iter()
                .for_each(|case| fir(&mut resizer, case, &mut out))
        })
    });
    let mut resampler = Resampler::new();
    group.bench_function("ringfeed", |b| {
        b.iter(|| {
            cases
                .iter()
                .for_each(|case| ours(&mut resampler, case, &mut out))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
