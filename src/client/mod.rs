//! The command-line client: send each input line, print each message received.
//!
//! One thread reads the input and sends, one reads the socket and prints, and the calling
//! thread waits for either to finish, then closes the connection properly. Both threads
//! share one socket (one file descriptor); a lock around each whole frame keeps the sender's
//! messages and the reader's automatic replies (pongs, the answer to a close) from
//! interleaving.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use crossbeam_channel::{Receiver, select};
use log::{debug, info};
use parking_lot::Mutex;
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::http::Uri;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use crate::config::ClientConfig;
use crate::error::{Error, Result, is_disconnect};
use crate::message::printable;

/// How a client run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A close frame arrived: the server's own, or its answer to ours.
    Closed {
        /// The status code, if the frame had one.
        code: Option<u16>,
        /// The reason the server gave.
        reason: String,
    },
    /// The connection ended without a close frame.
    Lost(String),
    /// The output was closed (a pipe whose reader left); nothing more could be shown.
    OutputClosed,
}

impl Ending {
    /// Whether this is a normal end: a close with 1000 or 1001, or a closed output.
    pub fn is_clean(&self) -> bool {
        match self {
            Ending::Closed { code, .. } => matches!(code, Some(1000 | 1001) | None),
            Ending::Lost(_) => false,
            Ending::OutputClosed => true,
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Closed {
                code: Some(code),
                reason,
            } if reason.is_empty() => {
                write!(f, "connection closed ({code})")
            }
            Ending::Closed {
                code: Some(code),
                reason,
            } => {
                write!(f, "connection closed ({code}: {})", printable(reason))
            }
            Ending::Closed { code: None, .. } => f.write_str("connection closed"),
            Ending::Lost(why) => write!(f, "connection lost: {why}"),
            Ending::OutputClosed => f.write_str("output closed"),
        }
    }
}

/// Connect, then send every non-empty line of `input` and write every text message to
/// `output`, one per line, until the input ends, `interrupt` fires, or the server closes.
///
/// When the input ends or `interrupt` fires, the client sends a close (1000) and keeps
/// printing until the server's close arrives, at most `config.close_timeout`. The input
/// thread is not joined: it may be blocked reading a terminal, and it ends by itself at its
/// next line or end of input.
///
/// # Errors
/// [`Error::Url`], [`Error::Connect`] or [`Error::Handshake`] when no connection could be
/// made, with a message saying what to check.
pub fn run(
    config: &ClientConfig,
    input: impl BufRead + Send + 'static,
    output: impl Write + Send + 'static,
    interrupt: &Receiver<()>,
) -> Result<Ending> {
    let (reader, stream) = connect(config)?;
    info!(
        "connected to {}; type a message and press Enter, Ctrl-D to quit",
        config.url
    );
    let sent_close = Arc::new(AtomicBool::new(false));
    let writer = Arc::new(Mutex::new(WebSocket::from_raw_socket(
        stream.clone(),
        Role::Client,
        Some(ws_config()),
    )));

    let (ended_tx, ended) = crossbeam_channel::bounded(1);
    let closing = Arc::clone(&sent_close);
    let reader = thread::Builder::new()
        .name("socket reader".into())
        .spawn(move || {
            let _ = ended_tx.send(print_messages(reader, output, &closing));
        })
        .map_err(|source| Error::Spawn {
            what: "socket reader",
            source,
        })?;

    let (eof_tx, input_done) = crossbeam_channel::bounded(1);
    let sender = Arc::clone(&writer);
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            send_lines(input, &sender);
            let _ = eof_tx.send(());
        })
        .map_err(|source| Error::Spawn {
            what: "stdin",
            source,
        })?;

    let ending = select! {
        recv(ended) -> ending => ending.ok(),
        recv(input_done) -> _ => None,
        recv(interrupt) -> _ => None,
    };
    let ending = match ending {
        Some(ending) => ending,
        None => {
            sent_close.store(true, Ordering::Release);
            let close = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            if let Err(e) = writer.lock().close(Some(close)) {
                debug!("sending the close failed: {e}");
            }
            match ended.recv_timeout(config.close_timeout) {
                Ok(ending) => ending,
                Err(_) => Ending::Lost(format!(
                    "the server did not answer our close within {} s",
                    config.close_timeout.as_secs_f32()
                )),
            }
        }
    };
    stream.shutdown();
    if reader.join().is_err() {
        return Err(Error::Panicked {
            what: "socket reader",
        });
    }
    Ok(ending)
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

/// Open the TCP connection and do the handshake, each under the connect timeout.
fn connect(config: &ClientConfig) -> Result<(WebSocket<Shared>, Shared)> {
    let url = config.url.as_str();
    let target = Target::parse(url)?;
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|source| Error::Connect {
            url: url.to_string(),
            source,
        })?
        .collect();
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    let mut connected = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, config.connect_timeout) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(e) => last_error = e,
        }
    }
    let stream = connected.ok_or_else(|| Error::Connect {
        url: url.to_string(),
        source: last_error,
    })?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(config.connect_timeout))?;
    stream.set_write_timeout(Some(config.connect_timeout))?;
    let shared = Shared {
        stream: Arc::new(stream),
        write_lock: Arc::new(Mutex::new(())),
    };
    let (ws, _response) =
        tungstenite::client::client_with_config(url, shared.clone(), Some(ws_config()))
            .map_err(|e| handshake_error(url, e))?;
    shared.stream.set_read_timeout(None)?;
    shared.stream.set_write_timeout(None)?;
    Ok((ws, shared))
}

fn handshake_error(url: &str, error: HandshakeError<ClientHandshake<Shared>>) -> Error {
    let reason = match error {
        HandshakeError::Interrupted(_) => "the handshake was interrupted".to_string(),
        HandshakeError::Failure(WsError::Http(response)) => {
            let status = response.status();
            let body = response.body().as_deref().unwrap_or_default();
            let detail = refusal_detail(status.as_str(), &String::from_utf8_lossy(body));
            format!("the server refused the WebSocket handshake: HTTP {status}{detail}")
        }
        HandshakeError::Failure(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            "the server did not answer the handshake in time".to_string()
        }
        HandshakeError::Failure(e) => format!("the WebSocket handshake failed: {e}"),
    };
    Error::Handshake {
        url: url.to_string(),
        reason,
    }
}

/// What a refusal's body adds to its status line, as one short printable line: the body's
/// first line, without the status it may repeat, escaped and cut to 160 characters.
fn refusal_detail(status: &str, body: &str) -> String {
    const LONGEST: usize = 160;
    let line = body.trim().lines().next().unwrap_or("").trim();
    let line = match line.strip_prefix(status) {
        Some(rest) => rest.split_once(": ").map_or(rest, |(_, detail)| detail),
        None => line,
    };
    let line = printable(line.trim());
    match line.char_indices().nth(LONGEST) {
        _ if line.is_empty() => String::new(),
        Some((cut, _)) => format!(": {}…", &line[..cut]),
        None => format!(": {line}"),
    }
}

/// Where a `ws://` URL points.
struct Target {
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str) -> Result<Target> {
        let bad = |reason: &str| Error::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| bad("not a URL; expected ws://HOST:PORT"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => return Err(bad("wss:// (TLS) is not supported; use ws://")),
            _ => return Err(bad("the scheme must be ws://, as in ws://127.0.0.1:8080")),
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host; expected ws://HOST:PORT"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Target {
            host,
            port: uri.port_u16().unwrap_or(80),
        })
    }
}

/// The input thread: send each non-empty line as a text message until the input ends or
/// the connection fails.
fn send_lines(mut input: impl BufRead, writer: &Mutex<WebSocket<Shared>>) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                eprintln!("cannot read the input: {e}");
                return;
            }
        }
        let text = match std::str::from_utf8(&line) {
            Ok(text) => text.trim_end_matches(['\n', '\r']),
            Err(_) => {
                eprintln!("skipped a line that is not valid UTF-8");
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        if let Err(e) = writer.lock().send(Message::text(text)) {
            debug!("sending failed: {e}");
            return;
        }
    }
}

/// The socket thread: print every text message until a close frame or the end.
fn print_messages(
    mut ws: WebSocket<Shared>,
    mut output: impl Write,
    sent_close: &AtomicBool,
) -> Ending {
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let line = printable(&text);
                if let Err(e) = writeln!(output, "{line}").and_then(|()| output.flush()) {
                    return if e.kind() == io::ErrorKind::BrokenPipe {
                        Ending::OutputClosed
                    } else {
                        Ending::Lost(format!("cannot write the output: {e}"))
                    };
                }
            }
            Ok(Message::Binary(data)) => {
                eprintln!("(ignored a binary message of {} bytes)", data.len());
            }
            Ok(Message::Close(frame)) => {
                if !sent_close.load(Ordering::Acquire) {
                    // The server closed first: send the reply tungstenite has queued.
                    let _ = ws.flush();
                }
                return match frame {
                    Some(f) => Ending::Closed {
                        code: Some(f.code.into()),
                        reason: f.reason.to_string(),
                    },
                    None => Ending::Closed {
                        code: None,
                        reason: String::new(),
                    },
                };
            }
            Ok(_) => {}
            Err(WsError::Io(e)) if is_disconnect(&e) => return Ending::Lost(e.to_string()),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                return Ending::Lost("the server closed the connection".to_string());
            }
            Err(e) => return Ending::Lost(e.to_string()),
        }
    }
}

/// One TCP connection shared by the two threads: reads go straight to the socket; each
/// write (tungstenite writes whole frames) holds the lock until all of it is sent.
#[derive(Debug, Clone)]
struct Shared {
    stream: Arc<TcpStream>,
    write_lock: Arc<Mutex<()>>,
}

impl Shared {
    fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.stream).read(buf)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _guard = self.write_lock.lock();
        (&*self.stream).write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
