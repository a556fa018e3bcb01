//! The whole per-sample stage, one thread: decode → RandomResizedCrop 224 → horizontal flip →
//! normalise → f32 CHW, with region-of-interest decoding and, as the baseline in the same
//! run, with full decoding.

mod common;

use common::bench_images;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringfeed::augment::{AugmentConfig, Augmenter, SampleKey};

fn config(roi_decode: bool) -> AugmentConfig {
    let mut cfg: AugmentConfig = toml::from_str(
        r#"
        random-resized-crop = { size = 224 }
        horizontal-flip = { p = 0.5 }
        normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }
        output = { dtype = "f32", layout = "nchw" }
        "#,
    )
    .expect("valid config");
    cfg.roi_decode = roi_decode;
    cfg
}

fn bench(c: &mut Criterion) {
    let (source, images) = bench_images();
    let mut group = c.benchmark_group(format!(
        "augment_rrc224_f32/{}images/{source}",
        images.len()
    ));
    group.throughput(Throughput::Elements(images.len() as u64));
    group.sample_size(20);
    for (name, roi) in [("roi_decode", true), ("full_decode", false)] {
        let aug = Augmenter::new(&config(roi)).expect("valid plan");
        let mut scratch = aug.scratch();
        let mut out = vec![0u8; aug.sample_bytes()];
        let mut epoch = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                epoch += 1;
                for (id, bytes) in images.iter().enumerate() {
                    let key = SampleKey {
                        seed: 0,
                        epoch,
                        sample_id: id as u64,
                    };
                    aug.process(bytes, key, &mut out, &mut scratch)
                        .expect("sample");
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
