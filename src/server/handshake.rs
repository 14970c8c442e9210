//! The HTTP side of a connection: read one request under a deadline, then upgrade it to a
//! WebSocket, serve the chat page, or answer with an error status.
//!
//! Parsing the request ourselves (with httparse, which tungstenite uses too) lets one read
//! path answer everything a port can be asked: the WebSocket upgrade; the page; and every
//! refusal (400, 403, 404, 405, 426, 431, 503) as a real HTTP response instead of a dropped
//! connection. The deadline covers the whole request, not each read, so a client trickling
//! one byte a second is cut off too.
//!
//! What to answer is decided by [`reply`], a pure function of the bytes received (tested
//! with arbitrary input); [`handshake`] only reads, asks it, and writes the answer, except
//! to a valid upgrade, whose 101 the dispatcher sends as the client joins.
//!
//! The upgrade makes the checks tungstenite's `create_response` makes and answers with
//! tungstenite's `derive_accept_key`, but reads the headers in place rather than building
//! `http` request and response values. Every small allocation a connection thread frees
//! stays in that thread's malloc cache for as long as the client is connected; with ten
//! thousand clients those caches cost more than the rest of a connection's heap.

use std::borrow::Cow;
use std::io;
use std::time::Instant;

use tungstenite::handshake::derive_accept_key;

use std::sync::atomic::Ordering;

use crate::message::{self, Frame};

use super::admission::Slot;
use super::connection::Context;
use super::metrics::Refused;
use super::origin::Origins;
use super::tls::HANDSHAKE_RECORD;
use super::web::Site;
use crate::error::{time_left, timed_out};
use crate::tls::Wire;

/// The largest request head we read; real browsers send well under 2 KiB.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// The most header lines we accept.
const MAX_HEADERS: usize = 32;
/// Room for header lines while parsing: more than [`MAX_HEADERS`], so that the block is
/// larger than glibc's per-thread cache takes (40 × 32 bytes).
const HEADER_SLOTS: usize = 40;
/// A TLS record holding a fatal `handshake_failure` alert: what a TLS client that reached
/// a plaintext port is told, so it reports a failed handshake rather than garbage.
const HANDSHAKE_FAILURE_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// How a request ended.
#[derive(Debug)]
pub(crate) enum Outcome<'a> {
    /// The request is a valid upgrade, not answered yet: `answer` is the 101 and the
    /// welcome, for the dispatcher to send as the client joins. `leftover` holds bytes the
    /// client sent after its request, and `slot` is the client's place in the chat. The
    /// socket may still have a receive timeout (the listening socket's, a TLS handshake's
    /// or this one's), for the session to clear.
    Upgraded {
        leftover: Vec<u8>,
        slot: Slot<'a>,
        answer: Frame,
    },
    /// The request got an HTTP response; the connection ends.
    Answered { status: u16, detail: String },
    /// The client went away before sending a whole request.
    Vanished,
    /// The client began a TLS handshake on this plaintext port; it was sent a TLS alert.
    TlsOnPlaintext,
}

/// The answer to an upgrade, with the chat's welcome behind it, for the dispatcher to send
/// as the client joins, with the history, in one write.
///
/// When the connection thread sent the 101, it cost a system call and a TCP segment of its
/// own, and the welcome and history another; sent when the dispatcher takes the client in, the
/// answer also means the client is in the room: whatever is broadcast after it has the
/// 101 reaches it. 10 000 clients reconnecting at once: 30-33 µs of server CPU each instead
/// of 35–42 (README, Connection storms).
fn switching(accept: &str) -> Frame {
    const HEAD: &str = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                        Upgrade: websocket\r\nSec-WebSocket-Accept: ";
    let welcome = message::welcome();
    let mut answer = Vec::with_capacity(HEAD.len() + accept.len() + 4 + welcome.len());
    for part in [HEAD.as_bytes(), accept.as_bytes(), b"\r\n\r\n", &welcome] {
        answer.extend_from_slice(part);
    }
    Frame::from(answer)
}

/// What a request head calls for.
#[derive(Debug)]
pub(crate) enum Reply<'s> {
    /// Not a whole request yet: read more.
    Incomplete,
    /// A valid WebSocket upgrade, to be answered with this accept key; the request ends at
    /// byte `len`.
    Upgrade { accept: String, len: usize },
    /// Answer this and end the connection.
    Respond(Response<'s>),
    /// Say whether the server takes clients (`GET /healthz`): for load balancers, and for
    /// the page, which cannot see why a WebSocket was refused.
    Health,
    /// The operator's metrics (`GET /metrics`).
    Metrics,
}

/// An HTTP response, with a one-line explanation for the log.
#[derive(Debug)]
pub(crate) struct Response<'s> {
    pub(crate) status: u16,
    pub(crate) detail: String,
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    headers: &'static str,
    /// Borrowed from the site for its files: a page is never copied to be sent.
    body: Cow<'s, [u8]>,
}

/// Read one request from `stream` and answer it, all before `deadline`; a valid upgrade,
/// which also needs a place in the chat from the context's admission, is answered by the
/// dispatcher instead (see [`Outcome::Upgraded`]).
///
/// # Errors
/// Fails when the deadline passes or the socket fails.
pub(crate) fn handshake<'a>(
    wire: Wire<'_>,
    deadline: Instant,
    context: &'a Context,
) -> io::Result<Outcome<'a>> {
    let (site, admission) = (context.site.as_ref(), &*context.admission);
    let mut buf = Vec::with_capacity(1024);
    loop {
        if read_more(wire, &mut buf, deadline)? == 0 {
            return Ok(Outcome::Vanished);
        }
        if wire.tls.is_none() && buf.first() == Some(&HANDSHAKE_RECORD) {
            write_before(wire, deadline, &HANDSHAKE_FAILURE_ALERT)?;
            return Ok(Outcome::TlsOnPlaintext);
        }
        let response = match reply(&buf, site, &admission.origins) {
            Reply::Incomplete => continue,
            Reply::Respond(response) => response,
            Reply::Health => health(context),
            Reply::Metrics => {
                Response::metrics(context.metrics.render(admission.clients()).into_bytes())
            }
            Reply::Upgrade { accept, len } => match admission.join() {
                Some(slot) => {
                    return Ok(Outcome::Upgraded {
                        leftover: buf[len..].to_vec(),
                        slot,
                        answer: switching(&accept),
                    });
                }
                None => {
                    context.metrics.refused(Refused::Full);
                    Response::error(503, "the chat is full; try again later".into())
                }
            },
        };
        write_before(wire, deadline, &response.to_bytes())?;
        return Ok(Outcome::Answered {
            status: response.status,
            detail: response.detail,
        });
    }
}

/// What to answer to the bytes of a request head received so far.
pub(crate) fn reply<'s>(buf: &[u8], site: Option<&'s Site>, origins: &Origins) -> Reply<'s> {
    // On the heap: a kilobyte and more of stack, at the deepest point of a connection
    // thread's life, would cost every idle client a resident stack page. Past glibc's
    // per-thread cache (1032 bytes), the block goes back to the arena, not to a cache each
    // idle thread would keep.
    let mut headers = vec![httparse::EMPTY_HEADER; HEADER_SLOTS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) if request.headers.len() > MAX_HEADERS => {
            too_many_headers()
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Reply::Respond(Response::error(
            431,
            "request headers are larger than 8 KiB".into(),
        )),
        Ok(httparse::Status::Partial) => Reply::Incomplete,
        Ok(httparse::Status::Complete(len)) => answer(&request, len, site, origins),
        Err(httparse::Error::TooManyHeaders) => too_many_headers(),
        Err(e) => Reply::Respond(Response::error(400, format!("malformed request: {e}"))),
    }
}

fn too_many_headers() -> Reply<'static> {
    Reply::Respond(Response::error(
        431,
        format!("too many request headers (limit {MAX_HEADERS})"),
    ))
}

fn answer<'s>(
    request: &httparse::Request<'_, '_>,
    len: usize,
    site: Option<&'s Site>,
    origins: &Origins,
) -> Reply<'s> {
    let method = request.method.unwrap_or_default();
    let path = request.path.unwrap_or("/");
    if method != "GET" {
        return Reply::Respond(Response::error(405, "only GET is supported".into()));
    }
    if !wants_upgrade(request) {
        match path.split('?').next() {
            Some("/healthz") => return Reply::Health,
            Some("/metrics") => return Reply::Metrics,
            _ => {}
        }
        let shown = path.escape_debug();
        return Reply::Respond(match site.and_then(|site| site.page(path)) {
            Some(page) => Response {
                status: 200,
                detail: format!("served {shown}"),
                content_type: page.content_type,
                headers: page.headers,
                body: page.body,
            },
            None if site.is_some() || path != "/" => {
                Response::error(404, format!("no page at {shown}"))
            }
            None => Response::error(
                426,
                "this is a WebSocket chat server; connect with a WebSocket client".into(),
            ),
        });
    }
    let key = match upgrade_key(request) {
        Ok(key) => key,
        Err((status, detail)) => return Reply::Respond(Response::error(status, detail.into())),
    };
    if let Err(detail) = origins.check(header(request, "origin"), header(request, "host")) {
        return Reply::Respond(Response::error(403, detail));
    }
    Reply::Upgrade {
        accept: derive_accept_key(key),
        len,
    }
}

/// `200 ok` with the number of clients, or `503` with the reason this node should not be
/// sent new clients: it is shutting down, its Redis link is down or the room's history is
/// not read from Redis yet, or the chat is full.
fn health(context: &Context) -> Response<'static> {
    let admission = &context.admission;
    let (clients, max) = (admission.clients(), admission.max_clients());
    let trouble = if context.stopping.load(Ordering::Relaxed) {
        Some("the server is shutting down".to_string())
    } else if let Some(trouble) = context.backplane.trouble() {
        Some(format!(
            "{trouble}; clients here stay connected but new ones should go elsewhere"
        ))
    } else if clients >= max {
        Some(format!("the chat is full ({max} clients)"))
    } else {
        None
    };
    match trouble {
        None => Response::text(200, format!("ok: {clients} of {max} clients\n")),
        Some(trouble) => Response::error(503, format!("{trouble}; try again later")),
    }
}

fn header<'b>(request: &httparse::Request<'_, 'b>, name: &str) -> Option<&'b [u8]> {
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn wants_upgrade(request: &httparse::Request<'_, '_>) -> bool {
    header(request, "upgrade").is_some()
}

/// The client's key, once the request passes every check of an opening handshake (RFC 6455
/// §4.2.1, the same ones tungstenite's `create_response` makes); otherwise the status and
/// reason to refuse it with.
fn upgrade_key<'b>(request: &httparse::Request<'_, 'b>) -> Result<&'b [u8], (u16, &'static str)> {
    if request.version != Some(1) {
        return Err((400, "a WebSocket handshake needs HTTP/1.1"));
    }
    if !header(request, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Err((400, "the Upgrade header must say \"websocket\""));
    }
    let connection_upgrade = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b',' || b == b' '))
        .any(|token| token.eq_ignore_ascii_case(b"upgrade"));
    if !connection_upgrade {
        return Err((400, "the Connection header must include \"Upgrade\""));
    }
    match header(request, "sec-websocket-version") {
        Some(b"13") => {}
        Some(_) => return Err((426, "unsupported WebSocket version; this server speaks 13")),
        None => return Err((400, "no Sec-WebSocket-Version header")),
    }
    match header(request, "sec-websocket-key") {
        Some(key) if is_valid_key(key) => Ok(key),
        Some(_) => Err((400, "the Sec-WebSocket-Key must be 16 bytes in base64")),
        None => Err((400, "no Sec-WebSocket-Key header")),
    }
}

/// Whether `key` is 16 bytes in canonical base64: 22 digits, the last with its low four
/// bits clear, then "==".
fn is_valid_key(key: &[u8]) -> bool {
    let digit = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24
        && key[..22].iter().all(digit)
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
        && &key[22..] == b"=="
}

impl Response<'_> {
    /// A plain-text answer.
    fn text(status: u16, body: String) -> Response<'static> {
        Response {
            status,
            detail: body.trim_end().to_string(),
            content_type: "text/plain; charset=utf-8",
            headers: "Cache-Control: no-store\r\n",
            body: Cow::Owned(body.into_bytes()),
        }
    }

    /// The metrics page, in the text format Prometheus scrapes.
    fn metrics(body: Vec<u8>) -> Response<'static> {
        Response {
            status: 200,
            detail: "served /metrics".to_string(),
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            headers: "Cache-Control: no-store\r\n",
            body: Cow::Owned(body),
        }
    }

    /// An error `status` with a one-line plain-text explanation.
    pub(crate) fn error(status: u16, detail: String) -> Response<'static> {
        let body = format!("{status} {}: {detail}\n", reason(status));
        let headers = match status {
            405 => "Allow: GET\r\n",
            426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            503 => "Retry-After: 5\r\n",
            _ => "",
        };
        Response {
            status,
            detail,
            content_type: "text/plain; charset=utf-8",
            headers,
            body: Cow::Owned(body.into_bytes()),
        }
    }

    /// The whole response, head and body, to go out in one write.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Connection: close\r\n{}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.headers
        )
        .into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Read what has arrived into `buf`, waiting no later than the deadline. What is there
/// already is read without setting a timeout, which saves a system call on most
/// connections: a request usually arrives with its connection.
///
/// The socket's own timeouts are never relied on: they may be the listening socket's, which
/// the accepted socket inherits (see `workers`).
fn read_more(wire: Wire<'_>, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
    let len = buf.len();
    buf.resize(MAX_HEAD.min(len + 1024), 0);
    let result = match wire.read_now(&mut buf[len..]) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => loop {
            wire.sock.set_read_timeout(Some(time_left(deadline)?))?;
            match wire.read(&mut buf[len..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => break result,
            }
        },
        result => result,
    };
    buf.truncate(len + *result.as_ref().unwrap_or(&0));
    result.map_err(timed_out)
}

/// Write `bytes` before the deadline: at once if the socket takes them all, as it
/// nearly always does with an answer this small.
///
/// Only for answers after which the connection ends: a session keeps the write timeout
/// the socket inherited (see `Session::run`), which the deadline set here would replace.
fn write_before(wire: Wire<'_>, deadline: Instant, bytes: &[u8]) -> io::Result<()> {
    let sent = wire.write_now(bytes)?;
    if sent == bytes.len() {
        return Ok(());
    }
    wire.sock.set_write_timeout(Some(time_left(deadline)?))?;
    wire.write_all(&bytes[sent..]).map_err(timed_out)
}

#[cfg(test)]
mod tests;
