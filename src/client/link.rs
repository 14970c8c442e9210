//! One connection to the server: the TCP socket and handshake, the socket-reader thread,
//! and sending.
//!
//! The reader and the session's sends share one socket (one file descriptor); a lock
//! around each whole frame keeps the session's messages and the reader's automatic replies
//! (pongs, the answer to a close) from interleaving. Over TLS, the frame is encrypted
//! under that lock too, so records go out in the order they were sealed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::debug;
use parking_lot::Mutex;
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use super::Ending;
use super::confirm::Confirm;
use super::console::Sink;
use super::tls::Connector;
use super::url::Target;
use crate::config::{ClientConfig, later};
use crate::error::{Error, Result, is_disconnect, time_left};
use crate::message::{LONGEST_TEXT, printable};
use crate::tls::{Tls, Wire};

/// An open connection and its reader thread.
pub(crate) struct Link {
    writer: Mutex<WebSocket<Shared>>,
    shared: Shared,
    sent_close: Arc<AtomicBool>,
    /// A send made no progress for the keepalive time, and the socket was cut for it.
    stalled: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// How the reader ended; it sends once.
    pub(crate) ended: Receiver<Ending>,
}

impl Link {
    /// Connect and start the reader, which shows messages on `sink` and tells `confirm`
    /// about each (after telling it a new connection has begun).
    ///
    /// # Errors
    /// [`Error::Connect`] or [`Error::Handshake`], saying what to check.
    pub(crate) fn open(
        config: &ClientConfig,
        target: &Target,
        tls: Option<&Connector>,
        sink: Arc<dyn Sink>,
        confirm: Arc<Confirm>,
    ) -> Result<Link> {
        let (reader_ws, shared) = connect(config, target, tls)?;
        confirm.reset(shared.stream.local_addr()?);
        let sent_close = Arc::new(AtomicBool::new(false));
        let (ended_tx, ended) = crossbeam_channel::bounded(1);
        let stalled = Arc::new(AtomicBool::new(false));
        let watch = Watch {
            sent_close: Arc::clone(&sent_close),
            stalled: Arc::clone(&stalled),
            keepalive: config.keepalive,
        };
        let reader = thread::Builder::new()
            .name("socket reader".into())
            .spawn(move || {
                let ending = read_messages(reader_ws, &*sink, &confirm, &watch);
                let _ = ended_tx.send(ending);
            })
            .map_err(|source| Error::Spawn {
                what: "socket reader",
                source,
            })?;
        let writer = WebSocket::from_raw_socket(shared.clone(), Role::Client, Some(ws_config()));
        Ok(Link {
            writer: Mutex::new(writer),
            shared,
            sent_close,
            stalled,
            reader: Some(reader),
            ended,
        })
    }

    /// Send one text message.
    ///
    /// # Errors
    /// The connection failed, or the server took none of it for the keepalive time; the
    /// socket is then cut, and the reader says how the connection ended.
    pub(crate) fn send(&self, text: &str) -> Result<()> {
        let sent = self.writer.lock().send(Message::text(text));
        if let Err(WsError::Io(e)) = &sent
            && matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        {
            self.stalled.store(true, Ordering::Release);
            let _ = self.shared.stream.shutdown(Shutdown::Both);
        }
        Ok(sent?)
    }

    /// Send our close (1000), unless a close went out already (the reader's answer to the
    /// server's); the reader goes on until the server's answer.
    pub(crate) fn close(&self) {
        if self.sent_close.swap(true, Ordering::AcqRel) {
            return;
        }
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        if let Err(e) = self.writer.lock().close(Some(close)) {
            debug!("sending the close failed: {e}");
        }
    }
}

impl Drop for Link {
    /// Cut the socket and join the reader, which ends with it: at once, unless it is stuck
    /// writing to an output nobody reads (`client | sleep 1000`). Such a reader is left
    /// to end with the process rather than hold the exit forever.
    fn drop(&mut self) {
        let _ = self.shared.stream.shutdown(Shutdown::Both);
        let Some(reader) = self.reader.take() else {
            return;
        };
        // The reader's sender goes away as it ends: wait for that, not in a polling loop.
        let deadline = Instant::now() + READER_GRACE;
        let ended = loop {
            match self.ended.recv_deadline(deadline) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break true,
                Err(RecvTimeoutError::Timeout) => break false,
            }
        };
        if ended && reader.join().is_err() {
            let _ = writeln!(
                io::stderr(),
                "client: the socket reader panicked (this is a bug)"
            );
        }
    }
}

/// How long a closing link waits for its reader to end.
const READER_GRACE: Duration = Duration::from_secs(1);

/// Messages up to the longest a server of ours relays, not tungstenite's 64 MiB: a message
/// is shown as one line, and escaping can make it six times longer.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(LONGEST_TEXT))
        .max_frame_size(Some(LONGEST_TEXT))
}

/// Open the TCP connection (each address under the connect timeout) and do the handshakes
/// (TLS if `tls`, then WebSocket), both under one more: a server that trickles its answer
/// cannot hold the client longer. Afterwards the socket's timeouts are the keepalive's.
fn connect(
    config: &ClientConfig,
    target: &Target,
    tls: Option<&Connector>,
) -> Result<(WebSocket<Shared>, Shared)> {
    let url = config.url.as_str();
    let connect_error = |source| Error::Connect {
        url: url.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(connect_error)?
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
    let stream = connected.ok_or_else(|| connect_error(last_error))?;
    stream.set_nodelay(true)?;
    let deadline = later(Instant::now(), config.connect_timeout);
    let tls = match tls {
        Some(connector) => {
            let started = connector
                .start(&target.host, &stream, deadline)
                .map_err(|reason| Error::Handshake {
                    url: url.to_string(),
                    reason,
                })?;
            Some(Arc::new(started))
        }
        None => None,
    };
    let shared = Shared {
        stream: Arc::new(stream),
        tls,
        write_lock: Arc::new(Mutex::new(())),
        deadline: None,
    };
    let handshaking = Shared {
        deadline: Some(deadline),
        ..shared.clone()
    };
    let (mut ws, _response) = tungstenite::client::client_with_config(
        target.url.as_str(),
        handshaking,
        Some(ws_config()),
    )
    .map_err(|e| handshake_error(url, e))?;
    ws.get_mut().deadline = None;
    shared.stream.set_read_timeout(Some(config.keepalive))?;
    shared.stream.set_write_timeout(Some(config.keepalive))?;
    Ok((ws, shared))
}

fn handshake_error(url: &str, error: HandshakeError<ClientHandshake<Shared>>) -> Error {
    let reason = match error {
        // The socket blocks, with a timeout: a read that would block has timed out.
        HandshakeError::Interrupted(_) => {
            "the server did not answer the handshake in time".to_string()
        }
        HandshakeError::Failure(WsError::Http(response)) => {
            let status = response.status();
            let body = response.body().as_deref().unwrap_or_default();
            let detail = refusal_detail(status.as_str(), &String::from_utf8_lossy(body));
            format!("the server refused the WebSocket handshake: HTTP {status}{detail}")
        }
        HandshakeError::Failure(WsError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
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

/// What the reader shares with the link, and the keepalive it keeps.
struct Watch {
    sent_close: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    keepalive: Duration,
}

/// The socket thread: show every text message until a close frame or the end.
fn read_messages(
    ws: WebSocket<Shared>,
    sink: &dyn Sink,
    confirm: &Confirm,
    watch: &Watch,
) -> Ending {
    match read_until_end(ws, sink, confirm, watch) {
        Ending::Lost(_) if watch.stalled.load(Ordering::Acquire) => Ending::Lost(format!(
            "the server took none of our data for {} s",
            watch.keepalive.as_secs()
        )),
        ending => ending,
    }
}

/// The socket's read timeout is the keepalive: after one of silence the reader pings the
/// server (unless we closed, when the session's close timeout is the limit), after a
/// second it gives up.
fn read_until_end(
    mut ws: WebSocket<Shared>,
    sink: &dyn Sink,
    confirm: &Confirm,
    watch: &Watch,
) -> Ending {
    let sent_close = &*watch.sent_close;
    let mut pinged = false;
    loop {
        let read = ws.read();
        if read.is_ok() {
            pinged = false;
        }
        match read {
            Ok(Message::Text(text)) => {
                let own = confirm.observe(&text);
                if let Err(e) = sink.message(&text, own) {
                    return if e.kind() == io::ErrorKind::BrokenPipe {
                        Ending::OutputClosed
                    } else {
                        Ending::OutputFailed(e.to_string())
                    };
                }
            }
            Ok(Message::Binary(data)) => {
                sink.status(&format!("ignored a binary message of {} bytes", data.len()));
            }
            Ok(Message::Close(frame)) => {
                if !sent_close.swap(true, Ordering::AcqRel) {
                    // The server closed first: send the reply tungstenite has queued.
                    let _ = ws.flush();
                }
                return Ending::Closed {
                    code: frame.as_ref().map(|f| f.code.into()),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            Ok(_) => {}
            Err(WsError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if pinged {
                    return Ending::Lost(format!(
                        "the server sent nothing for {} s, not even an answer to a ping",
                        watch.keepalive.as_secs() * 2
                    ));
                }
                if !sent_close.load(Ordering::Acquire) {
                    if let Err(e) = ws.send(Message::Ping(Default::default())) {
                        return Ending::Lost(format!("cannot ping the server: {e}"));
                    }
                    pinged = true;
                }
            }
            Err(WsError::Io(e)) if is_disconnect(&e) => return Ending::Lost(e.to_string()),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                return Ending::Lost("the server closed the connection".to_string());
            }
            Err(e) => return Ending::Lost(e.to_string()),
        }
    }
}

/// One TCP connection shared by the two threads: reads go straight to the socket (or
/// through TLS); each write (tungstenite writes whole frames) holds the lock until all of
/// it is sent.
#[derive(Debug, Clone)]
struct Shared {
    stream: Arc<TcpStream>,
    tls: Option<Arc<Tls>>,
    write_lock: Arc<Mutex<()>>,
    /// During the handshake, when it must be over: each read and write waits only as long
    /// as is left.
    deadline: Option<Instant>,
}

impl Shared {
    fn wire(&self) -> Wire<'_> {
        Wire {
            sock: &self.stream,
            tls: self.tls.as_deref(),
        }
    }
}

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            self.stream.set_read_timeout(Some(time_left(deadline)?))?;
        }
        self.wire().read(buf)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _guard = self.write_lock.lock();
        if let Some(deadline) = self.deadline {
            self.stream.set_write_timeout(Some(time_left(deadline)?))?;
        }
        self.wire().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_one_short_escaped_line_without_the_status_twice() {
        let detail = refusal_detail("503", "503 Service Unavailable: the chat is full\n");
        assert_eq!(detail, ": the chat is full");
        assert_eq!(refusal_detail("404", ""), "");
        let long = refusal_detail("400", &format!("x\u{1b}[2J{}", "y".repeat(500)));
        assert!(
            long.starts_with(": x\\u{1b}[2J") && long.ends_with('…'),
            "{long}"
        );
        assert!(long.chars().count() < 170);
    }
}
