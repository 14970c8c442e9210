//! `client`: send each line typed on stdin to a chat server, print every message received.

use std::io::{self, BufReader, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use broadcast_chat::Error;
use broadcast_chat::cli::ClientArgs;
use broadcast_chat::client::{self, Console, Ending};
use log::LevelFilter;

fn main() -> ExitCode {
    let args: ClientArgs = match broadcast_chat::cli::parse("client") {
        Ok(args) => args,
        Err(status) => return status,
    };
    let level = if args.quiet {
        LevelFilter::Warn
    } else {
        LevelFilter::Info
    };
    let log_config = simplelog::ConfigBuilder::new()
        .set_time_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_max_level(LevelFilter::Off)
        .build();
    let _ = simplelog::TermLogger::init(
        level,
        log_config,
        simplelog::TerminalMode::Stderr,
        simplelog::ColorChoice::Never,
    );

    // The first Ctrl-C (or SIGTERM) closes properly; a second one exits at once, whatever
    // the client is waiting for (a connect, the server's close, a stuck write).
    let (interrupt_tx, interrupt) = crossbeam_channel::bounded(1);
    let presses = AtomicUsize::new(0);
    if let Err(e) = ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::Relaxed) > 0 {
            client::put_terminal_back();
            std::process::exit(130);
        }
        let _ = interrupt_tx.try_send(());
    }) {
        say(&format!("cannot install the Ctrl-C handler: {e}"));
        return ExitCode::FAILURE;
    }

    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let config = args.config(io::stdout().is_terminal(), no_color);
    let console = if client::is_interactive() {
        Console::Terminal
    } else {
        Console::Pipe(Box::new(BufReader::new(io::stdin())))
    };
    match client::run(&config, console, &interrupt) {
        Ok(outcome) => {
            match &outcome.ending {
                Ending::OutputClosed => log::debug!("{}", outcome.ending),
                ending if ending.is_clean() => log::info!("{ending}"),
                ending => say(&ending.to_string()),
            }
            if outcome.unconfirmed > 0 {
                say(&format!(
                    "{} of {} line(s) were not confirmed: they did not come back from the \
                     server within {} s (raise --wait, or --no-confirm for a server that does \
                     not echo)",
                    outcome.unconfirmed,
                    outcome.sent,
                    config.wait.as_secs()
                ));
            }
            ExitCode::from(outcome.exit_status())
        }
        Err(e @ (Error::Url { .. } | Error::Certificate { .. })) => {
            say(&e.to_string());
            ExitCode::from(2)
        }
        Err(e) => {
            say(&e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// One line on stderr; a closed stderr (`client 2>&1 | head -1`) is no reason to panic.
fn say(line: &str) {
    let _ = writeln!(io::stderr(), "client: {line}");
}
