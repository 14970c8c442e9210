//! `client`: send each line typed on stdin to a chat server, print every message received.

use std::io::{self, BufReader};
use std::process::ExitCode;

use broadcast_chat::cli::ClientArgs;
use broadcast_chat::client::{self, Ending};
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

    let (interrupt_tx, interrupt) = crossbeam_channel::bounded(1);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = interrupt_tx.try_send(());
    }) {
        eprintln!("client: cannot install the Ctrl-C handler: {e}");
        return ExitCode::FAILURE;
    }

    let config = args.config();
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
