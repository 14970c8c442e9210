//! The HTTP side of a connection: read one request under a deadline, then upgrade it to a
//! WebSocket, serve the chat page, or answer with an error status.
//!
//! Parsing the request ourselves (with httparse, which tungstenite uses too) lets one read
//! path answer everything a port can be asked: the WebSocket upgrade; the page; and every
//! refusal (400, 404, 405, 426, 431, 503) as a real HTTP response instead of a dropped
//! connection. The deadline covers the whole request, not each read, so a client trickling
//! one byte a second is cut off too.
//!
//! The upgrade makes the checks tungstenite's `create_response` makes and answers with
//! tungstenite's `derive_accept_key`, but reads the headers in place rather than building
//! `http` request and response values. Every small allocation a connection thread frees
//! stays in that thread's malloc cache for as long as the client is connected; with ten
//! thousand clients those caches cost more than the rest of a connection's heap.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use tungstenite::handshake::derive_accept_key;

use super::web;

/// The largest request head we read; real browsers send well under 2 KiB.
const MAX_HEAD: usize = 8 * 1024;
/// The most header lines we accept.
const MAX_HEADERS: usize = 32;

/// How a request ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handshake succeeded; `leftover` holds bytes the client sent after its request.
    Upgraded { leftover: Vec<u8> },
    /// The request got an HTTP response; the connection ends.
    Answered { status: u16, detail: String },
    /// The client went away before sending a whole request.
    Vanished,
}

/// Read one request from `stream` and answer it, all before `deadline`. `admit` is asked,
/// only for a valid upgrade, to reserve a client slot; `false` means the chat is full.
///
/// # Errors
/// Fails when the deadline passes or the socket fails.
pub(crate) fn handshake(
    stream: &TcpStream,
    deadline: Instant,
    web_enabled: bool,
    admit: impl FnOnce() -> bool,
) -> io::Result<Outcome> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD {
            return refuse(
                stream,
                deadline,
                431,
                "request headers are larger than 8 KiB",
            );
        }
        if read_more(stream, &mut buf, deadline)? == 0 {
            return Ok(Outcome::Vanished);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let leftover = buf[len..].to_vec();
                return answer(stream, deadline, &request, leftover, web_enabled, admit);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return refuse(stream, deadline, 431, "too many request headers (limit 32)");
            }
            Err(e) => return refuse(stream, deadline, 400, &format!("malformed request: {e}")),
        }
    }
}

fn answer(
    stream: &TcpStream,
    deadline: Instant,
    request: &httparse::Request<'_, '_>,
    leftover: Vec<u8>,
    web_enabled: bool,
    admit: impl FnOnce() -> bool,
) -> io::Result<Outcome> {
    let method = request.method.unwrap_or_default();
    let path = request.path.unwrap_or("/");
    if method != "GET" {
        return refuse(stream, deadline, 405, "only GET is supported");
    }
    if !wants_upgrade(request) {
        return match web::page(path, web_enabled) {
            Some(page) => {
                send(
                    stream,
                    deadline,
                    200,
                    page.content_type,
                    page.headers,
                    page.body,
                )?;
                Ok(Outcome::Answered {
                    status: 200,
                    detail: format!("served {path}"),
                })
            }
            None if web_enabled || path != "/" => {
                refuse(stream, deadline, 404, &format!("no page at {path}"))
            }
            None => refuse(
                stream,
                deadline,
                426,
                "this is a WebSocket chat server; connect with a WebSocket client",
            ),
        };
    }
    let accept = match upgrade_key(request) {
        Ok(key) => derive_accept_key(key),
        Err((status, detail)) => return refuse(stream, deadline, status, detail),
    };
    if !admit() {
        return refuse(stream, deadline, 503, "the chat is full; try again later");
    }
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    write_before(stream, deadline, head.as_bytes())?;
    Ok(Outcome::Upgraded { leftover })
}

fn wants_upgrade(request: &httparse::Request<'_, '_>) -> bool {
    request
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
}

/// The client's key, once the request passes every check of an opening handshake (RFC 6455
/// §4.2.1, the same ones tungstenite's `create_response` makes); otherwise the status and
/// reason to refuse it with.
fn upgrade_key<'b>(request: &httparse::Request<'_, 'b>) -> Result<&'b [u8], (u16, &'static str)> {
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if request.version != Some(1) {
        return Err((400, "a WebSocket handshake needs HTTP/1.1"));
    }
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
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
    match header("sec-websocket-version") {
        Some(b"13") => {}
        Some(_) => return Err((426, "unsupported WebSocket version; this server speaks 13")),
        None => return Err((400, "no Sec-WebSocket-Version header")),
    }
    match header("sec-websocket-key") {
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

/// Answer with an error `status` and a one-line plain-text explanation.
fn refuse(stream: &TcpStream, deadline: Instant, status: u16, detail: &str) -> io::Result<Outcome> {
    let body = format!("{status} {}: {detail}\n", reason(status));
    let extra = match status {
        405 => "Allow: GET\r\n",
        426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        503 => "Retry-After: 5\r\n",
        _ => "",
    };
    send(
        stream,
        deadline,
        status,
        "text/plain; charset=utf-8",
        extra,
        body.as_bytes(),
    )?;
    Ok(Outcome::Answered {
        status,
        detail: detail.to_string(),
    })
}

fn send(
    stream: &TcpStream,
    deadline: Instant,
    status: u16,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
) -> io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra_headers}\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    write_before(stream, deadline, &response)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Read what has arrived into `buf`, waiting no later than `deadline`.
fn read_more(mut stream: &TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
    let len = buf.len();
    buf.resize(MAX_HEAD.min(len + 1024), 0);
    let result = loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut buf[len..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => break result,
        }
    };
    buf.truncate(len + *result.as_ref().unwrap_or(&0));
    result.map_err(timed_out)
}

fn write_before(mut stream: &TcpStream, deadline: Instant, bytes: &[u8]) -> io::Result<()> {
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(bytes).map_err(timed_out)
}

fn remaining(deadline: Instant) -> io::Result<std::time::Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

/// Socket timeouts surface as `WouldBlock` on Unix; call them what they are.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::ErrorKind::TimedOut.into()
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<'h, 'b>(
        raw: &'b [u8],
        headers: &'h mut [httparse::Header<'b>],
    ) -> httparse::Request<'h, 'b> {
        let mut request = httparse::Request::new(headers);
        assert!(request.parse(raw).expect("parses").is_complete());
        request
    }

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn the_rfc_example_is_accepted_with_the_rfc_answer() {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let request = parse(GOOD.as_bytes(), &mut headers);
        let key = upgrade_key(&request).expect("valid");
        assert_eq!(derive_accept_key(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn each_missing_or_wrong_part_is_refused() {
        for (from, to, status) in [
            ("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost", 400),
            ("Upgrade: WebSocket", "Upgrade: h2c", 400),
            ("keep-alive, Upgrade", "keep-alive", 400),
            ("Version: 13", "Version: 8", 426),
            ("Sec-WebSocket-Version: 13\r\n", "", 400),
            ("jZQ==", "jZQ=", 400),
            ("jZQ==", "jZR==", 400),
            ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", 400),
        ] {
            let raw = GOOD.replace(from, to);
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let request = parse(raw.as_bytes(), &mut headers);
            assert_eq!(
                upgrade_key(&request).map_err(|e| e.0),
                Err(status),
                "{from} -> {to}"
            );
        }
    }
}
