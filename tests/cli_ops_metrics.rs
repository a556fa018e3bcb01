//! `serve --metrics ADDR`: a real HTTP GET returns Prometheus text with the ring's counters.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};

use common::{small_config, write_dataset, Daemon, RuntimeTmp};

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let data = tempfile::tempdir().unwrap();
    let runtime = RuntimeTmp::new();
    let spec = write_dataset(data.path(), 1, 16);
    let config = small_config(data.path(), &spec, "metricsring");
    // A free loopback port: bind port 0, note it, let it go.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
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
    ] {
        assert!(body.contains(m), "missing {m:?} in:\n{body}");
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
