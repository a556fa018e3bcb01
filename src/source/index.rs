//! Sidecar index of a tar shard: where each sample's image bytes lie and its label, so that an
//! epoch in any order is a series of positioned reads.
//!
//! Brief overview: [`build_index`] walks the shard's headers ([`super::tar`]), groups members
//! into samples by key ([`split_member_name`]), reads the small `.cls` labels and records every
//! member it skips. [`write_index`] stores the result as `<shard>.idx.json` with the shard's
//! size and modification time; [`load_or_build_index`] reuses a fresh index (beside the shard,
//! else in the cache directory) and rebuilds a stale or unreadable one.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::crypt::{self, SealedInfo};
use super::error::{IssueReason, SourceError};
use super::file::{open_regular, open_regular_nofollow, read_capped};
use super::tar::{self, ReadAt};

/// Version of the index file format; an index with another version is rebuilt. Version 2
/// records encrypted shards ([`ShardIndex::sealed`]).
pub const INDEX_VERSION: u32 = 2;

/// Suffix appended to the shard's file name to name its sidecar index.
pub const INDEX_SUFFIX: &str = ".idx.json";

/// Image extensions recognised (compared case-insensitively).
pub const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Largest `.cls` member read as a label.
const MAX_LABEL_BYTES: u64 = 64;

/// The index of one shard, as stored in its sidecar file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ShardIndex {
    /// [`INDEX_VERSION`] when written.
    pub version: u32,
    /// The shard's size in bytes when indexed.
    pub shard_size: u64,
    /// The shard's modification time when indexed, nanoseconds since the Unix epoch.
    pub shard_mtime_ns: i64,
    /// Samples in shard order.
    pub samples: Vec<IndexedSample>,
    /// Members skipped, in shard order.
    pub issues: Vec<MemberIssue>,
    /// For an encrypted shard, its plaintext header and where its sealed manifest lies
    /// (see [`super::crypt`]); its samples' labels are 0 here and come from the manifest once
    /// the key is known. Absent for a plaintext shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedInfo>,
}

/// One sample of a shard: its image member and label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexedSample {
    /// The sample key: member path without its extensions.
    pub key: String,
    /// The image member's extension as written (`jpg`, `JPEG`, …).
    pub ext: String,
    /// Offset of the image bytes in the shard.
    pub offset: u64,
    /// Length of the image bytes.
    pub size: u64,
    /// The integer label from `<key>.cls`; 0 in the index of an encrypted shard, whose labels
    /// are in its sealed manifest (filled in by [`super::crypt::unseal_index`]).
    pub label: i64,
}

impl IndexedSample {
    /// The image member's name inside the shard: `<key>.<ext>`.
    pub fn member(&self) -> String {
        format!("{}.{}", self.key, self.ext)
    }
}

/// A member skipped while indexing a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberIssue {
    /// The member's name (lossy UTF-8), or the sample key when the whole sample is skipped.
    pub member: String,
    /// Why it was skipped.
    #[serde(flatten)]
    pub reason: IssueReason,
}

/// Splits a member path into (key, extension) the WebDataset way: the extension is everything
/// after the first `.` of the file name (`a/b/img_01.seg.png` → `a/b/img_01`, `seg.png`).
///
/// Leading `./` is removed. Returns the issue for names that would leave the shard (absolute,
/// `..` components), hidden files, and empty names.
pub fn split_member_name(name: &str) -> Result<(&str, &str), IssueReason> {
    let mut name = name;
    while let Some(rest) = name.strip_prefix("./") {
        name = rest;
    }
    if name.starts_with('/') || name.split('/').any(|c| c == "..") {
        return Err(IssueReason::UnsafePath);
    }
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let file = &name[file_start..];
    if file.is_empty() || file.starts_with('.') {
        return Err(IssueReason::Hidden);
    }
    match file.find('.') {
        Some(dot) => Ok((&name[..file_start + dot], &name[file_start + dot + 1..])),
        None => Ok((name, "")),
    }
}

/// True for the extensions of images that can be decoded (`jpg`, `jpeg`, `png`, `webp`).
pub fn is_image_ext(ext: &str) -> bool {
    IMAGE_EXTS
        .iter()
        .any(|known| ext.eq_ignore_ascii_case(known))
}

/// Parses a `.cls` label: ASCII decimal integer, surrounding whitespace ignored.
pub fn parse_label(bytes: &[u8]) -> Result<i64, IssueReason> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| IssueReason::BadLabel {
            text: String::from_utf8_lossy(&bytes[..bytes.len().min(32)]).into_owned(),
        })
}

#[derive(Default)]
struct Group {
    image: Option<(String, u64, u64)>,
    label: Option<(u64, u64)>,
    other_exts: Vec<String>,
}

/// Indexes the tar archive of `len` bytes in `src`: the pure part of [`build_index`]. Fills
/// samples and issues of an index whose size and mtime the caller sets.
pub fn index_archive<R: ReadAt + ?Sized>(
    src: &R,
    len: u64,
) -> (Vec<IndexedSample>, Vec<MemberIssue>) {
    let mut issues = Vec::new();
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Group> = HashMap::new();
    for entry in tar::entries(src, len) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                issues.push(MemberIssue {
                    member: format!("<tar at byte {}>", e.offset()),
                    reason: IssueReason::from(&e),
                });
                break;
            }
        };
        let name = match String::from_utf8(entry.path) {
            Ok(name) => name,
            Err(e) => {
                issues.push(MemberIssue {
                    member: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                    reason: IssueReason::NonUtf8Name,
                });
                continue;
            }
        };
        let (key, ext) = match split_member_name(&name) {
            Ok(parts) => parts,
            Err(reason) => {
                issues.push(MemberIssue {
                    member: name,
                    reason,
                });
                continue;
            }
        };
        let group = groups.entry(key.to_owned()).or_insert_with(|| {
            order.push(key.to_owned());
            Group::default()
        });
        if ext.eq_ignore_ascii_case("cls") {
            group.label.get_or_insert((entry.data_offset, entry.size));
        } else if is_image_ext(ext) {
            group
                .image
                .get_or_insert((ext.to_owned(), entry.data_offset, entry.size));
        } else {
            group.other_exts.push(ext.to_owned());
        }
    }

    let mut samples = Vec::new();
    for key in order {
        let Some(group) = groups.remove(&key) else {
            continue;
        };
        let outcome = match (group.image, group.label) {
            (Some((ext, offset, size)), Some(label)) => {
                read_label(src, label).map(|label| IndexedSample {
                    key: key.clone(),
                    ext,
                    offset,
                    size,
                    label,
                })
            }
            (Some(_), None) => Err(IssueReason::MissingLabel),
            (None, _) if !group.other_exts.is_empty() => Err(IssueReason::UnknownExt {
                exts: group.other_exts.join(", "),
            }),
            (None, _) => Err(IssueReason::MissingImage),
        };
        match outcome {
            Ok(sample) if sample.size > u64::from(u32::MAX) => issues.push(MemberIssue {
                member: sample.member(),
                reason: IssueReason::TooLarge { size: sample.size },
            }),
            Ok(sample) => samples.push(sample),
            Err(reason) => issues.push(MemberIssue {
                member: key,
                reason,
            }),
        }
    }
    (samples, issues)
}

fn read_label<R: ReadAt + ?Sized>(src: &R, (offset, size): (u64, u64)) -> Result<i64, IssueReason> {
    if size > MAX_LABEL_BYTES {
        return Err(IssueReason::BadLabel {
            text: format!("<{size} bytes>"),
        });
    }
    // Bounded by MAX_LABEL_BYTES above.
    let mut bytes = vec![0u8; size as usize];
    src.read_exact_at(&mut bytes, offset)
        .map_err(|e| IssueReason::Tar {
            message: format!("cannot read label at byte {offset}: {e}"),
        })?;
    parse_label(&bytes)
}

/// Size and modification time (ns since the epoch) that identify a shard's contents.
pub(crate) fn fingerprint(meta: &fs::Metadata) -> (u64, i64) {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).ok(),
            Err(e) => i64::try_from(e.duration().as_nanos()).ok().map(|ns| -ns),
        })
        .unwrap_or(0);
    (meta.len(), mtime_ns)
}

/// Builds the index of the shard at `shard` by walking its headers.
pub fn build_index(shard: &Path) -> Result<ShardIndex, SourceError> {
    let io_err = |source| SourceError::Io {
        path: shard.to_path_buf(),
        source,
    };
    let file = open_regular(shard).map_err(io_err)?;
    build_index_from(&file, shard)
}

/// [`build_index`] of an open shard (`shard` names it in errors).
pub(crate) fn build_index_from(file: &File, shard: &Path) -> Result<ShardIndex, SourceError> {
    let io_err = |source| SourceError::Io {
        path: shard.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    let (shard_size, shard_mtime_ns) = fingerprint(&meta);
    let sealed = crypt::index_sealed(file, shard_size).map_err(|reason| {
        SourceError::Crypt(crypt::CryptError::BadHeader {
            shard: shard.to_path_buf(),
            reason,
        })
    })?;
    let (samples, issues, sealed) = match sealed {
        Some((samples, issues, info)) => (samples, issues, Some(info)),
        None => {
            let (samples, issues) = index_archive(file, shard_size);
            (samples, issues, None)
        }
    };
    Ok(ShardIndex {
        version: INDEX_VERSION,
        shard_size,
        shard_mtime_ns,
        samples,
        issues,
        sealed,
    })
}

/// Writes `index` to `path` atomically (a temporary file in the same directory, then a rename),
/// creating the parent directory if needed.
pub fn write_index(index: &ShardIndex, path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir, path)?;
    let result = (|| {
        let mut writer = io::BufWriter::new(&mut tmp.1);
        serde_json::to_writer(&mut writer, index).map_err(io::Error::other)?;
        writer.flush()?;
        drop(writer);
        tmp.1.sync_data()?;
        fs::rename(&tmp.0, path)
    })();
    if result.is_err() {
        // Best effort: the temporary file is useless once the rename failed.
        let _ = fs::remove_file(&tmp.0);
    }
    result
}

/// Creates a fresh temporary file beside `target`.
fn tempfile_in(dir: &Path, target: &Path) -> io::Result<(PathBuf, File)> {
    let stem = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for attempt in 0..100u32 {
        let tmp = dir.join(format!(".{stem}.{}.{attempt}.tmp", std::process::id()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary file name",
    ))
}

/// Largest index file read for a shard of `shard_size` bytes: 1 MiB plus 8 bytes per shard
/// byte (a sample takes at least 1.5 KiB of shard and well under 1 KiB of index, even with
/// every character of its name escaped), and never more than 1 GiB.
pub fn max_index_bytes(shard_size: u64) -> u64 {
    shard_size
        .saturating_mul(8)
        .saturating_add(1 << 20)
        .min(1 << 30)
}

/// Reads the index at `path` for a shard whose metadata is `meta`: `Ok(None)` if it is
/// missing, of another version, or describes another size/mtime of the shard (stale, the
/// normal reason to rebuild); `Err(reason)` if it cannot be trusted: a symlink, a FIFO or
/// device, larger than [`max_index_bytes`], not an index, or an entry that lies outside the
/// shard ([`check_entries`]).
fn read_fresh_index(path: &Path, meta: &fs::Metadata) -> Result<Option<ShardIndex>, String> {
    read_fresh_index_for(path, fingerprint(meta))
}

/// [`read_fresh_index`] for a shard known by its (size, mtime ns) alone: a remote shard
/// whose copy may not be fetched yet.
pub(crate) fn read_fresh_index_for(
    path: &Path,
    (size, mtime_ns): (u64, i64),
) -> Result<Option<ShardIndex>, String> {
    let file = match open_regular_nofollow(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Err("is a symlink".to_owned())
        }
        Err(e) => return Err(e.to_string()),
    };
    let limit = max_index_bytes(size);
    let bytes = read_capped(file, limit)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("larger than {limit} bytes, the limit for this shard"))?;
    let index: ShardIndex =
        serde_json::from_slice(&bytes).map_err(|e| format!("not an index: {e}"))?;
    if index.version != INDEX_VERSION
        || index.shard_size != size
        || index.shard_mtime_ns != mtime_ns
    {
        return Ok(None);
    }
    check_entries(&index)?;
    Ok(Some(index))
}

/// Checks what an index says against its shard: each image lies on a tar block boundary past
/// its header, inside the shard's length, and is at most 4 GiB (what indexing records). Size
/// and mtime alone are no proof (`cp -p` and tar preserve both), and a forged entry would make
/// workers read, or allocate, whatever it claims.
pub fn check_entries(index: &ShardIndex) -> Result<(), String> {
    for s in &index.samples {
        let end = s.offset.checked_add(s.size);
        let fits = s.offset >= tar::BLOCK
            && s.offset % tar::BLOCK == 0
            && s.size <= u64::from(u32::MAX)
            && end.is_some_and(|end| end <= index.shard_size);
        if !fits {
            return Err(format!(
                "sample {:?}: {} bytes at offset {} do not lie inside the shard's {} bytes",
                s.key, s.size, s.offset, index.shard_size
            ));
        }
        if !is_image_ext(&s.ext) {
            return Err(format!(
                "sample {:?}: extension {:?} is not an image's",
                s.key, s.ext
            ));
        }
    }
    Ok(())
}

/// The index path beside a shard: `<shard>.idx.json`.
pub fn index_path_beside(shard: &Path) -> PathBuf {
    let mut name = shard.as_os_str().to_owned();
    name.push(INDEX_SUFFIX);
    PathBuf::from(name)
}

/// The index path of a shard inside a cache directory: `<dir>/<file name>.<hash>.idx.json`,
/// the hash (FNV-1a of the shard's absolute path) keeping same-named shards apart.
pub fn index_path_in(dir: &Path, shard: &Path) -> PathBuf {
    let absolute = std::path::absolute(shard).unwrap_or_else(|_| shard.to_path_buf());
    let hash = absolute
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let name = shard
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!("{name}.{hash:016x}{INDEX_SUFFIX}"))
}

/// The default cache directory for indexes: `$XDG_CACHE_HOME/ringfeed`, else
/// `$HOME/.cache/ringfeed`; `env` looks variables up (empty values count as unset).
pub fn default_cache_dir(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    var("XDG_CACHE_HOME")
        .map(|d| PathBuf::from(d).join("ringfeed"))
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache").join("ringfeed")))
}

/// An index ready for use, and where it lives.
#[derive(Debug, Clone)]
pub struct LoadedIndex {
    /// The index.
    pub index: ShardIndex,
    /// The index file it was read from or written to.
    pub path: PathBuf,
    /// True when an existing fresh index was reused, false when it was (re)built.
    pub reused: bool,
}

/// Returns the shard's index: a fresh one beside the shard or in the cache directory
/// (`index_dir`, else [`default_cache_dir`]) is reused; otherwise the index is built and
/// written beside the shard, or into the cache directory when that fails (read-only dataset).
pub fn load_or_build_index(
    shard: &Path,
    index_dir: Option<&Path>,
) -> Result<LoadedIndex, SourceError> {
    let meta = fs::metadata(shard).map_err(|source| SourceError::Io {
        path: shard.to_path_buf(),
        source,
    })?;
    let cache_dir = index_dir
        .map(Path::to_path_buf)
        .or_else(|| default_cache_dir(|k| std::env::var(k).ok()));
    let mut candidates = vec![index_path_beside(shard)];
    candidates.extend(cache_dir.map(|dir| index_path_in(&dir, shard)));

    for path in &candidates {
        match read_fresh_index(path, &meta) {
            Ok(Some(index)) => {
                return Ok(LoadedIndex {
                    index,
                    path: path.clone(),
                    reused: true,
                })
            }
            Ok(None) => {}
            Err(reason) => log::warn!(
                "index {} of shard {} not used: {reason}; rebuilding it",
                path.display(),
                shard.display()
            ),
        }
    }
    let index = build_index(shard)?;
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no index location");
    for path in &candidates {
        match write_index(&index, path) {
            Ok(()) => {
                return Ok(LoadedIndex {
                    index,
                    path: path.clone(),
                    reused: false,
                })
            }
            Err(e) => last_error = e,
        }
    }
    Err(SourceError::IndexWrite {
        shard: shard.to_path_buf(),
        tried: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        source: last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::tar::tests::TarBuilder;

    #[test]
    fn member_names_split_like_webdataset() {
        assert_eq!(
            split_member_name("a/b/img_01.jpg"),
            Ok(("a/b/img_01", "jpg"))
        );
        assert_eq!(split_member_name("./img.seg.png"), Ok(("img", "seg.png")));
        assert_eq!(split_member_name("dir.v2/x.cls"), Ok(("dir.v2/x", "cls")));
        assert_eq!(split_member_name("noext"), Ok(("noext", "")));
        assert_eq!(split_member_name("../x.jpg"), Err(IssueReason::UnsafePath));
        assert_eq!(
            split_member_name("a/../../x.jpg"),
            Err(IssueReason::UnsafePath)
        );
        assert_eq!(
            split_member_name("/etc/x.jpg"),
            Err(IssueReason::UnsafePath)
        );
        assert_eq!(split_member_name("a/._x.jpg"), Err(IssueReason::Hidden));
        assert_eq!(split_member_name("a/"), Err(IssueReason::Hidden));
    }

    #[test]
    fn labels_parse_trimmed_integers() {
        assert_eq!(parse_label(b" 42\n"), Ok(42));
        assert_eq!(parse_label(b"-3"), Ok(-3));
        assert!(
            matches!(parse_label(b"cat"), Err(IssueReason::BadLabel { text }) if text == "cat")
        );
        assert!(parse_label(b"").is_err());
        assert!(parse_label(b"1.5").is_err());
    }

    #[test]
    fn archive_groups_members_and_reports_skips() {
        let tar = TarBuilder::default()
            .file("s/a.JPG", b"AAAA")
            .file("s/a.cls", b"1\n")
            .file("s/a.json", b"{}")
            .file("s/b.png", b"BB")
            .file("s/c.cls", b"2")
            .file("s/c.gif", b"G")
            .file("s/d.webp", b"D")
            .file("s/d.cls", b"dog")
            .file("../evil.jpg", b"E")
            .file("s/e.cls", b"5")
            .file("s/f.cls", b"6")
            .file("s/f.jpeg", b"FFF")
            .finish();
        let (samples, issues) = index_archive(&tar[..], tar.len() as u64);
        let got: Vec<_> = samples
            .iter()
            .map(|s| (s.member(), s.label, s.size))
            .collect();
        assert_eq!(
            got,
            [("s/a.JPG".to_owned(), 1, 4), ("s/f.jpeg".to_owned(), 6, 3)]
        );
        let start = samples[0].offset as usize;
        assert_eq!(&tar[start..start + 4], b"AAAA");
        let reasons: Vec<_> = issues
            .iter()
            .map(|i| (i.member.as_str(), &i.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("../evil.jpg", &IssueReason::UnsafePath),
                ("s/b", &IssueReason::MissingLabel),
                (
                    "s/c",
                    &IssueReason::UnknownExt {
                        exts: "gif".to_owned()
                    }
                ),
                (
                    "s/d",
                    &IssueReason::BadLabel {
                        text: "dog".to_owned()
                    }
                ),
                ("s/e", &IssueReason::MissingImage),
            ]
        );
    }

    #[test]
    fn truncated_archive_keeps_earlier_samples() {
        let tar = TarBuilder::default()
            .file("a.jpg", b"A")
            .file("a.cls", b"0")
            .file("b.jpg", &[7u8; 3000])
            .file("b.cls", b"1")
            .finish();
        // Cut inside the header of b.cls: b.jpg is whole, its label is lost.
        let cut = &tar[..5632 + 100];
        let (samples, issues) = index_archive(cut, cut.len() as u64);
        assert_eq!(samples.len(), 1);
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(
            matches!(&issues[0].reason, IssueReason::Tar { message } if message.contains("truncated"))
        );
        assert_eq!(
            issues[1],
            MemberIssue {
                member: "b".to_owned(),
                reason: IssueReason::MissingLabel
            }
        );
    }

    #[test]
    fn cache_dir_prefers_xdg_then_home() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            default_cache_dir(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/ringfeed"))
        );
        assert_eq!(
            default_cache_dir(env(&[("XDG_CACHE_HOME", ""), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/ringfeed"))
        );
        assert_eq!(default_cache_dir(env(&[])), None);
    }

    #[test]
    fn cache_paths_keep_same_named_shards_apart() {
        let a = index_path_in(Path::new("/c"), Path::new("/data/a/shard-0.tar"));
        let b = index_path_in(Path::new("/c"), Path::new("/data/b/shard-0.tar"));
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().starts_with("/c/shard-0.tar."));
        assert_eq!(
            index_path_beside(Path::new("d/s.tar")),
            PathBuf::from("d/s.tar.idx.json")
        );
    }
}
