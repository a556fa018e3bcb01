//! The `ringfeed` command line: parses flags, calls the library, renders errors for humans and
//! returns an exit code. One file per subcommand under `cli/`.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ringfeed: error: {}", render(&err));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each cause once: library errors often show their
/// source in their own message, and anyhow's `{:#}` would print it a second time.
fn render(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::render;

    #[derive(Debug, thiserror::Error)]
    #[error("runtime directory /x: {source}")]
    struct ShowsItsSource {
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_rendered_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let err = anyhow::Error::new(ShowsItsSource { source: io }).context("cannot attach");
        let line = render(&err);
        assert_eq!(line.matches(&text).count(), 1, "{line}");
        assert!(
            line.starts_with("cannot attach: runtime directory /x: "),
            "{line}"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render(&plain), "outer: inner");
    }
}
