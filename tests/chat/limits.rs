use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Instant;

use broadcast_chat::{ServerConfig, WELCOME};
use tungstenite::Message;

use crate::support::*;

#[test]
fn a_client_that_does_not_read_is_closed_with_1008_while_the_others_get_everything() {
    const MESSAGES: usize = 600;
    // Reading what waits in the stalled client's socket takes a while: give it time.
    let server = unthrottled(ServerConfig::default().queue(8).close_timeout(WAIT * 3));
    let addr = server.local_addr();
    let mut stalled = stalled_client(addr);
    let (mut sender, tag) = join(addr);
    let (mut reader, _) = join(addr);
    let expected = thread::scope(|s| {
        let reading = s.spawn(|| {
            (0..MESSAGES)
                .map(|_| recv_text(&mut reader))
                .collect::<Vec<_>>()
        });
        let expected = flood(&mut sender, &tag, MESSAGES, 16 * 1024);
        assert_eq!(
            reading.join().expect("reader"),
            expected,
            "the reader lost nothing"
        );
        expected
    });

    // Now read what reached the stalled client: an unbroken prefix, then the 1008 close.
    let mut received = 0;
    loop {
        let (opcode, payload) = stalled.read_frame();
        match opcode {
            1 => {
                assert_eq!(
                    payload,
                    expected[received].as_bytes(),
                    "no gap before the close"
                );
                received += 1;
            }
            8 => {
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
                let reason = String::from_utf8_lossy(&payload[2..]);
                assert!(reason.contains("too slow"), "the reason says why: {reason}");
                break;
            }
            9 => {}
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert!(
        received < MESSAGES,
        "the stalled client was cut off early ({received})"
    );
}

#[test]
fn max_clients_answers_the_next_client_with_503_and_never_registers_it() {
    let server = server(ServerConfig::default().max_clients(2));
    let addr = server.local_addr();
    let (a, _) = join(addr);
    let (_b, _) = join(addr);
    let mut third = Raw::connect(addr);
    third.handshake_request();
    let head = third.read_head();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(server.client_count(), 2);
    drop(a);
    eventually("a slot to free up", || server.client_count() < 2);
    let (mut c, me) = join(addr);
    send(&mut c, "in");
    assert_eq!(recv_text(&mut c), format!("{me}: in"));
}

#[test]
fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    let server = server(ServerConfig::default().handshake_timeout(ms(300)));
    let started = Instant::now();
    let mut raw = Raw::connect(server.local_addr());
    assert!(raw.closed_by_server());
    let waited = started.elapsed();
    assert!(waited >= ms(250), "not before the deadline: {waited:?}");
    assert!(
        waited < ms(300) + ms(2000),
        "soon after the deadline: {waited:?}"
    );
}

#[test]
fn a_client_that_made_the_handshake_wait_may_then_be_idle_past_its_deadline() {
    let server = server(
        ServerConfig::default()
            .handshake_timeout(ms(500))
            .ping_interval(None),
    );
    let mut raw = Raw::connect(server.local_addr());
    // The request in two parts, so the server waits for the second under the deadline.
    raw.write(b"GET / HTTP/1.1\r\nHost: x\r\n");
    thread::sleep(ms(100));
    raw.write(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(raw.read_head().starts_with("HTTP/1.1 101"));
    assert_eq!(raw.read_frame().1, WELCOME.as_bytes());
    // Quiet for twice the handshake deadline: a joined client is no longer under it.
    thread::sleep(ms(1000));
    raw.masked(0x81, b"still here");
    let (opcode, text) = raw.read_frame();
    assert_eq!(opcode, 1);
    assert!(text.ends_with(b": still here"), "{text:?}");
}

#[test]
fn the_handshake_deadline_covers_the_whole_request_not_each_read() {
    let server = server(ServerConfig::default().handshake_timeout(ms(500)));
    let mut stream = TcpStream::connect(server.local_addr()).expect("connect");
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut sent = 0;
    for byte in request {
        // One byte every 50 ms would take over 7 s; each gap is far below the deadline.
        if stream.write_all(&[*byte]).is_err() {
            break;
        }
        sent += 1;
        thread::sleep(ms(50));
    }
    assert!(
        sent < request.len(),
        "cut off after {sent} of {} bytes",
        request.len()
    );
}

#[test]
fn keepalive_pings_clients_and_drops_the_silent_ones() {
    // Intervals long enough that a test thread held up for a few hundred milliseconds
    // on a busy machine does not miss a ping.
    let server = server(ServerConfig::default().ping_interval(Some(ms(500))));
    let addr = server.local_addr();
    let (mut alive, me) = join(addr);
    // Before the silent client connects: the server's count of its silence starts later.
    let started = Instant::now();
    let mut silent = Raw::join(addr);
    thread::scope(|s| {
        // A client that reads (tungstenite answers pings as it reads) stays connected.
        s.spawn(move || {
            alive
                .get_ref()
                .set_read_timeout(Some(ms(50)))
                .expect("timeout");
            let until = Instant::now() + ms(2500);
            let mut pings = 0;
            while Instant::now() < until {
                match alive.read() {
                    Ok(Message::Ping(_)) => pings += 1,
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("the answering client was dropped: {e}"),
                }
            }
            assert!(pings >= 2, "pinged again and again ({pings})");
            alive
                .get_ref()
                .set_read_timeout(Some(WAIT))
                .expect("timeout");
            send(&mut alive, "still here");
            assert_eq!(recv_text(&mut alive), format!("{me}: still here"));
        });

        // A client that never answers gets pings and is dropped after two intervals.
        let mut received = Vec::new();
        match std::io::Read::read_to_end(&mut silent.stream, &mut received) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the silent client was not dropped: {e}"),
        }
        assert!(
            received.windows(2).any(|w| w == [0x89, 0x00]),
            "pings came before the drop"
        );
        assert!(
            started.elapsed() >= ms(900),
            "not dropped before two intervals"
        );
    });
}

#[test]
fn handshakes_past_the_per_address_bound_are_closed_at_once_without_a_thread() {
    // A handshake deadline far beyond the read deadline: if the extra connection got a
    // thread, it would wait for a request and the read below would time out and fail.
    let config = ServerConfig::default()
        .max_pending_per_ip(3)
        .handshake_timeout(WAIT * 6);
    let server = server(config);
    let addr = server.local_addr();
    let _waiting: Vec<Raw> = (0..3).map(|_| Raw::connect(addr)).collect();
    let mut extra = Raw::connect(addr);
    assert!(
        extra.read_to_end().is_empty(),
        "closed without a word or a thread"
    );
    let (mut other, me) = join_from("127.0.0.2", addr);
    send(&mut other, "another address still gets in");
    assert_eq!(
        recv_text(&mut other),
        format!("{me}: another address still gets in")
    );
}
