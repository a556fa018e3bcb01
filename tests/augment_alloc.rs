//! After warm-up, producing a JPEG sample allocates nothing at all: decoder buffers, the
//! resampler's coefficient tables and strips, and the intermediate images live in the
//! per-worker Scratch and only grow, and decoding itself allocates nothing. (libjpeg-turbo
//! manages its own per-image memory in C, outside Rust's allocator.) PNG samples reuse the same
//! pixel buffers; what the `image` crate's PNG decoder allocates for its own state (inflate
//! window, row buffers: about 11 allocations per image, the largest 256 KiB) stays far below
//! an image's size. (WebP is the exception: the `image-webp` decoder builds its own frame,
//! width × height × 4 bytes, for every lossless image.)
//!
//! Only the allocations of the thread that counts are counted, so the test harness's other
//! threads do not disturb the figures.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::tar;
use image::ImageEncoder;
use ringfeed::augment::{AugmentConfig, Augmenter, SampleKey};

struct Counting;

/// Whether this thread counts its allocations (false while its thread-locals are torn down).
fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

fn set_counting(on: bool) {
    COUNTING.with(|c| c.set(on));
}

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counters are process-wide: one test counts at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Augments samples `0..samples` of `epoch` (seed 9), cycling through `inputs`.
fn process_epoch(
    aug: &Augmenter,
    inputs: &[Vec<u8>],
    epoch: u64,
    samples: u64,
    scratch: &mut ringfeed::augment::Scratch,
    out: &mut [u8],
) {
    for id in 0..samples {
        let key = SampleKey {
            seed: 9,
            epoch,
            sample_id: id,
        };
        aug.process(&inputs[id as usize % inputs.len()], key, out, scratch)
            .unwrap();
    }
}

#[test]
fn jpeg_samples_allocate_nothing_after_warm_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg: AugmentConfig = toml::from_str(
        r#"
        random-resized-crop = { size = 64 }
        horizontal-flip = { p = 0.5 }
        rotate = { degrees = [-10, 10], p = 0.5 }
        color-jitter = { brightness = 0.4, contrast = 0.4, saturation = 0.4, hue = 0.1 }
        grayscale = { p = 0.2 }
        gaussian-blur = { kernel = 5, p = 0.5 }
        normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }
        "#,
    )
    .unwrap();
    let aug = Augmenter::new(&cfg).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let inputs: Vec<Vec<u8>> = [
        "coffee_420.jpg",
        "chelsea_444.jpg",
        "rocket_progressive.jpg",
    ]
    .iter()
    .map(|n| std::fs::read(dir.join(n)).unwrap())
    .collect();
    let mut scratch = aug.scratch();
    let mut out = vec![0u8; aug.sample_bytes()];
    // Warm-up: each input's full decode once (the largest region any crop can need).
    let full: AugmentConfig = AugmentConfig {
        roi_decode: false,
        ..cfg.clone()
    };
    let full = Augmenter::new(&full).unwrap();
    for bytes in &inputs {
        let mut o = vec![0u8; full.sample_bytes()];
        full.process(
            bytes,
            SampleKey {
                seed: 0,
                epoch: 0,
                sample_id: 0,
            },
            &mut o,
            &mut scratch,
        )
        .unwrap();
    }
    // Decoding alone allocates nothing.
    let mut decoder = ringfeed::decode::Decoder::new(ringfeed::decode::DEFAULT_MAX_PIXELS);
    let request = ringfeed::decode::DecodeRequest::FULL;
    for counting in [false, true] {
        set_counting(counting);
        for bytes in &inputs {
            let info = decoder.probe(bytes).unwrap();
            decoder.decode(bytes, &info, request).unwrap();
        }
    }
    set_counting(false);
    assert_eq!(
        ALLOCATIONS.swap(0, Ordering::SeqCst),
        0,
        "allocations by decode"
    );

    process_epoch(&aug, &inputs, 0, 60, &mut scratch, &mut out);
    set_counting(true);
    process_epoch(&aug, &inputs, 1, 60, &mut scratch, &mut out);
    set_counting(false);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst);
    let largest = LARGEST.load(Ordering::SeqCst);
    assert_eq!(
        allocations, 0,
        "{allocations} allocations (largest {largest} bytes) in 60 samples after warm-up"
    );
}

#[test]
fn png_samples_allocate_no_image_sized_buffers_after_warm_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg: AugmentConfig = toml::from_str(
        r#"
        random-resized-crop = { size = 64 }
        horizontal-flip = { p = 0.5 }
        normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }
        "#,
    )
    .unwrap();
    let aug = Augmenter::new(&cfg).unwrap();
    // Photo-sized (the fixtures are smaller than the codec's own state): 1024×768, made here.
    let (w, h) = (1024u32, 768u32);
    let pixels: Vec<u8> = (0..w * h * 3)
        .map(|i| ((i % (w * 3)) / 5 + (i / (w * 3)) / 3 + i % 7) as u8)
        .collect();
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&pixels, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    let inputs = [png];
    let mut decoder = ringfeed::decode::Decoder::new(ringfeed::decode::DEFAULT_MAX_PIXELS);
    let smallest_image = inputs
        .iter()
        .map(|b| {
            let info = decoder.probe(b).unwrap();
            info.width as usize * info.height as usize * 3
        })
        .min()
        .unwrap();
    let mut scratch = aug.scratch();
    let mut out = vec![0u8; aug.sample_bytes()];
    let samples = 30u64;
    for epoch in 0..2u64 {
        ALLOCATIONS.store(0, Ordering::SeqCst);
        LARGEST.store(0, Ordering::SeqCst);
        set_counting(epoch == 1);
        process_epoch(&aug, &inputs, epoch, samples, &mut scratch, &mut out);
        set_counting(false);
    }
    let allocations = ALLOCATIONS.swap(0, Ordering::SeqCst);
    let largest = LARGEST.swap(0, Ordering::SeqCst);
    eprintln!(
        "PNG: {allocations} allocations in {samples} samples, largest {largest} bytes \
         (smallest image {smallest_image} bytes)"
    );
    assert!(
        largest < smallest_image / 4,
        "an allocation of {largest} bytes: image-sized buffers must come from the Scratch"
    );
}

/// Reading a member of an encrypted shard decrypts it in place in the reused read buffer:
/// after warm-up, reading (with decryption) and augmenting allocate nothing, like plaintext.
#[test]
fn encrypted_jpeg_samples_decrypt_in_place_and_allocate_nothing_after_warm_up() {
    use ringfeed::source::crypt::{
        Manifest, ManifestEntry, ShardSealer, HEADER_MEMBER, MANIFEST_MEMBER,
    };
    use ringfeed::source::{Dataset, ShardKey, SourceConfig};

    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg: AugmentConfig = toml::from_str(
        r#"
        random-resized-crop = { size = 64 }
        horizontal-flip = { p = 0.5 }
        normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }
        "#,
    )
    .unwrap();
    let aug = Augmenter::new(&cfg).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tmp = tempfile::tempdir().unwrap();
    let key = ShardKey::generate(&tmp.path().join("k")).unwrap();
    let sealer = ShardSealer::new(&key, false).unwrap();
    let mut members = vec![(HEADER_MEMBER.to_owned(), sealer.header())];
    let mut manifest = Manifest {
        samples: Vec::new(),
    };
    for (i, name) in [
        "coffee_420.jpg",
        "chelsea_444.jpg",
        "rocket_progressive.jpg",
    ]
    .iter()
    .enumerate()
    {
        let member = format!("{i:09}.jpg");
        let bytes = std::fs::read(fixtures.join(name)).unwrap();
        members.push((member.clone(), sealer.seal(&member, &bytes).unwrap()));
        manifest.samples.push(ManifestEntry {
            member,
            label: i as i64,
        });
    }
    members.push((
        MANIFEST_MEMBER.to_owned(),
        sealer.manifest(&manifest).unwrap(),
    ));
    std::fs::write(tmp.path().join("s.tar"), tar(&members)).unwrap();
    let mut source = SourceConfig::tar(["s.tar"]);
    source.key_file = Some("k".into());
    let dataset = Dataset::open(&source, tmp.path()).unwrap();

    let mut scratch = aug.scratch();
    let mut out = vec![0u8; aug.sample_bytes()];
    let mut buf = Vec::new();
    let mut epoch = |epoch: u64| {
        for id in 0..30 {
            dataset.read_into(id % dataset.len(), &mut buf).unwrap();
            let key = SampleKey {
                seed: 9,
                epoch,
                sample_id: id,
            };
            aug.process(&buf, key, &mut out, &mut scratch).unwrap();
        }
    };
    epoch(0);
    set_counting(true);
    epoch(1);
    set_counting(false);
    let allocations = ALLOCATIONS.swap(0, Ordering::SeqCst);
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 30 encrypted samples"
    );
}
