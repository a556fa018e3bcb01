//! Where the ring's memory lives: a sealed memfd (the default), or a named file
//! `<dir>/ringfeed-<name>.ring` in a directory given with `--shm-dir`. Either way the memory is
//! reserved in full (`fallocate`) before anyone can attach, so a lack of space fails at start
//! with the size needed, never as a `SIGBUS` on a later first touch.
//!
//! The named file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` relative to a directory fd
//! opened with `O_NOFOLLOW` (no symlink is followed at either step), mode 0600 (0640 and the
//! allowed group with `--allow-group`: consumers get the descriptor over the socket and never
//! open the file by name, so the group needs no write access that would let it truncate it). The producer holds an exclusive `flock` on its own open
//! file description of it, never shared with consumers, so a file whose lock is free was left
//! by a producer that died: the next start removes it and creates a new one.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FallocateFlags, FileType, FlockOperation, Mode, OFlags, CWD};
use rustix::io::Errno;
use thiserror::Error;

use super::layout::hdr;

/// A `--shm-dir` (or its ring file) that the producer refuses to use.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ShmDirError {
    /// The directory could not be opened or inspected.
    #[error("shm directory {path}: {source}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The directory path is a symlink.
    #[error("shm directory {path} is a symlink; give the directory it points to")]
    Symlink {
        /// The directory.
        path: PathBuf,
    },
    /// The path is not a directory.
    #[error("shm directory {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Others (or the group) may write the directory and it lacks the sticky bit, so they
    /// could delete or replace the ring file.
    #[error("shm directory {path} (mode {mode:o}) is writable by group or others without the sticky bit: they could replace the ring file; use a directory only you can write, or one with the sticky bit like /dev/shm (chmod +t)")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A live producer (possibly of another runtime directory) uses the ring file.
    #[error("ring file {path} is in use by a live producer; stop it or pick another --name")]
    InUse {
        /// The ring file.
        path: PathBuf,
    },
    /// Something that is not this user's regular file sits at the ring file's path.
    #[error("{path} exists and is not a regular file owned by this user (uid {uid}); refusing to touch it. Another user may have created it first to keep the daemon from starting: remove it (as its owner or root), or use another --name, or another --shm-dir that only you can write, or no --shm-dir (the default memfd has no name to take)")]
    Foreign {
        /// The path.
        path: PathBuf,
        /// Our effective uid.
        uid: u32,
    },
}

/// Why the segment could not be created (the producer turns these into `RingCreateError`s
/// that carry the ring's size).
#[derive(Debug)]
pub(crate) enum SegmentError {
    /// The directory or an existing file was refused.
    Dir(ShmDirError),
    /// `fallocate` failed for lack of space: `free_bytes` is what the filesystem had left
    /// (`None` for a memfd, whose limit is RAM and the memory cgroup).
    NoSpace {
        dir: Option<PathBuf>,
        free_bytes: Option<u64>,
        source: io::Error,
    },
    /// Any other failure: what failed, and why.
    Io(&'static str, io::Error),
}

/// Who besides the owner may open the named file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileAccess {
    /// Group given read access (mode 0640), or `None` for 0600.
    pub(crate) group: Option<u32>,
}

/// The ring's memory.
#[derive(Debug)]
pub(crate) enum Segment {
    /// An anonymous, sealed memfd.
    Memfd(File),
    /// A named file in a `--shm-dir`.
    Named(NamedFile),
}

impl Segment {
    /// The file to map and to hand to consumers.
    pub(crate) fn file(&self) -> &File {
        match self {
            Segment::Memfd(f) => f,
            Segment::Named(n) => &n.file,
        }
    }

    /// The named file's path, if the segment is one.
    pub(crate) fn path(&self) -> Option<&Path> {
        match self {
            Segment::Memfd(_) => None,
            Segment::Named(n) => Some(&n.path),
        }
    }

    /// The `segment` value of the attach reply: `"memfd"` or `"file"`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Segment::Memfd(_) => "memfd",
            Segment::Named(_) => "file",
        }
    }

    /// Removes the named file's directory entry (if it is still ours); a no-op for a memfd.
    /// The memory lives on while anyone maps it.
    pub(crate) fn remove_name(&self) {
        if let Segment::Named(n) = self {
            n.remove_name();
        }
    }
}

/// The ring file name for `name` (already validated: no `/`, no leading `.`).
pub(crate) fn file_name(name: &str) -> String {
    format!("ringfeed-{name}.ring")
}

/// Creates a memfd of `bytes`, fully allocated and sealed against shrinking and growing.
pub(crate) fn create_memfd(name: &str, bytes: u64) -> Result<Segment, SegmentError> {
    super::memory::create_memfd(name, bytes)
        .map(Segment::Memfd)
        .map_err(|e| match e {
            super::memory::MemfdError::Allocate(source) => SegmentError::NoSpace {
                dir: None,
                free_bytes: None,
                source,
            },
            super::memory::MemfdError::Create(source) => {
                SegmentError::Io("creating the memfd", source)
            }
        })
}

/// A ring file in a `--shm-dir`, removed when dropped.
#[derive(Debug)]
pub(crate) struct NamedFile {
    /// The open file description mapped by the producer and passed to consumers.
    file: File,
    /// Our own open file description, holding the `flock` (never passed, never mapped, so
    /// the lock dies with this process even while consumers still map the file).
    lock: OwnedFd,
    dir: OwnedFd,
    file_name: String,
    path: PathBuf,
    named: AtomicBool,
}

impl NamedFile {
    fn remove_name(&self) {
        if !self.named.swap(false, Ordering::Relaxed) {
            return;
        }
        // Unlink only if the entry is still our inode (someone with write access to the
        // directory could have replaced it; never remove their file).
        let ours = rustix::fs::fstat(&self.lock);
        let there = rustix::fs::statat(&self.dir, &self.file_name, AtFlags::SYMLINK_NOFOLLOW);
        if let (Ok(a), Ok(b)) = (ours, there) {
            if a.st_dev == b.st_dev && a.st_ino == b.st_ino {
                let _ = rustix::fs::unlinkat(&self.dir, &self.file_name, AtFlags::empty());
            }
        }
    }
}

impl Drop for NamedFile {
    fn drop(&mut self) {
        self.remove_name();
    }
}

/// Opens and checks `dir`: not a symlink, a directory, and not writable by group or others
/// unless the sticky bit is set.
fn open_dir(dir: &Path) -> Result<OwnedFd, ShmDirError> {
    let io = |source: Errno| ShmDirError::Io {
        path: dir.to_owned(),
        source: source.into(),
    };
    let meta = rustix::fs::lstat(dir).map_err(io)?;
    match FileType::from_raw_mode(meta.st_mode) {
        FileType::Directory => {}
        FileType::Symlink => {
            return Err(ShmDirError::Symlink {
                path: dir.to_owned(),
            })
        }
        _ => {
            return Err(ShmDirError::NotADirectory {
                path: dir.to_owned(),
            })
        }
    }
    let fd = rustix::fs::openat(
        CWD,
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP | Errno::NOTDIR => ShmDirError::Symlink {
            path: dir.to_owned(),
        },
        e => io(e),
    })?;
    // Check what was opened, not what the path named a moment ago.
    let st = rustix::fs::fstat(&fd).map_err(io)?;
    check_dir_mode(dir, st.st_mode)?;
    Ok(fd)
}

/// The directory mode check as a pure function.
fn check_dir_mode(dir: &Path, mode: u32) -> Result<(), ShmDirError> {
    const STICKY: u32 = 0o1000;
    if mode & 0o022 != 0 && mode & STICKY == 0 {
        return Err(ShmDirError::Unsafe {
            path: dir.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Creates `<dir>/ringfeed-<name>.ring` of `bytes`, fully allocated, replacing a stale file
/// left by a dead producer.
pub(crate) fn create_named(
    dir: &Path,
    name: &str,
    bytes: u64,
    access: FileAccess,
) -> Result<Segment, SegmentError> {
    let dirfd = open_dir(dir).map_err(SegmentError::Dir)?;
    let file_name = file_name(name);
    let path = dir.join(&file_name);
    let uid = rustix::process::geteuid().as_raw();
    let mode = Mode::from_raw_mode(0o600);
    let mut replaced = false;
    let lock = loop {
        match rustix::fs::openat(
            &dirfd,
            &file_name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        ) {
            Ok(fd) => break fd,
            Err(Errno::EXIST) if !replaced => {
                remove_stale(&dirfd, &file_name, &path, uid).map_err(SegmentError::Dir)?;
                replaced = true;
            }
            Err(Errno::EXIST) => {
                return Err(SegmentError::Dir(ShmDirError::InUse { path }));
            }
            Err(e) => return Err(SegmentError::Io("creating the ring file", e.into())),
        }
    };
    // From here on, dropping `named` removes the file: a failure below leaves nothing.
    let io = |what| move |e: Errno| SegmentError::Io(what, e.into());
    rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive)
        .map_err(io("locking the ring file"))?;
    // A second open file description of the same inode, for mapping and passing.
    let file = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", lock.as_raw_fd()))
        .map_err(|e| SegmentError::Io("reopening the ring file", e))?;
    let named = NamedFile {
        file,
        lock,
        dir: dirfd,
        file_name,
        path,
        named: AtomicBool::new(true),
    };
    if let Some(gid) = access.group {
        rustix::fs::fchown(&named.lock, None, Some(rustix::process::Gid::from_raw(gid)))
            .map_err(io("giving the ring file to the allowed group"))?;
        rustix::fs::fchmod(&named.lock, Mode::from_raw_mode(0o640))
            .map_err(io("setting the ring file's mode"))?;
    } else {
        // The umask may only have narrowed 0600; set it exactly anyway.
        rustix::fs::fchmod(&named.lock, mode).map_err(io("setting the ring file's mode"))?;
    }
    if let Err(e) = rustix::fs::fallocate(&named.lock, FallocateFlags::empty(), 0, bytes) {
        let free_bytes = rustix::fs::fstatvfs(&named.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        let dir = Some(dir.to_owned());
        named.remove_name();
        return Err(match e {
            Errno::NOSPC | Errno::FBIG | Errno::NOMEM | Errno::DQUOT => SegmentError::NoSpace {
                dir,
                free_bytes,
                source: e.into(),
            },
            Errno::OPNOTSUPP => SegmentError::Io(
                "reserving the ring file (this filesystem cannot fallocate; use a tmpfs such as /dev/shm)",
                e.into(),
            ),
            e => SegmentError::Io("reserving the ring file", e.into()),
        });
    }
    Ok(Segment::Named(named))
}

/// Removes a ring file whose lock nobody holds (its producer died), after checking it is this
/// user's regular file; logs the pid the old header names.
fn remove_stale(
    dirfd: &OwnedFd,
    file_name: &str,
    path: &Path,
    uid: u32,
) -> Result<(), ShmDirError> {
    let foreign = || ShmDirError::Foreign {
        path: path.to_owned(),
        uid,
    };
    let io = |e: Errno| ShmDirError::Io {
        path: path.to_owned(),
        source: e.into(),
    };
    let old = rustix::fs::openat(
        dirfd,
        file_name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP => foreign(),
        e => io(e),
    })?;
    let st = rustix::fs::fstat(&old).map_err(io)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_uid != uid {
        return Err(foreign());
    }
    match rustix::fs::flock(&old, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(Errno::WOULDBLOCK) => {
            return Err(ShmDirError::InUse {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(io(e)),
    }
    let there = rustix::fs::statat(dirfd, file_name, AtFlags::SYMLINK_NOFOLLOW).map_err(io)?;
    if there.st_dev == st.st_dev && there.st_ino == st.st_ino {
        rustix::fs::unlinkat(dirfd, file_name, AtFlags::empty()).map_err(io)?;
    }
    log::warn!(
        "removed stale ring file {} ({} MiB) left by producer {} that died without cleaning up",
        path.display(),
        st.st_size.max(0) as u64 >> 20,
        stale_pid(&old).map_or("of unknown pid".to_owned(), |p| format!("pid {p}")),
    );
    Ok(())
}

/// The producer pid recorded in a ring file's header, if it has one.
fn stale_pid(fd: &OwnedFd) -> Option<u32> {
    let mut head = [0u8; hdr::PRODUCER_PID + 4];
    let n = rustix::io::pread(fd.as_fd(), &mut head, 0).ok()?;
    (n == head.len() && &head[..8] == b"RINGFEED").then(|| {
        u32::from_le_bytes(
            head[hdr::PRODUCER_PID..hdr::PRODUCER_PID + 4]
                .try_into()
                .expect("4 bytes"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn dir_mode_rule() {
        let p = Path::new("/x");
        assert!(check_dir_mode(p, 0o40700).is_ok());
        assert!(check_dir_mode(p, 0o41777).is_ok(), "/dev/shm style");
        assert!(matches!(
            check_dir_mode(p, 0o40777),
            Err(ShmDirError::Unsafe { mode: 0o777, .. })
        ));
        assert!(check_dir_mode(p, 0o40770).is_err());
    }

    #[test]
    fn named_file_is_0600_allocated_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let seg = create_named(tmp.path(), "t", 1 << 20, FileAccess { group: None }).unwrap();
        let path = tmp.path().join("ringfeed-t.ring");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 1 << 20);
        assert!(meta.blocks() * 512 >= 1 << 20, "allocated up front");
        assert_eq!(seg.kind(), "file");
        drop(seg);
        assert!(!path.exists());
    }

    #[test]
    fn live_file_is_in_use_and_stale_one_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let a = create_named(tmp.path(), "t", 4096, FileAccess { group: None }).unwrap();
        assert!(matches!(
            create_named(tmp.path(), "t", 4096, FileAccess { group: None }),
            Err(SegmentError::Dir(ShmDirError::InUse { .. }))
        ));
        // A dead producer's file: present, unlocked.
        drop(a);
        std::fs::write(tmp.path().join("ringfeed-t.ring"), b"old").unwrap();
        let b = create_named(tmp.path(), "t", 8192, FileAccess { group: None }).unwrap();
        assert_eq!(b.file().metadata().unwrap().len(), 8192);
    }

    #[test]
    fn symlinks_and_open_dirs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = |d: &Path| match create_named(d, "t", 4096, FileAccess { group: None }) {
            Err(SegmentError::Dir(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(matches!(err(&link), ShmDirError::Symlink { .. }));
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(err(&file), ShmDirError::NotADirectory { .. }));
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(err(&real), ShmDirError::Unsafe { .. }));
        // A symlink planted at the ring file's own path is never followed or removed.
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let target = tmp.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, real.join("ringfeed-t.ring")).unwrap();
        assert!(matches!(err(&real), ShmDirError::Foreign { .. }));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
