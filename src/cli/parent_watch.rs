//! `serve --parent-pid PID`: a daemon started by a training script (`ringfeed.serve()`) stops
//! when the process that started it is gone, however it ended (SIGKILL, OOM kill included).
//!
//! Why a pidfd and not `PR_SET_PDEATHSIG`: the death signal fires when the *thread* that forked
//! the daemon exits, so a daemon started from a short-lived Python thread would be killed while
//! its process still trains. A pidfd becomes readable only when the whole process has exited.
//! Where pidfds are unavailable (Linux < 5.3), the process is polled every 250 ms instead.

use std::time::Duration;

use anyhow::Context as _;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, Pid, PidfdFlags};

/// How often the fallback checks that the process still exists.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Starts a thread that calls `on_exit` once process `pid` has exited. Fails at once if `pid`
/// does not exist (the starter died before the daemon got here).
pub(crate) fn spawn(pid: u32, on_exit: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    let raw = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let pid = raw.with_context(|| format!("--parent-pid {pid} is not a process id"))?;
    let watch: Box<dyn FnOnce() + Send> = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => Box::new(move || {
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            // Readable once the process has exited; EINTR (a signal to this thread) retries.
            while !matches!(poll(&mut fds, None), Ok(n) if n > 0) {}
        }),
        Err(rustix::io::Errno::SRCH) => {
            anyhow::bail!("--parent-pid {pid}: the process has already exited")
        }
        Err(_) => Box::new(move || {
            while alive(pid) {
                std::thread::sleep(POLL_INTERVAL)
            }
        }),
    };
    std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            watch();
            log::warn!("the process that started this daemon (pid {pid}) has exited; stopping");
            on_exit();
        })
        .context("cannot start the parent-watch thread")?;
    Ok(())
}

/// Whether `pid` still exists (a zombie counts as gone: it can no longer consume).
fn alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())) {
        // The state follows the command name, which ends at the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn stops_once_the_watched_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        spawn(child.id(), move || flag.store(true, Ordering::SeqCst)).unwrap();
        assert!(!stop.load(Ordering::SeqCst));
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !stop.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "stop never set");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_gone_process_is_refused_at_once() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let err = spawn(pid, || {}).unwrap_err();
        assert!(err.to_string().contains("already exited"), "{err}");
    }

    #[test]
    fn a_live_process_is_alive_and_a_zombie_is_not() {
        let me = Pid::from_raw(std::process::id() as i32).unwrap();
        assert!(alive(me));
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32).unwrap();
        // Not reaped yet: a zombie once it has exited.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(child);
    }
}
