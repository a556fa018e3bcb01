//! [`ShardCache`]: remote shards as local files, in a directory several daemons may share.
//!
//! A shard is stored as `<dir>/<bucket>/<key>@<etag>`: another version of the object is
//! another file, so a copy is never mistaken for a newer object. The protocol between
//! daemons uses only atomic renames and `flock`:
//!
//! 1. Fetching takes an exclusive lock on `<copy>.lock`, so one daemon fetches while the
//!    others wait and then find the copy; the bytes go to a temporary name, are checked
//!    (size, ETag via `If-Match`), given the object's mtime, synced, and renamed into place.
//!    A half-written copy therefore never has the final name.
//! 2. A reader holds a shared lock on the copy for as long as it keeps it open.
//! 3. Past `cache-limit`, the least recently opened copies are evicted, each only if an
//!    exclusive lock on it can be had at once: a copy any daemon has open stays. A reader
//!    that opened a copy just before it was evicted keeps reading the complete (unlinked)
//!    file, so eviction never corrupts a read; the next open fetches again.
//! 4. A daemon killed mid-fetch leaves its temporary copy, but its lock dies with it: the
//!    next fetch of that copy, and every daemon opening the cache, removes the temporary
//!    copies whose fetch lock is free.

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustix::fs::{flock, FlockOperation};

use super::error::RemoteError;
use super::store::{RemoteObject, Store};
use super::url::Scheme;

/// Suffix of the per-copy lock files.
const LOCK_SUFFIX: &str = ".lock";
/// Marker in the names of copies being written.
const PART_MARK: &str = ".part-";

/// The local cache of remote shards; see the module documentation.
#[derive(Debug)]
pub struct ShardCache {
    dir: PathBuf,
    limit: Option<u64>,
    store: Arc<Store>,
}

impl ShardCache {
    /// A cache in `dir` (created if missing) holding at most `limit` bytes of copies not in
    /// use; `store` fetches what is missing.
    pub fn new(
        dir: &Path,
        limit: Option<u64>,
        store: Arc<Store>,
    ) -> Result<ShardCache, RemoteError> {
        fs::create_dir_all(dir).map_err(|source| RemoteError::Cache {
            path: dir.to_path_buf(),
            source,
        })?;
        sweep_stale_parts(dir);
        Ok(ShardCache {
            dir: dir.to_path_buf(),
            limit,
            store,
        })
    }

    /// The client this cache fetches with.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The byte limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Where the copy of `object` lives (whether or not it is there).
    pub fn path_of(&self, object: &RemoteObject) -> PathBuf {
        let tag: String = object
            .etag
            .as_deref()
            .unwrap_or("no-etag")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(64)
            .collect();
        // S3 copies directly under the bucket's name; other stores' under `gs+` / `az+`.
        let bucket = match object.url.scheme {
            Scheme::S3 => object.url.bucket.clone(),
            other => format!("{}+{}", &other.prefix()[..2], object.url.bucket),
        };
        self.dir
            .join(bucket)
            .join(format!("{}@{tag}", object.url.key))
    }

    /// Opens the complete copy of `object` under a shared lock if the cache has one, without
    /// fetching: `None` when it is not there (yet).
    pub fn open_cached(&self, object: &RemoteObject) -> Result<Option<File>, RemoteError> {
        open_copy(&self.path_of(object), object)
    }

    /// Opens the copy of `object`, fetching it first if no complete copy is there, and holds a
    /// shared lock on it (released when the file is closed) so no daemon evicts it meanwhile.
    pub fn open(&self, object: &RemoteObject) -> Result<File, RemoteError> {
        let path = self.path_of(object);
        if let Some(file) = open_copy(&path, object)? {
            return Ok(file);
        }
        let parent = path.parent().unwrap_or(&self.dir);
        let cache_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RemoteError::Cache { path, source }
        };
        fs::create_dir_all(parent).map_err(cache_err(parent))?;
        let lock_path = with_suffix(&path, LOCK_SUFFIX);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(cache_err(&lock_path))?;
        // Another daemon may be fetching this copy: wait for it, then look again.
        flock(&lock, FlockOperation::LockExclusive).map_err(|e| RemoteError::Cache {
            path: lock_path.clone(),
            source: e.into(),
        })?;
        if let Some(file) = open_copy(&path, object)? {
            return Ok(file);
        }
        // Holding the lock, no one else is writing this copy: any temporary copy of it is
        // left by a fetch that died (a daemon killed mid-fetch).
        remove_stale_parts(&path);
        let part = with_suffix(&path, &format!("{PART_MARK}{}", std::process::id()));
        let fetched = (|| {
            let mut out = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&part)
                .map_err(cache_err(&part))?;
            self.store.fetch(object, &mut out)?;
            out.set_times(FileTimes::new().set_modified(object.modified()))
                .and_then(|()| out.sync_data())
                .map_err(cache_err(&part))?;
            // Share-locked before it gets its final name, so no evictor can take it between
            // the rename and this reader's first use.
            let file = File::open(&part).map_err(cache_err(&part))?;
            flock(&file, FlockOperation::LockShared).map_err(|e| RemoteError::Cache {
                path: part.clone(),
                source: e.into(),
            })?;
            fs::rename(&part, &path).map_err(cache_err(&path))?;
            Ok(file)
        })();
        if fetched.is_err() {
            // Best effort: a partial copy is useless, and its name is never opened.
            let _ = fs::remove_file(&part);
        }
        let file = fetched?;
        drop(lock);
        self.evict(&path);
        Ok(file)
    }

    /// Evicts least recently opened copies not in use until the cache holds at most its
    /// limit; `keep` (the copy just fetched) stays. Returns the bytes freed.
    pub fn evict(&self, keep: &Path) -> u64 {
        let Some(limit) = self.limit else {
            return 0;
        };
        let mut copies = Vec::new();
        collect_copies(&self.dir, &mut copies);
        let mut total: u64 = copies.iter().map(|c| c.1).sum();
        copies.sort_by_key(|c| c.2);
        let mut freed = 0;
        for (path, size, _) in copies {
            if total <= limit {
                break;
            }
            if path == keep {
                continue;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok()
                && fs::remove_file(&path).is_ok()
            {
                log::debug!("shard cache: evicted {} ({size} bytes)", path.display());
                total -= size;
                freed += size;
            }
        }
        freed
    }
}

/// Opens a complete copy of `object` at `path` under a shared lock, and marks it used now
/// (its access time orders eviction); `None` when there is none.
fn open_copy(path: &Path, object: &RemoteObject) -> Result<Option<File>, RemoteError> {
    let file = match crate::source::file::open_regular_nofollow(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RemoteError::Cache {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let err = |source: io::Error| RemoteError::Cache {
        path: path.to_path_buf(),
        source,
    };
    flock(&file, FlockOperation::LockShared).map_err(|e| err(e.into()))?;
    if file.metadata().map_err(err)?.len() != object.size {
        // Only a rename ever creates this name, so this is a copy someone altered: refetch.
        fs::remove_file(path).map_err(err)?;
        return Ok(None);
    }
    // Access times may not be kept by the mount (noatime): set it.
    let _ = file.set_times(FileTimes::new().set_accessed(SystemTime::now()));
    Ok(Some(file))
}

/// Removes the temporary copies of the copy at `path` (`<path>.part-<pid>`); the caller holds
/// its fetch lock, so none of them is being written.
fn remove_stale_parts(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let mut prefix = name.to_owned();
    prefix.push(PART_MARK);
    let prefix = prefix.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            log::info!(
                "shard cache: removing {}, left by a fetch that did not finish",
                entry.path().display()
            );
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Removes, under `dir`, the temporary copies no daemon is writing: those whose copy's fetch
/// lock can be taken at once. A daemon killed mid-fetch leaves its `.part-<pid>` file behind;
/// its lock went with the process.
fn sweep_stale_parts(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            sweep_stale_parts(&path);
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(at) = name.find(PART_MARK) else {
            continue;
        };
        let copy = path.with_file_name(&name[..at]);
        let lock_path = with_suffix(&copy, LOCK_SUFFIX);
        let Ok(lock) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
        else {
            continue;
        };
        if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok() {
            remove_stale_parts(&copy);
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Every complete copy under `dir`: (path, size, last access).
fn collect_copies(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if kind.is_dir() {
            collect_copies(&path, out);
        } else if kind.is_file() && !name.ends_with(LOCK_SUFFIX) && !name.contains(PART_MARK) {
            if let Ok(meta) = entry.metadata() {
                let used = meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((path, meta.len(), used));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::remote::ObjectUrl;
    use std::time::Duration;

    fn object(key: &str, size: u64) -> RemoteObject {
        RemoteObject {
            url: ObjectUrl {
                scheme: Default::default(),
                bucket: "b".to_owned(),
                key: key.to_owned(),
            },
            size,
            etag: Some("\"0a1b-2c\"".to_owned()),
            mtime_ns: 0,
        }
    }

    /// Puts a complete copy of `object` in place, last used `age` ago.
    fn plant(cache: &ShardCache, object: &RemoteObject, age: Duration) -> PathBuf {
        let path = cache.path_of(object);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, vec![7u8; object.size as usize]).unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        file.set_times(FileTimes::new().set_accessed(SystemTime::now() - age))
            .unwrap();
        path
    }

    #[test]
    fn eviction_takes_the_least_recently_used_copies_no_reader_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cache =
            ShardCache::new(dir.path(), Some(250), Arc::new(Store::new(false).unwrap())).unwrap();
        let objects: Vec<_> = (0..4)
            .map(|i| object(&format!("p/s-{i}.tar"), 100))
            .collect();
        assert_eq!(
            cache.path_of(&objects[0]),
            dir.path().join("b/p/s-0.tar@0a1b2c"),
            "the ETag, stripped to alphanumerics, names the version"
        );
        let paths: Vec<_> = objects
            .iter()
            .enumerate()
            .map(|(i, o)| plant(&cache, o, Duration::from_secs(100 - 10 * i as u64)))
            .collect();
        // The oldest copy is open (share-locked) by a reader, as another daemon would hold it.
        let held = open_copy(&paths[0], &objects[0]).unwrap().unwrap();
        // A half-written copy and lock files are never counted or touched.
        fs::write(with_suffix(&paths[1], ".part-99"), [0u8; 500]).unwrap();
        fs::write(with_suffix(&paths[1], LOCK_SUFFIX), b"").unwrap();

        assert_eq!(cache.evict(&paths[3]), 200);
        let left: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [true, false, false, true], "held and newest stay");
        assert!(with_suffix(&paths[1], ".part-99").exists());
        assert_eq!(cache.evict(&paths[3]), 0, "within the limit");
        drop(held);
        // Released, it is still the most recently used (opening it was a use): when a new
        // copy comes in, the least recently used one goes.
        let newest = object("p/s-4.tar", 100);
        let newest = plant(&cache, &newest, Duration::ZERO);
        assert_eq!(cache.evict(&newest), 100);
        assert!(paths[0].exists() && !paths[3].exists() && newest.exists());
    }

    #[test]
    fn temporary_copies_of_dead_fetches_are_swept_but_not_one_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::new(false).unwrap());
        let cache = ShardCache::new(dir.path(), None, Arc::clone(&store)).unwrap();
        let (dead, live) = (object("p/dead.tar", 10), object("p/live.tar", 10));
        let dead_part = with_suffix(&cache.path_of(&dead), ".part-4000001");
        let live_part = with_suffix(&cache.path_of(&live), ".part-4000002");
        fs::create_dir_all(dead_part.parent().unwrap()).unwrap();
        fs::write(&dead_part, [0u8; 5]).unwrap();
        fs::write(&live_part, [0u8; 5]).unwrap();
        // Another daemon is fetching `live`: it holds the fetch lock.
        let lock = File::create(with_suffix(&cache.path_of(&live), LOCK_SUFFIX)).unwrap();
        flock(&lock, FlockOperation::LockExclusive).unwrap();
        // A daemon starting on the cache sweeps what no one is writing.
        ShardCache::new(dir.path(), None, Arc::clone(&store)).unwrap();
        assert!(!dead_part.exists(), "left by a killed fetch: removed");
        assert!(live_part.exists(), "being written: kept");
        drop(lock);
        ShardCache::new(dir.path(), None, store).unwrap();
        assert!(!live_part.exists(), "its writer gone: removed");
    }

    #[test]
    fn a_copy_of_the_wrong_size_is_discarded_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache =
            ShardCache::new(dir.path(), None, Arc::new(Store::new(false).unwrap())).unwrap();
        let o = object("s.tar", 64);
        let path = plant(&cache, &o, Duration::ZERO);
        fs::write(&path, [1u8; 10]).unwrap();
        assert!(open_copy(&path, &o).unwrap().is_none());
        assert!(!path.exists());
        assert_eq!(cache.limit(), None);
    }
}
