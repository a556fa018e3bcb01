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
    ] {
        assert!(body.contains(m), "missing {m:?} in:\n{body}");
    }
    assert!(get(&addr, "/nope").starts_with("HTTP/1.1 404"));
    assert!(daemon.terminate().success());
}
