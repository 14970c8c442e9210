//! The two binaries' command lines: their options, each numeric one with a documented
//! range, and how a mistake is reported.
//!
//! A user who mistypes an option should get one line saying what is wrong, not a screen of
//! usage; `--help` and `--version` still print in full.

use std::process::ExitCode;

mod client;
mod server;

pub use client::ClientArgs;
pub use server::ServerArgs;

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
        eprintln!("{program}: {} (see --help)", one_line(&e));
        ExitCode::from(2)
    })
}

/// The first line of a parse error, which says what is wrong, with the valid values when
/// there is a list of them, and the indented lines it introduces (the missing arguments,
/// say) when it ends in a colon.
fn one_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let rendered = e.render().to_string();
    let mut lines = rendered.lines();
    let mut line = lines.next().unwrap_or("invalid arguments").to_string();
    if line.ends_with(':') {
        let listed: Vec<&str> = lines
            .take_while(|l| l.starts_with(' ') && !l.trim().is_empty())
            .map(str::trim)
            .collect();
        line.push(' ');
        line.push_str(&listed.join(", "));
    }
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        line.push_str(&format!("; expected one of: {}", valid.join(", ")));
    }
    line
}

#[cfg(test)]
mod tests;
