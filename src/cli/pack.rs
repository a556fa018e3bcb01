//! `ringfeed pack`: an ImageFolder tree (or a list file of `path label` lines) → WebDataset tar
//! shards (`<key>.jpg` + `<key>.cls`) plus `OUT/index.json`.
//!
//! # Brief overview
//!
//! [`inputs`] lists the samples and class names; [`encode`] keeps each file's bytes as they
//! are unless `--max-side`/`--quality` ask for a re-encode; [`ShardWriter`] appends ustar
//! members to `OUT/.<shard>.partial` and renames it to its final name only when complete, so
//! an interrupted pack never leaves a half shard under a final name. On a terminal an
//! `indicatif` bar shows the samples packed, the rate and the ETA.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use rand::seq::SliceRandom as _;
use ringfeed::source::crypt::{self, Manifest, ManifestEntry, ShardSealer};
use ringfeed::source::ShardKey;
use serde::Serialize;

/// Flags of `ringfeed pack`.
#[derive(Debug, Args)]
pub(crate) struct PackArgs {
    /// ImageFolder root (`<root>/<class>/<image>`), or a text file of `path label` lines
    /// (paths relative to the file's folder).
    src: PathBuf,
    /// Output folder for the shards and index.json (created if missing).
    out: PathBuf,
    /// Samples per shard.
    #[arg(long, conflicts_with = "shard_size")]
    samples_per_shard: Option<u64>,
    /// Largest shard size, e.g. 256MB, 1GiB (default 256MB when --samples-per-shard is not
    /// given).
    #[arg(long, value_parser = parse_size)]
    shard_size: Option<u64>,
    /// Downscale images whose longer side exceeds this (re-encodes them as JPEG).
    #[arg(long)]
    max_side: Option<u32>,
    /// Re-encode every image as JPEG at this quality (1–100); with --max-side alone, 90.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: Option<u8>,
    /// Encrypt every image and label with the key in FILE (`ringfeed keygen`): each image
    /// member is sealed with AES-256-GCM under a fresh random nonce, labels go into a
    /// sealed manifest, and samples are written in a random order (a class-by-class order
    /// would reveal labels by position). See docs/security.md.
    #[arg(long, value_name = "FILE")]
    encrypt_key_file: Option<PathBuf>,
    /// With --encrypt-key-file: name members by random opaque keys (`<32 hex>.img`) instead
    /// of `<ordinal>.<ext>`, hiding each image's format too.
    #[arg(long, requires = "encrypt_key_file")]
    hide_names: bool,
}

/// Parses `256MB`, `1GiB`, `512k`, `1000` (bytes) into bytes.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 256MB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let bytes = (n * mult as f64) as u64;
    if bytes == 0 {
        return Err(format!("{text:?}: a shard size must be positive"));
    }
    Ok(bytes)
}

/// One sample to pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Input {
    /// Image file.
    pub(crate) path: PathBuf,
    /// Class index.
    pub(crate) label: i64,
}

/// The samples of `src` and, for an ImageFolder, its class names (the label is the index).
pub(crate) fn inputs(src: &Path) -> anyhow::Result<(Vec<Input>, Option<Vec<String>>)> {
    if src.is_dir() {
        let scan = ringfeed::source::imagefolder::scan(src)
            .with_context(|| format!("cannot scan {}", src.display()))?;
        for issue in &scan.issues {
            eprintln!("ringfeed: skipping {issue:?}");
        }
        let files = scan
            .files
            .iter()
            .map(|(rel, label, _)| Input {
                path: src.join(rel),
                label: *label,
            })
            .collect();
        return Ok((files, Some(scan.classes)));
    }
    let text =
        std::fs::read_to_string(src).with_context(|| format!("cannot read {}", src.display()))?;
    let base = src.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (path, label) = line
            .rsplit_once(char::is_whitespace)
            .with_context(|| format!("{}:{}: expected `path label`", src.display(), n + 1))?;
        let label: i64 = label.parse().with_context(|| {
            format!(
                "{}:{}: label {label:?} is not an integer",
                src.display(),
                n + 1
            )
        })?;
        files.push(Input {
            path: base.join(path.trim()),
            label,
        });
    }
    Ok((files, None))
}

/// The member extension and bytes of one image: the file as it is, or re-encoded as JPEG when
/// `max_side` (image larger than it) or `quality` asks for it.
pub(crate) fn encode(
    path: &Path,
    bytes: Vec<u8>,
    max_side: Option<u32>,
    quality: Option<u8>,
) -> anyhow::Result<(String, Vec<u8>)> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let ext = if ext == "jpeg" { "jpg".to_owned() } else { ext };
    if max_side.is_none() && quality.is_none() {
        return Ok((ext, bytes));
    }
    let img = image::load_from_memory(&bytes)
        .with_context(|| format!("cannot decode {}", path.display()))?;
    let too_big = max_side.filter(|&m| img.width().max(img.height()) > m);
    if too_big.is_none() && quality.is_none() {
        return Ok((ext, bytes));
    }
    let img = match too_big {
        Some(m) => img.resize(m, m, image::imageops::FilterType::Triangle),
        None => img,
    };
    let rgb = img.to_rgb8();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.unwrap_or(90))
        .encode_image(&rgb)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    Ok(("jpg".to_owned(), out))
}

/// A ustar header for a regular file `name` of `len` bytes.
fn tar_header(name: &str, len: u64) -> anyhow::Result<[u8; 512]> {
    anyhow::ensure!(name.len() < 100, "member name {name:?} too long");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{len:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..265].copy_from_slice(b"ustar\x0000");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    Ok(h)
}

/// Bytes a member of `len` bytes takes in a tar (header plus padded data).
fn member_bytes(len: u64) -> u64 {
    512 + len.div_ceil(512) * 512
}

/// Writes one shard under a temporary name; [`finish`](ShardWriter::finish) renames it.
struct ShardWriter<'k> {
    tmp: PathBuf,
    path: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
    samples: u64,
    /// For an encrypted shard: its sealer and the manifest written as its last member.
    sealing: Option<(ShardSealer<'k>, Manifest)>,
}

impl<'k> ShardWriter<'k> {
    fn create(
        dir: &Path,
        name: &str,
        key: Option<(&'k ShardKey, bool)>,
    ) -> anyhow::Result<ShardWriter<'k>> {
        let tmp = dir.join(format!(".{name}.partial"));
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut writer = ShardWriter {
            tmp,
            path: dir.join(name),
            out: BufWriter::new(file),
            bytes: 0,
            samples: 0,
            sealing: None,
        };
        if let Some((key, hide_names)) = key {
            let sealer = ShardSealer::new(key, hide_names)?;
            writer.member(crypt::HEADER_MEMBER, &sealer.header())?;
            let manifest = Manifest {
                samples: Vec::new(),
            };
            writer.sealing = Some((sealer, manifest));
        }
        Ok(writer)
    }

    /// Writes one sample: `<key>.<ext>` and `<key>.cls`, or in an encrypted shard the sealed
    /// image member alone (its label goes into the sealed manifest).
    fn sample(&mut self, key: &str, ext: &str, data: &[u8], label: i64) -> anyhow::Result<()> {
        let image = format!("{key}.{ext}");
        match &mut self.sealing {
            None => {
                self.member(&image, data)?;
                self.member(&format!("{key}.cls"), format!("{label}\n").as_bytes())?;
            }
            Some((sealer, manifest)) => {
                let sealed = sealer.seal(&image, data)?;
                manifest.samples.push(ManifestEntry {
                    member: image.clone(),
                    label,
                });
                self.member(&image, &sealed)?;
            }
        }
        self.samples += 1;
        Ok(())
    }

    fn member(&mut self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        let len = data.len() as u64;
        self.out.write_all(&tar_header(name, len)?)?;
        self.out.write_all(data)?;
        let pad = (member_bytes(len) - 512 - len) as usize;
        self.out.write_all(&[0u8; 512][..pad])?;
        self.bytes += member_bytes(len);
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<u64> {
        if let Some((sealer, manifest)) = self.sealing.take() {
            let sealed = sealer.manifest(&manifest)?;
            self.member(crypt::MANIFEST_MEMBER, &sealed)?;
        }
        self.out.write_all(&[0u8; 1024])?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot rename to {}", self.path.display()))?;
        Ok(self.samples)
    }
}

/// `OUT/index.json`.
#[derive(Debug, Serialize)]
struct PackIndex {
    shards: Vec<ShardEntry>,
    samples: u64,
    classes: Option<Vec<String>>,
    /// Where each sample came from, in pack order: the shard, the member and the original
    /// file's path (relative to the packed folder or list file's directory). Left out with
    /// --hide-names, whose point is not to reveal them.
    #[serde(skip_serializing_if = "Option::is_none")]
    originals: Option<Vec<PackedSample>>,
    /// Encrypted shards: the key id (never the key) and whether names are hidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption: Option<PackEncryption>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct PackEncryption {
    algorithm: &'static str,
    key_id: String,
    hidden_names: bool,
}

/// One entry of `index.json`'s `originals`.
#[derive(Debug, Serialize)]
struct PackedSample {
    shard: String,
    member: String,
    path: String,
}

#[derive(Debug, Serialize)]
struct ShardEntry {
    name: String,
    samples: u64,
}

/// Packs `src` into shards under `out`.
pub(crate) fn run(args: PackArgs) -> anyhow::Result<ExitCode> {
    let (mut files, classes) = inputs(&args.src)?;
    anyhow::ensure!(!files.is_empty(), "{}: no images found", args.src.display());
    let key = args
        .encrypt_key_file
        .as_deref()
        .map(ShardKey::load)
        .transpose()?;
    if key.is_some() {
        // An ImageFolder scan lists classes one after another: in that order a sample's
        // position (and ordinal name) would give its label away.
        files.shuffle(&mut rand::rng());
    }
    let sealing = key.as_ref().map(|k| (k, args.hide_names));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let max_bytes = match args.samples_per_shard {
        Some(_) => u64::MAX,
        None => args.shard_size.unwrap_or(256_000_000),
    };
    let max_samples = args.samples_per_shard.unwrap_or(u64::MAX).max(1);
    let started = Instant::now();
    let progress = progress_bar(files.len() as u64);
    let mut shards: Vec<ShardEntry> = Vec::new();
    let mut originals: Vec<PackedSample> = Vec::new();
    let src_dir = if args.src.is_dir() {
        args.src.clone()
    } else {
        args.src.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let mut current: Option<ShardWriter> = None;
    let total = files.len();
    for (i, input) in files.iter().enumerate() {
        let raw = std::fs::read(&input.path)
            .with_context(|| format!("cannot read {}", input.path.display()))?;
        let (ext, data) = encode(&input.path, raw, args.max_side, args.quality)?;
        let need = match sealing {
            None => member_bytes(data.len() as u64) + member_bytes(32),
            // The sealed image, and its manifest entry (name and label, about 40 bytes).
            Some(_) => member_bytes((data.len() + crypt::OVERHEAD) as u64) + 64,
        };
        if current
            .as_ref()
            .is_some_and(|w| w.samples >= max_samples || w.bytes + need + 1024 > max_bytes)
        {
            let w = current.take().expect("checked");
            let name = file_name(&w.path);
            shards.push(ShardEntry {
                samples: w.finish()?,
                name,
            });
        }
        let w = match &mut current {
            Some(w) => w,
            None => current.insert(ShardWriter::create(
                &args.out,
                &format!("shard-{:06}.tar", shards.len()),
                sealing,
            )?),
        };
        if args.hide_names {
            w.sample(&ShardSealer::opaque_key()?, "img", &data, input.label)?;
        } else {
            let key = format!("{i:09}");
            w.sample(&key, &ext, &data, input.label)?;
            originals.push(PackedSample {
                shard: format!("shard-{:06}.tar", shards.len()),
                member: format!("{key}.{ext}"),
                path: input
                    .path
                    .strip_prefix(&src_dir)
                    .unwrap_or(&input.path)
                    .to_string_lossy()
                    .into_owned(),
            });
        }
        progress.set_message((shards.len() + 1).to_string());
        progress.inc(1);
    }
    if let Some(w) = current.take() {
        let name = file_name(&w.path);
        shards.push(ShardEntry {
            samples: w.finish()?,
            name,
        });
    }
    progress.finish_and_clear();
    let index = PackIndex {
        samples: total as u64,
        shards,
        classes,
        originals: (!args.hide_names).then_some(originals),
        encryption: key.as_ref().map(|k| PackEncryption {
            algorithm: crypt::ALGORITHM,
            key_id: k.id().to_owned(),
            hidden_names: args.hide_names,
        }),
    };
    let tmp = args.out.join(".index.json.partial");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&index)?)?;
    std::fs::rename(&tmp, args.out.join("index.json"))?;
    eprintln!(
        "ringfeed: wrote {} shard(s) of {} samples to {} in {:.1} s",
        index.shards.len(),
        total,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The bar of `pack` (drawn only when stderr is a terminal): samples packed, shards begun,
/// rate and ETA.
fn progress_bar(total: u64) -> ProgressBar {
    let bar = super::logging::bars().add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template(
            "packed {pos}/{len} samples into {msg} shard(s) [{bar:24}] {rate}  ETA {eta}",
        )
        .expect("a valid template")
        .with_key(
            "rate",
            |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{:.0} images/s", state.per_sec());
            },
        )
        .progress_chars("#>-"),
    );
    bar
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("256MB"), Ok(256_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("0MB").is_err());
    }

    #[test]
    fn tar_header_checksum_and_padding() {
        let h = tar_header("000000001.cls", 2).unwrap();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut copy = h;
        copy[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, copy.iter().map(|&b| u32::from(b)).sum::<u32>());
        assert_eq!(member_bytes(2), 1024);
        assert_eq!(member_bytes(512), 1024);
        assert_eq!(member_bytes(0), 512);
    }

    #[test]
    fn list_files_give_paths_relative_to_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "# comment\na/b c.jpg 3\n\nx.png 0\n").unwrap();
        let (files, classes) = inputs(&list).unwrap();
        assert_eq!(classes, None);
        assert_eq!(files[0].path, dir.path().join("a/b c.jpg"));
        assert_eq!(files[0].label, 3);
        assert_eq!(files[1].label, 0);
        std::fs::write(&list, "nolabel\n").unwrap();
        assert!(inputs(&list).is_err());
    }
}
