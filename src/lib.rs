//! A WebSocket broadcast chat: every text a client sends reaches every connected client,
//! tagged with the sender's address, in one global order. Threads and blocking I/O, no
//! async runtime.
//!
//! Start a server on a free port, talk to it with any WebSocket client, stop it:
//!
//! ```
//! use broadcast_chat::{Server, ServerConfig};
//!
//! let server = Server::with_config(ServerConfig::default().bind("127.0.0.1:0".parse()?))?;
//! let url = format!("ws://{}", server.local_addr());
//! let (mut ws, _) = tungstenite::connect(url.as_str())?;
//! assert_eq!(ws.read()?.to_text()?, broadcast_chat::WELCOME);
//! ws.send("hi".into())?;
//! let echo = ws.read()?;
//! assert!(echo.to_text()?.ends_with(": hi"));
//! ws.close(None)?;
//! while ws.read().is_ok() {} // the server's answer, then the end of the connection
//! server.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! How it is built: [`server`](Server) accepts connections and gives each a thread
//! (`connection`, kept for the next client by `workers`), which does the handshake
//! (`handshake`, and `web` for the page) and reads the client's frames. One dispatcher
//! thread (`dispatcher`) owns the client list and the recent messages and writes every
//! broadcast (`peer`) in the wire format (`message`). With a certificate, both sides speak
//! TLS (`tls`) on the socket their two threads share. [`client`] is the command-line
//! client; [`cli`] holds what both binaries share.

#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations, unused_must_use)]

pub mod cli;
pub mod client;
mod config;
mod error;
mod message;
mod server;
mod tls;

pub use config::{ClientConfig, MAX_QUEUE, RedisConfig, ServerConfig, TlsFiles};
pub use error::{Error, Result};
pub use message::{WELCOME, printable, sender_tag};
pub use server::{Server, raise_open_file_limit};
