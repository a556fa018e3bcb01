//! JPEG decode, one thread: full decode vs region-of-interest decode of random-resized-crop
//! sized regions (the same regions every run), per image.

mod common;

use common::bench_images;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringfeed::decode::{DecodeRequest, Decoder, Rect, Scale, DEFAULT_MAX_PIXELS};

/// Deterministic crop regions like RandomResizedCrop's (area 8–100 %, ratio 3/4–4/3).
fn regions(decoder: &mut Decoder, images: &[Vec<u8>]) -> Vec<Rect> {
    let mut state = 0x1234_5678_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    images
        .iter()
        .map(|bytes| {
            let info = decoder.probe(bytes).unwrap();
            let (w, h) = (f64::from(info.width), f64::from(info.height));
            let area = w * h * (0.08 + 0.92 * next());
            let ratio = ((0.75f64).ln() + ((4.0f64 / 3.0).ln() - (0.75f64).ln()) * next()).exp();
            let cw = (area * ratio).sqrt().min(w).max(1.0) as u32;
            let ch = (area / ratio).sqrt().min(h).max(1.0) as u32;
            let x = ((info.width - cw) as f64 * next()) as u32;
            let y = ((info.height - ch) as f64 * next()) as u32;
            Rect {
                x,
                y,
                width: cw,
                height: ch,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (source, images) = bench_images();
    let mut decoder = Decoder::new(DEFAULT_MAX_PIXELS);
    let regions = regions(&mut decoder, &images);
    let mut group = c.benchmark_group(format!("decode_jpeg/{}images/{source}", images.len()));
    group.throughput(Throughput::Elements(images.len() as u64));
    group.sample_size(20);
    group.bench_function("full", |b| {
        b.iter(|| {
            for bytes in &images {
                let info = decoder.probe(bytes).unwrap();
                let px = decoder.decode(bytes, &info, DecodeRequest::FULL).unwrap();
                criterion::black_box(px.data.len());
            }
        })
    });
    group.bench_function("roi", |b| {
        b.iter(|| {
            for (bytes, region) in images.iter().zip(&regions) {
                let info = decoder.probe(bytes).unwrap();
                let request = DecodeRequest {
                    region: Some(*region),
                    scale: Scale::ONE,
                };
                let px = decoder.decode(bytes, &info, request).unwrap();
                criterion::black_box(px.data.len());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
