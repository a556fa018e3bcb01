//! Sidecar index of a tar shard: where each sample's image bytes lie and its label, so that an
//! epoch in any order is a series of positioned reads.
//!
//! Brief overview: [`build_index`] walks the shard's headers ([`super::tar`]), groups members
//! into samples by key ([`split_member_name`]), reads the small `.cls` labels and records every
//! member it skips. [`write_index`] stores the result as `<shard>.idx` ([`encode_index`]: a
//! compact binary file with a magic, a version, the shard's size and modification time,
//! fixed-width entries, the names, and a CRC-32 of it all); [`load_or_build_index`] reuses a
//! fresh index (beside the shard, else in the cache directory) and rebuilds a stale or
//! unreadable one.
//!
//! # The index file (version 3)
//!
//! All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RFINDEX\n` |
//! | 8 | 4 | version, `3` |
//! | 12 | 4 | entry size, `32` |
//! | 16 | 8 | shard size in bytes when indexed |
//! | 24 | 8 | shard modification time, ns since the Unix epoch (signed) |
//! | 32 | 8 | `n`, samples |
//! | 40 | 8 | bytes of names |
//! | 48 | 8 | bytes of the JSON tail |
//! | 56 | 8 | reserved, 0 |
//! | 64 | `32 n` | entries: offset u64, size u64, label i64, key length u32, extension length u32 |
//! | … | | names: each sample's key then extension, UTF-8, in entry order |
//! | … | | JSON tail: `{"issues": […], "sealed": …}` (members skipped; encrypted shards) |
//! | end − 4 | 4 | CRC-32 (IEEE) of every byte before it |
//!
//! A reader trusts nothing in it: the file must be a regular file (never a link, FIFO or
//! device) no larger than [`max_index_bytes`], its lengths must add up to the file's length
//! exactly, its checksum must match, and every entry must lie inside the shard
//! ([`check_entries`]); a file that fails is rebuilt with a warning. The JSON index of
//! earlier releases (`<shard>.idx.json`, version 2) is never read: a shard that has only one
//! is indexed again (once) into `<shard>.idx`.

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
/// recorded encrypted shards ([`ShardIndex::sealed`]); version 3 is the binary file.
pub const INDEX_VERSION: u32 = 3;

/// Suffix appended to the shard's file name to name its sidecar index.
pub const INDEX_SUFFIX: &str = ".idx";

/// The first bytes of an index file.
pub const INDEX_MAGIC: [u8; 8] = *b"RFINDEX\n";

/// Bytes before the entries.
const HEADER_BYTES: usize = 64;

/// Bytes of one entry.
const ENTRY_BYTES: usize = 32;

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
        let bytes = encode_index(index)?;
        tmp.1.write_all(&bytes)?;
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

/// Why bytes are not an index file ([`decode_index`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexFormatError {
    /// The file does not start with [`INDEX_MAGIC`].
    #[error("not a ringfeed index (no RFINDEX magic)")]
    Magic,
    /// The file is JSON: an index of an earlier release (or a copy of one) at the new name.
    #[error("a JSON index of an earlier release, not the binary index")]
    OldJson,
    /// Another version of the format.
    #[error("index version {0}, this release reads {INDEX_VERSION}")]
    Version(u32),
    /// The lengths in the header do not add up to the file's length.
    #[error("truncated or padded: {0}")]
    Length(String),
    /// The CRC-32 does not match the contents.
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        /// The CRC-32 at the end of the file.
        stored: u32,
        /// The CRC-32 of the bytes before it.
        computed: u32,
    },
    /// A name or the JSON tail is malformed.
    #[error("malformed {0}")]
    Malformed(String),
}

/// The index file's bytes for `index` (see the module documentation for the layout). Fails
/// only for a sample larger than 4 GiB's key or extension length (never built).
pub fn encode_index(index: &ShardIndex) -> io::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Tail<'a> {
        issues: &'a [MemberIssue],
        #[serde(skip_serializing_if = "Option::is_none")]
        sealed: Option<&'a SealedInfo>,
    }
    let too_long = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} longer than 4 GiB"),
        )
    };
    let tail = serde_json::to_vec(&Tail {
        issues: &index.issues,
        sealed: index.sealed.as_ref(),
    })
    .map_err(io::Error::other)?;
    let names: usize = index
        .samples
        .iter()
        .map(|s| s.key.len() + s.ext.len())
        .sum();
    let mut out = Vec::with_capacity(
        HEADER_BYTES + index.samples.len() * ENTRY_BYTES + names + tail.len() + 4,
    );
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&(ENTRY_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&index.shard_size.to_le_bytes());
    out.extend_from_slice(&index.shard_mtime_ns.to_le_bytes());
    out.extend_from_slice(&(index.samples.len() as u64).to_le_bytes());
    out.extend_from_slice(&(names as u64).to_le_bytes());
    out.extend_from_slice(&(tail.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    for sample in &index.samples {
        out.extend_from_slice(&sample.offset.to_le_bytes());
        out.extend_from_slice(&sample.size.to_le_bytes());
        out.extend_from_slice(&sample.label.to_le_bytes());
        let key = u32::try_from(sample.key.len()).map_err(|_| too_long("a key"))?;
        let ext = u32::try_from(sample.ext.len()).map_err(|_| too_long("an extension"))?;
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&ext.to_le_bytes());
    }
    for sample in &index.samples {
        out.extend_from_slice(sample.key.as_bytes());
        out.extend_from_slice(sample.ext.as_bytes());
    }
    out.extend_from_slice(&tail);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads an index file's bytes: the magic, the version, the lengths against `bytes.len()`,
/// the checksum, the names (UTF-8) and the JSON tail. What the entries say about the shard is
/// checked by [`check_entries`], not here.
pub fn decode_index(bytes: &[u8]) -> Result<ShardIndex, IndexFormatError> {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    if bytes.len() < INDEX_MAGIC.len() || bytes[..INDEX_MAGIC.len()] != INDEX_MAGIC {
        let json = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        return Err(if json {
            IndexFormatError::OldJson
        } else {
            IndexFormatError::Magic
        });
    }
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(IndexFormatError::Length(format!(
            "{} bytes, shorter than the {}-byte header and checksum",
            bytes.len(),
            HEADER_BYTES + 4
        )));
    }
    let version = u32_at(8);
    if version != INDEX_VERSION {
        return Err(IndexFormatError::Version(version));
    }
    let entry_bytes = u32_at(12) as usize;
    let (count, names_len, tail_len) = (u64_at(32), u64_at(40), u64_at(48));
    let expected = (count as u128) * (entry_bytes as u128)
        + u128::from(names_len)
        + u128::from(tail_len)
        + (HEADER_BYTES + 4) as u128;
    if entry_bytes != ENTRY_BYTES || expected != bytes.len() as u128 {
        return Err(IndexFormatError::Length(format!(
            "{count} entries of {entry_bytes} bytes, {names_len} bytes of names and {tail_len} \
             of tail need {expected} bytes; the file has {}",
            bytes.len()
        )));
    }
    let body = bytes.len() - 4;
    let stored = u32_at(body);
    let computed = crc32fast::hash(&bytes[..body]);
    if stored != computed {
        return Err(IndexFormatError::Checksum { stored, computed });
    }
    // The lengths add up to the file's, so every count below is bounded by its length.
    let count = count as usize;
    let names_start = HEADER_BYTES + count * ENTRY_BYTES;
    let tail_start = names_start + names_len as usize;
    let mut samples = Vec::with_capacity(count);
    let mut name_at = names_start;
    for i in 0..count {
        let at = HEADER_BYTES + i * ENTRY_BYTES;
        let (key_len, ext_len) = (u32_at(at + 24) as usize, u32_at(at + 28) as usize);
        let end = name_at
            .checked_add(key_len)
            .and_then(|k| k.checked_add(ext_len))
            .filter(|&end| end <= tail_start)
            .ok_or_else(|| {
                IndexFormatError::Malformed(format!("entry {i}: its name runs past the names"))
            })?;
        let text = |range: std::ops::Range<usize>| {
            std::str::from_utf8(&bytes[range])
                .map(str::to_owned)
                .map_err(|_| IndexFormatError::Malformed(format!("entry {i}: name is not UTF-8")))
        };
        samples.push(IndexedSample {
            key: text(name_at..name_at + key_len)?,
            ext: text(name_at + key_len..end)?,
            offset: u64_at(at),
            size: u64_at(at + 8),
            label: u64_at(at + 16) as i64,
        });
        name_at = end;
    }
    if name_at != tail_start {
        return Err(IndexFormatError::Malformed(
            "names: their lengths do not add up to the names' bytes".to_owned(),
        ));
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tail {
        issues: Vec<MemberIssue>,
        #[serde(default)]
        sealed: Option<SealedInfo>,
    }
    let tail: Tail = serde_json::from_slice(&bytes[tail_start..body])
        .map_err(|e| IndexFormatError::Malformed(format!("tail: {e}")))?;
    Ok(ShardIndex {
        version,
        shard_size: u64_at(16),
        shard_mtime_ns: u64_at(24) as i64,
        samples,
        issues: tail.issues,
        sealed: tail.sealed,
    })
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
    let index = match decode_index(&bytes) {
        Ok(index) => index,
        // An index of another version is stale, not hostile: rebuilt without a warning.
        Err(IndexFormatError::Version(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
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

/// The index path beside a shard: `<shard>.idx`.
pub fn index_path_beside(shard: &Path) -> PathBuf {
    let mut name = shard.as_os_str().to_owned();
    name.push(INDEX_SUFFIX);
    PathBuf::from(name)
}

/// The index path of a shard inside a cache directory: `<dir>/<file name>.<hash>.idx`,
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

    fn sample_index() -> ShardIndex {
        let tar = TarBuilder::default()
            .file("s/a.JPG", b"AAAA")
            .file("s/a.cls", b"-1\n")
            .file("s/é.png", b"BB")
            .file("s/é.cls", b"2")
            .file("s/c.cls", b"3")
            .finish();
        let (samples, issues) = index_archive(&tar[..], tar.len() as u64);
        ShardIndex {
            version: INDEX_VERSION,
            shard_size: tar.len() as u64,
            shard_mtime_ns: -5,
            samples,
            issues,
            sealed: None,
        }
    }

    #[test]
    fn binary_index_round_trips_and_names_its_layout() {
        let index = sample_index();
        assert_eq!(index.samples.len(), 2);
        assert_eq!(index.issues.len(), 1);
        let bytes = encode_index(&index).unwrap();
        assert_eq!(bytes[..8], INDEX_MAGIC);
        let names = "s/aJPG".len() + "s/épng".len();
        let tail = bytes.len() - HEADER_BYTES - 2 * ENTRY_BYTES - names - 4;
        assert!(bytes[bytes.len() - 4 - tail..].starts_with(b"{\"issues\""));
        assert_eq!(decode_index(&bytes).unwrap(), index);
        check_entries(&index).unwrap();
    }

    #[test]
    fn damaged_index_bytes_are_refused_each_with_its_reason() {
        let good = encode_index(&sample_index()).unwrap();
        let refused = |bytes: &[u8]| decode_index(bytes).unwrap_err();
        let mut magic = good.clone();
        magic[3] = b'x';
        assert_eq!(refused(&magic), IndexFormatError::Magic);
        assert_eq!(refused(b""), IndexFormatError::Magic);
        let json = serde_json::to_vec(&sample_index()).unwrap();
        assert_eq!(refused(&json), IndexFormatError::OldJson);
        let mut version = good.clone();
        version[8] = 2;
        assert_eq!(refused(&version), IndexFormatError::Version(2));
        // Every truncation and any padding: the lengths no longer add up.
        for cut in 8..good.len() {
            assert!(
                matches!(refused(&good[..cut]), IndexFormatError::Length(_)),
                "cut at {cut}"
            );
        }
        let mut padded = good.clone();
        padded.push(0);
        assert!(matches!(refused(&padded), IndexFormatError::Length(_)));
        // A huge count cannot overflow the length check.
        let mut count = good.clone();
        count[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(refused(&count), IndexFormatError::Length(_)));
        // Any flipped bit past the version is a checksum mismatch (or, in the lengths, a
        // length error): never a different index.
        for at in 16..good.len() {
            let mut flipped = good.clone();
            flipped[at] ^= 0x10;
            assert!(
                matches!(
                    refused(&flipped),
                    IndexFormatError::Checksum { .. } | IndexFormatError::Length(_)
                ),
                "byte {at}"
            );
        }
    }

    #[test]
    fn forged_entries_with_a_valid_checksum_are_refused_by_the_entry_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar.idx");
        let fresh = sample_index();
        let fingerprint = (fresh.shard_size, fresh.shard_mtime_ns);
        std::fs::write(&path, encode_index(&fresh).unwrap()).unwrap();
        assert_eq!(
            read_fresh_index_for(&path, fingerprint),
            Ok(Some(fresh.clone()))
        );
        // Stale (another size): rebuilt without a warning.
        assert_eq!(
            read_fresh_index_for(&path, (1, fresh.shard_mtime_ns)),
            Ok(None)
        );
        let forge = |edit: &dyn Fn(&mut IndexedSample)| {
            let mut index = fresh.clone();
            edit(&mut index.samples[1]);
            std::fs::write(&path, encode_index(&index).unwrap()).unwrap();
            read_fresh_index_for(&path, fingerprint).unwrap_err()
        };
        let end = fresh.shard_size;
        assert!(forge(&|s| s.offset = end).contains("do not lie inside"));
        assert!(forge(&|s| s.size = end).contains("do not lie inside"));
        assert!(forge(&|s| s.size = 1 << 33).contains("do not lie inside"));
        assert!(forge(&|s| s.offset += 1).contains("do not lie inside"));
        assert!(forge(&|s| s.offset = u64::MAX).contains("do not lie inside"));
        assert!(forge(&|s| s.ext = "exe".into()).contains("not an image"));
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
            PathBuf::from("d/s.tar.idx")
        );
    }
}
