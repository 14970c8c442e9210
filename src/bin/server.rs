//! `server`: run the broadcast chat server until Ctrl-C or SIGTERM.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use broadcast_chat::Server;
use broadcast_chat::cli::ServerArgs;
use log::{LevelFilter, info};

fn main() -> ExitCode {
    let args: ServerArgs = match broadcast_chat::cli::parse("server") {
        Ok(args) => args,
        Err(status) => return status,
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stderr is no reason to panic on the way out.
            let _ = writeln!(io::stderr(), "server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &ServerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let log_config = simplelog::ConfigBuilder::new()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .build();
    simplelog::TermLogger::init(
        args.log_level(),
        log_config,
        simplelog::TerminalMode::Stderr,
        if io::stderr().is_terminal() {
            simplelog::ColorChoice::Auto
        } else {
            simplelog::ColorChoice::Never
        },
    )?;

    let (stop_tx, stop) = crossbeam_channel::bounded(1);
    ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    })
    .map_err(|e| format!("cannot install the Ctrl-C/SIGTERM handler: {e}"))?;

    let config = args.config();
    broadcast_chat::raise_open_file_limit(&config);
    let web = config.web;
    let server = Server::with_config(config)?;
    let addr = server.local_addr();
    info!("listening on ws://{addr}");
    if web {
        info!("chat page at http://{addr}/");
    }
    let _ = stop.recv();
    info!("shutting down: closing every client with 1001");
    server.shutdown()?;
    info!("stopped");
    Ok(())
}
