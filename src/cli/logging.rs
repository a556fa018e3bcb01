//! Where log lines go: stderr, one line per event, filtered by `env_logger` with the full
//! `RUST_LOG` syntax (`warn`, `ringfeed::pipeline=debug,ringfeed=info`, `debug/lane 1`). A
//! `/text` message filter matches a substring: env_logger's `regex` feature is left out (0.6 MB).
//!
//! The filter comes from `RINGFEED_LOG` (an alias that wins when both are set and it is not
//! empty), else `RUST_LOG`; whatever it does not mention stays at `info`. Lines read
//! `ringfeed: message` for info and `ringfeed: [level] message` otherwise. Progress bars
//! ([`bars`]) are hidden while a line is written, so a line never lands inside a bar.

use std::io::Write as _;
use std::sync::OnceLock;

use indicatif::MultiProgress;
use log::{LevelFilter, Log, Metadata, Record};

/// The environment variables read for the filter, first set wins.
pub(crate) const FILTER_VARS: [&str; 2] = ["RINGFEED_LOG", "RUST_LOG"];

/// Every progress bar of the process is drawn through this, so log lines can suspend them.
pub(crate) fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// An `env_logger` logger that clears the progress bars around each line.
struct BarAwareLogger {
    inner: env_logger::Logger,
}

impl Log for BarAwareLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if self.inner.matches(record) {
            bars().suspend(|| self.inner.log(record));
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The logger for filter `spec` (`RUST_LOG` syntax); targets it does not name log at `info`.
pub(crate) fn logger(spec: &str) -> env_logger::Logger {
    env_logger::Builder::new()
        .filter_level(LevelFilter::Info)
        .parse_filters(spec)
        .format(|out, record| match record.level() {
            log::Level::Info => writeln!(out, "ringfeed: {}", record.args()),
            level => writeln!(
                out,
                "ringfeed: [{}] {}",
                level.as_str().to_lowercase(),
                record.args()
            ),
        })
        .build()
}

/// Installs the logger once, at start.
pub(crate) fn init() {
    let spec = FILTER_VARS
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_default();
    let inner = logger(&spec);
    let level = inner.filter();
    if log::set_boxed_logger(Box::new(BarAwareLogger { inner })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(spec: &str, target: &str, level: log::Level) -> bool {
        logger(spec).enabled(&Metadata::builder().target(target).level(level).build())
    }

    #[test]
    fn filters_follow_rust_log_conventions() {
        use log::Level::*;
        assert!(on("debug", "ringfeed::pipeline", Debug));
        assert!(!on("debug", "ringfeed::pipeline", Trace));
        assert!(on("warn,hyper=trace", "ringfeed", Warn));
        assert!(!on("warn,hyper=trace", "ringfeed", Info));
        assert!(on("warn,hyper=trace", "hyper::proto", Trace));
        assert!(on("hyper=trace,ringfeed=error", "ringfeed::ring", Error));
        assert!(!on("hyper=trace,ringfeed=error", "ringfeed::ring", Warn));
        // Unnamed targets keep the default level.
        assert!(on("hyper=trace", "ringfeed", Info));
        assert!(!on("hyper=trace", "ringfeed", Debug));
        assert!(on("", "ringfeed", Info));
        assert!(on("nonsense", "ringfeed", Info));
    }

    #[test]
    fn per_module_directives_apply_to_their_module_only() {
        use log::Level::*;
        let spec = "ringfeed::pipeline=off,ringfeed::ring=debug";
        assert!(!on(spec, "ringfeed::pipeline", Error));
        assert!(on(spec, "ringfeed::ring::producer", Debug));
        assert!(on(spec, "ringfeed::source", Info));
        assert!(!on(spec, "ringfeed::source", Debug));
    }

    #[test]
    fn message_filters_keep_matching_lines_only() {
        let logger = logger("warn/lane 1");
        let matches = |level, text: &str| {
            logger.matches(
                &Record::builder()
                    .target("ringfeed::cli::status")
                    .level(level)
                    .args(format_args!("{text}"))
                    .build(),
            )
        };
        assert!(matches(log::Level::Warn, "lane 1 stalled: consumer pid 7"));
        assert!(!matches(log::Level::Warn, "lane 2 stalled: consumer pid 7"));
        assert!(!matches(log::Level::Info, "lane 1 flowing again"));
    }
}
