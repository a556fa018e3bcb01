//! Ring hand-off between two processes: this binary is the producer and re-executes itself
//! as the consumer (env `RINGFEED_BENCH_ROLE`).
//!
//! - latency: a 1-slot ring, so each publish waits for the previous release; the consumer
//!   measures `now - published_mono_ns` at take time (median, p99);
//! - throughput: a 4-slot ring, a producer that only claims and publishes (no payload
//!   writes), a consumer that takes and releases; batches/s, and the consumer thread's CPU
//!   time per batch (next + release, excluding time asleep), which must not grow with batch
//!   size since nothing is copied.
//!
//! Since ring format 2.0 a release is a store into the consumer's lane page and a `write(2)`
//! of 1 to its eventfd doorbell, and a producer waiting for a slot `poll(2)`s the doorbells
//! (1.x: two futex bumps and wakes, and a `FUTEX_WAIT` on `release_any`); a publish and the
//! consumer's wait are unchanged (the lane's `publish_seq` futex).
//!
//! Run: `cargo bench --bench ring_handoff` (about 10 s; `RINGFEED_BENCH_QUICK=1` for fewer
//! iterations).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfeed::ring::{
    mono_ns, AttachError, AttachOptions, BatchMeta, Consumer, DType, Producer, RingSpec,
    RuntimeDir, TensorSpec,
};

const ROLE: &str = "RINGFEED_BENCH_ROLE";

fn spec(name: &str, batch: u32, side: u64, slots: u32) -> RingSpec {
    RingSpec {
        drop_last: true,
        ..RingSpec::new(
            name,
            1,
            slots,
            batch,
            vec![
                TensorSpec {
                    name: "images".into(),
                    dtype: DType::F32,
                    shape: vec![batch.into(), 3, side, side],
                },
                TensorSpec {
                    name: "labels".into(),
                    dtype: DType::I64,
                    shape: vec![batch.into()],
                },
            ],
        )
    }
}

fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn attach(name: &str) -> Consumer {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut o = AttachOptions::new(name, 0);
        o.dir = Some(RuntimeDir::from_env().unwrap());
        match Consumer::attach_with(&o) {
            Ok(c) => return c,
            Err(e @ (AttachError::Connect { .. } | AttachError::Refused { .. })) => {
                assert!(Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The consumer child: takes every batch until the stream ends, prints one result line.
fn consumer(mode: &str, name: &str) {
    let c = attach(name);
    println!("ATTACHED");
    std::io::stdout().flush().unwrap();
    let mut lat = Vec::new();
    let mut n = 0u64;
    let (mut t0, mut cpu0) = (Instant::now(), 0);
    while let Some(b) = c.next().unwrap() {
        if n == 0 {
            // Start the clocks at the first batch, so attach and mapping are not counted.
            t0 = Instant::now();
            cpu0 = thread_cpu_ns();
        }
        if mode == "latency" {
            lat.push(mono_ns().saturating_sub(b.published_mono_ns()));
        }
        n += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu_ns() - cpu0;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "RESULT n={n} median_ns={} p99_ns={} per_s={:.0} cpu_ns_per_batch={}",
        pct(0.5),
        pct(0.99),
        (n.saturating_sub(1)) as f64 / wall,
        cpu / n.max(1)
    );
}

struct Row {
    size: String,
    n: u64,
    median_us: f64,
    p99_us: f64,
    per_s: f64,
    cpu_us: f64,
}

/// Runs one scenario: creates the ring, starts the consumer child, publishes `batches`.
fn run(mode: &str, label: &str, batch: u32, side: u64, batches: u64) -> Row {
    let slots = if mode == "latency" { 1 } else { 4 };
    let name = format!("bench-{mode}-{batch}");
    let dir = RuntimeDir::from_env().unwrap();
    let p = Producer::create(&spec(&name, batch, side, slots), &dir).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, format!("{mode}:{name}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "ATTACHED");
    for i in 0..batches {
        let mut w = p
            .claim_any(&[0], Duration::from_secs(30))
            .expect("consumer stalled");
        if mode == "latency" {
            // Touch the labels so the slot is "written"; the payload size is what the
            // throughput rows are about.
            w.tensor_bytes_mut(1)[..8].copy_from_slice(&(i as i64).to_le_bytes());
        }
        w.publish(BatchMeta {
            epoch: 0,
            index: i,
            count: batch,
            last_of_epoch: false,
        });
    }
    p.finish();
    let result = lines.next().unwrap().unwrap();
    child.wait().unwrap();
    let field = |k: &str| -> f64 {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Row {
        size: label.into(),
        n: field("n") as u64,
        median_us: field("median_ns") / 1e3,
        p99_us: field("p99_ns") / 1e3,
        per_s: field("per_s"),
        cpu_us: field("cpu_ns_per_batch") / 1e3,
    }
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let (mode, name) = role.split_once(':').unwrap();
        consumer(mode, name);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Set before any thread starts; the consumer children inherit it.
    std::env::set_var("RINGFEED_RUNTIME_DIR", tmp.path().join("rt"));
    let quick = std::env::var_os("RINGFEED_BENCH_QUICK").is_some();
    let k = if quick { 10 } else { 1 };
    let sizes = [
        ("64x3x32x32 f32 (0.8 MB)", 64u32, 32u64),
        ("256x3x224x224 f32 (154 MB)", 256, 224),
    ];
    println!("ring hand-off, two processes, lane 0 only");
    println!(
        "{:<28} {:>7} {:>12} {:>10} {:>12} {:>16}",
        "batch", "mode", "batches", "median µs", "p99 µs", "batches/s"
    );
    let mut cpu_rows = Vec::new();
    for (label, batch, side) in sizes {
        let lat = run("latency", label, batch, side, 20_000 / k);
        println!(
            "{:<28} {:>7} {:>12} {:>10.1} {:>12.1} {:>16}",
            lat.size, "latency", lat.n, lat.median_us, lat.p99_us, "-"
        );
        let thr = run("throughput", label, batch, side, 200_000 / k);
        println!(
            "{:<28} {:>7} {:>12} {:>10} {:>12} {:>16.0}",
            thr.size, "thru", thr.n, "-", "-", thr.per_s
        );
        cpu_rows.push((label, thr.cpu_us));
    }
    println!();
    println!(
        "{:<28} {:>28}",
        "batch", "consumer CPU µs/batch (next+release)"
    );
    for (label, cpu) in cpu_rows {
        println!("{label:<28} {cpu:>28.2}");
    }
}
