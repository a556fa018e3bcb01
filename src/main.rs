//! The `ringfeed` command line: parses flags, calls the library, renders errors for humans and
//! returns an exit code. One file per subcommand under `cli/`.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ringfeed: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
