//! What a hostile client tries, over real sockets: aborted handshakes, idle and trickling
//! connections, cross-site pages, floods, and a client that never reads.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use broadcast_chat::{ServerConfig, WELCOME};
use socket2::SockRef;
use tungstenite::Message;

use crate::support::*;

/// Close `stream` with a TCP reset instead of a FIN.
fn reset(stream: TcpStream) {
    SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("linger 0");
    drop(stream);
}

#[test]
fn aborted_handshakes_give_their_places_back() {
    const MAX: usize = 5;
    let server = server(ServerConfig::default().max_clients(MAX));
    let addr = server.local_addr();
    for i in 0..60 {
        let mut raw = Raw::connect(addr);
        raw.handshake_request();
        match i % 3 {
            // A reset right after the request, most often before the 101 is written.
            0 => reset(raw.stream),
            // A plain close before reading the answer.
            1 => drop(raw),
            // A reset once the 101 has arrived (on a fresh connection once the earlier
            // ones have let go, or it might be told 503).
            _ => {
                drop(raw);
                eventually("the earlier places to come back", || {
                    server.client_count() == 0
                });
                let mut raw = Raw::connect(addr);
                raw.handshake_request();
                let head = raw.read_head();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                reset(raw.stream);
            }
        }
    }
    eventually("every aborted client's place to come back", || {
        server.client_count() == 0
    });
    // The last aborted handshakes may still be finishing, and hold a place for a moment:
    // a 503 then is tried again, for a moment only, far less than any timer of the server.
    let mut clients: Vec<(Ws, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while clients.len() < MAX {
        match try_join(addr) {
            Ok(client) => clients.push(client),
            Err(status) => {
                assert_eq!(status, 503, "only a full chat may refuse");
                assert!(Instant::now() < deadline, "a place was not given back");
                thread::sleep(ms(10));
            }
        }
    }
    let first = clients[0].1.clone();
    send(&mut clients[0].0, "all in");
    for (ws, _) in &mut clients {
        assert_eq!(recv_text(ws), format!("{first}: all in"));
    }
}

/// Whether the server has closed `stream`, without waiting.
fn is_closed(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let closed = match (&*stream).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).expect("blocking");
    closed
}

#[test]
fn hundreds_of_idle_connections_from_one_address_do_not_keep_another_address_out() {
    // A handshake deadline far past the test's: if the idle connections held the room, the
    // newcomer would wait for them to time out and the test would fail.
    let config = ServerConfig::default().handshake_timeout(Duration::from_secs(600));
    let server = server(config);
    let addr = server.local_addr();
    let attackers: Vec<TcpStream> = (0..300)
        .map(|i| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            if i % 2 == 0 {
                // Half of them trickle the start of a request, then stall.
                stream.write_all(b"GET / HTTP/1.1\r\nHo").expect("write");
            }
            stream
        })
        .collect();
    eventually(
        "the connections past 128 from one address to be closed",
        || attackers.iter().filter(|s| is_closed(s)).count() == 300 - 128,
    );
    assert!(
        attackers[..128].iter().all(|s| !is_closed(s)),
        "the first 128 wait in their handshake"
    );

    let (mut ws, me) = join_from("127.0.0.2", addr);
    send(&mut ws, "made it");
    assert_eq!(recv_text(&mut ws), format!("{me}: made it"));
    assert!(me.starts_with("127.0.0.2:"), "{me}");
}

#[test]
fn when_every_handshake_place_is_taken_the_longest_waiting_makes_room() {
    let config = ServerConfig::default()
        .max_pending(8)
        .handshake_timeout(Duration::from_secs(600));
    let server = server(config);
    let addr = server.local_addr();
    let lingering: Vec<TcpStream> = (0..8)
        .map(|i| tcp_from(&format!("127.0.0.{}", 10 + i), addr))
        .collect();
    // Until they have lingered a second, newcomers are turned away; then one gets in.
    let deadline = Instant::now() + WAIT;
    let mut ws = loop {
        let stream = tcp_from("127.0.0.2", addr);
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        if let Ok((ws, _)) = tungstenite::client(format!("ws://{addr}/"), stream) {
            break ws;
        }
        assert!(Instant::now() < deadline, "no room was made");
        thread::sleep(ms(50));
    };
    assert_eq!(recv_text(&mut ws), WELCOME);
    eventually("the longest waiting handshake to be cut", || {
        is_closed(&lingering[0])
    });
    assert!(
        lingering[1..].iter().filter(|s| is_closed(s)).count() < 7,
        "only as many are cut as newcomers needed"
    );
}

/// Send an upgrade request with these extra header lines; returns the response head and
/// the connection.
fn upgrade(addr: SocketAddr, extra: &str) -> (String, Raw) {
    let mut raw = Raw::connect(addr);
    raw.write(
        format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        )
        .as_bytes(),
    );
    (raw.read_head(), raw)
}

#[test]
fn a_page_from_another_origin_is_refused_and_the_log_says_how_to_allow_it() {
    let server = ServerProc::start(&[]);
    let addr = server.addr;
    let (head, mut raw) = upgrade(addr, "Origin: http://evil.example\r\n");
    assert!(head.starts_with("HTTP/1.1 403 Forbidden"), "{head}");
    let body = String::from_utf8_lossy(&raw.read_to_end()).into_owned();
    assert!(body.contains("http://evil.example"), "{body}");
    server.expect_log("start the server with --allow-origin http://evil.example");

    for (what, extra) in [
        ("its own page", format!("Origin: http://{addr}\r\n")),
        ("a script with no Origin", String::new()),
    ] {
        let (head, _) = upgrade(addr, &extra);
        assert!(head.starts_with("HTTP/1.1 101"), "{what}: {head}");
    }

    // DNS rebinding: a page whose name now points at 127.0.0.1 looks same-origin.
    let port = addr.port();
    let mut raw = Raw::connect(addr);
    raw.write(
        format!(
            "GET / HTTP/1.1\r\nHost: evil.example:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nOrigin: http://evil.example:{port}\r\n\r\n"
        )
        .as_bytes(),
    );
    let head = raw.read_head();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    server.expect_log("DNS rebinding");
}

#[test]
fn allow_origin_lets_the_named_origins_in() {
    let server = ServerProc::start(&["--allow-origin", "https://app.example"]);
    let (head, _) = upgrade(server.addr, "Origin: https://app.example\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (head, _) = upgrade(server.addr, "Origin: https://other.example\r\n");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let any = ServerProc::start(&["--allow-origin", "*"]);
    let (head, _) = upgrade(any.addr, "Origin: https://other.example\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[test]
fn a_flooder_is_slowed_not_dropped_loses_nothing_and_others_are_not_held_up() {
    const FLOOD: usize = 45;
    const RATE: u32 = 20;
    const BURST: usize = 5;
    let server = server(ServerConfig::default().rate(RATE).burst(BURST as u32));
    let addr = server.local_addr();
    let (mut flooder, flood_tag) = join(addr);
    let (mut other, other_tag) = join(addr);
    let started = Instant::now();
    for i in 0..FLOOD {
        send(&mut flooder, &format!("flood {i}"));
    }
    // Once the flood is being held back, another client speaks: it is not queued behind.
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(recv_text(&mut other));
    }
    send(&mut other, "me too");
    let mut before_mine = None;
    while seen.len() < FLOOD + 1 {
        let line = recv_text(&mut other);
        if line == format!("{other_tag}: me too") {
            before_mine = Some(seen.len());
        }
        seen.push(line);
    }
    let before_mine = before_mine.expect("the other client's message arrived");
    assert!(before_mine < FLOOD, "it overtook the flood ({before_mine})");
    let flood: Vec<String> = seen
        .into_iter()
        .filter(|l| l.starts_with(&flood_tag))
        .collect();
    let expected: Vec<String> = (0..FLOOD)
        .map(|i| format!("{flood_tag}: flood {i}"))
        .collect();
    assert_eq!(flood, expected, "the flood, whole and in order");
    let least = Duration::from_secs_f64((FLOOD - BURST) as f64 / f64::from(RATE));
    assert!(
        started.elapsed() >= least.mul_f64(0.95),
        "held to its rate: {:?}",
        started.elapsed()
    );
    for _ in 0..FLOOD + 1 {
        recv_text(&mut flooder);
    }
    send(&mut flooder, "still connected");
    assert_eq!(
        recv_text(&mut flooder),
        format!("{flood_tag}: still connected")
    );
}

#[test]
fn unasked_for_pongs_are_held_to_the_rate_like_messages() {
    let server = ServerProc::start(&[]);
    let mut raw = Raw::connect(server.addr);
    raw.handshake();
    // More pongs than the default burst (50) allows at once, each masked as a client must.
    let pongs = [0x8a, 0x80, 1, 2, 3, 4].repeat(200);
    raw.write(&pongs);
    server.expect_log("reading it more slowly (--rate)");
}

#[test]
fn a_message_sent_as_a_flood_of_one_byte_fragments_is_held_to_the_rate() {
    let server = ServerProc::start(&[]);
    let mut raw = Raw::connect(server.addr);
    raw.handshake();
    // A text message begun, then a thousand one-byte continuations: it never ends, so it
    // never costs a message's token; its frames cost one for every eight.
    let mut fragments = vec![0x01, 0x81, 1, 2, 3, 4, b'a' ^ 1];
    for _ in 0..1000 {
        fragments.extend([0x00, 0x81, 1, 2, 3, 4, b'b' ^ 1]);
    }
    raw.write(&fragments);
    server.expect_log("reading it more slowly (--rate)");
}

#[test]
fn time_spent_held_back_by_flood_control_is_not_silence() {
    // Each message past the first waits a second, more than two keepalive intervals; the
    // client must not be taken for silent meanwhile.
    let config = ServerConfig::default()
        .rate(1)
        .burst(1)
        .ping_interval(Some(ms(400)));
    let server = server(config);
    let (mut ws, me) = join(server.local_addr());
    for i in 0..3 {
        send(&mut ws, &i.to_string());
    }
    for i in 0..3 {
        assert_eq!(recv_text(&mut ws), format!("{me}: {i}"));
    }
}

/// The server with `options`, for clients that stop reading: a queue that never fills,
/// flood control off, no history.
fn stalling_server(options: &[&str]) -> ServerProc {
    let common = ["--queue", "65536", "--rate", "0", "--history", "0"];
    ServerProc::start(&[options, &common[..]].concat())
}

#[test]
fn a_client_that_never_reads_but_keeps_pinging_is_cut_and_its_thread_and_descriptor_go() {
    // No thread cache: the client's thread should end with it.
    let server = stalling_server(&["--thread-cache", "0", "--write-timeout", "1"]);
    let pid = server.proc.pid();
    let (threads, fds) = (threads_of(pid), fds_of(pid));
    let (mut sender, tag) = join(server.addr);
    let mut stalled = stalled_client(server.addr);
    let stalled_addr = stalled.stream.local_addr().expect("addr");
    thread::scope(|s| {
        let pinger = s.spawn(|| {
            // Pings keep it from looking silent; it never reads.
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if stalled.stream.write_all(&[0x89, 0x80, 1, 2, 3, 4]).is_err() {
                    return true;
                }
                thread::sleep(ms(100));
            }
            false
        });
        flood(&mut sender, &tag, 400, 32 * 1024);
        server.expect_log(&format!("cutting {stalled_addr}: it has not read anything"));
        assert!(pinger.join().expect("pinger"), "the connection was cut");
    });
    eventually("its thread and writer to end", || {
        threads_of(pid) == threads + 1
    });
    eventually("its descriptor to be closed", || fds_of(pid) == fds + 1);
    send(&mut sender, "after");
    assert_eq!(recv_text(&mut sender), format!("{tag}: after"));
}

#[test]
fn backlog_writer_threads_never_outnumber_max_writers_and_the_others_wait_their_turn() {
    const MESSAGES: usize = 200;
    let server = stalling_server(&["--max-writers", "1"]);
    let pid = server.proc.pid();
    let (mut sender, tag) = join(server.addr);
    let mut stalled: Vec<Raw> = (0..3).map(|_| stalled_client(server.addr)).collect();
    let most = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            // Bounded, so that a failing test below cannot leave it running.
            let deadline = Instant::now() + WAIT * 3;
            while !done.load(Ordering::Acquire) && Instant::now() < deadline {
                let writers = threads(&pid.to_string())
                    .iter()
                    .filter(|(name, _)| name.starts_with("writer "))
                    .count();
                most.fetch_max(writers, Ordering::Relaxed);
                thread::sleep(ms(2));
            }
        });
        let expected = flood(&mut sender, &tag, MESSAGES, 32 * 1024);
        server.expect_log("backlog writer threads are busy");
        // Read all three at once: each gets everything, in order, as the one writer
        // passes from one to the next.
        thread::scope(|r| {
            let readers: Vec<_> = stalled
                .iter_mut()
                .map(|raw| r.spawn(|| texts_until_end(raw, &expected)))
                .collect();
            for reader in readers {
                assert_eq!(reader.join().expect("reader"), MESSAGES, "served in full");
            }
        });
        done.store(true, Ordering::Release);
    });
    assert_eq!(
        most.into_inner(),
        1,
        "one writer at a time, and one did run"
    );
}

/// How many of `expected` arrive, in order, before `raw`'s connection ends (or all do).
fn texts_until_end(raw: &mut Raw, expected: &[String]) -> usize {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let mut texts = 0;
    let mut at = 0;
    while texts < expected.len() {
        match raw.stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
        // Whole frames only; each text must be the next one expected.
        while let Some((opcode, payload, next)) = frame_at(&bytes, at) {
            if opcode == 1 {
                assert_eq!(payload, expected[texts].as_bytes(), "no gap, no reordering");
                texts += 1;
            }
            at = next;
        }
    }
    texts
}

/// The server frame starting at `at` in `bytes`, if it is all there, and where the next one
/// starts.
fn frame_at(bytes: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let head = bytes.get(at..at + 2)?;
    let (len, start) = match head[1] & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(
                bytes.get(at + 2..at + 4)?.try_into().ok()?,
            )),
            at + 4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(
                bytes.get(at + 2..at + 10)?.try_into().ok()?,
            ))
            .ok()?,
            at + 10,
        ),
        n => (usize::from(n), at + 2),
    };
    Some((head[0] & 0x0f, bytes.get(start..start + len)?, start + len))
}

#[test]
fn durations_at_their_maximum_do_not_panic() {
    let config = ServerConfig::default()
        .ping_interval(Some(Duration::MAX))
        .handshake_timeout(Duration::MAX)
        .write_timeout(Duration::MAX)
        .close_timeout(Duration::MAX);
    let server = server(config);
    let (mut ws, me) = join(server.local_addr());
    send(&mut ws, "fine");
    assert_eq!(recv_text(&mut ws), format!("{me}: fine"));
    ws.close(None).expect("close");
    assert!(matches!(ws.read(), Ok(Message::Close(_))));
    server.shutdown().expect("clean shutdown");
}
