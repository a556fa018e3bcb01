//! Helpers shared by the daemon tests: tiny tar shards of generated images, a running
//! `ringfeed serve` child that is always stopped, and a consumer that drains a finite run.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use image::codecs::jpeg::JpegEncoder;
use image::{ImageEncoder, RgbImage};
use ringfeed::ring::{AttachOptions, Batch, Consumer, RuntimeDir};

/// A ustar archive of `(name, bytes)` members (regular files, names up to 100 bytes).
pub fn tar<N: AsRef<str>, D: AsRef<[u8]>>(members: &[(N, D)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in members {
        let (name, data) = (name.as_ref(), data.as_ref());
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = b'0';
        h[257..265].copy_from_slice(b"ustar\x0000");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A deterministic, textured RGB JPEG of `w`×`h` (gradients plus a pattern keyed by `seed`).
pub fn jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        let v = x
            .wrapping_mul(7)
            .wrapping_add(y.wrapping_mul(13))
            .wrapping_add(seed * 31);
        image::Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((v ^ (x * y)) % 256) as u8,
        ])
    });
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

/// `n` samples `<prefix>_NNNN.jpg` + `.cls` (label = i % 10), sizes varying with i.
pub fn samples(prefix: &str, n: u32) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .flat_map(|i| {
            [
                (
                    format!("{prefix}_{i:04}.jpg"),
                    jpeg(64 + (i % 5) * 16, 48 + (i % 3) * 20, i),
                ),
                (
                    format!("{prefix}_{i:04}.cls"),
                    format!("{}\n", i % 10).into_bytes(),
                ),
            ]
        })
        .collect()
}

/// Writes `shards` tar files of `per_shard` samples each into `dir`; returns the brace spec.
pub fn write_dataset(dir: &Path, shards: u32, per_shard: u32) -> String {
    for s in 0..shards {
        let members = samples(&format!("s{s}"), per_shard);
        std::fs::write(dir.join(format!("shard-{s:06}.tar")), tar(&members)).unwrap();
    }
    format!("{}/shard-{{000000..{:06}}}.tar", dir.display(), shards - 1)
}

/// A small config for generated data: 32×32 crops, f32 NCHW, normalised.
pub fn small_config(dir: &Path, shards_spec: &str, name: &str) -> PathBuf {
    let source = format!("kind = \"tar\"\nshards = [\"{shards_spec}\"]");
    config_with_source(dir, &source, name)
}

/// [`small_config`] with `source` as the body of its `[source]` table.
pub fn config_with_source(dir: &Path, source: &str, name: &str) -> PathBuf {
    let text = format!(
        r#"
[source]
{source}

[sampling]
seed = 7
drop-last = true

[batch]
size = 8

[augment]
random-resized-crop = {{ size = 32 }}
horizontal-flip = {{ p = 0.5 }}
color-jitter = {{ brightness = 0.3, contrast = 0.3, saturation = 0.3, hue = 0.05 }}
normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }}

[ring]
name = "{name}"
slots-per-lane = 3

[workers]
status-interval-s = 0.5
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A `ringfeed serve` child process; killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub stderr: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Daemon {
    /// Starts `ringfeed serve ARGS` with `RINGFEED_RUNTIME_DIR=runtime` and waits until it
    /// prints its "serving ring" line (or fails).
    pub fn start(runtime: &Path, args: &[&str]) -> Daemon {
        let mut d = Daemon::spawn(runtime, args);
        d.wait_for_line("serving ring", Duration::from_secs(120));
        d
    }

    /// Like [`start`](Self::start), with the daemon's address space limited to `bytes`
    /// (`RLIMIT_AS`, set right after the spawn): a runaway allocation fails in the daemon
    /// instead of exhausting the test machine.
    pub fn start_with_memory_limit(runtime: &Path, args: &[&str], bytes: u64) -> Daemon {
        let mut d = Daemon::spawn(runtime, args);
        let pid = rustix::process::Pid::from_raw(d.child.id() as i32);
        let limit = rustix::process::Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        };
        rustix::process::prlimit(pid, rustix::process::Resource::As, limit).unwrap();
        d.wait_for_line("serving ring", Duration::from_secs(120));
        d
    }

    /// Starts `ringfeed serve ARGS` without waiting for it to serve. `$RINGFEED_BIN`, when
    /// set, names the binary to run instead of this build's (to check that a test fails
    /// against an older build).
    pub fn spawn(runtime: &Path, args: &[&str]) -> Daemon {
        Daemon::spawn_env(runtime, args, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables (an S3 endpoint, credentials).
    pub fn spawn_env(runtime: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let bin = std::env::var_os("RINGFEED_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_ringfeed")),
            PathBuf::from,
        );
        let mut child = Command::new(bin)
            .arg("serve")
            .args(args)
            .env("RINGFEED_RUNTIME_DIR", runtime)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ringfeed serve");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            stderr: rx,
            log: Vec::new(),
        }
    }

    /// The daemon's peak resident memory (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib * 1024
    }

    /// Sends SIGTERM and returns the exit status and how long the exit took.
    pub fn terminate_timed(self) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        let status = self.terminate();
        (status, start.elapsed())
    }

    /// Waits for a stderr line containing `needle`; panics with the log on timeout or exit.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .stderr
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        panic!(
                            "no line with {needle:?} within {timeout:?}; log:\n{}",
                            self.log.join("\n")
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "daemon exited before printing {needle:?}; log:\n{}",
                        self.log.join("\n")
                    );
                }
            }
        }
    }

    /// Sends SIGTERM and waits for the exit status (with a deadline).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.wait(Duration::from_secs(30))
    }

    /// Waits for the child to exit by itself (with a deadline), draining stderr.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(line) = self.stderr.try_recv() {
                self.log.push(line);
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(100)) {
                    self.log.push(line);
                }
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ringfeed serve --config CONFIG --epochs EPOCHS --exit-when-done EXTRA…`: a finite run
/// that exits once its consumers have taken every batch; returned once it serves.
pub fn serve_finite(runtime: &Path, config: &Path, epochs: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--epochs",
        epochs,
        "--exit-when-done",
    ];
    args.extend_from_slice(extra);
    Daemon::start(runtime, &args)
}

/// Options to attach to lane `lane` of ring `name` in the runtime directory `runtime`.
pub fn lane_options(runtime: &Path, name: &str, lane: u32) -> AttachOptions {
    let mut options = AttachOptions::new(name, lane);
    options.dir = Some(RuntimeDir::at(runtime));
    options
}

/// Takes every batch of `consumer` until the end of the stream (waiting at most 60 s for
/// each), hands it to `each` and releases it; returns how many batches there were.
pub fn drain(consumer: &Consumer, mut each: impl FnMut(&Batch<'_>)) -> usize {
    let mut batches = 0;
    while let Some(batch) = consumer.next_timeout(Duration::from_secs(60)).unwrap() {
        each(&batch);
        batches += 1;
    }
    batches
}

/// A private runtime directory for one test: a not-yet-existing folder inside a temp dir, so
/// the daemon creates it with mode 0700 as it requires.
pub struct RuntimeTmp {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl RuntimeTmp {
    /// A fresh one.
    pub fn new() -> RuntimeTmp {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run");
        RuntimeTmp { _tmp: tmp, path }
    }

    /// The runtime directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A free loopback `IP:PORT` (for `--metrics`): bind port 0, note it, let it go.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The whole reply (status line, headers, body) to `GET path` on `addr`.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
