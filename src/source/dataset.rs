//! [`Dataset`]: the fixed, ordered list of samples of a source, where each sample's id is its
//! position, with positioned reads of each sample's encoded image bytes.
//!
//! A tar dataset keeps, per sample, only its offset, size, label and member name, in compact
//! columns (`table.rs`: about 15 bytes a sample), and one open file per shard, opened on
//! first use and reopened after a failed read. Each (re)open checks that the shard still has
//! the size and modification time it was indexed with, so a shard rewritten under a running
//! daemon is reported, not misread.
//!
//! An open descriptor keeps reading the file it was opened on, even after the path is deleted
//! or replaced; [`Dataset::recheck_shards`] (called by the pipeline at each epoch's start)
//! closes the descriptors whose path no longer names that same, unchanged file, so from then
//! on the shard's samples fail to open and are skipped (docs/failure-modes.md).
//!
//! Remote (`s3://`) shards are listed at open; each one's index is read from (or built into)
//! the local index directory, and its bytes come from the shard cache ([`super::remote`]):
//! a shard is fetched when a sample of it is first read, and at most half of `cache-limit`
//! of open copies is held by one dataset (the least recently opened is closed first), so
//! copies this daemon no longer reads can be evicted.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::config::{SourceConfig, SourceKind};
use super::crypt::{unseal_index, CryptError, ShardCipher, ShardKey};
use super::error::{IndexIssue, IssueReason, SampleReadError, SourceError};
use super::file::open_regular;
use super::imagefolder;
use super::index::{
    build_index_from, default_cache_dir, fingerprint, index_path_in, load_or_build_index,
    read_fresh_index_for, write_index, LoadedIndex,
};
use super::remote::{self, RemoteObject, ShardCache, Store};
use super::spec::expand_shards;
use super::table::SampleTable;

/// A dataset opened from a [`SourceConfig`]. Cheap to share between threads (`&Dataset` is
/// all reads need).
#[derive(Debug)]
pub struct Dataset {
    backend: Backend,
    /// Offset, size, label and member name (tar) or root-relative path (ImageFolder) of
    /// every sample, by id.
    samples: SampleTable,
    issues: Vec<IndexIssue>,
    class_names: Option<Vec<String>>,
    shard_starts: Vec<u64>,
    /// `source.max-sample-bytes`: larger images are skipped at open and refused at read.
    max_sample_bytes: u64,
}

#[derive(Debug)]
enum Backend {
    Tar {
        shards: Vec<Shard>,
        /// Remote shards whose copy this dataset holds open, least recently opened first.
        remote_open: Mutex<VecDeque<u32>>,
        /// Most bytes of open remote copies (half of `cache-limit`; unbounded without one).
        remote_budget: u64,
    },
    Folder {
        root: PathBuf,
    },
}

/// A sample id resolved: its position in the columns and its shard (0 for an ImageFolder).
#[derive(Debug, Clone, Copy)]
struct Record {
    id: usize,
    shard: usize,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    display: String,
    size: u64,
    mtime_ns: i64,
    file: Mutex<Option<Arc<File>>>,
    /// Opens the members of an encrypted shard; `None` for a plaintext one.
    cipher: Option<ShardCipher>,
    /// For an `s3://` shard: the object, and the cache its copy (at `path`) comes from.
    remote: Option<(Arc<ShardCache>, RemoteObject)>,
}

/// A label a classifier can train on: not negative and, with `num_classes`, below it.
fn check_label(label: i64, num_classes: Option<u64>) -> Result<(), IssueReason> {
    if label < 0 {
        return Err(IssueReason::NegativeLabel { label });
    }
    match num_classes {
        Some(n) if label as u64 >= n => Err(IssueReason::LabelOutOfRange {
            label,
            num_classes: n,
        }),
        _ => Ok(()),
    }
}

impl Dataset {
    /// Opens the dataset that `cfg` describes; relative paths resolve against `base_dir`.
    ///
    /// Tar shards are indexed on first use (see [`super::index::load_or_build_index`]).
    /// With `key-file`, every shard must be encrypted with that key (checked against each
    /// shard's key id before anything is served; see [`super::crypt::unseal_index`]);
    /// members that cannot be served, or whose image is over `cfg.max_sample_bytes`, are
    /// skipped and listed by [`skipped_at_index`](Self::skipped_at_index). A dataset without
    /// any usable sample is an error.
    pub fn open(cfg: &SourceConfig, base_dir: &Path) -> Result<Dataset, SourceError> {
        let limit = cfg.max_sample_bytes;
        match cfg.kind {
            SourceKind::Tar => {
                if cfg.shards.is_empty() || cfg.path.is_some() {
                    return Err(SourceError::Config(
                        "kind = \"tar\" needs `shards` and takes no `path`".to_owned(),
                    ));
                }
                let index_dir = cfg.index_dir.as_ref().map(|d| base_dir.join(d));
                let key = cfg
                    .key_file
                    .as_ref()
                    .map(|path| ShardKey::load(&base_dir.join(path)).map(Arc::new))
                    .transpose()
                    .map_err(CryptError::from)?;
                let remote = cfg.shards.iter().filter(|s| remote::is_remote(s)).count();
                let cache = match remote {
                    0 => None,
                    n if n == cfg.shards.len() => Some(Arc::new(Self::shard_cache(cfg, base_dir)?)),
                    _ => {
                        return Err(SourceError::Config(
                            "`shards` mixes s3:// objects and local files; use one \
                             [[source.streams]] for each"
                                .to_owned(),
                        ))
                    }
                };
                Self::open_tar(
                    &cfg.shards,
                    base_dir,
                    index_dir.as_deref(),
                    key.as_ref(),
                    limit,
                    cfg.num_classes,
                    cache,
                )
            }
            SourceKind::Imagefolder => match &cfg.path {
                Some(_) if cfg.key_file.is_some() => Err(SourceError::Config(
                    "`key-file` needs kind = \"tar\" (encrypted shards from `ringfeed pack \
                     --encrypt-key-file`)"
                        .to_owned(),
                )),
                Some(path) if cfg.shards.is_empty() && cfg.index_dir.is_none() => {
                    Self::open_folder(&base_dir.join(path), limit, cfg.num_classes)
                }
                _ => Err(SourceError::Config(
                    "kind = \"imagefolder\" needs `path` and takes no `shards` or `index-dir`"
                        .to_owned(),
                )),
            },
        }
    }

    /// The shard cache of remote shards: `cache-dir` (default `<index cache>/remote-shards`)
    /// with `cache-limit`, fetching through a client configured from the AWS variables.
    fn shard_cache(cfg: &SourceConfig, base_dir: &Path) -> Result<ShardCache, SourceError> {
        let dir = match &cfg.cache_dir {
            Some(dir) => base_dir.join(dir),
            None => default_cache_dir(|k| std::env::var(k).ok())
                .map(|d| d.join("remote-shards"))
                .ok_or_else(|| {
                    SourceError::Config(
                        "s3:// shards need `[source] cache-dir` (no $XDG_CACHE_HOME or $HOME \
                         to default to)"
                            .to_owned(),
                    )
                })?,
        };
        let store = Arc::new(Store::new(cfg.allow_http)?);
        Ok(ShardCache::new(&dir, cfg.cache_limit, store)?)
    }

    /// The index of a remote shard: a fresh one in the local index directory is used without
    /// fetching the shard; otherwise the shard is fetched into the cache and indexed there.
    fn remote_index(
        cache: &ShardCache,
        object: &RemoteObject,
        index_dir: Option<&Path>,
    ) -> Result<(PathBuf, LoadedIndex), SourceError> {
        let copy = cache.path_of(object);
        let dir = index_dir
            .map(Path::to_path_buf)
            .or_else(|| default_cache_dir(|k| std::env::var(k).ok()))
            .ok_or_else(|| {
                SourceError::Config(
                    "s3:// shards need `[source] index-dir` (no $XDG_CACHE_HOME or $HOME to \
                     default to)"
                        .to_owned(),
                )
            })?;
        let path = index_path_in(&dir, &copy);
        match read_fresh_index_for(&path, (object.size, object.mtime_ns)) {
            Ok(Some(index)) => {
                return Ok((
                    copy,
                    LoadedIndex {
                        index,
                        path,
                        reused: true,
                    },
                ))
            }
            Ok(None) => {}
            Err(reason) => log::warn!("{}: rebuilding the index: {reason}", path.display()),
        }
        let file = cache.open(object)?;
        let index = build_index_from(&file, &copy)?;
        write_index(&index, &path).map_err(|source| SourceError::IndexWrite {
            shard: copy.clone(),
            tried: path.display().to_string(),
            source,
        })?;
        Ok((
            copy,
            LoadedIndex {
                index,
                path,
                reused: false,
            },
        ))
    }

    fn open_tar(
        specs: &[String],
        base_dir: &Path,
        index_dir: Option<&Path>,
        key: Option<&Arc<ShardKey>>,
        limit: u64,
        num_classes: Option<u64>,
        cache: Option<Arc<ShardCache>>,
    ) -> Result<Dataset, SourceError> {
        let objects = match &cache {
            Some(cache) => remote::expand_remote(specs, cache.store())?,
            None => Vec::new(),
        };
        let paths = match &cache {
            Some(_) => Vec::new(),
            None => expand_shards(specs, base_dir)?,
        };
        let count = paths.len().max(objects.len());
        let remote_budget = cache
            .as_ref()
            .and_then(|c| c.limit())
            .map_or(u64::MAX, |l| l / 2);
        if u32::try_from(count).is_err() {
            return Err(SourceError::TooLarge {
                path: base_dir.to_path_buf(),
                reason: format!("{count} shards (limit {})", u32::MAX),
            });
        }
        let mut dataset = Dataset::empty(
            Backend::Tar {
                shards: Vec::new(),
                remote_open: Mutex::new(VecDeque::new()),
                remote_budget,
            },
            limit,
        );
        let mut shards = Vec::with_capacity(count);
        let sources = paths
            .into_iter()
            .map(|p| (p, None))
            .chain(objects.into_iter().map(Some).map(|o| (PathBuf::new(), o)));
        for (path, object) in sources {
            let (path, mut loaded, remote) = match (object, &cache) {
                (Some(object), Some(cache)) => {
                    let (copy, loaded) = Self::remote_index(cache, &object, index_dir)?;
                    (copy, loaded, Some((Arc::clone(cache), object)))
                }
                _ => {
                    let loaded = load_or_build_index(&path, index_dir)?;
                    (path, loaded, None)
                }
            };
            let cipher = unseal_index(&mut loaded.index, &path, key)?;
            dataset.shard_starts.push(dataset.samples.len());
            // One buffer for every member name: a million samples open in well under a second.
            let mut name = String::new();
            for sample in &loaded.index.samples {
                name.clear();
                name.push_str(&sample.key);
                name.push('.');
                name.push_str(&sample.ext);
                if let Err(reason) = check_label(sample.label, num_classes) {
                    dataset.issues.push(IndexIssue {
                        shard: path.clone(),
                        member: name.clone(),
                        reason,
                    });
                    continue;
                }
                // The limit is at most u32::MAX (checked by the config), so the size fits.
                let Some(size) = u32::try_from(sample.size)
                    .ok()
                    .filter(|_| sample.size <= limit)
                else {
                    dataset.issues.push(IndexIssue {
                        shard: path.clone(),
                        member: name.clone(),
                        reason: IssueReason::OverLimit {
                            size: sample.size,
                            limit,
                        },
                    });
                    continue;
                };
                dataset.push(name.as_str(), sample.offset, size, sample.label);
            }
            dataset
                .issues
                .extend(loaded.index.issues.into_iter().map(|issue| IndexIssue {
                    shard: path.clone(),
                    member: issue.member,
                    reason: issue.reason,
                }));
            shards.push(Shard {
                display: match &remote {
                    Some((_, object)) => object.url.to_string(),
                    None => path.file_name().map_or_else(
                        || path.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    ),
                },
                path,
                size: loaded.index.shard_size,
                mtime_ns: loaded.index.shard_mtime_ns,
                file: Mutex::new(None),
                cipher,
                remote,
            });
        }
        if let Backend::Tar { shards: slot, .. } = &mut dataset.backend {
            *slot = shards;
        }
        dataset.finish(&specs.join(", "))
    }

    fn open_folder(
        root: &Path,
        limit: u64,
        num_classes: Option<u64>,
    ) -> Result<Dataset, SourceError> {
        let scan = imagefolder::scan(root)?;
        let mut dataset = Dataset::empty(
            Backend::Folder {
                root: root.to_path_buf(),
            },
            limit,
        );
        dataset.shard_starts.push(0);
        dataset.issues = scan.issues;
        for (rel, label, size) in &scan.files {
            if let Err(reason) = check_label(*label, num_classes) {
                dataset.issues.push(IndexIssue {
                    shard: root.join(rel).parent().unwrap_or(root).to_path_buf(),
                    member: rel.clone(),
                    reason,
                });
                continue;
            }
            match u32::try_from(*size).ok().filter(|_| *size <= limit) {
                Some(size) => dataset.push(rel, 0, size, *label),
                None => dataset.issues.push(IndexIssue {
                    shard: root.join(rel).parent().unwrap_or(root).to_path_buf(),
                    member: rel.clone(),
                    reason: IssueReason::OverLimit { size: *size, limit },
                }),
            }
        }
        dataset.class_names = Some(scan.classes);
        dataset.finish(&root.display().to_string())
    }

    fn empty(backend: Backend, max_sample_bytes: u64) -> Dataset {
        Dataset {
            backend,
            max_sample_bytes,
            samples: SampleTable::default(),
            issues: Vec::new(),
            class_names: None,
            shard_starts: Vec::new(),
        }
    }

    fn push(&mut self, name: &str, offset: u64, size: u32, label: i64) {
        self.samples.push(name, offset, size, label);
    }

    fn finish(mut self, what: &str) -> Result<Dataset, SourceError> {
        if self.samples.len() == 0 {
            return Err(SourceError::Empty {
                what: what.to_owned(),
                skipped: self.issues.len(),
                first: self
                    .issues
                    .first()
                    .map_or_else(String::new, |i| format!("; first: {i}")),
            });
        }
        self.samples.finish();
        self.shard_starts.shrink_to_fit();
        Ok(self)
    }

    /// Number of samples; ids are `0..len()`.
    pub fn len(&self) -> u64 {
        self.samples.len()
    }

    /// True if the dataset has no sample (never the case for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.samples.len() == 0
    }

    /// Sample `id` as an index into the columns, `None` out of range.
    fn record(&self, id: u64) -> Option<Record> {
        (id < self.samples.len()).then(|| {
            // The last shard whose first id is at most `id` (empty shards share their
            // successor's start and are passed over).
            let shard = self.shard_starts.partition_point(|&start| start <= id);
            Record {
                id: id as usize,
                shard: shard.saturating_sub(1),
            }
        })
    }

    /// The label of sample `id`.
    ///
    /// # Panics
    /// If `id >= len()` (ids come from the [`Sampler`](super::Sampler), which never yields one).
    pub fn label(&self, id: u64) -> i64 {
        match self.record(id) {
            Some(record) => self.samples.label(record.id),
            None => panic!(
                "sample id {id} out of range (dataset has {} samples)",
                self.len()
            ),
        }
    }

    fn name(&self, record: &Record) -> String {
        self.samples.name(record.id)
    }

    /// A human-readable location of sample `id` for log lines: `shard-000001.tar:img_0042.jpg`
    /// for tar shards, the root-relative path for ImageFolder.
    pub fn describe(&self, id: u64) -> String {
        let Some(record) = self.record(id) else {
            return format!("<sample {id} out of range>");
        };
        match &self.backend {
            Backend::Tar { shards, .. } => {
                format!("{}:{}", shards[record.shard].display, self.name(&record))
            }
            Backend::Folder { .. } => self.name(&record),
        }
    }

    /// Where sample `id` comes from: the tar shard's path and the member's name, or, for an
    /// ImageFolder, no shard and the image file's path (root joined with its relative path).
    /// `None` for an id out of range.
    pub fn origin(&self, id: u64) -> Option<(Option<&Path>, String)> {
        let record = self.record(id)?;
        Some(match &self.backend {
            Backend::Tar { shards, .. } => (
                Some(shards[record.shard].path.as_path()),
                self.name(&record),
            ),
            Backend::Folder { root } => (
                None,
                root.join(self.name(&record)).to_string_lossy().into_owned(),
            ),
        })
    }

    /// Reads sample `id`'s encoded image bytes into `buf` (cleared first; its capacity is
    /// reused). Never panics: a vanished, replaced, changed or truncated file is an error
    /// naming the shard and member.
    ///
    /// A member of an encrypted shard is read behind its associated data and opened in place
    /// in `buf`: the plaintext exists only there (no other buffer, no file), and a member that
    /// fails authentication is [`SampleReadError::Unauthentic`].
    pub fn read_into(&self, id: u64, buf: &mut Vec<u8>) -> Result<(), SampleReadError> {
        buf.clear();
        let record = self.record(id).ok_or(SampleReadError::OutOfRange {
            id,
            len: self.len(),
        })?;
        match &self.backend {
            Backend::Tar {
                shards,
                remote_open,
                remote_budget,
            } => {
                let shard = &shards[record.shard];
                let (offset, size) = (self.samples.offset(record.id), self.samples.size(record.id));
                let location = || self.describe(id);
                let was_open = shard.is_open();
                let file = shard.file(&location)?;
                if shard.remote.is_some() && !was_open {
                    hold_within_budget(shards, remote_open, *remote_budget, record.shard as u32);
                }
                // An encrypted member is read behind room for its associated data.
                let name = match &shard.cipher {
                    Some(_) => self.name(&record),
                    None => String::new(),
                };
                let aad_len = shard.cipher.as_ref().map_or(0, |c| c.aad_len(&name));
                buf.resize(aad_len + size as usize, 0);
                if file.read_exact_at(&mut buf[aad_len..], offset).is_err() {
                    // The descriptor may have gone bad (network filesystem, replaced file):
                    // retry once on a fresh one, which also re-checks the shard's identity.
                    shard.forget(&file);
                    let file = shard.file(&location).inspect_err(|_| buf.clear())?;
                    file.read_exact_at(&mut buf[aad_len..], offset)
                        .map_err(|source| {
                            buf.clear();
                            SampleReadError::Read {
                                location: location(),
                                path: shard.path.clone(),
                                offset,
                                size: u64::from(size),
                                source,
                            }
                        })?;
                }
                match &shard.cipher {
                    None => Ok(()),
                    Some(cipher) => {
                        cipher.write_aad(&name, &mut buf[..aad_len]);
                        if cipher.open_in_place(buf, aad_len) {
                            Ok(())
                        } else {
                            Err(SampleReadError::Unauthentic {
                                location: location(),
                                path: shard.path.clone(),
                            })
                        }
                    }
                }
            }
            Backend::Folder { root } => {
                let path = root.join(self.name(&record));
                let open_err = |source| SampleReadError::Open {
                    location: self.describe(id),
                    path: path.clone(),
                    source,
                };
                // The file may have been replaced since the scan: never block on a FIFO, and
                // judge what was opened, not the path.
                let file = open_regular(&path).map_err(open_err)?;
                let len = file.metadata().map_err(open_err)?.len();
                let limit = self.max_sample_bytes;
                let too_large = |size| SampleReadError::TooLarge {
                    location: self.describe(id),
                    path: path.clone(),
                    size,
                    limit,
                };
                if len > limit {
                    return Err(too_large(len));
                }
                buf.reserve(len as usize);
                // The file can still grow while it is read: read one byte past the limit at most.
                let read = file.take(limit + 1).read_to_end(buf);
                match read {
                    Ok(n) if n as u64 > limit => {
                        buf.clear();
                        Err(too_large(n as u64))
                    }
                    Ok(_) => Ok(()),
                    Err(source) => {
                        buf.clear();
                        Err(SampleReadError::Read {
                            location: self.describe(id),
                            path: path.clone(),
                            offset: 0,
                            size: len,
                            source,
                        })
                    }
                }
            }
        }
    }

    /// Checks every open shard against its path: a shard whose path is gone, is no longer a
    /// regular file, names another file, or whose size or modification time changed since it
    /// was indexed has its descriptor closed, so its next reads fail (and are skipped) instead
    /// of quietly serving a file that was deleted or replaced. Returns one error per shard
    /// found so. Shards not open yet are checked when they are opened. One `stat` per open
    /// shard: cheap enough to run once per epoch even on a network filesystem.
    pub fn recheck_shards(&self) -> Vec<SampleReadError> {
        match &self.backend {
            Backend::Tar { shards, .. } => shards.iter().filter_map(Shard::recheck).collect(),
            Backend::Folder { .. } => Vec::new(),
        }
    }

    /// Members (tar) or files (ImageFolder) skipped while indexing, with reasons.
    pub fn skipped_at_index(&self) -> &[IndexIssue] {
        &self.issues
    }

    /// Class names of an ImageFolder dataset, indexed by label; `None` for tar shards.
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// The id of the first sample of each shard, in shard order (one entry, 0, for an
    /// ImageFolder). Used by [`ShuffleMode::Buffer`](super::ShuffleMode::Buffer) to shuffle
    /// shards.
    pub fn shard_starts(&self) -> &[u64] {
        &self.shard_starts
    }

    /// Feeds the dataset's identity into `digest`: each shard's file name and size (not its
    /// directory or time: a copied dataset is the same dataset), then every indexed
    /// sample's member name (or root-relative path), size and label, in id order. Two
    /// datasets with the same digest give the same ids to the same samples.
    pub fn digest_into(&self, digest: &mut crate::ring::resume::Digest) {
        if let Backend::Tar { shards, .. } = &self.backend {
            digest.u64(shards.len() as u64);
            for shard in shards {
                // A remote shard is named by its key's file name, not its cached copy's
                // (which carries the ETag).
                let name = match &shard.remote {
                    Some((_, object)) => object
                        .url
                        .key
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    None => shard
                        .path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                };
                digest.str(&name).u64(shard.size);
            }
        }
        digest.u64(self.samples.len());
        self.samples.for_each(|name, size, label| {
            digest.str(name).u64(u64::from(size)).u64(label as u64);
        });
    }

    /// The shard files of a tar dataset, in shard order (empty for an ImageFolder).
    pub fn shard_paths(&self) -> Vec<&Path> {
        match &self.backend {
            Backend::Tar { shards, .. } => shards.iter().map(|s| s.path.as_path()).collect(),
            Backend::Folder { .. } => Vec::new(),
        }
    }
}

/// Notes that remote shard `opened` was just opened, and closes the least recently opened
/// others while the open copies exceed `budget` bytes (the newest always stays open).
fn hold_within_budget(shards: &[Shard], open: &Mutex<VecDeque<u32>>, budget: u64, opened: u32) {
    let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
    open.retain(|&s| s != opened);
    open.push_back(opened);
    let mut held: u64 = open.iter().map(|&s| shards[s as usize].size).sum();
    while held > budget && open.len() > 1 {
        if let Some(oldest) = open.pop_front() {
            let shard = &shards[oldest as usize];
            held -= shard.size;
            *shard.file.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

impl Shard {
    fn is_open(&self) -> bool {
        self.file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The shard's open file, opening (and checking) it if needed; a remote shard's copy is
    /// fetched into the cache first when it is not there.
    fn file(&self, location: &dyn Fn() -> String) -> Result<Arc<File>, SampleReadError> {
        let mut slot = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(file) = slot.as_ref() {
            return Ok(Arc::clone(file));
        }
        let open_err = |source| SampleReadError::Open {
            location: location(),
            path: self.path.clone(),
            source,
        };
        let file = match &self.remote {
            Some((cache, object)) => {
                // Other shards' readers wait on this lock only for this shard's fetch.
                cache
                    .open(object)
                    .map_err(|source| SampleReadError::Fetch {
                        location: location(),
                        source,
                    })?
            }
            None => open_regular(&self.path).map_err(open_err)?,
        };
        let meta = file.metadata().map_err(open_err)?;
        let (size, mtime_ns) = fingerprint(&meta);
        if size != self.size || mtime_ns != self.mtime_ns {
            return Err(SampleReadError::Changed {
                location: location(),
                path: self.path.clone(),
                what: format!(
                    "size {} (indexed {}), mtime {} ns (indexed {})",
                    size, self.size, mtime_ns, self.mtime_ns
                ),
            });
        }
        let file = Arc::new(file);
        *slot = Some(Arc::clone(&file));
        Ok(file)
    }

    /// See [`Dataset::recheck_shards`]. A remote shard's copy is named by the object's
    /// ETag and only ever renamed into place complete, so there is nothing to recheck: a
    /// changed object is refused by its fetch (`If-Match`).
    fn recheck(&self) -> Option<SampleReadError> {
        if self.remote.is_some() {
            return None;
        }
        let cached = self
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let problem = match std::fs::metadata(&self.path) {
            Err(source) => SampleReadError::Open {
                location: self.display.clone(),
                path: self.path.clone(),
                source,
            },
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                let (size, mtime_ns) = fingerprint(&meta);
                let same_file = cached
                    .metadata()
                    .is_ok_and(|open| open.dev() == meta.dev() && open.ino() == meta.ino());
                let what = if !meta.is_file() {
                    "the path is no longer a regular file".to_owned()
                } else if !same_file {
                    "the path names another file than the one opened".to_owned()
                } else if size != self.size || mtime_ns != self.mtime_ns {
                    format!(
                        "size {} (indexed {}), mtime {} ns (indexed {})",
                        size, self.size, mtime_ns, self.mtime_ns
                    )
                } else {
                    return None;
                };
                SampleReadError::Changed {
                    location: self.display.clone(),
                    path: self.path.clone(),
                    what,
                }
            }
        };
        self.forget(&cached);
        Some(problem)
    }

    /// Drops the cached file if it is still `file`, so the next read reopens the shard.
    fn forget(&self, file: &Arc<File>) {
        let mut slot = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if slot
            .as_ref()
            .is_some_and(|cached| Arc::ptr_eq(cached, file))
        {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::tar::tests::TarBuilder;
    use std::fs;

    fn shard_bytes(prefix: &str, n: usize) -> Vec<u8> {
        let mut b = TarBuilder::default();
        for i in 0..n {
            b.file(
                &format!("{prefix}_{i:03}.jpg"),
                format!("image {prefix} {i}").as_bytes(),
            );
            b.file(&format!("{prefix}_{i:03}.cls"), format!("{i}\n").as_bytes());
        }
        b.finish()
    }

    #[test]
    fn recheck_closes_shards_deleted_replaced_or_changed_after_opening() {
        let dir = tempfile::tempdir().unwrap();
        for s in 0..4 {
            fs::write(
                dir.path().join(format!("s-{s:03}.tar")),
                shard_bytes("a", 2),
            )
            .unwrap();
        }
        let ds = Dataset::open(&SourceConfig::tar(["s-{000..003}.tar"]), dir.path()).unwrap();
        let mut buf = Vec::new();
        assert!(ds.recheck_shards().is_empty(), "nothing is open yet");
        for id in [0, 2, 4, 6] {
            ds.read_into(id, &mut buf).unwrap();
        }
        assert!(ds.recheck_shards().is_empty(), "open and unchanged");
        let path = |s: u32| dir.path().join(format!("s-{s:03}.tar"));
        fs::remove_file(path(0)).unwrap();
        fs::remove_file(path(1)).unwrap();
        fs::create_dir(path(1)).unwrap();
        fs::remove_file(path(2)).unwrap();
        fs::write(path(2), shard_bytes("a", 2)).unwrap(); // same bytes, another file
                                                          // The open descriptors still read the old files until the recheck.
        ds.read_into(0, &mut buf).unwrap();
        let found: Vec<String> = ds.recheck_shards().iter().map(|e| e.to_string()).collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("s-000.tar") && found[0].contains("cannot open"));
        assert!(found[1].contains("s-001.tar") && found[1].contains("no longer a regular file"));
        assert!(found[2].contains("s-002.tar") && found[2].contains("another file"));
        assert!(ds.recheck_shards().is_empty(), "reported once");
        for id in [0, 2, 4] {
            assert!(
                ds.read_into(id, &mut buf).is_err(),
                "sample {id} still served"
            );
        }
        ds.read_into(6, &mut buf).unwrap();
    }

    #[test]
    fn dataset_is_shared_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<Dataset>();
    }

    #[test]
    fn tar_dataset_orders_shards_and_reads_samples() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("s-001.tar"), shard_bytes("b", 2)).unwrap();
        fs::write(dir.path().join("s-000.tar"), shard_bytes("a", 3)).unwrap();
        let ds = Dataset::open(&SourceConfig::tar(["s-{000..001}.tar"]), dir.path()).unwrap();
        assert_eq!(ds.len(), 5);
        assert_eq!(ds.shard_starts(), [0, 3]);
        assert_eq!(ds.describe(3), "s-001.tar:b_000.jpg");
        assert_eq!(ds.label(4), 1);
        assert_eq!(ds.class_names(), None);
        let mut buf = Vec::with_capacity(64);
        for (id, want) in [(0, "image a 0"), (4, "image b 1"), (2, "image a 2")] {
            ds.read_into(id, &mut buf).unwrap();
            assert_eq!(buf, want.as_bytes());
        }
        assert!(matches!(
            ds.read_into(5, &mut buf),
            Err(SampleReadError::OutOfRange { id: 5, len: 5 })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn imagefolder_dataset_reads_files() {
        let dir = tempfile::tempdir().unwrap();
        for (path, bytes) in [("b/1.jpg", "one"), ("a/2.png", "two"), ("a/x.txt", "")] {
            let p = dir.path().join("root").join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, bytes).unwrap();
        }
        let ds = Dataset::open(&SourceConfig::imagefolder("root"), dir.path()).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.class_names().unwrap(), ["a", "b"]);
        assert_eq!((ds.describe(0), ds.label(0)), ("a/2.png".to_owned(), 0));
        assert_eq!(ds.skipped_at_index().len(), 1);
        let mut buf = Vec::new();
        ds.read_into(1, &mut buf).unwrap();
        assert_eq!(buf, b"one");
        fs::remove_file(dir.path().join("root/b/1.jpg")).unwrap();
        let err = ds.read_into(1, &mut buf).unwrap_err();
        assert!(err.to_string().contains("b/1.jpg"), "{err}");
    }

    #[test]
    fn inconsistent_configs_and_empty_datasets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SourceConfig::tar(["x.tar"]);
        cfg.path = Some("p".into());
        assert!(matches!(
            Dataset::open(&cfg, dir.path()),
            Err(SourceError::Config(_))
        ));
        let mut b = TarBuilder::default();
        b.file("a.jpg", b"a");
        fs::write(dir.path().join("x.tar"), b.finish()).unwrap();
        let err = Dataset::open(&SourceConfig::tar(["x.tar"]), dir.path()).unwrap_err();
        assert!(
            matches!(&err, SourceError::Empty { skipped: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("no .cls label"), "{err}");
    }
}
