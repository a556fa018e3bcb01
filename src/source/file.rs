//! Opening files that a dataset's author controls: image files, shards and sidecar indexes.
//!
//! A path in a dataset may name a FIFO (opening it for reading blocks until a writer comes), a
//! device (`/dev/zero` reads forever), or a huge sparse file. Each file is therefore opened
//! without blocking and judged by `fstat` on the opened descriptor, never by the path, so a
//! file replaced between a check and the open cannot slip through.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::OFlags;

/// The error for a path that is not a regular file.
pub(crate) fn not_a_file() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")
}

/// Opens `path` for reading with `O_NONBLOCK` (a FIFO opens at once instead of waiting for a
/// writer) and refuses anything but a regular file. Symlinks are followed (trees of links to
/// images are common); what they point to is judged the same way.
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    open_with(path, OFlags::NONBLOCK)
}

/// Like [`open_regular`], but a symlink is refused too (`O_NOFOLLOW`): for files the daemon
/// wrote itself, such as sidecar indexes, where a link can only be planted.
pub(crate) fn open_regular_nofollow(path: &Path) -> io::Result<File> {
    open_with(path, OFlags::NONBLOCK | OFlags::NOFOLLOW)
}

fn open_with(path: &Path, flags: OFlags) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    if file.metadata()?.is_file() {
        Ok(file)
    } else {
        Err(not_a_file())
    }
}

/// Reads all of `file` if it holds at most `limit` bytes; `None` if it is (or grows) larger.
pub(crate) fn read_capped(file: File, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if len > limit {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_links_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.jpg");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert_eq!(
            open_regular(&fifo).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(open_regular(Path::new("/dev/zero")).is_err());
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link).is_ok());
        assert!(open_regular_nofollow(&link).is_err());
        assert!(open_regular_nofollow(&file).is_ok());
        let f = open_regular(&file).unwrap();
        assert_eq!(read_capped(f, 5).unwrap().unwrap(), b"12345");
        let f = open_regular(&file).unwrap();
        assert_eq!(read_capped(f, 4).unwrap(), None);
    }
}
