//! A connection thread: the handshake, then reading one client's frames until it leaves.
//!
//! The thread only ever reads its socket. Everything the server writes, including pongs
//! and close frames, goes through the dispatcher (see [`peer`](super::peer)), so that one writer
//! at a time owns the socket, frames are never interleaved, and a close never overtakes
//! the messages queued before it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message, error::ProtocolError};

use super::admission::{Admission, Pending, Slot};
use super::backplane::Backplane;
use super::flood::{Bucket, FRAMES_PER_TOKEN, FrameCounter};
use super::handshake::{self, Outcome};
use super::inbox::{Event, Events};
use super::metrics::{Closed, Metrics, Refused};
use super::peer::{Backlogs, Peer, PeerOutlet};
use super::tls::{Refusal, ServerTls};
use super::web::Site;
use crate::config::{ServerConfig, later};
use crate::error::is_disconnect;
use crate::message::{self, Frame, printable};
use crate::tls::Wire;

/// Bytes tungstenite reads per system call, allocated per client and zero-filled before
/// every read, so all of it is resident. Measured with 2000 idle clients: 4 KiB makes 15.4
/// KiB of server memory per client, 2 KiB makes 13.4; 4 KiB halves the reads a 64 KiB
/// message takes.
const READ_BUFFER: usize = 4 * 1024;

/// How long a refused HTTP client may take to read our answer and hang up.
const LINGER: Duration = Duration::from_secs(2);

/// What every connection thread shares with the server.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) config: ServerConfig,
    pub(crate) events: Events<PeerOutlet>,
    pub(crate) admission: Arc<Admission>,
    /// The chat page, unless it is turned off.
    pub(crate) site: Option<Site>,
    /// Where the clients' messages go.
    pub(crate) backplane: Backplane,
    pub(crate) metrics: Arc<Metrics>,
    /// What the clients' backlogs take, against `--max-writers` and `--max-tls-backlog`.
    pub(crate) backlogs: Arc<Backlogs>,
    /// Set when shutdown begins: `/healthz` says so.
    pub(crate) stopping: AtomicBool,
    /// The certificate, when the port speaks TLS.
    pub(crate) tls: Option<ServerTls>,
}

/// The body of a connection thread. `pending` is the connection's room for its handshake,
/// held until its request has been read and found a valid upgrade, or the connection ends
/// (including the linger after an HTTP answer, which also holds a thread).
pub(crate) fn run(peer: &Arc<Peer>, context: &Context, pending: Pending) {
    let config = &context.config;
    let deadline = later(Instant::now(), config.handshake_timeout);
    if let Some(tls) = &context.tls {
        match tls.accept(&peer.stream, deadline) {
            Ok(started) => {
                let _ = peer.tls.set(started);
            }
            Err(refusal) => {
                refused_tls(peer, context, refusal);
                let _ = peer.stream.shutdown(Shutdown::Both);
                return;
            }
        }
    }
    match handshake::handshake(peer.wire(), deadline, context) {
        Ok(Outcome::Upgraded {
            leftover,
            slot,
            answer,
        }) => {
            drop(pending);
            let session = Session {
                peer,
                context,
                joined: false,
                _slot: slot,
            };
            // The session shuts the socket down itself as it ends, whichever way.
            session.run(leftover, answer);
            return;
        }
        Ok(Outcome::Answered { status, detail }) => {
            let detail = printable(&detail);
            if status < 400 {
                info!("{} left after HTTP {status}: {detail}", peer.addr);
            } else {
                // A missing page (404) or an unhealthy /healthz (503) is no refused
                // handshake; a full chat is counted where the upgrade is refused.
                match status {
                    403 => context.metrics.refused(Refused::Origin),
                    404 | 503 => {}
                    _ => context.metrics.refused(Refused::BadRequest),
                }
                info!("{} refused with HTTP {status}: {detail}", peer.addr);
            }
            close_gracefully(&peer.stream, LINGER);
        }
        _ if peer.is_cut() => info!(
            "{} was cut during its handshake to make room for others",
            peer.addr
        ),
        Ok(Outcome::Vanished) => info!("{} left before sending a request", peer.addr),
        Ok(Outcome::TlsOnPlaintext) => {
            context.metrics.refused(Refused::Tls);
            info!(
                "{} began a TLS handshake, but this port speaks plaintext: it should use \
                 ws:// or http://, or the server --tls-cert and --tls-key; closed",
                peer.addr
            );
            // The rest of its ClientHello is unread: closing now would reset the
            // connection and could wipe out the alert.
            close_gracefully(&peer.stream, LINGER);
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            context.metrics.refused(Refused::Timeout);
            info!(
                "{} did not complete the handshake within {} s; closed",
                peer.addr,
                config.handshake_timeout.as_secs_f32()
            );
        }
        Err(e) => info!("{} left during the handshake: {e}", peer.addr),
    }
    let _ = peer.stream.shutdown(Shutdown::Both);
}

/// Log and count a connection to the TLS port that did not become a TLS connection.
fn refused_tls(peer: &Peer, context: &Context, refusal: Refusal) {
    let addr = peer.addr;
    match refusal {
        _ if peer.is_cut() => info!("{addr} was cut during its handshake to make room for others"),
        Refusal::Plaintext => {
            context.metrics.refused(Refused::Tls);
            info!("{addr} spoke plain HTTP to this TLS port; answered 400: use https:// or wss://");
            close_gracefully(&peer.stream, LINGER);
        }
        Refusal::Failed(e) if e.kind() == io::ErrorKind::TimedOut => {
            context.metrics.refused(Refused::Timeout);
            info!(
                "{addr} did not complete the TLS handshake within {} s; closed",
                context.config.handshake_timeout.as_secs_f32()
            );
        }
        Refusal::Failed(e) if is_disconnect(&e) => {
            info!("{addr} left during the TLS handshake");
        }
        Refusal::Failed(e) => {
            context.metrics.refused(Refused::Tls);
            info!("{addr}: the TLS handshake failed: {e}");
        }
    }
}

/// How a session ended, and why, for the log.
enum End {
    /// The client closed; answer with `reply` once everything queued before it is out.
    Closed { reply: Frame, why: String },
    /// The client broke a rule; fail the connection with `close`.
    Failed { close: Frame, why: String },
    /// The connection is gone; there is no one to tell.
    Dropped { why: String },
}

/// A client past the handshake. Dropping it, even while unwinding from a panic, tells the
/// dispatcher the client left and gives back its slot, so no failure leaks a client.
struct Session<'a> {
    peer: &'a Arc<Peer>,
    context: &'a Context,
    joined: bool,
    _slot: Slot<'a>,
}

impl<'a> Session<'a> {
    /// Never inlined into the connection thread's body, whose frame sits under the
    /// handshake's: keeping the two apart keeps an idle client's thread to two stack pages.
    #[inline(never)]
    fn run(mut self, leftover: Vec<u8>, answer: Frame) {
        let peer = self.peer;
        // From here on, reads wait for the client as long as keepalive allows (whatever
        // timeout the socket had: the listening socket's, which it inherits, or the
        // handshake's), and a backlog writer's blocked write gives up after --write-timeout
        // without progress: the write timeout the socket inherits (see `listen`), unless
        // the TLS handshake set its own.
        let cleared = peer.stream.set_read_timeout(None);
        let timeouts = if peer.tls.get().is_some() {
            cleared.and(
                peer.stream
                    .set_write_timeout(self.context.config.socket_write_timeout()),
            )
        } else {
            cleared
        };
        if let Err(e) = timeouts {
            debug!("{}: cannot set the socket timeouts: {e}", peer.addr);
            peer.abort();
            return;
        }
        peer.heard();
        let outlet = PeerOutlet::new(
            Arc::clone(peer),
            self.context.config.queue,
            Arc::clone(&self.context.backlogs),
        );
        if self
            .context
            .events
            .send(Event::Join(outlet, answer))
            .is_err()
        {
            peer.abort();
            return;
        }
        self.joined = true;
        info!("{} joined", peer.addr);

        let end = self.read_until_end(self.websocket(leftover), &message::sender_tag(peer.addr));
        let answering_ours = peer.is_closing();
        self.joined = false;
        if !answering_ours && !peer.is_cut() {
            self.context.metrics.closed(match end {
                End::Closed { .. } => Closed::Client,
                End::Failed { .. } => Closed::Protocol,
                End::Dropped { .. } => Closed::Dropped,
            });
        }
        let (close, failed, why) = match end {
            End::Closed { reply, why } if answering_ours => (
                Some(reply),
                false,
                why.replacen(
                    "closed by the client",
                    "closed by the server; the client answered",
                    1,
                ),
            ),
            End::Closed { reply, why } => (Some(reply), false, why),
            End::Failed { close, why } => (Some(close), true, why),
            End::Dropped { why } => (None, false, why),
        };
        let sends_close = close.is_some();
        let _ = self.context.events.send(Event::Leave(peer.id, close));
        if sends_close || answering_ours {
            peer.wait_close_written(self.context.config.close_timeout);
        }
        if failed && !answering_ours {
            // Let the client read our close and answer before the socket goes away.
            close_gracefully(&peer.stream, self.context.config.close_timeout);
        }
        peer.finish();
        info!("{} left: {why}", peer.addr);
    }

    /// Never inlined, like what it calls for each message and each error: the read loop's
    /// frame sits under every blocking read, and kept apart it holds only what reading
    /// needs, which keeps an idle client's thread to two resident stack pages.
    #[inline(never)]
    fn read_until_end(&self, mut ws: Box<WebSocket<Inbound<'a>>>, tag: &str) -> End {
        loop {
            let end = match ws.read() {
                Ok(message) => self.take(&mut ws, message, tag),
                Err(e) => Some(self.failed(e)),
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Act on one message from the client: `None` to read on.
    #[inline(never)]
    fn take(&self, ws: &mut WebSocket<Inbound<'a>>, message: Message, tag: &str) -> Option<End> {
        let cut = || {
            Some(End::Dropped {
                why: "cut by the server".to_string(),
            })
        };
        if self.peer.is_cut() {
            return cut();
        }
        self.peer.heard();
        // Every message a client can send costs a token, pongs too: unasked-for pongs
        // cost the server as much to read as anything else.
        let counts = !matches!(message, Message::Close(_));
        if counts && !ws.get_mut().flood.hold_back() {
            return cut();
        }
        let stopped = || {
            Some(End::Dropped {
                why: "the server stopped".to_string(),
            })
        };
        let event = match message {
            Message::Text(text) => {
                debug!("{} says {:?}", self.peer.addr, text.as_str());
                self.context.metrics.received.inc();
                let published =
                    self.context
                        .backplane
                        .publish(&self.context.events, tag, &text, |wait| {
                            self.peer.heard_until(wait)
                        });
                return if published.is_err() { stopped() } else { None };
            }
            Message::Ping(payload) => Event::Pong(self.peer.id, message::pong(&payload)),
            Message::Pong(_) | Message::Frame(_) => return None,
            Message::Close(frame) => return Some(closed_by_client(frame)),
            Message::Binary(_) => {
                return Some(fail(
                    CloseCode::Unsupported,
                    "binary messages are not supported; send text",
                    "sent a binary message",
                ));
            }
        };
        if self.context.events.send(event).is_err() {
            return stopped();
        }
        None
    }

    /// The client's side of the WebSocket, on the heap and built in a frame of its own:
    /// on the stack, under every blocking read, its few hundred bytes pushed each idle
    /// client's thread into a third resident stack page (4 KiB more per client).
    #[inline(never)]
    fn websocket(&self, leftover: Vec<u8>) -> Box<WebSocket<Inbound<'a>>> {
        let config = &self.context.config;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_message_size));
        let mut counter = FrameCounter::default();
        let inbound = Inbound {
            wire: self.peer.wire(),
            flood: Flood {
                bucket: Bucket::new(config.rate, config.burst, Instant::now()),
                told: false,
                peer: self.peer,
                rate: config.rate,
                // The frames the handshake read past the request, paid for with the next.
                unpaid: counter.feed(&leftover),
            },
            counter,
        };
        Box::new(WebSocket::from_partially_read(
            inbound,
            leftover,
            Role::Server,
            Some(ws_config),
        ))
    }

    #[inline(never)]
    fn failed(&self, error: WsError) -> End {
        let limit = self.context.config.max_message_size;
        match error {
            WsError::Utf8(_) => fail(
                CloseCode::Invalid,
                "text must be valid UTF-8",
                "sent invalid UTF-8",
            ),
            WsError::Capacity(e) => fail(
                CloseCode::Size,
                &format!("message too big: the limit is {limit} bytes"),
                &format!("sent a message over the limit ({e})"),
            ),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Dropped {
                why: "connection dropped without a close".to_string(),
            },
            WsError::Protocol(e) => fail(
                CloseCode::Protocol,
                &format!("protocol error: {e}"),
                "broke the protocol",
            ),
            WsError::Io(e) if is_disconnect(&e) => End::Dropped {
                why: format!("connection dropped ({e})"),
            },
            WsError::Io(e) => End::Dropped {
                why: format!("connection failed: {e}"),
            },
            other => fail(
                CloseCode::Protocol,
                &other.to_string(),
                "broke the protocol",
            ),
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if self.joined {
            let _ = self.context.events.send(Event::Leave(self.peer.id, None));
            self.peer.finish();
        }
    }
}

/// A session's flood control: its bucket (none with `--rate 0`), whether the log has been
/// told the client is being slowed, and the frames not paid for yet.
struct Flood<'a> {
    bucket: Option<Bucket>,
    told: bool,
    peer: &'a Peer,
    rate: u32,
    unpaid: u64,
}

impl Flood<'_> {
    /// When the client is over its rate, wait before handling its message and reading
    /// on, so that TCP slows the client down. The wait is not its silence. Returns
    /// whether to go on: not if the server cut the client meanwhile.
    fn hold_back(&mut self) -> bool {
        let Some(bucket) = &mut self.bucket else {
            return true;
        };
        let wait = bucket.take(Instant::now());
        if wait.is_zero() {
            return true;
        }
        if !self.told {
            self.told = true;
            info!(
                "{} sends more than {} messages a second; reading it more slowly (--rate)",
                self.peer.addr, self.rate
            );
        }
        self.peer.heard_until(wait);
        thread::sleep(wait);
        !self.peer.is_cut()
    }

    /// Pay for `frames` more frames, a token for every [`FRAMES_PER_TOKEN`].
    fn frames(&mut self, frames: u64) {
        self.unpaid += frames;
        while self.unpaid >= FRAMES_PER_TOKEN {
            self.unpaid -= FRAMES_PER_TOKEN;
            if !self.hold_back() {
                // Cut: the socket is shut down, and the next read ends the session.
                return;
            }
        }
    }
}

/// The answer to a client's close: its own status code back, as RFC 6455 §5.5.1 asks.
fn closed_by_client(frame: Option<CloseFrame>) -> End {
    match frame {
        Some(frame) => {
            let why = if frame.reason.is_empty() {
                format!("closed by the client ({})", u16::from(frame.code))
            } else {
                format!(
                    "closed by the client ({}, {:?})",
                    u16::from(frame.code),
                    frame.reason.as_str()
                )
            };
            End::Closed {
                reply: message::close(frame.code, ""),
                why,
            }
        }
        None => End::Closed {
            reply: message::close_without_code(),
            why: "closed by the client".to_string(),
        },
    }
}

/// Fail the connection (RFC 6455 §7.1.7): close with `code`, telling the client why.
fn fail(code: CloseCode, reason: &str, what: &str) -> End {
    End::Failed {
        close: message::close(code, reason),
        why: format!("{what}; closed with {}", u16::from(code)),
    }
}

/// Send our FIN, then read and discard until the client closes too or `timeout` passes,
/// so that closing a socket with unread data does not reset the connection before the
/// client has read our last words.
fn close_gracefully(mut stream: &TcpStream, timeout: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = later(Instant::now(), timeout);
    let mut sink = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The connection as tungstenite sees it: readable, and a sink for tungstenite's
/// automatic replies, because the server sends its pongs and closes itself, through the
/// dispatcher. Flood control reads here too, to charge for frames as they come.
struct Inbound<'a> {
    wire: Wire<'a>,
    counter: FrameCounter,
    flood: Flood<'a>,
}

impl Read for Inbound<'_> {
    /// Read, and pay for the frames that began in what was read (with flood control on:
    /// off, there is nothing to pay, and nothing is counted).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.wire.read(buf)?;
        if self.flood.bucket.is_some() {
            self.pay(&buf[..read]);
        }
        Ok(read)
    }
}

impl Inbound<'_> {
    /// Pay for the frames that began in `bytes`. Never inlined: flood control's frame (its
    /// log line, its sleep) inlined into `read` sat under every blocking read, and pushed
    /// each idle client's thread into a third resident stack page (4 KiB more per client).
    #[inline(never)]
    fn pay(&mut self, bytes: &[u8]) {
        let frames = self.counter.feed(bytes);
        self.flood.frames(frames);
    }
}

impl Write for Inbound<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
