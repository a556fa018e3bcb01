//! Inputs shared by the per-stage benchmarks.

/// Up to 64 real-photo JPEGs: `../shared/data/photos-dev` beside the repository when present
/// (or `$RINGFEED_BENCH_DIR`, an ImageFolder tree), else the repository's JPEG fixtures.
pub(crate) fn bench_images() -> (String, Vec<Vec<u8>>) {
    let dir = std::env::var("RINGFEED_BENCH_DIR").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/photos-dev/imagefolder"
        )
        .to_owned()
    });
    let mut paths: Vec<std::path::PathBuf> = glob::glob(&format!("{dir}/*/*.jpg"))
        .map(|g| g.filter_map(Result::ok).collect())
        .unwrap_or_default();
    let source = if paths.is_empty() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        paths = [
            "coffee_420.jpg",
            "chelsea_444.jpg",
            "rocket_progressive.jpg",
        ]
        .iter()
        .map(|n| std::path::Path::new(fixtures).join(n))
        .collect();
        "tests/fixtures".to_owned()
    } else {
        dir.trim_end_matches('/')
            .rsplit('/')
            .nth(1)
            .unwrap_or("images")
            .to_owned()
    };
    paths.sort();
    paths.truncate(64);
    let images = paths
        .iter()
        .map(|p| std::fs::read(p).expect("readable image"))
        .collect();
    (source, images)
}
