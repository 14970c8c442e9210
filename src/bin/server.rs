//! `server`: run the broadcast chat server until Ctrl-C or SIGTERM; with TLS, reload the
//! certificate on SIGHUP.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use broadcast_chat::Server;
use broadcast_chat::cli::ServerArgs;
use log::{LevelFilter, error, info};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

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

    // Installed first: a signal that comes while the server starts waits for the loop
    // below. SIGINT and SIGTERM stop the server; SIGHUP reloads the certificate of a TLS
    // server, and stops any other, as it always has.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install the signal handlers: {e}"))?;
    let config = args.config();
    broadcast_chat::raise_open_file_limit(&config);
    let web = config.web;
    let server = Server::with_config(config)?;
    let addr = server.local_addr();
    let (ws, http) = if server.is_tls() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    info!("listening on {ws}://{addr}");
    if web {
        info!("chat page at {http}://{addr}/");
    }
    for signal in signals.forever() {
        if signal != SIGHUP || !server.is_tls() {
            break;
        }
        match server.reload_tls() {
            Ok(()) => {
                info!("SIGHUP: reloaded the TLS certificate and key; new connections use them")
            }
            Err(e) => error!("SIGHUP: {e}; still using the certificate loaded before"),
        }
    }
    drop(signals);
    info!("shutting down: closing every client with 1001");
    server.shutdown()?;
    info!("stopped");
    Ok(())
}
