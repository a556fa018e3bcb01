//! Helpers of the fault tests: consumer children (the test binary re-executing itself with
//! `RINGFEED_FAULT_ROLE` set), a read-only view of the daemon's ring, deadlines for awaited
//! conditions, the daemon's resident memory, and a watchdog against hangs.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringfeed::ring::{Observer, RingSnapshot, RuntimeDir};

/// Env var naming the role a re-executed test binary plays.
pub const ROLE: &str = "RINGFEED_FAULT_ROLE";

/// The role this process plays, if it is a re-executed child.
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Prints one protocol line to the parent (stdout, flushed).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Blocks until the parent writes `word` on a line of stdin (or closes it: then exits).
pub fn await_word(word: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::stdin().read_line(&mut line).unwrap_or(0) == 0 {
            std::process::exit(0);
        }
        if line.trim() == word {
            return;
        }
    }
}

/// A re-executed copy of this test binary playing a role; SIGKILLed on drop.
pub struct Peer {
    /// The child process.
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    /// Runs this binary's `entry` test (which dispatches on [`role`]) as `role`, with the
    /// daemon's runtime directory and extra environment.
    pub fn spawn(entry: &str, role: &str, runtime: &Path, env: &[(&str, String)]) -> Peer {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([entry, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env("RINGFEED_RUNTIME_DIR", runtime)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer {
            child,
            stdin,
            lines,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The rest of the next line containing `prefix` (libtest may print its own text before
    /// it on the same line).
    pub fn expect(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(prefix) => {
                    let at = l.find(prefix).unwrap() + prefix.len();
                    return l[at..].trim().to_owned();
                }
                Ok(_) => {}
                Err(e) => panic!("child never printed {prefix:?}: {e}"),
            }
        }
    }

    /// Writes one line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: rustix::process::Signal) {
        signal_pid(self.pid(), signal);
    }

    /// SIGKILLs the child and reaps it.
    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` to `pid`.
pub fn signal_pid(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A read-only observer of ring `name` served in `runtime`.
pub fn observe(runtime: &Path, name: &str) -> Observer {
    Observer::open(&RuntimeDir::at(runtime), name).expect("observing the ring")
}

/// Snapshot of lane `lane`: (ready, held, free, writing, consumer pid).
pub fn lane_state(snap: &RingSnapshot, lane: usize) -> (u32, u32, u32, u32, u32) {
    let l = &snap.stats.lanes[lane];
    (l.ready, l.held, l.free, l.writing, l.consumer_pid)
}

/// A process's resident set size in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Ends the whole test process if a test runs far past any sane time (a hang), after
/// SIGKILLing the processes it guards; dropping it disarms it.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    pids: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl Watchdog {
    /// Arms it for `limit`.
    pub fn arm(what: &'static str, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
        let guarded = std::sync::Arc::clone(&pids);
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("watchdog: {what} hung for {limit:?}; aborting");
                for pid in guarded.lock().unwrap().iter() {
                    let _ = rustix::process::Pid::from_raw(*pid as i32)
                        .map(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL));
                }
                std::process::exit(3);
            }
        });
        Watchdog {
            disarm: Some(tx),
            pids,
        }
    }

    /// Also SIGKILLs `pid` if the watchdog fires.
    pub fn guard(&self, pid: u32) {
        self.pids.lock().unwrap().push(pid);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}

/// A seed for a test's random choices: `RINGFEED_FAULT_SEED` if set (to replay a failure),
/// else from the clock. Printed so a failing run can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("RINGFEED_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("RINGFEED_FAULT_SEED={seed}");
    seed
}
