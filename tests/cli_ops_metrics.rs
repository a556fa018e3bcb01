//! `serve --metrics ADDR`: a real HTTP GET returns Prometheus text with the ring's counters.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;

use common::{free_addr, http_get as get, small_config, write_dataset, Daemon, RuntimeTmp};

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 1, 16);
    let config = small_config(data.path(), &spec, "metricsring");
    let addr = free_addr();
    let daemon = Daemon::start(
        runtime.path(),
        &["--config", config.to_str().unwrap(), "--metrics", &addr],
    );
    let reply = get(&addr, "/metrics");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("Content-Type: text/plain; version=0.0.4"));
    let body = reply.split("\r\n\r\n").nth(1).unwrap();
    for m in [
        "# TYPE ringfeed_samples_total counter",
        "ringfeed_samples_skipped_total{ring=\"metricsring\"} 0",
        "ringfeed_lane_slots_ready{ring=\"metricsring\",lane=\"0\"}",
        "ringfeed_lane_consumer_attached{ring=\"metricsring\",lane=\"0\"} 0",
        "ringfeed_producer_wait_seconds_total{ring=\"metricsring\"}",
        "# TYPE ringfeed_sample_process_seconds histogram",
        "ringfeed_sample_process_seconds_bucket{ring=\"metricsring\",le=\"+Inf\"}",
        // Every documented name and label (docs/configuration.md), with its type and help.
        "# HELP ringfeed_samples_total Samples decoded and written.",
        "# TYPE ringfeed_samples_skipped_total counter",
        "# TYPE ringfeed_batches_published_total counter",
        "ringfeed_batches_published_total{ring=\"metricsring\"} ",
        "# TYPE ringfeed_producer_wait_seconds_total counter",
        "# TYPE ringfeed_lane_consumer_wait_seconds_total counter",
        "ringfeed_lane_consumer_wait_seconds_total{ring=\"metricsring\",lane=\"0\"} ",
        "# TYPE ringfeed_lane_slots_ready gauge",
        "# TYPE ringfeed_lane_slots_held gauge",
        "ringfeed_lane_slots_held{ring=\"metricsring\",lane=\"0\"} ",
        "# TYPE ringfeed_lane_published_total counter",
        "ringfeed_lane_published_total{ring=\"metricsring\",lane=\"0\"} ",
        "# TYPE ringfeed_lane_consumer_attached gauge",
        "ringfeed_sample_process_seconds_bucket{ring=\"metricsring\",le=\"0.001\"} ",
        "ringfeed_sample_process_seconds_sum{ring=\"metricsring\"} ",
    ] {
        assert!(body.contains(m), "missing {m:?} in:\n{body}");
    }
    // Counts are integers, as before the exposition moved to prometheus-client.
    for line in body.lines().filter(|l| {
        l.starts_with("ringfeed_samples_total")
            || l.starts_with("ringfeed_lane_published_total")
            || l.starts_with("ringfeed_lane_slots_")
    }) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<u64>().is_ok(), "not an integer: {line}");
    }
    // The histogram counts every sample written so far: its count equals its +Inf bucket,
    // and it grows once the pipeline has filled the ring's first slots.
    let value = |body: &str, prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{body}"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let reply = get(&addr, "/metrics");
        let body = reply.split("\r\n\r\n").nth(1).unwrap();
        let count = value(body, "ringfeed_sample_process_seconds_count");
        let inf = "ringfeed_sample_process_seconds_bucket{ring=\"metricsring\",le=\"+Inf\"}";
        assert_eq!(count, value(body, inf));
        if count > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sample timed:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(get(&addr, "/nope").starts_with("HTTP/1.1 404"));
    assert!(daemon.terminate().success());
}

/// A daemon serving metrics on a fresh loopback port, with its address.
fn metrics_daemon(
    data: &std::path::Path,
    runtime: &std::path::Path,
    name: &str,
) -> (Daemon, String) {
    let spec = write_dataset(data, 1, 16);
    let config = small_config(data, &spec, name);
    let addr = free_addr();
    let daemon = Daemon::start(
        runtime,
        &["--config", config.to_str().unwrap(), "--metrics", &addr],
    );
    (daemon, addr)
}

/// Resident set size of `pid` in bytes, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in:\n{status}"));
    kib * 1024
}

/// A slow-loris client: connects, then sends one byte of a request line every 1.5 s until
/// the daemon answers or closes the connection (or `bytes` are sent). Returns how many bytes
/// it sent and what the daemon answered. Between bytes it waits in a read, so a reply or a
/// close ends it at once. `progress` hears the count after each byte.
fn slow_client(
    addr: &str,
    bytes: usize,
    progress: std::sync::mpsc::Sender<usize>,
) -> (usize, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
        .unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: slow\r\n".repeat(4);
    let mut sent = 0;
    let mut reply = Vec::new();
    while sent < bytes.min(request.len()) {
        if s.write_all(&request[sent..sent + 1]).is_err() {
            break;
        }
        sent += 1;
        let _ = progress.send(sent);
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    (sent, String::from_utf8_lossy(&reply).into_owned())
}

/// Issue 24: a request line of hundreds of MiB without a newline must not grow the daemon's
/// memory (the old responder read it whole with `read_line`); the daemon refuses it once it
/// passes the request cap, and keeps serving scrapes.
#[test]
fn metrics_request_without_newline_does_not_grow_memory() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let (daemon, addr) = metrics_daemon(data.path(), runtime.path(), "metricshuge");
    let pid = daemon.child.id();
    assert!(get(&addr, "/metrics").starts_with("HTTP/1.1 200 OK\r\n"));
    let before = rss_bytes(pid);

    const SEND: usize = 512 << 20;
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_write_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![b'A'; 1 << 20];
    let mut sent = 0;
    while sent < SEND {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break, // refused and closed: what the cap is for
        }
    }
    // Measured while the connection is still open: whatever the daemon buffered is held now.
    let grown = rss_bytes(pid).saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "the daemon grew by {} MiB after {} MiB of request line",
        grown >> 20,
        sent >> 20
    );
    assert!(
        sent < SEND,
        "the daemon read all {} MiB of a request line without refusing it",
        SEND >> 20
    );
    drop(s);
    assert!(get(&addr, "/metrics").starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(daemon.terminate().success());
}

/// Issue 24: a client sending one byte every 1.5 s must not block other scrapes, and its
/// request is cut off by the per-request deadline instead of holding a thread forever.
#[test]
fn metrics_slow_client_blocks_neither_scrapes_nor_itself_forever() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let (daemon, addr) = metrics_daemon(data.path(), runtime.path(), "metricsslow");
    let (tx, rx) = std::sync::mpsc::channel();
    let slow = {
        let addr = addr.clone();
        std::thread::spawn(move || slow_client(&addr, 40, tx))
    };
    rx.recv().unwrap(); // the first byte is out
                        // A scrape while the slow client trickles: answered while the slow client is still
                        // connected and sending (it sends for up to 60 s unless the daemon cuts it off).
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        !slow.is_finished(),
        "the scrape was answered only after the slow client was done"
    );
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
    // The slow client is cut off (answered 408 or closed) long before it sends its 40 bytes.
    let (sent, answer) = slow.join().unwrap();
    assert!(sent < 40, "the daemon waited for all {sent} slow bytes");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    assert!(daemon.terminate().success());
}

/// Issue 24: SIGTERM ends the daemon within 2 s while a slow client is connected to the
/// metrics port (the old shutdown joined the thread blocked on that client).
#[test]
fn metrics_sigterm_exits_promptly_with_a_slow_client_connected() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let (mut daemon, addr) = metrics_daemon(data.path(), runtime.path(), "metricsterm");
    let (tx, rx) = std::sync::mpsc::channel();
    let slow = {
        let addr = addr.clone();
        std::thread::spawn(move || slow_client(&addr, 40, tx))
    };
    // The second byte goes out after the first waited 1.5 s in a read with no answer: by
    // then the daemon has long accepted the connection and is reading the request.
    while rx.recv().unwrap() < 2 {}
    let pid = rustix::process::Pid::from_raw(daemon.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = daemon.wait(std::time::Duration::from_secs(2));
    assert!(status.success(), "{status:?}");
    let (sent, _) = slow.join().unwrap();
    assert!(sent < 40);
}
