//! What the two binaries share about their command lines.
//!
//! A user who mistypes an option should get one line saying what is wrong, not a screen of
//! usage; `--help` and `--version` still print in full.

use std::process::ExitCode;

/// Parse the command line into `T`. On a mistake, print one line prefixed with `program`
/// and return exit status 2; for `--help` and `--version`, print them and return success.
///
/// # Errors
/// The exit status to end the program with, when it should not go on.
pub fn parse<T: clap::Parser>(program: &str) -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        if !e.use_stderr() {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        let rendered = e.render().to_string();
        let line = rendered.lines().next().unwrap_or("invalid arguments");
        eprintln!("{program}: {line} (see --help)");
        ExitCode::from(2)
    })
}
