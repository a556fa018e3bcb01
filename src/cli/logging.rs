//! Where log lines go: stderr, one line per event, filtered by level.
//!
//! The level comes from `RINGFEED_LOG`, else `RUST_LOG`, in `RUST_LOG` style: a bare level
//! (`debug`) or comma-separated `target=level` directives, of which the one for `ringfeed`
//! (or a bare level) applies. Default `info`.

use std::io::{IsTerminal as _, Write as _};

use log::{LevelFilter, Log, Metadata, Record};

/// Writes `ringfeed: [LEVEL] message` lines to stderr (`ringfeed: message` for info).
struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // On a terminal, first clear the progress bar the line would otherwise append to.
        let clear = if std::io::stderr().is_terminal() {
            "\r\x1b[2K"
        } else {
            ""
        };
        let line = match record.level() {
            log::Level::Info => format!("{clear}ringfeed: {}\n", record.args()),
            level => format!(
                "{clear}ringfeed: [{}] {}\n",
                level.as_str().to_lowercase(),
                record.args()
            ),
        };
        // One write per line keeps lines whole when threads log at once.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The level a `RUST_LOG`-style filter sets for ringfeed; `None` if it names none.
pub(crate) fn parse_filter(filter: &str) -> Option<LevelFilter> {
    let mut level = None;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match directive.split_once('=') {
            Some((target, value)) if target == "ringfeed" || target.starts_with("ringfeed::") => {
                level = value.parse().ok().or(level);
            }
            Some(_) => {}
            None => level = directive.parse().ok().or(level),
        }
    }
    level
}

/// Installs the logger once, at start.
pub(crate) fn init() {
    let level = ["RINGFEED_LOG", "RUST_LOG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| parse_filter(&v)))
        .unwrap_or(LevelFilter::Info);
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_rust_log_conventions() {
        assert_eq!(parse_filter("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_filter("warn,hyper=trace"), Some(LevelFilter::Warn));
        assert_eq!(
            parse_filter("hyper=trace,ringfeed=error"),
            Some(LevelFilter::Error)
        );
        assert_eq!(
            parse_filter("ringfeed::pipeline=off"),
            Some(LevelFilter::Off)
        );
        assert_eq!(parse_filter("hyper=trace"), None);
        assert_eq!(parse_filter("nonsense"), None);
    }
}
