//! `ringfeed peek`: a PNG grid from a running ring (without taking the batch) and from a
//! configuration alone; the two agree for the same batch.

mod common;

use std::path::Path;
use std::process::Command;

use common::{small_config, write_dataset, Daemon, RuntimeTmp};

fn peek(runtime: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .arg("peek")
        .args(args)
        .env("RINGFEED_RUNTIME_DIR", runtime)
        .output()
        .expect("running ringfeed peek");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "peek failed: {stderr}");
    stderr
}

/// Decodes the PNG and checks the grid of 8 samples of 32×32 (3 columns × 3 rows of tiles
/// with a two-line caption) holds real picture content.
fn check_grid(path: &Path) -> image::RgbImage {
    let img = image::open(path).unwrap().to_rgb8();
    // Tiles widened to 50 px (8 caption characters of 6.2 px) + 4 px gap; 32 px tall + 30 px
    // caption (two 14 px lines) + 4 px gap; 4 px border.
    assert_eq!((img.width(), img.height()), (3 * 54 + 4, 3 * 66 + 4));
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 100, "only {} colours", colours.len());
    img
}

#[test]
fn peek_copies_a_published_batch_and_matches_the_offline_render() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 2, 16);
    let config = small_config(data.path(), &spec, "peekring");
    let daemon = Daemon::start(runtime.path(), &["--config", config.to_str().unwrap()]);

    let live = data.path().join("live.png");
    let said = peek(
        runtime.path(),
        &["peekring", "--lane", "0", "--out", live.to_str().unwrap()],
    );
    let live_img = check_grid(&live);
    // "lane 0 seq S epoch E batch I (8 samples)"
    let words: Vec<&str> = said
        .lines()
        .find(|l| l.contains(" seq "))
        .unwrap_or_else(|| panic!("no batch line in {said}"))
        .split_whitespace()
        .collect();
    let after = |key: &str| {
        let i = words.iter().position(|w| *w == key).unwrap();
        words[i + 1].to_owned()
    };
    let (epoch, index) = (after("epoch"), after("batch"));

    // Peeking took nothing: a consumer still receives the ring's first batch.
    let mut opts = ringfeed::ring::AttachOptions::new("peekring", 0);
    opts.dir = Some(ringfeed::ring::RuntimeDir::at(runtime.path()));
    let consumer = ringfeed::ring::Consumer::attach_with(&opts).unwrap();
    let first = consumer.next().unwrap().unwrap();
    assert_eq!((first.epoch(), first.index(), first.seq()), (0, 0, 1));
    drop(first);
    drop(consumer);

    let offline = data.path().join("offline.png");
    peek(
        runtime.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--epoch",
            &epoch,
            "--index",
            &index,
            "--out",
            offline.to_str().unwrap(),
        ],
    );
    let offline_img = check_grid(&offline);
    assert!(
        live_img == offline_img,
        "the ring's batch (epoch {epoch}, batch {index}) differs from the offline render"
    );
    assert!(daemon.terminate().success());
}

/// Runs `ringfeed peek` in the repository root (where the default configuration's relative
/// shard paths resolve) and returns its stderr.
fn peek_in_repo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .arg("peek")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running ringfeed peek");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "peek failed: {stderr}");
    stderr
}

/// The bundled sample's captions name its classes (from `data/sample/classes.txt`): the same
/// batch rendered with an empty class list differs exactly in the caption strips.
#[test]
fn peek_of_the_bundled_sample_shows_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let named = dir.path().join("named.png");
    let numbered = dir.path().join("numbered.png");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let common = ["--config", "configs/default.toml", "--batch-size", "8"];
    let said = peek_in_repo(&[&common[..], &["--out", named.to_str().unwrap()]].concat());
    assert!(
        said.contains("captions show class names (8 from")
            && said.contains("data/sample/classes.txt"),
        "{said}"
    );
    let said = peek_in_repo(
        &[
            &common[..],
            &[
                "--classes",
                empty.to_str().unwrap(),
                "--out",
                numbered.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(said.contains("captions show class names (0 from"), "{said}");
    let (a, b) = (
        image::open(&named).unwrap().to_rgb8(),
        image::open(&numbered).unwrap().to_rgb8(),
    );
    assert_eq!(a.dimensions(), b.dimensions());
    // 160 px tiles + 30 px caption + 4 px gap per row, from a 4 px border.
    let (tile, caption, cell) = (160, 30, 194);
    let differing_rows: Vec<u32> = (0..a.height())
        .filter(|&y| (0..a.width()).any(|x| a.get_pixel(x, y) != b.get_pixel(x, y)))
        .collect();
    assert!(
        !differing_rows.is_empty(),
        "class names drew nothing different"
    );
    for y in differing_rows {
        let in_cell = (y - 4) % cell;
        assert!(
            (tile..tile + caption).contains(&in_cell),
            "row {y} differs outside a caption"
        );
    }
}

/// Where peek finds class names, in order: `[source] classes` (inline or a file), the
/// ImageFolder's directories, `classes.txt` beside the shards; none leaves numbers.
#[test]
fn peek_finds_class_names_in_config_folder_and_classes_txt() {
    let data = tempfile::tempdir().unwrap();
    let spec = write_dataset(data.path(), 1, 16);
    let config = small_config(data.path(), &spec, "classesring");
    let out = data.path().join("grid.png");
    let run = |config: &Path| {
        peek(
            data.path(),
            &[
                "--config",
                config.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };
    assert!(run(&config).contains("captions show label numbers"));

    std::fs::write(data.path().join("classes.txt"), "zero\none\ntwo\n").unwrap();
    let said = run(&config);
    assert!(said.contains("captions show class names (3 from"), "{said}");
    assert!(said.contains("classes.txt"), "{said}");

    // The configuration wins over classes.txt: inline, then as a file.
    let text = std::fs::read_to_string(&config).unwrap();
    let inline = data.path().join("inline.toml");
    let with_classes = |value: &str| {
        text.replace(
            "kind = \"tar\"",
            &format!("kind = \"tar\"\nclasses = {value}"),
        )
    };
    std::fs::write(&inline, with_classes(r#"["a", "b", "c", "d"]"#)).unwrap();
    let said = run(&inline);
    assert!(
        said.contains("captions show class names (4 from [source] classes)"),
        "{said}"
    );
    let names = data.path().join("names.txt");
    std::fs::write(&names, "x\ny\n").unwrap();
    let from_file = data.path().join("from_file.toml");
    std::fs::write(
        &from_file,
        with_classes(&format!("{:?}", names.display().to_string())),
    )
    .unwrap();
    let said = run(&from_file);
    assert!(said.contains("captions show class names (2 from"), "{said}");
    assert!(said.contains("names.txt"), "{said}");
    // A missing classes file is an error naming it and the key.
    std::fs::remove_file(&names).unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_ringfeed"))
        .args(["peek", "--config", from_file.to_str().unwrap(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(
        stderr.contains("[source] classes") && stderr.contains("names.txt"),
        "{stderr}"
    );

    // An ImageFolder names its classes by its directories.
    let root = data.path().join("folder");
    for (class, seed) in [("ant", 1), ("bee", 2)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..8 {
            std::fs::write(
                root.join(class).join(format!("{i}.jpg")),
                common::jpeg(48, 40, seed * 10 + i),
            )
            .unwrap();
        }
    }
    let folder = data.path().join("folder.toml");
    let folder_text = text.replace(
        &format!("kind = \"tar\"\nshards = [\"{spec}\"]"),
        &format!(
            "kind = \"imagefolder\"\npath = {:?}",
            root.display().to_string()
        ),
    );
    assert_ne!(folder_text, text);
    std::fs::write(&folder, folder_text).unwrap();
    let said = run(&folder);
    assert!(
        said.contains("captions show class names (2 from the ImageFolder's directories)"),
        "{said}"
    );
}

#[test]
fn peek_with_shards_and_no_config_renders_from_the_shards_not_a_ring() {
    // No daemon runs in this runtime directory: before, `--shards` without `--config` fell
    // through to live-ring mode and failed to find ring "default".
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 1, 40);
    let shard = spec.replace("{000000..000000}", "000000");
    let out = data.path().join("shards.png");
    let said = peek(
        runtime.path(),
        &["--shards", &shard, "--out", out.to_str().unwrap()],
    );
    assert!(!said.contains(" seq "), "read a ring: {said}");
    let img = image::open(&out).unwrap().to_rgb8();
    assert!(img.width() > 100 && img.height() > 100);
}
