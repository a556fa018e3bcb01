//! Surviving a named ring file (`--shm-dir`) truncated under the daemon.
//!
//! A memfd ring is sealed against shrinking; a named file cannot be sealed, and anyone with
//! write access to it (the daemon's user, a consumer through the descriptor it was passed, a
//! member of the `--allow-group` group) can `ftruncate` it. Every later access to a mapped
//! page past the new end raises `SIGBUS`, which would kill the daemon and leave its socket,
//! lock and ring file behind.
//!
//! Brief overview: the producer registers each mapping of a named file with [`guard`]. A
//! process-wide `SIGBUS` handler looks the faulting address up among the registered ranges;
//! inside one, it maps anonymous zero pages over the whole range (`MAP_FIXED`, so the
//! faulting access is retried and succeeds), marks the range lost and returns. The producer
//! sees [`Guard::lost`] and stops with an error, through its normal clean exit. A fault
//! anywhere else is handed to the handler that was installed before (Rust's stack-overflow
//! reporter), or to the default action.
//!
//! The crate denies `unsafe_code`; this file allows it for the signal handler and its
//! `mmap` of zero pages.
#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::OnceLock;

/// Ranges guarded at once (two per producer: control and data).
const RANGES: usize = 16;
/// A `START` entry being written or cleared: skipped by the handler.
const BUSY: usize = usize::MAX;

static START: [AtomicUsize; RANGES] = [const { AtomicUsize::new(0) }; RANGES];
static LEN: [AtomicUsize; RANGES] = [const { AtomicUsize::new(0) }; RANGES];
static LOST: [AtomicBool; RANGES] = [const { AtomicBool::new(false) }; RANGES];
/// The `SIGBUS` action before ours, set once before ours is installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered mapping; dropping it unregisters the range (drop it before unmapping).
#[derive(Debug)]
pub(crate) struct Guard {
    entry: usize,
}

impl Guard {
    /// Whether the range faulted (its file was truncated) and now holds anonymous memory.
    pub(crate) fn lost(&self) -> bool {
        LOST[self.entry].load(Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        START[self.entry].store(BUSY, Release);
        LEN[self.entry].store(0, Relaxed);
        LOST[self.entry].store(false, Relaxed);
        START[self.entry].store(0, Release);
    }
}

/// Registers `[start, start + len)`, a shared mapping of a file that may be truncated, and
/// installs the handler on first use.
pub(crate) fn guard(start: *const u8, len: usize) -> io::Result<Guard> {
    install()?;
    for entry in 0..RANGES {
        if START[entry]
            .compare_exchange(0, BUSY, AcqRel, Relaxed)
            .is_ok()
        {
            LOST[entry].store(false, Relaxed);
            LEN[entry].store(len, Relaxed);
            // SYNC POINT with the handler's acquire load of START: LEN is visible with it.
            START[entry].store(start as usize, Release);
            return Ok(Guard { entry });
        }
    }
    Err(io::Error::other("too many guarded ring mappings"))
}

fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<io::Result<()>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags) that is filled
        // in below before use; `sigaction` is given valid pointers to locals.
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return Err(io::Error::last_os_error());
            }
            let _ = PREVIOUS.set(previous);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

/// The handler: only atomics, `mmap` and `sigaction`, all async-signal-safe in practice (raw
/// system calls, no lock, no allocation).
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for entry in 0..RANGES {
        let start = START[entry].load(Acquire);
        if start == 0 || start == BUSY {
            continue;
        }
        let len = LEN[entry].load(Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start + len) is a live mapping of ours (registered until its Guard
        // drops, before it is unmapped); replacing it with anonymous pages at the same
        // address keeps every reference into it valid, now pointing at zeroes.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            LOST[entry].store(true, Release);
            return;
        }
        break;
    }
    pass_on(signal, info, context);
}

/// Hands a fault that is not ours to the previous handler, or restores the default action so
/// the faulting access, retried on return, ends the process as it would have.
fn pass_on(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if let Some(previous) = PREVIOUS.get() {
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature; the arguments are the
                // ones the kernel gave us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(signal, info, context);
            } else {
                // SAFETY: a plain handler has this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(signal);
            }
            return;
        }
    }
    // SAFETY: a zeroed sigaction with SIG_DFL (0) is the default action.
    unsafe {
        let default: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_truncated_file_mapping_turns_into_zeroes_and_is_reported() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 8192]).unwrap();
        let map = memmap2::MmapOptions::new()
            .len(8192)
            .map_raw(&file)
            .unwrap();
        let guard = guard(map.as_ptr(), map.len()).unwrap();
        // SAFETY: in bounds of the live mapping.
        let at = |off: usize| unsafe { map.as_ptr().add(off).read_volatile() };
        assert_eq!(at(4096), 7);
        assert!(!guard.lost());
        file.set_len(0).unwrap();
        assert_eq!(at(4096), 0, "the page past the new end reads as zero");
        assert!(guard.lost());
        drop(guard);
    }
}
