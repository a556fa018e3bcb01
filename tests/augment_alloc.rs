//! After warm-up, producing a JPEG sample allocates nothing at all: decoder buffers, the
//! resampler's coefficient tables and strips, and the intermediate images live in the
//! per-worker Scratch and only grow, and decoding itself allocates nothing. (libjpeg-turbo
//! manages its own per-image memory in C, outside Rust's allocator.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ringfeed::augment::{AugmentConfig, Augmenter, SampleKey};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
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
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn jpeg_samples_allocate_nothing_after_warm_up() {
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
    let run = |epoch: u64, scratch: &mut ringfeed::augment::Scratch, out: &mut [u8]| {
        for id in 0..60u64 {
            let key = SampleKey {
                seed: 9,
                epoch,
                sample_id: id,
            };
            aug.process(&inputs[id as usize % 3], key, out, scratch)
                .unwrap();
        }
    };
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
        COUNTING.store(counting, Ordering::SeqCst);
        for bytes in &inputs {
            let info = decoder.probe(bytes).unwrap();
            decoder.decode(bytes, &info, request).unwrap();
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(
        ALLOCATIONS.swap(0, Ordering::SeqCst),
        0,
        "allocations by decode"
    );

    run(0, &mut scratch, &mut out);
    COUNTING.store(true, Ordering::SeqCst);
    run(1, &mut scratch, &mut out);
    COUNTING.store(false, Ordering::SeqCst);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst);
    let largest = LARGEST.load(Ordering::SeqCst);
    assert_eq!(
        allocations, 0,
        "{allocations} allocations (largest {largest} bytes) in 60 samples after warm-up"
    );
}
