//! The HTTP side of `serve --metrics ADDR`: answers `GET /metrics` with
//! [`super::metrics::render`], and holds up against hostile clients.
//!
//! # Brief overview
//!
//! Every local user can connect to a loopback port (and the network can, with `IP:PORT`), so
//! the endpoint assumes nothing of its clients (tested in `tests/cli_ops_metrics.rs`):
//!
//! 1. One accept thread polls the listener and the stop flag; it never blocks on a client, so
//!    [`MetricsServer::join`] returns within one poll interval.
//! 2. Each connection gets its own short-lived thread, at most [`MAX_CONNECTIONS`] at once
//!    (more are closed at once): a slow client delays only itself.
//! 3. A request is read into a buffer of at most [`MAX_REQUEST_BYTES`] (larger: `431`) and
//!    parsed by `httparse`; the whole request, reading and answering, has [`REQUEST_DEADLINE`]
//!    (slower: `408`), however the bytes trickle in.
//! 4. Connection threads are never joined: at shutdown they are left to their deadline, and
//!    the process exits without waiting for them.
//!
//! The endpoint is read-only: a client can read the counters, and at worst occupy the
//! connection slots for [`REQUEST_DEADLINE`] at a time (failing scrapes meanwhile); it cannot
//! grow the daemon's memory past `MAX_CONNECTIONS × MAX_REQUEST_BYTES`, nor delay its exit.
//!
//! Why not an HTTP server crate: the well-kept ones (hyper, axum) bring an async runtime for
//! one GET route, and tiny_http has no request-size bound and no release since 2022; the
//! parsing is `httparse` (hyper's parser), what remains here is the bounding issue 24 needs.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prometheus_client::registry::Registry;

use super::metrics::{render_all, CONTENT_TYPE};

/// Largest request (line and headers) read; a scrape's is a few hundred bytes.
pub(crate) const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time for one whole request, from accept to the last byte of the answer.
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 16;
/// How often the accept thread looks at the stop flag while no client connects.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The accept thread of the metrics endpoint.
pub(crate) struct MetricsServer {
    handle: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves `registries` (one per ring of the daemon) until `stop` is set.
    pub(crate) fn spawn(
        addr: SocketAddr,
        registry: Vec<Registry>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<MetricsServer> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("cannot bind --metrics {addr}"))?;
        listener.set_nonblocking(true)?;
        let registry = Arc::new(registry);
        let active = Arc::new(AtomicUsize::new(0));
        let handle = std::thread::Builder::new()
            .name("ringfeed-metrics".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => admit(stream, &registry, &active),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            wait_readable(&listener, POLL_INTERVAL);
                        }
                        Err(e) => {
                            // EMFILE and the like: back off instead of spinning.
                            log::debug!("metrics accept failed: {e}");
                            std::thread::sleep(POLL_INTERVAL);
                        }
                    }
                }
            })
            .context("cannot start the metrics thread")?;
        Ok(MetricsServer { handle })
    }

    /// Waits for the accept thread to end (within one poll interval of `stop` being set).
    /// Connection threads are not waited for.
    pub(crate) fn join(self) {
        let _ = self.handle.join();
    }
}

/// Blocks until `listener` has a connection or `timeout` passes.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timeout = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let _ = poll(&mut fds, Some(&timeout));
}

/// Hands `stream` to a connection thread, or closes it when [`MAX_CONNECTIONS`] are busy.
fn admit(stream: TcpStream, registry: &Arc<Vec<Registry>>, active: &Arc<AtomicUsize>) {
    // Only this thread increments, so the check and the increment cannot race past the cap.
    if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
        log::debug!("metrics: {MAX_CONNECTIONS} connections busy; closing a new one");
        return;
    }
    active.fetch_add(1, Ordering::AcqRel);
    let (registry, done) = (Arc::clone(registry), Arc::clone(active));
    let spawned = std::thread::Builder::new()
        .name("ringfeed-metrics-conn".into())
        .spawn(move || {
            let deadline = Instant::now() + REQUEST_DEADLINE;
            if let Err(e) = serve_connection(&stream, &registry, deadline) {
                log::debug!("metrics request failed: {e}");
            }
            done.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET /metrics` (a query string is ignored).
    Metrics,
    /// Any other well-formed request.
    Other,
    /// Not HTTP.
    Malformed,
    /// Larger than [`MAX_REQUEST_BYTES`].
    TooLarge,
}

/// Reads one request under `deadline` and answers it.
fn serve_connection(
    stream: &TcpStream,
    registry: &[Registry],
    deadline: Instant,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let request = match read_request(stream, deadline)? {
        Some(request) => request,
        None => {
            return respond(
                stream,
                deadline,
                "408 Request Timeout",
                "request too slow\n",
            )
        }
    };
    match request {
        Request::Metrics => {
            let body = render_all(registry);
            respond(stream, deadline, "200 OK", &body)
        }
        Request::Other => respond(
            stream,
            deadline,
            "404 Not Found",
            "not found; try GET /metrics\n",
        ),
        Request::Malformed => respond(stream, deadline, "400 Bad Request", "not an HTTP request\n"),
        Request::TooLarge => respond(
            stream,
            deadline,
            "431 Request Header Fields Too Large",
            "request too large\n",
        ),
    }
}

/// Reads until the request's headers are complete; `None` when `deadline` passes first.
fn read_request(mut stream: &TcpStream, deadline: Instant) -> std::io::Result<Option<Request>> {
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return Ok(Some(Request::Malformed)),
            Ok(n) => len += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Some(request) = parse(&buf[..len]) {
            return Ok(Some(request));
        }
        if len == buf.len() {
            return Ok(Some(Request::TooLarge));
        }
    }
}

/// The request in `bytes`, or `None` while its headers are incomplete.
fn parse(bytes: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or_default();
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            Some(if request.method == Some("GET") && path == "/metrics" {
                Request::Metrics
            } else {
                Request::Other
            })
        }
        Err(httparse::Error::TooManyHeaders) => Some(Request::TooLarge),
        Err(_) => Some(Request::Malformed),
    }
}

/// Writes one response and closes the connection's write side.
fn respond(
    mut stream: &TcpStream,
    deadline: Instant,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    // A zero timeout would mean "block forever"; a client past its deadline gets a moment.
    stream.set_write_timeout(Some(left.max(Duration::from_millis(100))))?;
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified_once_their_headers_are_complete() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Request::Metrics)
        );
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Request::Metrics)
        );
        assert_eq!(parse(b"GET /nope HTTP/1.1\r\n\r\n"), Some(Request::Other));
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Request::Other)
        );
        assert_eq!(parse(b"\x00\x01garbage\r\n\r\n"), Some(Request::Malformed));
        let many: String = (0..40).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(
            parse(format!("GET /metrics HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Some(Request::TooLarge)
        );
    }
}
