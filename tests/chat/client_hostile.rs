//! The client against servers that misbehave: silent, deaf, slow to answer the handshake,
//! sending more than any server of ours would. Each is a one-connection server written
//! here, down to the bytes it sends, since no well-behaved library would send them.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use broadcast_chat::client::{self, Console};
use broadcast_chat::{ClientConfig, Error};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::support::*;

/// A server for one client: `serve` gets its socket once accepted (after the WebSocket
/// handshake when `upgrade`). Returns the URL and the server's thread, which gives back
/// what `serve` returns.
fn one_client<T: Send + 'static>(
    upgrade: bool,
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (String, JoinHandle<T>) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    // Small, so that a server that does not read is full after a few kilobytes.
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into(),
        )
        .expect("bind");
    socket.listen(1).expect("listen");
    let listener: TcpListener = socket.into();
    let url = format!("ws://{}", listener.local_addr().expect("addr"));
    let thread = thread::spawn(move || {
        let stream = accept_within(&listener, WAIT);
        if upgrade {
            let ws = tungstenite::accept(stream).expect("the client's handshake");
            serve(ws.into_inner())
        } else {
            serve(stream)
        }
    });
    (url, thread)
}

fn accept_within(listener: &TcpListener, wait: Duration) -> TcpStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                return stream;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(ms(5));
            }
            Err(e) => panic!("no client came: {e}"),
        }
    }
}

/// The opcodes of the (masked) frames the client sent, read until it closed the
/// connection or `wait` passed.
fn opcodes_until_gone(mut stream: TcpStream, wait: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(wait)).expect("timeout");
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let mut opcodes = Vec::new();
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let (opcode, short) = (bytes[at] & 0x0f, usize::from(bytes[at + 1] & 0x7f));
        let (len, header) = match short {
            126 => (
                usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                4,
            ),
            127 => panic!("the client sent a frame over 64 KiB"),
            len => (len, 2),
        };
        opcodes.push(opcode);
        at += header + 4 + len;
    }
    opcodes
}

/// The client against `url` with `args`, its stdin held open and never written to.
fn listening_client(url: &str, args: &[&str]) -> std::process::Output {
    let mut proc = Proc::spawn(client(url).args(args));
    let _stdin = proc.child.stdin.take();
    proc.output()
}

#[test]
fn a_server_that_falls_silent_is_pinged_then_given_up_on() {
    let (url, server) = one_client(true, |stream| opcodes_until_gone(stream, WAIT));
    let started = Instant::now();
    let output = listening_client(&url, &["--keepalive", "1"]);
    let waited = started.elapsed();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sent nothing for 2 s, not even an answer to a ping"),
        "{stderr}"
    );
    assert!(waited >= Duration::from_secs(2), "not before: {waited:?}");
    let opcodes = server.join().expect("server");
    assert_eq!(opcodes.first(), Some(&0x9), "a ping first: {opcodes:?}");
    assert!(
        opcodes[1..].iter().all(|&op| op == 0x8),
        "then at most a goodbye: {opcodes:?}"
    );
}

/// The client with `--keepalive SECS`, fed lines of 1000 bytes until it stops reading
/// them, against a server that upgrades it and then runs `serve`, given a channel that
/// ends (and its waits with it) once the client has exited. Returns the client's output
/// and what it printed on stderr.
fn sending_without_end(
    keepalive: &str,
    serve: impl FnOnce(TcpStream, &Receiver<()>) + Send + 'static,
) -> (std::process::Output, String) {
    let (done, hold) = crossbeam_channel::bounded::<()>(0);
    let (url, server) = one_client(true, move |stream| serve(stream, &hold));
    let mut command = client(&url);
    command.args(["--keepalive", keepalive, "--no-confirm"]);
    let line = "x".repeat(1000);
    let output = fed(
        &mut command,
        move |stdin| {
            while writeln!(stdin, "{line}").is_ok() {}
        },
    );
    drop(done);
    server.join().expect("server");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stderr)
}

#[test]
fn a_server_that_neither_reads_nor_talks_cannot_hang_a_sending_client() {
    let (output, stderr) = sending_without_end("1", |stream, hold| {
        // Hold the connection without a word or a byte read until the test is over.
        let _ = hold.recv_timeout(WAIT * 2);
        drop(stream);
    });
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    // Found by the send, stalled with nothing heard, or by the reader, when it pinged
    // before the sends were stuck (on loopback the send buffer grows to megabytes first,
    // which under load can take a debug build over a second). The send's own verdict has
    // a unit test (`link::tests`).
    assert!(
        (stderr.contains("took none of our data for") && stderr.contains("we heard nothing"))
            || stderr.contains("sent nothing for 2 s, not even an answer to a ping"),
        "{stderr}"
    );
}

#[test]
fn a_server_that_half_closes_without_reading_cannot_hang_a_sending_client() {
    // A keepalive longer than the test waits for the client's exit: only the end of stream
    // can end it in time (the reader, finding it, cuts the socket under the stuck send).
    let (output, stderr) = sending_without_end("60", |stream, hold| {
        // Never a byte read; once the client's sends are stuck (its 4 KiB are full long
        // before), its end of the conversation (a FIN), and no reset.
        let _ = hold.recv_timeout(ms(1500));
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = hold.recv_timeout(WAIT * 2);
        drop(stream);
    });
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert!(stderr.contains("closed the connection"), "{stderr}");
}

#[test]
fn a_server_that_stops_reading_but_talks_is_waited_for() {
    let (done, hold) = crossbeam_channel::bounded::<()>(0);
    let (url, server) = one_client(true, move |mut stream| {
        // As ours does with a client far over its --rate: it reads on only later, and goes
        // on talking meanwhile.
        let deadline = Instant::now() + WAIT * 2;
        while matches!(hold.recv_timeout(ms(100)), Err(RecvTimeoutError::Timeout))
            && Instant::now() < deadline
        {
            if stream.write_all(&[0x81, 0x02, b'h', b'i']).is_err() {
                return;
            }
        }
    });
    let mut proc = Proc::spawn(client(&url).args(["--keepalive", "1", "--no-confirm"]));
    let mut stdin = proc.child.stdin.take().expect("stdin");
    let started = Instant::now();
    let fed_at_ms = Arc::new(AtomicU64::new(0));
    let feeding = {
        let fed_at_ms = Arc::clone(&fed_at_ms);
        thread::spawn(move || {
            let line = "x".repeat(1000);
            while writeln!(stdin, "{line}").is_ok() {
                let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                fed_at_ms.store(now, Ordering::Relaxed);
            }
        })
    };
    // Until the client has taken no input for three keepalive times (its send is stuck,
    // the server silent on none of them), it must stay connected.
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let exited = proc.child.try_wait().expect("try_wait");
        assert!(exited.is_none(), "the client gave up: {exited:?}");
        let fed_at = Duration::from_millis(fed_at_ms.load(Ordering::Relaxed));
        if started.elapsed().saturating_sub(fed_at) >= Duration::from_secs(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client's sends never got stuck"
        );
        thread::sleep(ms(50));
    }
    drop(done);
    let output = proc.output();
    feeding.join().expect("feeding");
    server.join().expect("server");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("took none of our data"), "{stderr}");
}

#[test]
fn a_handshake_answer_trickled_a_byte_at_a_time_ends_at_the_connect_timeout() {
    let (url, server) = one_client(false, |mut stream| {
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        let deadline = Instant::now() + WAIT;
        for byte in b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n".repeat(100) {
            if stream.write_all(&[byte]).is_err() || Instant::now() > deadline {
                return;
            }
            thread::sleep(ms(50));
        }
    });
    let config = ClientConfig::default()
        .url(url)
        .connect_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let result = run_library_client(config);
    let waited = started.elapsed();
    match result {
        Err(Error::Handshake { reason, .. }) => {
            assert!(
                reason.contains("did not answer the handshake in time"),
                "{reason}"
            );
        }
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(3), "one deadline: {waited:?}");
    server.join().expect("server");
}

/// `client::run` with nothing to send, on a thread, waited for at most [`WAIT`].
fn run_library_client(config: ClientConfig) -> broadcast_chat::Result<client::Outcome> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (_interrupt_tx, interrupt): (_, Receiver<()>) = crossbeam_channel::bounded(1);
    let running = thread::spawn(move || {
        let console = Console::Pipe(Box::new(io::BufReader::new(io::empty())));
        let _ = tx.send(client::run(&config, console, &interrupt));
    });
    let result = rx
        .recv_timeout(WAIT)
        .expect("the client to give up in time");
    running.join().expect("client thread");
    result
}

#[test]
fn a_message_longer_than_any_server_of_ours_sends_is_refused() {
    let (url, server) = one_client(true, |mut stream| {
        // A 24 MiB text message in three fragments of 8 MiB: each is a frame tungstenite
        // takes by default, and so is the whole.
        let fragment = vec![b'x'; 8 << 20];
        for first_byte in [0x01, 0x00, 0x80] {
            let mut header = vec![first_byte, 127];
            header.extend_from_slice(&(fragment.len() as u64).to_be_bytes());
            if stream.write_all(&header).is_err() || stream.write_all(&fragment).is_err() {
                break;
            }
        }
        opcodes_until_gone(stream, WAIT)
    });
    let output = listening_client(&url, &[]);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Message too long"), "{stderr}");
    server.join().expect("server");
}

#[test]
fn a_close_from_the_server_is_answered_once() {
    let (url, server) = one_client(true, |mut stream| {
        // Close (1000) first, then see what the client says.
        let _ = stream.write_all(&[0x88, 0x02, 0x03, 0xe8]);
        opcodes_until_gone(stream, WAIT)
    });
    let output = listening_client(&url, &["--no-confirm"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(
        server.join().expect("server"),
        [0x8],
        "one close, the answer"
    );
}
