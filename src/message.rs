//! The wire format: the chat's texts and the WebSocket frames the server writes.
//!
//! Frames from a server are never masked (RFC 6455 §5.1), so the bytes of one broadcast suit
//! every receiver. The server therefore encodes each broadcast exactly once, on the sender's
//! connection thread, and hands the same reference-counted [`Frame`] to every client: a
//! delivery costs a reference count, not an allocation or a copy.

use std::borrow::Cow;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::LazyLock;

use tungstenite::Bytes;
use tungstenite::protocol::frame::coding::CloseCode;

/// The first text every client receives after the handshake.
pub const WELCOME: &str = "Welcome to chat! Type a message";

/// The largest `--max-message-size`: no server of ours takes a longer message.
pub(crate) const LONGEST_MESSAGE: usize = 16 * 1024 * 1024;

/// The longest tagged text a server of ours relays: the longest message and the longest
/// sender tag (a scoped IPv6 address). Whoever reads what servers relay (a fleet node
/// reading the stream, the client) takes nothing longer, however its own limits are set.
pub(crate) const LONGEST_TEXT: usize = LONGEST_MESSAGE + 128;

/// An encoded server frame, ready to be written to any client. Cloning it is cheap.
pub(crate) type Frame = Bytes;

const FIN: u8 = 0x80;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The longest close reason that fits a control frame (125 bytes) after the 2-byte code.
const MAX_CLOSE_REASON: usize = 123;

/// The prefix that tags every broadcast from `addr`: `127.0.0.1:53412: `.
///
/// `SocketAddr`'s `Display` brackets IPv6 addresses (`[::1]:53412: `), so the tag is
/// unambiguous whatever the family.
pub fn sender_tag(addr: SocketAddr) -> String {
    format!("{addr}: ")
}

/// `text` as one line that is safe to print to a terminal: control characters (C0 but
/// tab, DEL, C1) are shown escaped as Rust does (`\n`, `\r`, `\u{1b}`), and so are the
/// characters that end a line or reorder text in some terminals (U+2028, U+2029 and the
/// bidirectional overrides and isolates). A message can then neither forge a line that
/// seems to come from another sender nor send an escape sequence to the terminal.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            let _ = write!(out, "{}", c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A text frame whose payload is `tag` followed by `text`, built with one allocation.
pub(crate) fn text(tag: &str, text: &str) -> Frame {
    let len = tag.len() + text.len();
    let mut out = Vec::with_capacity(header_len(len) + len);
    push_header(&mut out, OP_TEXT, len);
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(text.as_bytes());
    Bytes::from(out)
}

/// The welcome frame, which follows every upgrade's 101: made once; a clone shares its
/// bytes.
pub(crate) fn welcome() -> Frame {
    static FRAME: LazyLock<Frame> = LazyLock::new(|| text("", WELCOME));
    FRAME.clone()
}

/// A ping with an empty payload: the server's keepalive probe.
pub(crate) fn ping() -> Frame {
    Bytes::from_static(&[FIN | OP_PING, 0])
}

/// A pong echoing `payload`, which the protocol limits to 125 bytes.
pub(crate) fn pong(payload: &[u8]) -> Frame {
    control(OP_PONG, payload)
}

/// A close frame with `code` and a human-readable `reason`, cut to fit a control frame.
pub(crate) fn close(code: CloseCode, reason: &str) -> Frame {
    let reason = truncate_utf8(reason, MAX_CLOSE_REASON);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&u16::from(code).to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    control(OP_CLOSE, &payload)
}

/// A close frame without a status code: the reply to a peer's close that carried none.
pub(crate) fn close_without_code() -> Frame {
    Bytes::from_static(&[FIN | OP_CLOSE, 0])
}

fn control(opcode: u8, payload: &[u8]) -> Frame {
    let mut out = Vec::with_capacity(2 + payload.len());
    push_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn push_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(FIN | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let end = (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use tungstenite::protocol::frame::FrameHeader;

    fn parse(frame: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut cursor = Cursor::new(frame);
        let (header, len) = FrameHeader::parse(&mut cursor)
            .expect("valid header")
            .expect("complete header");
        let start = cursor.position() as usize;
        assert_eq!(frame.len() - start, len as usize, "payload length matches");
        (header, frame[start..].to_vec())
    }

    #[test]
    fn text_frames_of_every_length_class_parse_back() {
        for len in [0, 1, 125, 126, 65535, 65536, 70000] {
            let body = "x".repeat(len);
            let frame = text("1.2.3.4:5: ", &body);
            let (header, payload) = parse(&frame);
            assert!(header.is_final);
            assert!(header.mask.is_none(), "server frames are unmasked");
            assert_eq!(payload, format!("1.2.3.4:5: {body}").into_bytes());
        }
    }

    #[test]
    fn tags_bracket_ipv6() {
        let v6: SocketAddr = "[::1]:53412".parse().expect("address");
        let v4: SocketAddr = "127.0.0.1:53412".parse().expect("address");
        assert_eq!(sender_tag(v6), "[::1]:53412: ");
        assert_eq!(sender_tag(v4), "127.0.0.1:53412: ");
    }

    #[test]
    fn printable_escapes_what_could_forge_a_line_and_keeps_the_rest() {
        assert_eq!(printable("héllo\twörld ✓"), "héllo\twörld ✓");
        assert_eq!(
            printable("hello\n10.0.0.1:5555: I am the admin"),
            "hello\\n10.0.0.1:5555: I am the admin"
        );
        assert_eq!(
            printable("a\r\u{1b}]0;title\u{7}b"),
            "a\\r\\u{1b}]0;title\\u{7}b"
        );
        assert_eq!(
            printable("\u{1b}[2J\u{7f}\u{85}\u{9b}"),
            "\\u{1b}[2J\\u{7f}\\u{85}\\u{9b}"
        );
        assert_eq!(printable("x\u{2028}y\u{202e}z"), "x\\u{2028}y\\u{202e}z");
        assert!(matches!(printable("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close(CloseCode::Policy, &reason);
        let (_, payload) = parse(&frame);
        assert!(payload.len() <= 125);
        assert_eq!(&payload[..2], &1008u16.to_be_bytes());
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::io::{self, Cursor, Read, Write};
        use tungstenite::Message;
        use tungstenite::protocol::{CloseFrame, Role, WebSocket};

        /// Server bytes as a client reads them; the client's own writes go nowhere.
        struct Replay(Cursor<Vec<u8>>);

        impl Read for Replay {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.0.read(buf)
            }
        }

        impl Write for Replay {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        /// What tungstenite's client makes of `frame`.
        fn decode(frame: &Frame) -> Message {
            let mut ws =
                WebSocket::from_raw_socket(Replay(Cursor::new(frame.to_vec())), Role::Client, None);
            ws.read().expect("tungstenite decodes our frame")
        }

        fn close_code() -> impl Strategy<Value = u16> {
            prop_oneof![1000..=1003u16, 1007..=1011u16, 3000..=4999u16]
        }

        proptest! {
            #[test]
            fn text_frames_round_trip(
                ip in any::<std::net::IpAddr>(),
                port in any::<u16>(),
                body in "\\PC{0,300}",
                padding in prop_oneof![Just(0usize), 0..70_000usize],
            ) {
                let tag = sender_tag(SocketAddr::new(ip, port));
                let body = body + &"x".repeat(padding);
                let decoded = decode(&text(&tag, &body));
                prop_assert_eq!(decoded, Message::text(format!("{tag}{body}")));
            }

            #[test]
            fn close_frames_round_trip_with_the_reason_cut_to_fit(
                code in close_code(),
                reason in "\\PC{0,100}",
            ) {
                let frame = close(CloseCode::from(code), &reason);
                prop_assert!(frame.len() <= 127, "a control frame's payload fits 125 bytes");
                let expected = CloseFrame {
                    code: CloseCode::from(code),
                    reason: truncate_utf8(&reason, MAX_CLOSE_REASON).into(),
                };
                prop_assert_eq!(decode(&frame), Message::Close(Some(expected)));
            }

            #[test]
            fn pongs_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..=125)) {
                prop_assert_eq!(decode(&pong(&payload)), Message::Pong(payload.into()));
            }
        }

        #[test]
        fn pings_and_bare_closes_decode() {
            assert_eq!(decode(&ping()), Message::Ping(Default::default()));
            assert_eq!(decode(&close_without_code()), Message::Close(None));
        }
    }
}
