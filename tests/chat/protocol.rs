use broadcast_chat::ServerConfig;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// Send `frame` and expect a close with `code`, the TCP connection closed after it, and a
/// bystander that still gets every message.
fn expect_closed_with(code: u16, config: ServerConfig, frame: impl FnOnce(&mut Raw)) {
    let server = server(config);
    let addr = server.local_addr();
    let (mut bystander, tag) = join(addr);
    let mut raw = Raw::join(addr);
    frame(&mut raw);
    assert_eq!(raw.read_close(), code);
    assert!(
        raw.closed_by_server(),
        "the server closes the connection after its close frame"
    );
    send(&mut bystander, "still here");
    assert_eq!(recv_text(&mut bystander), format!("{tag}: still here"));
}

#[test]
fn a_binary_message_is_closed_with_1003() {
    expect_closed_with(1003, ServerConfig::default(), |raw| {
        raw.masked(FIN | BINARY, b"\x00\x01")
    });
}

#[test]
fn invalid_utf8_is_closed_with_1007() {
    expect_closed_with(1007, ServerConfig::default(), |raw| {
        raw.masked(FIN | TEXT, b"ok \xff\xfe")
    });
}

#[test]
fn invalid_utf8_across_fragments_is_closed_with_1007() {
    expect_closed_with(1007, ServerConfig::default(), |raw| {
        raw.masked(TEXT, b"fine so far ");
        raw.masked(FIN, b"\xc3\x28");
    });
}

#[test]
fn a_message_over_the_size_limit_is_closed_with_1009() {
    let config = ServerConfig::default().max_message_size(1000);
    expect_closed_with(1009, config, |raw| raw.masked(FIN | TEXT, &[b'x'; 1001]));
}

#[test]
fn a_fragmented_message_over_the_size_limit_is_closed_with_1009() {
    let config = ServerConfig::default().max_message_size(1000);
    expect_closed_with(1009, config, |raw| {
        raw.masked(TEXT, &[b'x'; 600]);
        raw.masked(FIN, &[b'x'; 600]);
    });
}

#[test]
fn a_message_at_the_size_limit_is_relayed() {
    let server = server(ServerConfig::default().max_message_size(1000));
    let (mut ws, me) = join(server.local_addr());
    let text = "y".repeat(1000);
    send(&mut ws, &text);
    assert_eq!(recv_text(&mut ws), format!("{me}: {text}"));
}

#[test]
fn protocol_violations_are_closed_with_1002() {
    type Case = (&'static str, fn(&mut Raw));
    let cases: [Case; 8] = [
        ("unmasked frame", |raw| raw.frame(FIN | TEXT, b"hi", None)),
        ("reserved bit set", |raw| {
            raw.masked(FIN | 0x40 | TEXT, b"hi")
        }),
        ("unknown data opcode", |raw| raw.masked(FIN | 0x3, b"hi")),
        ("unknown control opcode", |raw| raw.masked(FIN | 0xB, b"")),
        ("fragmented control frame", |raw| raw.masked(PING, b"x")),
        ("stray continuation", |raw| raw.masked(FIN, b"orphan")),
        ("control frame over 125 bytes", |raw| {
            raw.masked(FIN | PING, &[0; 126])
        }),
        ("new message inside a fragmented one", |raw| {
            raw.masked(TEXT, b"part");
            raw.masked(FIN | TEXT, b"interloper");
        }),
    ];
    for (what, frame) in cases {
        eprintln!("case: {what}");
        expect_closed_with(1002, ServerConfig::default(), frame);
    }
}

#[test]
fn an_invalid_close_code_is_answered_with_1002() {
    expect_closed_with(1002, ServerConfig::default(), |raw| {
        raw.masked(FIN | CLOSE, &1005u16.to_be_bytes());
    });
}

#[test]
fn a_ping_is_answered_with_a_pong_carrying_the_same_payload() {
    let server = default_server();
    let mut raw = Raw::join(server.local_addr());
    raw.masked(FIN | PING, b"are you there?");
    assert_eq!(raw.read_frame(), (0xA, b"are you there?".to_vec()));
}

#[test]
fn fragmented_messages_are_reassembled_even_with_a_ping_between_fragments() {
    let server = default_server();
    let addr = server.local_addr();
    let (mut listener, _) = join(addr);
    let mut raw = Raw::join(addr);
    let me = raw.stream.local_addr().expect("addr");
    raw.masked(TEXT, "hé".as_bytes());
    raw.masked(FIN | PING, b"");
    raw.masked(0x0, b"ll");
    raw.masked(FIN, "o ✓".as_bytes());
    assert_eq!(recv_text(&mut listener), format!("{me}: héllo ✓"));
}

/// The client's own echoes back up in the server (it sends big messages and reads nothing
/// until it closes), so its close is answered from behind a backlog and its writer thread.
#[test]
fn a_close_is_answered_only_after_everything_already_broadcast_even_behind_a_backlog() {
    const MESSAGES: usize = 200;
    let server = ServerProc::start(&["--rate", "0", "--history", "0"]);
    let pid = server.proc.pid();
    let threads = threads_of(pid);
    let stream = small_window(server.addr);
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let addr = server.addr;
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("handshake");
    let me = ws.get_ref().local_addr().expect("addr");
    let payload = "w".repeat(32 * 1024);
    for i in 0..MESSAGES {
        send(&mut ws, &format!("last words {i} {payload}"));
    }
    eventually("a backlog writer behind the client", || {
        threads_of(pid) == threads + 2
    });
    close(&mut ws, CloseCode::Normal);
    let (code, _, texts) = recv_until_close(&mut ws);
    assert_eq!(code, 1000, "the close is answered with the client's code");
    assert_eq!(
        texts.first().map(String::as_str),
        Some(broadcast_chat::WELCOME)
    );
    let expected: Vec<String> = (0..MESSAGES)
        .map(|i| format!("{me}: last words {i} {payload}"))
        .collect();
    assert!(
        texts[1..] == expected[..],
        "every message sent before the close came back first ({} of {MESSAGES})",
        texts.len() - 1
    );
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
}

#[test]
fn a_close_code_is_echoed_and_a_bare_close_gets_a_bare_answer() {
    let server = default_server();
    let (mut ws, _) = join(server.local_addr());
    close(&mut ws, CloseCode::Library(4321));
    assert_eq!(recv_until_close(&mut ws).0, 4321);

    let mut raw = Raw::join(server.local_addr());
    raw.masked(FIN | CLOSE, b"");
    assert_eq!(raw.read_close(), 1005, "no code in, no code out");
    assert!(raw.closed_by_server());
}
