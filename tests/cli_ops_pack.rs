//! `ringfeed pack`: an ImageFolder tree → shards + index.json, served and consumed with the
//! labels of the class folders.

mod common;

use std::process::Command;

use common::{drain, lane_options, serve_finite, RuntimeTmp};
use image::codecs::jpeg::JpegEncoder;
use image::{ImageEncoder, RgbImage};
use ringfeed::ring::Consumer;

/// Class `c` holds solid images whose channel `c` is bright and the others dark.
fn solid_jpeg(class: usize, w: u32, h: u32) -> Vec<u8> {
    let mut px = [30u8; 3];
    px[class] = 220;
    let img = RgbImage::from_pixel(w, h, image::Rgb(px));
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 95)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

#[test]
fn packed_image_folder_serves_with_class_index_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let classes = ["red", "green", "blue"];
    for (c, name) in classes.iter().enumerate() {
        std::fs::create_dir_all(src.join(name)).unwrap();
        for i in 0..5u32 {
            std::fs::write(
                src.join(name).join(format!("img{i}.jpg")),
                solid_jpeg(c, 80 + i * 20, 60),
            )
            .unwrap();
        }
    }
    let out = tmp.path().join("shards");
    let status = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["pack", src.to_str().unwrap(), out.to_str().unwrap()])
        .args(["--samples-per-shard", "4", "--max-side", "64"])
        .status()
        .unwrap();
    assert!(status.success());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["samples"], 15);
    assert_eq!(
        index["classes"],
        serde_json::json!(["blue", "green", "red"])
    );
    let per_shard: Vec<u64> = index["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["samples"].as_u64().unwrap())
        .collect();
    assert_eq!(per_shard, [4, 4, 4, 3]);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty());

    let config = tmp.path().join("packed.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[source]
kind = "tar"
shards = ["{}/shard-{{000000..000003}}.tar"]

[sampling]
seed = 3
drop-last = true

[batch]
size = 5

[augment]
random-resized-crop = {{ size = 16 }}
normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }}

[ring]
name = "packed"
slots-per-lane = 3
"#,
            out.display()
        ),
    )
    .unwrap();
    let runtime = RuntimeTmp::new();
    let mut daemon = serve_finite(runtime.path(), &config, "1", &[]);
    let consumer = Consumer::attach_with(&lane_options(runtime.path(), "packed", 0)).unwrap();
    let mut seen = [0u32; 3];
    drain(&consumer, |batch| {
        let labels: &[i64] = batch.tensor("labels").unwrap();
        let images: &[f32] = batch.tensor("images").unwrap();
        let per = 3 * 16 * 16;
        for (n, &label) in labels.iter().enumerate() {
            let mean = |ch: usize| {
                let s = &images[n * per + ch * 256..n * per + (ch + 1) * 256];
                s.iter().sum::<f32>() / 256.0
            };
            let bright = (0..3).max_by(|&a, &b| mean(a).total_cmp(&mean(b))).unwrap();
            // Folders sort as blue, green, red: label 0 is blue (channel 2).
            assert_eq!(
                2 - bright as i64,
                label,
                "sample {n} of batch {}",
                batch.index()
            );
            seen[label as usize] += 1;
        }
    });
    assert_eq!(seen, [5, 5, 5]);
    drop(consumer);
    assert!(daemon.wait(std::time::Duration::from_secs(30)).success());
}
