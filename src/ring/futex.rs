//! Waiting on and waking 32-bit words of the shared control region with shared (not
//! process-private) futexes, so waiters in other processes are woken too.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::thread::futex;

/// Blocks while `*word == expected`, at most `timeout`. Returns early on a wake-up, a signal
/// or when the word already differs; callers always re-read state afterwards.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // EAGAIN (value changed), ETIMEDOUT and EINTR all mean "re-check"; nothing to report.
    let _ = futex::wait(word, futex::Flags::empty(), expected, Some(&ts));
}

/// Wakes every waiter on `word`.
pub(crate) fn wake_all(word: &AtomicU32) {
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

/// Bumps `word` with release ordering (everything written before happens-before a waiter's
/// acquire load of the new value) and wakes all waiters.
pub(crate) fn bump_and_wake(word: &AtomicU32) {
    word.fetch_add(1, Ordering::Release);
    wake_all(word);
}

/// `CLOCK_MONOTONIC` in ns (the clock of `heartbeat_mono_ns` and `published_mono_ns`).
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Wall-clock time in ns since the Unix epoch.
pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_times_out_and_wakes() {
        let word = Arc::new(AtomicU32::new(0));
        let t = Instant::now();
        wait(&word, 0, Duration::from_millis(20));
        assert!(t.elapsed() >= Duration::from_millis(15));
        let w2 = word.clone();
        let waiter = std::thread::spawn(move || {
            while w2.load(Ordering::Acquire) == 0 {
                wait(&w2, 0, Duration::from_secs(10));
            }
        });
        std::thread::sleep(Duration::from_millis(10));
        bump_and_wake(&word);
        waiter.join().unwrap();
    }
}
