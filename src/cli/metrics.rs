//! `serve --metrics ADDR`: Prometheus text metrics (GET /metrics) from a minimal `std::net`
//! responder thread. Off by default; the address is whatever the operator gives (bind to
//! loopback unless you mean to expose it).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use ringfeed::pipeline::{PipelineCounters, SampleTimes, SAMPLE_TIME_BUCKETS_S};
use ringfeed::ring::{Producer, RingStats};

/// The metrics responder thread.
pub(crate) struct MetricsServer {
    handle: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves until `stop` is set.
    pub(crate) fn spawn(
        addr: SocketAddr,
        producer: Arc<Producer>,
        counters: Arc<PipelineCounters>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<MetricsServer> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("cannot bind --metrics {addr}"))?;
        listener.set_nonblocking(true)?;
        let name = producer.layout().name.clone();
        let handle = std::thread::Builder::new()
            .name("ringfeed-metrics".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let mut body = render(&name, &producer.stats());
                            body += &render_sample_times(&name, &counters.sample_times);
                            body += &super::feedback_metrics::render(&name, &producer.evaluation());
                            let _ = respond(stream, &body);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .context("cannot start the metrics thread")?;
        Ok(MetricsServer { handle })
    }

    /// Waits for the thread to end (after `stop` is set).
    pub(crate) fn join(self) {
        let _ = self.handle.join();
    }
}

/// Answers one request: the metrics for `GET /metrics`, 404 otherwise.
fn respond(stream: TcpStream, body: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(&stream);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Drain the headers so closing the socket does not reset the connection.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let ok = request.starts_with("GET /metrics ");
    let (status, body) = if ok {
        ("200 OK", body)
    } else {
        ("404 Not Found", "not found; try GET /metrics\n")
    };
    let mut out = &stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// The Prometheus text exposition of `s` for ring `name`.
pub(crate) fn render(name: &str, s: &RingStats) -> String {
    let mut out = String::new();
    let mut metric = |m: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        out += &format!("# HELP ringfeed_{m} {help}\n# TYPE ringfeed_{m} {kind}\n");
        for (labels, v) in rows {
            out += &format!("ringfeed_{m}{{ring=\"{name}\"{labels}}} {v}\n");
        }
    };
    let ring = |v: u64| vec![(String::new(), v as f64)];
    let lanes = |f: &dyn Fn(&ringfeed::ring::LaneStats) -> f64| {
        s.lanes
            .iter()
            .map(|l| (format!(",lane=\"{}\"", l.lane), f(l)))
            .collect::<Vec<_>>()
    };
    metric(
        "samples_total",
        "counter",
        "Samples decoded and written.",
        ring(s.samples_ok),
    );
    metric(
        "samples_skipped_total",
        "counter",
        "Samples skipped (corrupt, unreadable, bad label).",
        ring(s.samples_skipped),
    );
    metric(
        "batches_published_total",
        "counter",
        "Batches published, all lanes.",
        ring(s.batches_published),
    );
    metric(
        "producer_wait_seconds_total",
        "counter",
        "Time the producer waited for a free slot.",
        vec![(String::new(), s.producer_wait_ns as f64 / 1e9)],
    );
    metric(
        "lane_consumer_wait_seconds_total",
        "counter",
        "Time the lane's consumer waited for a batch.",
        lanes(&|l| l.consumer_wait_ns as f64 / 1e9),
    );
    metric(
        "lane_slots_ready",
        "gauge",
        "Slots holding a published batch.",
        lanes(&|l| f64::from(l.ready)),
    );
    metric(
        "lane_slots_held",
        "gauge",
        "Slots held by the consumer.",
        lanes(&|l| f64::from(l.held)),
    );
    metric(
        "lane_published_total",
        "counter",
        "Batches published in the lane.",
        lanes(&|l| l.published as f64),
    );
    metric(
        "lane_consumer_attached",
        "gauge",
        "1 when a consumer is attached.",
        lanes(&|l| f64::from(u8::from(l.consumer_pid != 0))),
    );
    out
}

/// The per-sample decode + augment + write time histogram, Prometheus style (cumulative
/// buckets, `+Inf`, sum, count).
pub(crate) fn render_sample_times(name: &str, times: &SampleTimes) -> String {
    let (counts, sum_ns) = times.snapshot();
    let m = "ringfeed_sample_process_seconds";
    let mut out =
        format!("# HELP {m} Time to decode, augment and write one sample.\n# TYPE {m} histogram\n");
    let mut cumulative = 0;
    for (i, count) in counts.iter().enumerate() {
        cumulative += count;
        let le = SAMPLE_TIME_BUCKETS_S
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
        out += &format!("{m}_bucket{{ring=\"{name}\",le=\"{le}\"}} {cumulative}\n");
    }
    out += &format!("{m}_sum{{ring=\"{name}\"}} {}\n", sum_ns as f64 / 1e9);
    out += &format!("{m}_count{{ring=\"{name}\"}} {cumulative}\n");
    out
}
