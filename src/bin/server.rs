//! `server`: run the broadcast chat server until Ctrl-C or SIGTERM.

use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use broadcast_chat::{Server, ServerConfig};
use clap::{Parser, ValueEnum};
use log::{LevelFilter, info};

/// A WebSocket broadcast chat server: every text message a client sends goes to every
/// connected client, tagged with the sender's address ("127.0.0.1:53412: hi").
///
/// Browsers get a chat page at http://ADDR/ (turn it off with --no-web); WebSocket clients
/// connect to ws://ADDR. Ctrl-C or SIGTERM closes every client with 1001 and exits.
#[derive(Debug, Parser)]
#[command(version, max_term_width = 100)]
struct Args {
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8080",
        help = "Address to listen on, IPv4 or IPv6 ([::1]:8080); port 0 picks a free port"
    )]
    bind: SocketAddr,

    /// Recent messages shown to each new client; 0 turns history off
    #[arg(long, value_name = "N", default_value_t = 16)]
    history: usize,

    /// Largest text message a client may send; larger ones are closed with 1009
    #[arg(long, value_name = "BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=16 * 1024 * 1024))]
    max_message_size: u32,

    /// Messages that may wait for a client whose socket buffer is full; a client that falls
    /// further behind is closed with 1008
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    queue: u32,

    /// Seconds between pings to each client; a client silent for two intervals is dropped;
    /// 0 turns keepalive off
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    ping_interval: u64,

    /// Seconds a connection has to send its whole request and complete the handshake
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    handshake_timeout: u64,

    /// Clients allowed at once; the next one gets HTTP 503
    #[arg(long, value_name = "N", default_value_t = 12000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_clients: u32,

    /// Do not serve the chat page on plain HTTP GET /
    #[arg(long)]
    no_web: bool,

    /// How much to log to stderr
    #[arg(long, value_name = "LEVEL", value_enum, default_value_t = Level::Info)]
    log_level: Level,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<Level> for LevelFilter {
    fn from(level: Level) -> Self {
        match level {
            Level::Off => LevelFilter::Off,
            Level::Error => LevelFilter::Error,
            Level::Warn => LevelFilter::Warn,
            Level::Info => LevelFilter::Info,
            Level::Debug => LevelFilter::Debug,
            Level::Trace => LevelFilter::Trace,
        }
    }
}

impl Args {
    fn config(&self) -> ServerConfig {
        ServerConfig::default()
            .bind(self.bind)
            .history(self.history)
            .max_message_size(self.max_message_size as usize)
            .queue(self.queue as usize)
            .ping_interval(
                (self.ping_interval > 0).then(|| Duration::from_secs(self.ping_interval)),
            )
            .handshake_timeout(Duration::from_secs(self.handshake_timeout))
            .max_clients(self.max_clients as usize)
            .web(!self.no_web)
    }
}

fn main() -> ExitCode {
    let args: Args = match broadcast_chat::cli::parse("server") {
        Ok(args) => args,
        Err(status) => return status,
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let log_config = simplelog::ConfigBuilder::new()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .build();
    simplelog::TermLogger::init(
        args.log_level.into(),
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

    let server = Server::with_config(args.config())?;
    let addr = server.local_addr();
    info!("listening on ws://{addr}");
    if !args.no_web {
        info!("chat page at http://{addr}/");
    }
    let _ = stop.recv();
    info!("shutting down: closing every client with 1001");
    server.shutdown()?;
    info!("stopped");
    Ok(())
}
