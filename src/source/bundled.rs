//! The bundled sample dataset (`data/sample/`), embedded in the binary so that `ringfeed serve`
//! with no arguments works from any directory, including a binary installed by pip far from
//! the repository.
//!
//! The tar reader works on files (positioned reads, a sidecar index next to each shard), so the
//! shards are written once to a per-user cache directory and reused: a file already there is
//! used only if its bytes equal the embedded ones; otherwise it is replaced through a temporary
//! file and a rename, so two daemons starting at once never see a half-written shard.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The embedded files, with their path relative to the built-in configuration's base
/// directory (`configs/default.toml` names `data/sample/shard-{000000..000001}.tar`; `peek`
/// finds the class names in `classes.txt` beside the shards).
const FILES: [(&str, &[u8]); 3] = [
    (
        "data/sample/shard-000000.tar",
        include_bytes!("../../data/sample/shard-000000.tar"),
    ),
    (
        "data/sample/shard-000001.tar",
        include_bytes!("../../data/sample/shard-000001.tar"),
    ),
    (
        "data/sample/classes.txt",
        include_bytes!("../../data/sample/classes.txt"),
    ),
];

/// The error of [`bundled_sample_dir`]: the cache directory could not be found or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundledSampleError {
    /// Neither `$XDG_CACHE_HOME` nor `$HOME` is set.
    #[error("cannot place the bundled sample: neither XDG_CACHE_HOME nor HOME is set")]
    NoCacheDir,
    /// Writing a shard failed.
    #[error("cannot write the bundled sample to {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Writes the bundled sample under the user's cache directory if it is not there yet and
/// returns the base directory the built-in configuration's relative shard paths resolve
/// against: `$XDG_CACHE_HOME/ringfeed/sample-<version>` (else `~/.cache/…`).
pub fn bundled_sample_dir() -> Result<PathBuf, BundledSampleError> {
    let var = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .ok_or(BundledSampleError::NoCacheDir)?;
    let base = cache
        .join("ringfeed")
        .join(concat!("sample-", env!("CARGO_PKG_VERSION")));
    extract_to(&base)?;
    Ok(base)
}

/// Writes every file under `base` unless an identical copy is already there.
fn extract_to(base: &Path) -> Result<(), BundledSampleError> {
    for (rel, bytes) in FILES {
        let path = base.join(rel);
        if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
            continue;
        }
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| BundledSampleError::Write { path, source }
        };
        let dir = path.parent().expect("a sample path has a parent");
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let mut tmp = tempfile_in(dir).map_err(err(dir))?;
        tmp.1.write_all(bytes).map_err(err(&tmp.0))?;
        tmp.1.sync_all().map_err(err(&tmp.0))?;
        std::fs::rename(&tmp.0, &path).map_err(err(&path))?;
    }
    Ok(())
}

/// A new file in `dir` with a name no other process uses (pid and a counter).
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        ".extract-{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_once_and_repairs_a_changed_copy() {
        let dir = tempfile::tempdir().unwrap();
        extract_to(dir.path()).unwrap();
        for (rel, bytes) in FILES {
            assert_eq!(std::fs::read(dir.path().join(rel)).unwrap(), bytes);
        }
        let first = dir.path().join(FILES[0].0);
        std::fs::write(&first, b"truncated").unwrap();
        extract_to(dir.path()).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), FILES[0].1);
        let leftovers = std::fs::read_dir(first.parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0, "no temporary file is left behind");
    }
}
