//! ImageFolder trees: `<root>/<class>/<file>`, the torchvision layout.
//!
//! Classes are the root's subdirectories sorted by name; a class's position in that order is
//! its label. Files under a class directory (searched recursively) with an image extension
//! are samples; other files are skipped and reported.
//!
//! The order is torchvision's `ImageFolder.samples` order, so sample ids are the indices a
//! torchvision user knows: class by class, the class's directories sorted by their path
//! (torchvision sorts `os.walk`'s directory paths as strings), each directory's files sorted
//! by name. It differs only where ringfeed reads fewer files: hidden files (`.name`) are
//! skipped and reported, and only `jpg`, `jpeg`, `png` and `webp` are images (torchvision
//! also takes `ppm`, `bmp`, `pgm`, `tif`, `tiff`).

use std::fs;
use std::path::{Path, PathBuf};

use super::error::{IndexIssue, IssueReason, SourceError};
use super::index::is_image_ext;

/// Deepest directory nesting followed below a class directory (guards against symlink loops).
const MAX_DEPTH: usize = 32;

/// The result of scanning an ImageFolder root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderScan {
    /// Class directory names, sorted; the index is the label.
    pub classes: Vec<String>,
    /// Samples in order: path relative to the root (`/`-separated), label, size in bytes.
    pub files: Vec<(String, i64, u64)>,
    /// Files skipped.
    pub issues: Vec<IndexIssue>,
}

/// Scans `root`.
pub fn scan(root: &Path) -> Result<FolderScan, SourceError> {
    let mut scan = FolderScan {
        classes: Vec::new(),
        files: Vec::new(),
        issues: Vec::new(),
    };
    for (name, path, is_dir) in sorted_entries(root)? {
        let Some(name) = name else {
            scan.issues
                .push(issue(root, &path, IssueReason::NonUtf8Name));
            continue;
        };
        if !is_dir {
            scan.issues
                .push(issue(root, &path, IssueReason::OutsideClass));
            continue;
        }
        let label = scan.classes.len() as i64;
        scan.classes.push(name.clone());
        walk_class(root, &path, &name, label, 0, &mut scan)?;
    }
    Ok(scan)
}

/// Adds the samples of class `label` (directory `dir`, named `rel` below the root), in
/// torchvision's order: every directory below the class, sorted by its path as a string, then
/// each one's files by name.
fn walk_class(
    root: &Path,
    dir: &Path,
    rel: &str,
    label: i64,
    depth: usize,
    scan: &mut FolderScan,
) -> Result<(), SourceError> {
    let mut dirs: Vec<(String, Vec<(String, PathBuf)>)> = Vec::new();
    collect_dirs(root, dir, rel, depth, scan, &mut dirs)?;
    dirs.sort_by(|a, b| a.0.cmp(&b.0));
    for (dir_rel, files) in dirs {
        for (name, path) in files {
            add_file(
                root,
                &path,
                &format!("{dir_rel}/{name}"),
                &name,
                label,
                scan,
            );
        }
    }
    Ok(())
}

/// Lists `dir` (named `rel`) and, recursively, its subdirectories: `(rel, files sorted by
/// name)` of each. Non-UTF-8 names are reported and skipped.
fn collect_dirs(
    root: &Path,
    dir: &Path,
    rel: &str,
    depth: usize,
    scan: &mut FolderScan,
    out: &mut Vec<(String, Vec<(String, PathBuf)>)>,
) -> Result<(), SourceError> {
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for (name, path, is_dir) in sorted_entries(dir)? {
        let Some(name) = name else {
            scan.issues
                .push(issue(root, &path, IssueReason::NonUtf8Name));
            continue;
        };
        if is_dir {
            if depth < MAX_DEPTH {
                subdirs.push((format!("{rel}/{name}"), path));
            }
        } else {
            files.push((name, path));
        }
    }
    out.push((rel.to_owned(), files));
    for (sub_rel, path) in subdirs {
        collect_dirs(root, &path, &sub_rel, depth + 1, scan, out)?;
    }
    Ok(())
}

/// Adds one file of a class as a sample, or reports why it is not one.
fn add_file(
    root: &Path,
    path: &Path,
    rel_path: &str,
    name: &str,
    label: i64,
    scan: &mut FolderScan,
) {
    if name.starts_with('.') {
        scan.issues.push(issue(root, path, IssueReason::Hidden));
        return;
    }
    let ext = name.rsplit_once('.').map_or("", |(_, ext)| ext);
    if !is_image_ext(ext) {
        scan.issues.push(issue(
            root,
            path,
            IssueReason::UnknownExt {
                exts: ext.to_owned(),
            },
        ));
        return;
    }
    // A FIFO, device or socket named like an image is no sample: opening a FIFO would
    // block a worker. A dangling symlink counts as a file, and fails when it is read.
    let size = match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            scan.issues
                .push(issue(root, path, IssueReason::NotRegularFile));
            return;
        }
        Ok(meta) => meta.len(),
        Err(_) => 0,
    };
    scan.files.push((rel_path.to_owned(), label, size));
}

fn issue(root: &Path, path: &Path, reason: IssueReason) -> IndexIssue {
    let member = path.strip_prefix(root).unwrap_or(path);
    IndexIssue {
        shard: path.parent().unwrap_or(root).to_path_buf(),
        member: member.to_string_lossy().into_owned(),
        reason,
    }
}

/// Entries of `dir` sorted by name: (UTF-8 name or None, path, is a directory after following
/// symlinks).
fn sorted_entries(dir: &Path) -> Result<Vec<(Option<String>, PathBuf, bool)>, SourceError> {
    let io_err = |source| SourceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let path = entry.path();
        // Follow symlinks; a dangling one counts as a file (and is then skipped or fails at read).
        let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        entries.push((entry.file_name(), path, is_dir));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries
        .into_iter()
        .map(|(name, path, is_dir)| (name.into_string().ok(), path, is_dir))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_sorted_files_sorted_non_images_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, bytes) in [
            ("dog/b.jpg", &b"bb"[..]),
            ("dog/a.PNG", b"a"),
            ("dog/notes.txt", b"x"),
            ("cat/sub/z.webp", b"zzz"),
            ("cat/sub-x/w.jpg", b"w"),
            ("cat/sub/deeper/v.jpg", b"v"),
            ("cat/y.jpeg", b"y"),
            ("cat/.hidden.jpg", b"h"),
            ("README", b"r"),
        ] {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, bytes).unwrap();
        }
        fs::create_dir(root.join("empty")).unwrap();
        let scan = scan(root).unwrap();
        assert_eq!(scan.classes, ["cat", "dog", "empty"]);
        assert_eq!(
            scan.files,
            // torchvision's order: a directory's files before its subdirectories', and
            // directories by their path as a string ("sub-x" < "sub/…", as '-' < '/').
            [
                ("cat/y.jpeg".to_owned(), 0, 1),
                ("cat/sub/z.webp".to_owned(), 0, 3),
                ("cat/sub-x/w.jpg".to_owned(), 0, 1),
                ("cat/sub/deeper/v.jpg".to_owned(), 0, 1),
                ("dog/a.PNG".to_owned(), 1, 1),
                ("dog/b.jpg".to_owned(), 1, 2),
            ]
        );
        let mut reasons: Vec<_> = scan
            .issues
            .iter()
            .map(|i| (i.member.as_str(), i.reason.clone()))
            .collect();
        reasons.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(
            reasons,
            [
                ("README", IssueReason::OutsideClass),
                ("cat/.hidden.jpg", IssueReason::Hidden),
                (
                    "dog/notes.txt",
                    IssueReason::UnknownExt {
                        exts: "txt".to_owned()
                    }
                ),
            ]
        );
    }

    #[test]
    fn missing_root_is_an_error_naming_it() {
        let err = scan(Path::new("/nonexistent/ringfeed-root")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/ringfeed-root"),
            "{err}"
        );
    }
}
