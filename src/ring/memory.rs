//! The ring's memory: a sealed, fully allocated memfd and its two mappings (read-write for
//! the producer, read-only for consumers and observers), the read-only descriptor consumers
//! receive (format 2.0), and the per-attach lane page memfd (the only memory a consumer
//! writes).
//!
//! This is the only file that turns addresses into references (and bytes into typed
//! elements). Every accessor checks bounds
//! and alignment against the mapping, so a wrong offset is a panic (a bug), never UB; the
//! offsets themselves come from a validated [`Layout`](super::Layout).
//!
//! The crate denies `unsafe_code`; this file allows it: it is the door to the shared memory.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};

use memmap2::{MmapOptions, MmapRaw};

use super::layout::Element;
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

/// Creates the ring's memfd: `bytes` long, fully allocated (so lack of memory fails now, not
/// as a SIGBUS later) and sealed against shrinking and growing. The seals are not closed
/// yet: [`seal_future_write`] adds `F_SEAL_FUTURE_WRITE` and then `F_SEAL_SEAL` once the
/// producer's own mappings exist.
pub(crate) fn create_memfd(name: &str, bytes: u64) -> Result<File, MemfdError> {
    let fd = rustix::fs::memfd_create(
        format!("ringfeed:{name}"),
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| MemfdError::Create(e.into()))?;
    rustix::fs::ftruncate(&fd, bytes).map_err(|e| MemfdError::Create(e.into()))?;
    rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, bytes)
        .map_err(|e| MemfdError::Allocate(e.into()))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)
        .map_err(|e| MemfdError::Create(e.into()))?;
    Ok(File::from(fd))
}

/// Adds `F_SEAL_FUTURE_WRITE` to the ring's memfd (format 2.0), then `F_SEAL_SEAL`: the
/// producer's existing writable mappings keep working, but no new writable mapping and no
/// `write` can be made through any descriptor of it, even an `O_RDWR` reopen through
/// `/proc/<pid>/fd`. Call it after the producer's own mappings exist. Linux ≥ 5.1: an error
/// means the kernel refused `F_SEAL_FUTURE_WRITE`; the seals are closed (`F_SEAL_SEAL`)
/// either way.
pub(crate) fn seal_future_write(file: &File) -> io::Result<()> {
    let future = rustix::fs::fcntl_add_seals(file, SealFlags::FUTURE_WRITE);
    rustix::fs::fcntl_add_seals(file, SealFlags::SEAL)?;
    Ok(future?)
}

/// A new, read-only open file description of `file` (`/proc/self/fd/<n>` opened `O_RDONLY |
/// O_CLOEXEC`): what consumers receive, so `mmap(PROT_WRITE, MAP_SHARED)`, `mprotect` to
/// writable, `write` and `ftruncate` through it all fail.
pub(crate) fn reopen_read_only(file: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    // std opens with O_CLOEXEC.
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Whether `file` was opened read-only (`fcntl(F_GETFL) & O_ACCMODE == O_RDONLY`).
pub(crate) fn is_read_only(file: &File) -> io::Result<bool> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    Ok(!flags.intersects(rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::RDWR))
}

/// Creates an attach's lane page (format 2.0): a memfd named `ringfeed-lane:<ring>:<lane>`
/// (never `ringfeed:<ring>`, which observers look for) holding `content`, sealed against
/// shrinking, growing and further seals.
pub(crate) fn create_lane_memfd(ring: &str, lane: u32, content: &[u8]) -> io::Result<File> {
    let fd = rustix::fs::memfd_create(
        format!("ringfeed-lane:{ring}:{lane}"),
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, content.len() as u64)?;
    let mut done = 0;
    while done < content.len() {
        done += rustix::io::pwrite(&fd, &content[done..], done as u64)?;
    }
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(File::from(fd))
}

/// Why the memfd could not be made.
#[derive(Debug)]
pub(crate) enum MemfdError {
    /// memfd_create, ftruncate or sealing failed.
    Create(io::Error),
    /// fallocate failed: not enough memory (or tmpfs quota) for the ring.
    Allocate(io::Error),
}

/// Whether `file` is sealed against shrinking (a ring that could shrink could SIGBUS readers).
pub(crate) fn is_shrink_sealed(file: &File) -> io::Result<bool> {
    Ok(rustix::fs::fcntl_get_seals(file)?.contains(SealFlags::SHRINK))
}

/// The control region `[0, data_offset)`, mapped read-write and shared. All access goes
/// through atomics, because other processes write it concurrently.
pub(crate) struct Control {
    map: MmapRaw,
}

impl Control {
    /// Maps the first `len` bytes of `file` read-write, pre-faulted.
    pub(crate) fn map(file: &File, len: u64) -> io::Result<Control> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let map = MmapOptions::new().len(len).populate().map_raw(file)?;
        Ok(Control { map })
    }

    /// Maps the first `len` bytes of `file` read-only, pre-faulted (a consumer or an observer:
    /// every access is a load; atomic loads from read-only memory are allowed, a store would
    /// fault).
    pub(crate) fn map_read_only(file: &File, len: u64) -> io::Result<Control> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw_read_only(file)?;
        Ok(Control { map })
    }

    /// The mapping's address and length (to guard it against truncation, `sigbus`).
    pub(crate) fn mapping(&self) -> (*const u8, usize) {
        (self.map.as_ptr(), self.map.len())
    }

    fn at(&self, off: u64, size: usize) -> *mut u8 {
        let off = usize::try_from(off).expect("control offset fits usize");
        assert!(
            off % size == 0 && off + size <= self.map.len(),
            "control access {off}+{size} outside the mapping or misaligned"
        );
        // SAFETY: `off + size <= len`, so the result stays inside the mapping.
        unsafe { self.map.as_mut_ptr().add(off) }
    }

    /// The 32-bit word at `off`.
    pub(crate) fn u32(&self, off: u64) -> &AtomicU32 {
        // SAFETY: `at` checked bounds and 4-byte alignment (the mapping is page aligned); the
        // mapping lives as long as `self`; every access to shared words is atomic.
        unsafe { &*(self.at(off, 4) as *const AtomicU32) }
    }

    /// The 64-bit word at `off`.
    pub(crate) fn u64(&self, off: u64) -> &AtomicU64 {
        // SAFETY: as in `u32`, with 8-byte alignment checked.
        unsafe { &*(self.at(off, 8) as *const AtomicU64) }
    }

    /// The byte at `off`.
    pub(crate) fn u8(&self, off: u64) -> &AtomicU8 {
        // SAFETY: as in `u32`; bytes need no alignment.
        unsafe { &*(self.at(off, 1) as *const AtomicU8) }
    }

    /// Copies `bytes` to the start of the region byte by byte (used once at creation, before
    /// any other process can see the memfd, and for the NUL-padded text fields).
    pub(crate) fn store_bytes(&self, off: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            self.u8(off + i as u64)
                .store(b, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reads `len` bytes at `off`.
    pub(crate) fn load_bytes(&self, off: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                self.u8(off + i as u64)
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .collect()
    }
}

/// The data region `[data_offset, file_bytes)`: slot payloads.
pub(crate) struct Data {
    map: MmapRaw,
    writable: bool,
}

impl Data {
    /// Maps the data region; read-write for the producer, read-only for consumers, pre-faulted
    /// so the first batch does not pay page faults.
    pub(crate) fn map(file: &File, offset: u64, len: u64, writable: bool) -> io::Result<Data> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut opts = MmapOptions::new();
        opts.offset(offset).len(len).populate();
        let map = if writable {
            opts.map_raw(file)?
        } else {
            opts.map_raw_read_only(file)?
        };
        Ok(Data { map, writable })
    }

    /// The mapping's address and length (to guard it against truncation, `sigbus`).
    pub(crate) fn mapping(&self) -> (*const u8, usize) {
        (self.map.as_ptr(), self.map.len())
    }

    fn range(&self, off: u64, len: u64) -> (*mut u8, usize) {
        let (off, len) = (
            usize::try_from(off).expect("fits"),
            usize::try_from(len).expect("fits"),
        );
        assert!(
            off.checked_add(len)
                .is_some_and(|end| end <= self.map.len()),
            "data access {off}+{len} outside the mapping"
        );
        // SAFETY: bounds checked just above.
        (unsafe { self.map.as_mut_ptr().add(off) }, len)
    }

    /// The bytes at `[off, off + len)` of the data region.
    ///
    /// # Safety
    /// No one may write these bytes while the returned slice lives: the caller holds the
    /// slot (consumer: taken by it and not released; producer: `WRITING` by it).
    pub(crate) unsafe fn bytes(&self, off: u64, len: u64) -> &[u8] {
        let (ptr, len) = self.range(off, len);
        // SAFETY: in bounds (checked), the mapping outlives `&self`, and the caller
        // guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }

    /// The bytes at `[off, off + len)` of the data region, writable.
    ///
    /// # Safety
    /// The caller owns the slot (`WRITING`) and creates no other reference to these bytes
    /// while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, off: u64, len: u64) -> &mut [u8] {
        assert!(self.writable, "data region is mapped read-only");
        let (ptr, len) = self.range(off, len);
        // SAFETY: in bounds, mapped writable, and exclusive by the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Addresses covered by the mapping (for diagnostics and zero-copy checks).
    pub(crate) fn address_range(&self) -> std::ops::Range<usize> {
        let start = self.map.as_ptr() as usize;
        start..start + self.map.len()
    }
}

/// `bytes` viewed as elements of `T` (a batch tensor's typed view, §5.2), without a copy.
///
/// # Panics
/// If `bytes` does not start aligned for `T` or is not a whole number of elements. Neither
/// happens for a tensor of a validated layout: tensors start 64-byte aligned inside
/// page-aligned slots, and their length is the product of their shape and the dtype's size.
pub(crate) fn elements<T: Element>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.as_ptr().cast::<T>().is_aligned() && bytes.len().is_multiple_of(size),
        "{} bytes at {:p} are not a whole, aligned number of {size}-byte elements",
        bytes.len(),
        bytes.as_ptr()
    );
    // SAFETY: `T` is a sealed plain-data type (`Element`) valid for every bit pattern; the
    // pointer is aligned for `T` and the length is a whole number of elements (both checked
    // above); the result borrows `bytes`, so it cannot outlive them.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) }
}

// SAFETY: the mappings are plain shared memory; all shared mutable state in them is accessed
// through atomics or under the slot protocol, so the handles may move and be shared between
// threads.
unsafe impl Send for Control {}
// SAFETY: see `Send` above.
unsafe impl Sync for Control {}
// SAFETY: see `Send` for `Control`.
unsafe impl Send for Data {}
// SAFETY: see `Send` for `Control`.
unsafe impl Sync for Data {}
