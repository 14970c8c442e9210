//! The client's command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::config::ClientConfig;

/// Chat from a terminal or a script: each line typed on stdin is sent as a message; every
/// message from the server is printed to stdout, one per line. Status goes to stderr.
///
/// At end of input (Ctrl-D, or the end of a pipe) the client closes the connection and
/// exits once the server has answered, so `printf 'hi\n' | client` sends one message.
/// Control characters in messages are shown escaped (\n, \u{1b}), so each message is one
/// line and none can move the cursor or forge another sender's line.
///
/// At a terminal it is a line editor (history with the arrow keys), messages appear above
/// the line being typed, your own are marked "(you)", and a dropped connection is
/// reconnected with what you typed meanwhile. In a pipe, at end of input it waits until
/// every line it sent has come back from the server (--wait), so that exit 0 means
/// "broadcast".
///
/// Exit status: 0 after a normal close (1000, 1001, or none), 1 if the server cannot be
/// reached, 2 for bad arguments, 3 if the server closed with an error or the connection
/// was lost, 4 if lines sent were not confirmed, 130 after a second Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "client", version, max_term_width = 100)]
pub struct ClientArgs {
    /// Server to connect to (ws://HOST:PORT, or wss://HOST:PORT for TLS; http:// and
    /// https:// work too)
    #[arg(value_name = "URL", default_value = "ws://127.0.0.1:8080")]
    url: String,

    /// Only print messages: no status lines, errors still
    #[arg(short, long)]
    pub quiet: bool,

    /// Colour the senders: auto (at a terminal, unless NO_COLOR is set), always, never
    #[arg(long, value_name = "WHEN", value_enum, ignore_case = true,
          default_value_t = Color::Auto)]
    color: Color,

    /// In a pipe, seconds to wait at end of input for the lines sent to come back from the
    /// server, 0 to 3600
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=3600))]
    wait: u32,

    /// In a pipe, do not wait for the lines sent to come back (for servers that do not
    /// echo a message to its sender)
    #[arg(long)]
    no_confirm: bool,

    /// At a terminal, do not reconnect when the connection drops
    #[arg(long)]
    no_reconnect: bool,

    /// Seconds without a word from the server before the client pings it, 1 to 3600; with
    /// no answer for as long again, or a send stuck that long with no word, the connection
    /// is lost
    #[arg(long, value_name = "SECS", default_value_t = 45,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    keepalive: u32,

    /// For wss://, trust the CA certificates in this PEM file instead of the public ones:
    /// for a server whose certificate comes from your own CA
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    ca: Option<PathBuf>,

    /// For wss://, accept any certificate without checking it: for testing only, since
    /// anyone between you and the server can then read and change the chat
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

impl ClientArgs {
    /// The client's configuration, as the options say; `terminal` when stdout is a
    /// terminal, `no_color` when `NO_COLOR` is set to something.
    pub fn config(&self, terminal: bool, no_color: bool) -> ClientConfig {
        let color = match self.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => terminal && !no_color,
        };
        ClientConfig::default()
            .url(self.url.clone())
            .color(color)
            .wait(Duration::from_secs(u64::from(self.wait)))
            .confirm(!self.no_confirm)
            .reconnect(!self.no_reconnect)
            .keepalive(Duration::from_secs(u64::from(self.keepalive)))
            .ca(self.ca.clone())
            .insecure(self.insecure)
    }
}
