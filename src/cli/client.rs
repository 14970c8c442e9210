//! The client's command line.

use clap::Parser;

use crate::config::ClientConfig;

/// Chat from a terminal or a script: each line typed on stdin is sent as a message; every
/// message from the server is printed to stdout, one per line. Status goes to stderr.
///
/// At end of input (Ctrl-D, or the end of a pipe) the client closes the connection and
/// exits once the server has answered, so `printf 'hi\n' | client` sends one message.
/// Control characters in messages are shown escaped (\n, \u{1b}), so each message is one
/// line and none can move the cursor or forge another sender's line.
///
/// Exit status: 0 after a normal close (1000 or 1001), 1 if the server cannot be reached,
/// 2 for bad arguments, 3 if the server closed with an error or the connection was lost.
#[derive(Debug, Parser)]
#[command(name = "client", version, max_term_width = 100)]
pub struct ClientArgs {
    /// Server to connect to
    #[arg(value_name = "URL", default_value = "ws://127.0.0.1:8080")]
    url: String,

    /// Only print messages: no status lines on stderr, errors still
    #[arg(short, long)]
    pub quiet: bool,
}

impl ClientArgs {
    /// The client's configuration, as the options say.
    pub fn config(&self) -> ClientConfig {
        ClientConfig::default().url(self.url.clone())
    }
}
