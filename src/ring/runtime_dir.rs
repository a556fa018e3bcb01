//! The runtime directory (docs/ring-format.md §2): where it is, its safety checks, ring
//! names, and the producer's lock file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use thiserror::Error;

use super::layout::MAX_NAME_LEN;

/// A problem with the runtime directory or a ring name.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RuntimeDirError {
    /// The directory could not be created or inspected.
    #[error("runtime directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The directory does not exist: no daemon of this user has used it.
    #[error("runtime directory {path} does not exist, so no daemon serves there (looked for at $RINGFEED_RUNTIME_DIR, else $XDG_RUNTIME_DIR/ringfeed, else /tmp/ringfeed-<uid>); start `ringfeed serve`, or set RINGFEED_RUNTIME_DIR to the daemon's runtime directory")]
    Missing {
        /// The path looked for.
        path: PathBuf,
    },
    /// The path is a symlink or not a directory.
    #[error("runtime directory {path} is not a directory (or is a symlink); refusing it")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The directory belongs to another user.
    #[error("runtime directory {path} is owned by uid {owner}, not by this user (uid {uid}); refusing it. To read another user's daemon, it must be started with --allow-group GROUP (a group of yours) and you pass trust_uid={owner} in Python or --trust-uid {owner} to ringfeed consume. Otherwise another user may have created it first (anyone can in /tmp) to keep the daemon from starting: use a directory only you control, with RINGFEED_RUNTIME_DIR=DIR or XDG_RUNTIME_DIR (e.g. /run/user/{uid}, which the system creates for you), or remove it as root")]
    WrongOwner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        uid: u32,
    },
    /// The directory grants more than allowed: nothing to others, and to the group nothing
    /// (chmod 700) or, with an allowed group, read and search only (chmod 750).
    #[error("runtime directory {path} has mode {mode:o}; it must grant nothing to others and at most read/search to its group (chmod 700, or 750 with --allow-group)")]
    Permissions {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The directory could not be opened to the allowed group.
    #[error("runtime directory {path}: cannot give it to group {gid}: {source} (the daemon's user must belong to that group)")]
    Group {
        /// The path.
        path: PathBuf,
        /// The allowed group.
        gid: u32,
        /// The OS error.
        source: io::Error,
    },
    /// The ring name is not allowed.
    #[error("invalid ring name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
}

/// Checks a ring name: 1–32 characters from `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<(), RuntimeDirError> {
    let bad = |reason| {
        Err(RuntimeDirError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("must be 1–32 characters");
    }
    if name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("only A-Z a-z 0-9 . _ - are allowed");
    }
    Ok(())
}

/// The directory holding `<name>.sock` and `<name>.lock` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Resolves the directory from the environment: `$RINGFEED_RUNTIME_DIR`, else
    /// `$XDG_RUNTIME_DIR/ringfeed`, else `/tmp/ringfeed-<uid>`. Nothing is created or checked
    /// yet; the producer and consumer check it when they use it.
    pub fn from_env() -> Result<RuntimeDir, RuntimeDirError> {
        RuntimeDir::from_env_for(None)
    }

    /// The directory of a daemon run by `owner` (a consumer's `trust_uid`), as §2 finds it:
    /// `$RINGFEED_RUNTIME_DIR` if set, else, for another user, `/tmp/ringfeed-<owner>` (that
    /// user's `$XDG_RUNTIME_DIR` is private to them), else as [`from_env`](Self::from_env).
    pub fn from_env_for(owner: Option<u32>) -> Result<RuntimeDir, RuntimeDirError> {
        let var = |k: &str| std::env::var_os(k);
        Ok(RuntimeDir {
            path: resolve(var, rustix::process::getuid().as_raw(), owner),
        })
    }

    /// A directory at an explicit path (tests, `--runtime-dir`).
    pub fn at(path: impl Into<PathBuf>) -> RuntimeDir {
        RuntimeDir { path: path.into() }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory with mode 0700 if it is missing, then [`check`](Self::check)s it.
    pub fn ensure(&self) -> Result<(), RuntimeDirError> {
        self.ensure_for(None)
    }

    /// Like [`ensure`](Self::ensure); with `group`, the directory is then given to that group
    /// with mode 0750 (members may reach the socket, nobody else may), and checked so.
    pub fn ensure_for(&self, group: Option<u32>) -> Result<(), RuntimeDirError> {
        let io = |source| RuntimeDirError::Io {
            path: self.path.clone(),
            source,
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(io(source)),
        }
        let Some(gid) = group else {
            return self.check();
        };
        // Adjust what was opened (no symlink followed), then check it like a consumer would.
        let fd = rustix::fs::open(
            &self.path,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|_| RuntimeDirError::NotADirectory {
            path: self.path.clone(),
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| io(e.into()))?;
        let uid = rustix::process::geteuid().as_raw();
        check_dir_meta(
            &self.path,
            true,
            st.st_uid,
            st.st_mode & 0o700,
            uid,
            uid,
            false,
        )?;
        let group_err = |e: rustix::io::Errno| RuntimeDirError::Group {
            path: self.path.clone(),
            gid,
            source: e.into(),
        };
        rustix::fs::fchown(&fd, None, Some(rustix::process::Gid::from_raw(gid)))
            .map_err(group_err)?;
        rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o750)).map_err(group_err)?;
        self.check_owned_by(uid, true)
    }

    /// Refuses a directory that is a symlink, not a directory, not owned by the effective
    /// uid, or grants any group/other permission.
    pub fn check(&self) -> Result<(), RuntimeDirError> {
        let uid = rustix::process::geteuid().as_raw();
        self.check_owned_by(uid, false)
    }

    /// The consumer's check when it trusts a producer of uid `owner` (`--allow-group` on the
    /// producer's side): the directory must be `owner`'s (or ours), not a symlink, grant
    /// nothing to others and at most read/search to its group.
    pub fn check_trusting(&self, owner: u32) -> Result<(), RuntimeDirError> {
        self.check_owned_by(owner, true)
    }

    fn check_owned_by(&self, owner: u32, group_may_read: bool) -> Result<(), RuntimeDirError> {
        let meta = std::fs::symlink_metadata(&self.path).map_err(|source| {
            let path = self.path.clone();
            match source.kind() {
                io::ErrorKind::NotFound => RuntimeDirError::Missing { path },
                _ => RuntimeDirError::Io { path, source },
            }
        })?;
        check_dir_meta(
            &self.path,
            meta.is_dir(),
            meta.uid(),
            meta.mode(),
            rustix::process::geteuid().as_raw(),
            owner,
            group_may_read,
        )
    }

    /// `<dir>/<name>.sock`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.sock"))
    }

    /// `<dir>/<name>.lock`.
    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.lock"))
    }

    /// `<dir>/<name>.finished` (1.3): left by a producer that exited after finishing its
    /// last epoch, so a consumer that finds no socket can tell "the run ended" from "no
    /// daemon" (docs/ring-format.md §7 "The end of a finite run").
    pub fn finished_path(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.finished"))
    }

    /// The rings running here, sorted by name, with their producer pids: every
    /// `<name>.lock` with a valid name whose pid (§2) is a live process and whose
    /// `<name>.sock` exists. Stale files of a killed producer are not listed. An unreadable
    /// directory lists nothing.
    pub fn running_rings(&self) -> Vec<(String, u32)> {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut rings: Vec<(String, u32)> = entries
            .filter_map(|entry| {
                let file = entry.ok()?.file_name();
                let name = file.to_str()?.strip_suffix(".lock")?.to_owned();
                validate_name(&name).ok()?;
                let pid: u32 = std::fs::read_to_string(self.lock_path(&name))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let alive = pid != 0 && Path::new(&format!("/proc/{pid}")).exists();
                (alive && self.socket_path(&name).exists()).then_some((name, pid))
            })
            .collect();
        rings.sort();
        rings
    }
}

/// §2's search order as a pure function of the environment (`var`), our uid and the uid of
/// the daemon's owner when we were told to trust one.
fn resolve(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
    uid: u32,
    owner: Option<u32>,
) -> PathBuf {
    let var = |k| var(k).filter(|v| !v.is_empty());
    if let Some(p) = var("RINGFEED_RUNTIME_DIR") {
        return PathBuf::from(p);
    }
    match owner {
        Some(other) if other != uid => PathBuf::from(format!("/tmp/ringfeed-{other}")),
        _ => match var("XDG_RUNTIME_DIR") {
            Some(p) => PathBuf::from(p).join("ringfeed"),
            None => PathBuf::from(format!("/tmp/ringfeed-{uid}")),
        },
    }
}

/// The directory checks as a pure function of the `lstat` result: owned by `uid` or
/// `trusted`, no permission for others, and for the group none or (`group_may_read`) read and
/// search only.
fn check_dir_meta(
    path: &Path,
    is_dir: bool,
    owner: u32,
    mode: u32,
    uid: u32,
    trusted: u32,
    group_may_read: bool,
) -> Result<(), RuntimeDirError> {
    if !is_dir {
        return Err(RuntimeDirError::NotADirectory {
            path: path.to_owned(),
        });
    }
    if owner != uid && owner != trusted {
        return Err(RuntimeDirError::WrongOwner {
            path: path.to_owned(),
            owner,
            uid,
        });
    }
    let forbidden = if group_may_read { 0o027 } else { 0o077 };
    if mode & forbidden != 0 {
        return Err(RuntimeDirError::Permissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// The producer's exclusive `flock` on `<name>.lock`, holding its pid. Dropping it removes
/// the file (while still locked) and releases the lock.
#[derive(Debug)]
pub(crate) struct ProducerLock {
    file: File,
    path: PathBuf,
}

/// Why the lock was not taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another live process holds it; its pid if the file says.
    Held(Option<u32>),
    /// The file could not be opened, locked or written.
    Io(io::Error),
}

impl ProducerLock {
    /// Takes the lock or reports who holds it. Never touches a lock held by someone else.
    pub(crate) fn acquire(path: &Path) -> Result<ProducerLock, LockError> {
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(LockError::Io)?;
            if let Err(e) = rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                if e == rustix::io::Errno::WOULDBLOCK {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Err(LockError::Held(text.trim().parse().ok()));
                }
                return Err(LockError::Io(e.into()));
            }
            // A departing producer unlinks the file while holding the lock; if we locked such
            // an orphaned inode, try again with the file now at `path`.
            let ours = file.metadata().map_err(LockError::Io)?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {}
                _ => continue,
            }
            file.set_len(0).map_err(LockError::Io)?;
            file.rewind().map_err(LockError::Io)?;
            write!(file, "{}", std::process::id()).map_err(LockError::Io)?;
            file.flush().map_err(LockError::Io)?;
            return Ok(ProducerLock {
                file,
                path: path.to_owned(),
            });
        }
    }
}

impl Drop for ProducerLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = rustix::fs::flock(&self.file, FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_order_of_section_2() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let all = env(&[("RINGFEED_RUNTIME_DIR", "/r"), ("XDG_RUNTIME_DIR", "/x")]);
        assert_eq!(resolve(all, 1000, None), PathBuf::from("/r"));
        assert_eq!(resolve(all, 1000, Some(0)), PathBuf::from("/r"));
        let xdg = env(&[("RINGFEED_RUNTIME_DIR", ""), ("XDG_RUNTIME_DIR", "/x")]);
        assert_eq!(resolve(xdg, 1000, None), PathBuf::from("/x/ringfeed"));
        assert_eq!(resolve(xdg, 1000, Some(1000)), PathBuf::from("/x/ringfeed"));
        // Another user's XDG directory is private to them: their /tmp fallback.
        assert_eq!(
            resolve(xdg, 1000, Some(0)),
            PathBuf::from("/tmp/ringfeed-0")
        );
        let none = env(&[]);
        assert_eq!(
            resolve(none, 1000, None),
            PathBuf::from("/tmp/ringfeed-1000")
        );
        assert_eq!(
            resolve(none, 1000, Some(7)),
            PathBuf::from("/tmp/ringfeed-7")
        );
    }

    #[test]
    fn names() {
        for ok in ["train", "a", "rank-0_x.v2", &"x".repeat(32)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "a b",
            "nul\0",
            &"x".repeat(33),
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dir_checks() {
        let p = Path::new("/x");
        assert!(check_dir_meta(p, true, 5, 0o40700, 5, 5, false).is_ok());
        assert!(matches!(
            check_dir_meta(p, false, 5, 0o700, 5, 5, false),
            Err(RuntimeDirError::NotADirectory { .. })
        ));
        assert!(matches!(
            check_dir_meta(p, true, 6, 0o700, 5, 5, false),
            Err(RuntimeDirError::WrongOwner { owner: 6, .. })
        ));
        assert!(matches!(
            check_dir_meta(p, true, 5, 0o750, 5, 5, false),
            Err(RuntimeDirError::Permissions { .. })
        ));
        assert!(matches!(
            check_dir_meta(p, true, 5, 0o701, 5, 5, false),
            Err(RuntimeDirError::Permissions { .. })
        ));
        // Trusting another owner with group access: 0750 of the trusted uid passes, group
        // write or any other bit does not, and an untrusted owner is still refused.
        assert!(check_dir_meta(p, true, 6, 0o40750, 5, 6, true).is_ok());
        assert!(check_dir_meta(p, true, 6, 0o40770, 5, 6, true).is_err());
        assert!(check_dir_meta(p, true, 6, 0o40751, 5, 6, true).is_err());
        assert!(check_dir_meta(p, true, 7, 0o40750, 5, 6, true).is_err());
    }

    #[test]
    fn ensure_creates_0700_and_refuses_symlinks_and_open_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = RuntimeDir::at(tmp.path().join("rt"));
        d.ensure().unwrap();
        assert_eq!(std::fs::metadata(d.path()).unwrap().mode() & 0o777, 0o700);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(matches!(
            RuntimeDir::at(&link).check(),
            Err(RuntimeDirError::NotADirectory { .. })
        ));
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        assert!(matches!(
            d.check(),
            Err(RuntimeDirError::Permissions { .. })
        ));
    }

    #[test]
    fn lock_is_exclusive_and_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("r.lock");
        let held = ProducerLock::acquire(&path).unwrap();
        match ProducerLock::acquire(&path) {
            Err(LockError::Held(Some(pid))) => assert_eq!(pid, std::process::id()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(held);
        assert!(!path.exists());
        let again = ProducerLock::acquire(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );
        drop(again);
    }
}
