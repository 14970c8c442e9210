//! One connection to the server: the TCP socket and handshake, the socket-reader thread,
//! and sending.
//!
//! The reader and the session's sends share one socket (one file descriptor); a lock
//! around each whole frame keeps the session's messages and the reader's own frames
//! (pongs, keepalive pings, the answer to a close) from interleaving. Over TLS, the frame
//! is encrypted under that lock too, so records go out in the order they were sealed.
//!
//! The keepalive (see [`ClientConfig::keepalive`]) watches both directions: the reader
//! pings a server silent that long and gives up after as long again, cutting the socket
//! so that a send blocked meanwhile wakes up; a send that makes no progress that long
//! waits on while the server is heard from (ours reads a client over its `--rate` slowly,
//! which is no fault) and gives up once the server has been silent that long too. Data
//! waiting unread counts as heard only for a send of the session's, while the reader
//! reads: the reader's own stuck write (a ping, a pong) cannot read it.

use std::hash::{BuildHasher, RandomState};
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::debug;
use parking_lot::Mutex;
use socket2::SockRef;
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message, error::ProtocolError};

use super::Ending;
use super::confirm::Confirm;
use super::console::Sink;
use super::tls::Connector;
use super::url::Target;
use crate::config::{ClientConfig, later};
use crate::error::{Error, Result, is_disconnect, is_timeout, time_left};
use crate::message::{LONGEST_TEXT, printable};
use crate::tls::{Tls, Wire};

/// An open connection and its reader thread.
pub(crate) struct Link {
    writer: Mutex<WebSocket<Shared>>,
    shared: Shared,
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
        let (ended_tx, ended) = crossbeam_channel::bounded(1);
        let reader = thread::Builder::new()
            .name("socket reader".into())
            .spawn(move || {
                let ending = read_messages(reader_ws, &*sink, &confirm);
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
            reader: Some(reader),
            ended,
        })
    }

    /// Send one text message.
    ///
    /// # Errors
    /// The connection failed, or stalled (see the module's notes); the reader says how the
    /// connection ended.
    pub(crate) fn send(&self, text: &str) -> Result<()> {
        self.writer.lock().send(Message::text(text))?;
        Ok(())
    }

    /// Send our close (1000), unless a close went out already (the reader's answer to the
    /// server's); the reader goes on until the server's answer.
    pub(crate) fn close(&self) {
        if self.shared.live.sent_close.swap(true, Ordering::AcqRel) {
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
    let keepalive = Some(config.keepalive).filter(|k| !k.is_zero());
    let shared = Shared {
        stream: Arc::new(stream),
        tls,
        write_lock: Arc::new(Mutex::new(())),
        deadline: None,
        reader: false,
        live: Arc::new(Liveness::new(Instant::now(), keepalive)),
    };
    // The WebSocket made on this one becomes the reader's.
    let handshaking = Shared {
        deadline: Some(deadline),
        reader: true,
        ..shared.clone()
    };
    let (mut ws, _response) = tungstenite::client::client_with_config(
        target.url.as_str(),
        handshaking,
        Some(ws_config()),
    )
    .map_err(|e| handshake_error(url, e))?;
    ws.get_mut().deadline = None;
    shared.stream.set_read_timeout(keepalive)?;
    shared.stream.set_write_timeout(keepalive)?;
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
        HandshakeError::Failure(WsError::Io(e)) if is_timeout(&e) => {
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

/// The socket thread: show every text message until a close frame or the end.
fn read_messages(ws: WebSocket<Shared>, sink: &dyn Sink, confirm: &Confirm) -> Ending {
    let live = Arc::clone(&ws.get_ref().live);
    let stream = Arc::clone(&ws.get_ref().stream);
    let ending = read_until_end(ws, sink, confirm);
    live.reading.store(false, Ordering::Release);
    match ending {
        Ending::Lost(why) => {
            // Nobody reads any more: a send stuck meanwhile must not wait on.
            let _ = stream.shutdown(Shutdown::Both);
            if live.stalled.load(Ordering::Acquire) {
                return Ending::Lost(format!(
                    "the server took none of our data for {} s, and we heard nothing from it",
                    live.keepalive.unwrap_or_default().as_secs()
                ));
            }
            Ending::Lost(why)
        }
        ending => ending,
    }
}

/// The socket's read timeout is the keepalive: after one of silence the reader pings the
/// server (unless we closed, when the session's close timeout is the limit), after a
/// second it gives up, and cuts the socket so that a send stuck meanwhile ends too.
fn read_until_end(mut ws: WebSocket<Shared>, sink: &dyn Sink, confirm: &Confirm) -> Ending {
    let live = Arc::clone(&ws.get_ref().live);
    // When the last ping went out, as when the server was last heard from then.
    let mut pinged: Option<u64> = None;
    loop {
        match ws.read() {
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
                if !live.sent_close.swap(true, Ordering::AcqRel) {
                    // The server closed first: send the reply tungstenite has queued, even
                    // if that means waiting for the lock; no message may follow it.
                    live.reading.store(false, Ordering::Release);
                    live.answered.store(true, Ordering::Release);
                    let _ = ws.flush();
                }
                return Ending::Closed {
                    code: frame.as_ref().map(|f| f.code.into()),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            Ok(_) => {}
            Err(WsError::Io(e)) if is_timeout(&e) => {
                // Nothing at all since the ping, a whole keepalive ago (a long message
                // trickling in is no silence, though it has not ended yet: ping again).
                let heard = live.heard_ms.load(Ordering::Relaxed);
                if pinged == Some(heard) {
                    return Ending::Lost(format!(
                        "the server sent nothing for {} s, not even an answer to a ping",
                        live.keepalive.unwrap_or_default().as_secs() * 2
                    ));
                }
                match ws.get_ref().ping_unless_closed() {
                    Ok(true) => pinged = Some(heard),
                    Ok(false) => {}
                    Err(e) => return Ending::Lost(format!("cannot ping the server: {e}")),
                }
            }
            Err(WsError::Io(e)) if is_disconnect(&e) => return Ending::Lost(e.to_string()),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                return Ending::Lost("the server closed the connection".to_string());
            }
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return Ending::Lost(
                    "the server closed the connection without a close frame".to_string(),
                );
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
    live: Arc<Liveness>,
    /// The reader's. Its writes (pongs) do not wait for the lock while a send holds it,
    /// but say `WouldBlock`, which tungstenite takes as "try again after the next read",
    /// so that the reader goes on reading while a send waits for a slow server; all but
    /// its answer to the server's close, which must go out.
    reader: bool,
}

/// What the keepalive goes by, shared by the reader and the sends.
#[derive(Debug)]
struct Liveness {
    born: Instant,
    /// When data last came from the server, in milliseconds after `born`.
    heard_ms: AtomicU64,
    /// A send gave up (see the module's notes), and the socket was cut for it.
    stalled: AtomicBool,
    /// A close has gone out, ours or our answer to the server's: nothing may follow it.
    sent_close: AtomicBool,
    /// The reader is reading, and will read what the server sends; not once it has ended,
    /// or while it waits to answer the server's close.
    reading: AtomicBool,
    /// The reader answered the server's close: no message may follow it.
    answered: AtomicBool,
    /// `None`: no keepalive, no timeouts.
    keepalive: Option<Duration>,
}

impl Liveness {
    /// A link's state at its start, `born`: nothing heard, sent or stalled yet, reading.
    fn new(born: Instant, keepalive: Option<Duration>) -> Self {
        Liveness {
            born,
            heard_ms: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            sent_close: AtomicBool::new(false),
            reading: AtomicBool::new(true),
            answered: AtomicBool::new(false),
            keepalive,
        }
    }

    fn heard(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heard_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let heard = Duration::from_millis(self.heard_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(heard)
    }
}

impl Shared {
    fn wire(&self) -> Wire<'_> {
        Wire {
            sock: &self.stream,
            tls: self.tls.as_deref(),
        }
    }

    /// A keepalive ping (empty, masked as a client's frames must be), unless a close went
    /// out already: checked under the write lock, so that no ping can follow our close.
    /// Not while a send holds the lock: that send waits for the server itself. Returns
    /// whether a ping went out.
    fn ping_unless_closed(&self) -> io::Result<bool> {
        let Some(_guard) = self.write_lock.try_lock() else {
            return Ok(false);
        };
        if self.live.sent_close.load(Ordering::Acquire) {
            return Ok(false);
        }
        let mask = RandomState::new().hash_one(Instant::now()).to_le_bytes();
        self.send_patiently(&[0x89, 0x80, mask[0], mask[1], mask[2], mask[3]])?;
        Ok(true)
    }

    /// Send all of `bytes` (sealed first, over TLS), under the write lock. A send that
    /// makes no progress for the keepalive time waits on while the server is heard from
    /// (data came within that time, or, for a send not the reader's, waits unread while
    /// the reader reads), and gives up once it has been silent as long: the socket is then
    /// cut, so that the reader ends too, and the link counts as stalled.
    fn send_patiently(&self, bytes: &[u8]) -> io::Result<()> {
        let sealed;
        let mut rest = match &self.tls {
            Some(tls) => {
                sealed = tls.seal(&mut [IoSlice::new(bytes)])?;
                &sealed[..]
            }
            None => bytes,
        };
        while !rest.is_empty() {
            match (&*self.stream).write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    // Unread data says the server is alive only while the reader will read it:
                    // not once it has ended, nor while the reader itself waits here (its ping,
                    // a pong, its answer to a close), or it would wait on it forever.
                    let patience = self.live.keepalive.unwrap_or(Duration::MAX);
                    let reading = !self.reader && self.live.reading.load(Ordering::Acquire);
                    if self.live.silent_for() < patience || (reading && has_unread(&self.stream)) {
                        continue;
                    }
                    self.live.stalled.store(true, Ordering::Release);
                    let _ = self.stream.shutdown(Shutdown::Both);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Whether `stream` has data waiting to be read (not its end, which says nothing of the
/// server being alive).
fn has_unread(stream: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::uninit()];
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    matches!(SockRef::from(stream).recv_with_flags(&mut byte, flags), Ok(n) if n > 0)
}

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            self.stream.set_read_timeout(Some(time_left(deadline)?))?;
        }
        let read = self.wire().read(buf)?;
        if read > 0 {
            self.live.heard();
        }
        Ok(read)
    }
}

impl Write for Shared {
    /// tungstenite writes whole frames; each goes out whole under the write lock.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let answered = self.live.answered.load(Ordering::Acquire);
        let _guard = match self.reader && !answered {
            true => self
                .write_lock
                .try_lock()
                .ok_or(io::ErrorKind::WouldBlock)?,
            false => self.write_lock.lock(),
        };
        if !self.reader && self.live.answered.load(Ordering::Acquire) {
            // The reader answered the server's close while this waited for the lock.
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if let Some(deadline) = self.deadline {
            // The handshake: a timeout ends it, so there is nothing to resume.
            self.stream.set_write_timeout(Some(time_left(deadline)?))?;
            self.wire().write_all(buf)?;
        } else {
            self.send_patiently(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader's own write (a ping, say) into a full socket, while data from the server
    /// waits unread: it is the reader's to read, and the reader is stuck here, so it must
    /// not count as the server being heard from.
    #[test]
    fn the_readers_own_stuck_write_gives_up_though_data_waits_unread() {
        let (shared, _server) = silent_pair(true, b"x");
        assert_eq!(
            send_stuck(&shared, WAIT),
            Ok(true),
            "the stuck write gives up"
        );
        assert!(shared.live.stalled.load(Ordering::Acquire));
    }

    /// The sender's write into a socket a silent server never reads: after the keepalive
    /// time with nothing heard it gives up, and the link counts as stalled (what the
    /// client then says: the server took none of our data).
    #[test]
    fn a_send_stuck_with_nothing_heard_gives_up_after_the_keepalive() {
        let (shared, _server) = silent_pair(false, b"");
        assert_eq!(
            send_stuck(&shared, WAIT),
            Ok(true),
            "the stuck send gives up"
        );
        assert!(shared.live.stalled.load(Ordering::Acquire));
    }

    /// The sender's write stuck as long, but with data from the server waiting for the
    /// reader, which reads on: the server is alive, so the send waits (five keepalives
    /// here) rather than give up.
    #[test]
    fn a_stuck_send_waits_while_data_waits_for_the_reader() {
        let (shared, _server) = silent_pair(false, b"x");
        assert_eq!(
            send_stuck(&shared, KEEPALIVE * 5),
            Err(crossbeam_channel::RecvTimeoutError::Timeout),
            "still waiting"
        );
        assert!(!shared.live.stalled.load(Ordering::Acquire));
    }

    const KEEPALIVE: Duration = Duration::from_millis(200);
    const WAIT: Duration = Duration::from_secs(10);

    /// A link (the reader's side or the sender's) to a server that never reads and has
    /// sent `said`, last heard from a second ago, longer than the keepalive; and the
    /// server's socket.
    fn silent_pair(reader: bool, said: &[u8]) -> (Shared, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        // Small on both sides, so that a send is stuck after a few kilobytes, however
        // loaded the machine (loopback lets a send buffer grow to megabytes first).
        SockRef::from(&server)
            .set_recv_buffer_size(4096)
            .expect("small window");
        SockRef::from(&client)
            .set_send_buffer_size(4096)
            .expect("small send buffer");
        (&server).write_all(said).expect("said");
        client.set_write_timeout(Some(KEEPALIVE)).expect("timeout");
        (link(client, KEEPALIVE, reader), server)
    }

    /// One side of a link over `client`, last heard from when it was born a second ago.
    fn link(client: TcpStream, keepalive: Duration, reader: bool) -> Shared {
        let born = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .expect("a second ago");
        Shared {
            stream: Arc::new(client),
            tls: None,
            write_lock: Arc::new(Mutex::new(())),
            deadline: None,
            live: Arc::new(Liveness::new(born, Some(keepalive))),
            reader,
        }
    }

    /// Send 64 MiB, more than any socket buffers, on a thread: whether the send failed,
    /// or a timeout when it had not ended `within`. The socket is shut down after.
    fn send_stuck(
        shared: &Shared,
        within: Duration,
    ) -> Result<bool, crossbeam_channel::RecvTimeoutError> {
        let (result_tx, result) = crossbeam_channel::bounded(1);
        let writer = {
            let shared = shared.clone();
            thread::spawn(move || {
                let _ = result_tx.send(shared.send_patiently(&vec![0u8; 64 << 20]).is_err());
            })
        };
        let gave_up = result.recv_timeout(within);
        let _ = shared.stream.shutdown(Shutdown::Both);
        writer.join().expect("writer");
        gave_up
    }

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
