//! What `serve` tells clients about its samples (`classes` and `describe` requests, format
//! 1.3): the class names, and for each sample id its shard, member and original file.
//!
//! Brief overview: [`catalog`] finds the class names (`[source] classes`, the ImageFolder's
//! directories, `index.json` beside the shards as `ringfeed pack` writes it, or `classes.txt`
//! beside them) and, from `index.json`'s `originals`, the file each packed member was made
//! from. A classes file that cannot be trusted (not UTF-8, a NUL byte, an over-long line, too
//! large) is refused with a warning naming it: the ring is served with the names unknown.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use ringfeed::config::Plan;
use ringfeed::ring::Catalog;
use ringfeed::source::{ClassNames, Mixture};

/// Largest classes file or `index.json` read (ImageNet-21k's names take about 1 MB; an index
/// of a million packed samples about 100 MB).
const MAX_FILE_BYTES: u64 = 256 << 20;
/// Longest class name accepted, in bytes.
const MAX_NAME_BYTES: usize = 1024;
/// Most class names accepted.
const MAX_CLASSES: usize = 1 << 20;

/// Reads at most [`MAX_FILE_BYTES`] of `path`, refusing a larger file.
fn read_bounded(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_FILE_BYTES,
        "{} is larger than {} MiB",
        path.display(),
        MAX_FILE_BYTES >> 20
    );
    Ok(bytes)
}

/// Checks class names from any source: not too many, none too long or holding a NUL or
/// another control character.
fn check_names(names: Vec<String>, from: &str) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        names.len() <= MAX_CLASSES,
        "{from}: {} class names, more than {MAX_CLASSES}",
        names.len()
    );
    for (i, name) in names.iter().enumerate() {
        anyhow::ensure!(
            name.len() <= MAX_NAME_BYTES,
            "{from}: line {}: class name longer than {MAX_NAME_BYTES} bytes",
            i + 1
        );
        anyhow::ensure!(
            !name.chars().any(char::is_control),
            "{from}: line {}: class name {name:?} holds a control character",
            i + 1
        );
    }
    Ok(names)
}

/// A classes file: one name per line (line `i` names label `i`), UTF-8.
pub(crate) fn read_classes_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let bytes = read_bounded(path)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 ({e})", path.display()))?;
    let names = text
        .lines()
        .map(|l| l.trim_end_matches('\r').trim().to_owned())
        .collect();
    check_names(names, &path.display().to_string())
}

/// `index.json` as `ringfeed pack` writes it (only what is read here).
#[derive(Debug, Default, serde::Deserialize)]
struct PackIndex {
    #[serde(default)]
    classes: Option<Vec<String>>,
    #[serde(default)]
    originals: Option<Vec<PackedSample>>,
}

#[derive(Debug, serde::Deserialize)]
struct PackedSample {
    shard: String,
    member: String,
    path: String,
}

/// The catalog of `plan`'s dataset.
pub(crate) fn catalog(plan: &Plan, dataset: Arc<Mixture>) -> Catalog {
    let shard_dir: Option<PathBuf> = dataset
        .shard_paths()
        .first()
        .and_then(|shard| shard.parent())
        .map(Path::to_path_buf);
    let index = shard_dir
        .as_ref()
        .map(|d| d.join("index.json"))
        .filter(|p| p.is_file());
    let index: PackIndex = match &index {
        None => PackIndex::default(),
        Some(path) => match read_bounded(path).and_then(|b| {
            serde_json::from_slice(&b)
                .with_context(|| format!("{}: not a pack index", path.display()))
        }) {
            Ok(index) => index,
            Err(e) => {
                log::warn!("{e:#}; samples are described without their original paths");
                PackIndex::default()
            }
        },
    };
    let (classes, source) = match class_names(plan, &dataset, shard_dir.as_deref(), &index) {
        Ok(Some((names, source))) => (serde_json::json!(names), source),
        Ok(None) => (serde_json::Value::Null, "unknown".to_owned()),
        Err(e) => {
            log::warn!("class names refused: {e:#}; loader.classes will be None");
            (serde_json::Value::Null, format!("refused: {e:#}"))
        }
    };
    let originals: HashMap<(String, String), String> = index
        .originals
        .unwrap_or_default()
        .into_iter()
        .map(|o| ((o.shard, o.member), o.path))
        .collect();
    let root = shard_dir.unwrap_or_default();
    Catalog {
        classes: serde_json::json!({"classes": classes, "source": source}),
        describe: Box::new(move |id| {
            let Some((stream, shard, member)) = dataset.origin(id) else {
                return serde_json::json!({"id": id, "error": format!(
                    "sample id {id} is outside the dataset (0..{})", dataset.len())});
            };
            let (shard_text, path) = match shard {
                Some(shard) => {
                    let name = shard
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let original = shard
                        .parent()
                        .filter(|d| *d == root)
                        .and_then(|_| originals.get(&(name, member.clone())))
                        .cloned();
                    (Some(shard.display().to_string()), original)
                }
                None => (None, Some(member.clone())),
            };
            let mut v =
                serde_json::json!({"id": id, "shard": shard_text, "member": member, "path": path});
            if let Some(stream) = stream {
                v["stream"] = serde_json::json!(stream);
            }
            v
        }),
    }
}

/// The class names, first found of: `[source] classes`, the ImageFolder's directories,
/// `index.json`'s `classes`, `classes.txt` beside the first shard.
fn class_names(
    plan: &Plan,
    dataset: &Mixture,
    shard_dir: Option<&Path>,
    index: &PackIndex,
) -> anyhow::Result<Option<(Vec<String>, String)>> {
    match &plan.source().classes {
        Some(ClassNames::List(names)) => {
            return Ok(Some((
                check_names(names.clone(), "[source] classes")?,
                "[source] classes".into(),
            )))
        }
        Some(ClassNames::File(path)) => {
            let path = plan.base_dir().join(path);
            return Ok(Some((
                read_classes_file(&path)?,
                path.display().to_string(),
            )));
        }
        None => {}
    }
    if let Some(names) = dataset.class_names() {
        return Ok(Some((
            names.to_vec(),
            "the ImageFolder's directories".into(),
        )));
    }
    if let (Some(names), Some(dir)) = (&index.classes, shard_dir) {
        let from = dir.join("index.json").display().to_string();
        return Ok(Some((check_names(names.clone(), &from)?, from)));
    }
    match shard_dir.map(|d| d.join("classes.txt")) {
        Some(path) if path.is_file() => Ok(Some((
            read_classes_file(&path)?,
            path.display().to_string(),
        ))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_classes_files_are_refused_naming_the_line() {
        let dir = std::env::temp_dir().join(format!("rf-classes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("classes.txt");
        std::fs::write(&path, b"cat\ndog\r\n").unwrap();
        assert_eq!(read_classes_file(&path).unwrap(), ["cat", "dog"]);
        std::fs::write(&path, b"cat\n\xff\xfe\n").unwrap();
        assert!(read_classes_file(&path)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
        std::fs::write(&path, b"cat\nd\x00g\n").unwrap();
        let e = read_classes_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("control character"),
            "{e}"
        );
        std::fs::write(&path, format!("cat\n{}\n", "x".repeat(5000))).unwrap();
        assert!(read_classes_file(&path)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
