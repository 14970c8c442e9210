//! `client`: send each line typed on stdin to a chat server, print every message received.

use std::io::{self, BufReader};
use std::process::ExitCode;

use broadcast_chat::ClientConfig;
use broadcast_chat::client::{self, Ending};
use clap::Parser;
use log::LevelFilter;

/// Chat from a terminal or a script: each line typed on stdin is sent as a message; every
/// message from the server is printed to stdout, one per line. Status goes to stderr.
///
/// At end of input (Ctrl-D, or the end of a pipe) the client closes the connection and
/// exits once the server has answered, so `printf 'hi\n' | client` sends one message.
///
/// Exit status: 0 after a normal close (1000 or 1001), 1 if the server cannot be reached,
/// 2 for bad arguments, 3 if the server closed with an error or the connection was lost.
#[derive(Debug, Parser)]
#[command(version, max_term_width = 100)]
struct Args {
    /// Server to connect to
    #[arg(value_name = "URL", default_value = "ws://127.0.0.1:8080")]
    url: String,

    /// Only print messages: no status lines on stderr, errors still
    #[arg(short, long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args: Args = match broadcast_chat::cli::parse("client") {
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

    let (interrupt_tx, interrupt) = crossbeam_channel::bounded(1);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = interrupt_tx.try_send(());
    }) {
        eprintln!("client: cannot install the Ctrl-C handler: {e}");
        return ExitCode::FAILURE;
    }

    let config = ClientConfig::default().url(args.url);
    let input = BufReader::new(io::stdin());
    match client::run(&config, input, io::stdout(), &interrupt) {
        Ok(ending @ Ending::OutputClosed) => {
            log::debug!("{ending}");
            ExitCode::SUCCESS
        }
        Ok(ending) if ending.is_clean() => {
            log::info!("{ending}");
            ExitCode::SUCCESS
        }
        Ok(ending) => {
            eprintln!("client: {ending}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("client: {e}");
            ExitCode::FAILURE
        }
    }
}
