use std::collections::HashSet;
use std::net::TcpStream;
use std::process::Command;
use std::thread;

use broadcast_chat::{ServerConfig, WELCOME};
use socket2::{Domain, Socket, Type};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

#[test]
fn shutdown_delivers_what_is_queued_then_closes_with_1001() {
    const MESSAGES: usize = 100;
    let server = unthrottled(ServerConfig::default());
    let addr = server.local_addr();
    // A receiver with a small buffer, so most of what it is sent waits in the server.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(8192).expect("small buffer");
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let (mut slow, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("handshake");
    let (mut sender, tag) = join(addr);
    let payload = "q".repeat(20_000);
    for i in 0..MESSAGES {
        send(&mut sender, &format!("{i} {payload}"));
        recv_text(&mut sender);
    }
    // Every message has been broadcast: the sender heard them all. Now stop.
    thread::scope(|s| {
        let stopping = s.spawn(|| server.shutdown());
        let (code, reason, texts) = recv_until_close(&mut slow);
        let _ = slow.flush();
        assert_eq!(
            texts.len(),
            MESSAGES + 1,
            "the welcome and every queued message"
        );
        for (i, text) in texts[1..].iter().enumerate() {
            assert_eq!(text, &format!("{tag}: {i} {payload}"));
        }
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
        stopping
            .join()
            .expect("shutdown thread")
            .expect("clean shutdown");
    });
}

#[test]
fn shutdown_ends_even_when_clients_never_answer_the_close() {
    let server = server(ServerConfig::default());
    let addr = server.local_addr();
    let mut silent = Raw::join(addr);
    let _half_open = Raw::connect(addr);
    server.shutdown().expect("clean shutdown");
    assert_eq!(silent.read_close(), 1001);
    assert!(silent.closed_by_server());
}

fn signal_test(signal: &str) {
    let server = ServerProc::start(&[]);
    let (mut ws, _) = join(server.addr);
    let mut proc = server.proc;
    proc.signal(signal);
    let (code, reason, _) = recv_until_close(&mut ws);
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    let _ = ws.flush();
    let status = proc.wait();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    signal_test("TERM");
}

#[test]
fn sigint_closes_every_client_with_1001_and_exits_0() {
    signal_test("INT");
}

#[test]
fn connect_close_cycles_leave_threads_and_descriptors_where_they_started() {
    let server = ServerProc::start(&["--history", "0", "--thread-cache", "0"]);
    let pid = server.proc.pid();
    let threads = threads_of(pid);
    let fds = fds_of(pid);
    for i in 0..300 {
        let (mut ws, me) = join(server.addr);
        send(&mut ws, &format!("cycle {i}"));
        let (code, _, texts) = {
            assert_eq!(recv_text(&mut ws), format!("{me}: cycle {i}"));
            close(&mut ws, CloseCode::Normal);
            recv_until_close(&mut ws)
        };
        assert_eq!(code, 1000);
        assert!(texts.is_empty());
    }
    eventually("threads back to the start", || threads_of(pid) == threads);
    eventually("descriptors back to the start", || fds_of(pid) == fds);
}

#[test]
fn each_idle_client_costs_one_thread_and_one_descriptor() {
    let server = ServerProc::start(&["--thread-cache", "0"]);
    let pid = server.proc.pid();
    let (threads, fds) = (threads_of(pid), fds_of(pid));
    let clients: Vec<_> = (0..50).map(|_| join(server.addr)).collect();
    eventually("one thread per client", || threads_of(pid) == threads + 50);
    assert_eq!(fds_of(pid), fds + 50, "one descriptor per client");
    drop(clients);
    eventually("threads released", || threads_of(pid) == threads);
    eventually("descriptors released", || fds_of(pid) == fds);
}

#[test]
fn the_dispatcher_is_scheduled_as_a_batch_thread_and_the_rest_as_started() {
    let server = ServerProc::start(&[]);
    let (_ws, _) = join(server.addr);
    let pid = server.proc.pid();
    let started = policy(&format!("/proc/{pid}/stat")).expect("the server's policy");
    let policies: Vec<(String, String)> = threads(&pid.to_string())
        .into_iter()
        .filter_map(|(name, stat)| Some((name, policy(&stat)?)))
        .collect();
    let batch = libc::SCHED_BATCH.to_string();
    assert!(
        policies.contains(&("dispatcher".to_string(), batch.clone())),
        "the dispatcher runs as SCHED_BATCH: {policies:?}"
    );
    // Backlog writers, which the dispatcher starts, may inherit its policy; none runs here.
    assert!(
        policies
            .iter()
            .filter(|(name, _)| name != "dispatcher")
            .all(|(_, policy)| *policy == started),
        "every other thread keeps the policy the server was started with ({started}): \
         {policies:?}"
    );
}

/// The ids of process `pid`'s threads.
fn thread_ids(pid: u32) -> HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn one_client_after_another_is_served_by_the_same_few_waiting_threads() {
    let server = ServerProc::start(&["--history", "0"]);
    let pid = server.proc.pid();
    let before = thread_ids(pid);
    let mut seen = HashSet::new();
    for i in 0..100 {
        let (mut ws, me) = join(server.addr);
        seen.extend(thread_ids(pid).difference(&before).cloned());
        send(&mut ws, &format!("cycle {i}"));
        assert_eq!(recv_text(&mut ws), format!("{me}: cycle {i}"));
        close(&mut ws, CloseCode::Normal);
        assert_eq!(recv_until_close(&mut ws).0, 1000);
    }
    // Without the cache, each of the 100 clients would have had a thread of its own.
    assert!(
        seen.len() <= 10,
        "{} threads served 100 clients one after another",
        seen.len()
    );
}

#[test]
fn waiting_threads_are_bounded_reused_and_end_when_idle() {
    let server = ServerProc::start(&["--thread-cache", "20", "--thread-idle", "4"]);
    let pid = server.proc.pid();
    let threads = threads_of(pid);
    let clients: Vec<_> = (0..50).map(|_| join(server.addr)).collect();
    eventually("a thread per client", || threads_of(pid) == threads + 50);
    drop(clients);
    eventually("20 waiting besides the first, the others ended", || {
        threads_of(pid) == threads + 20
    });
    let waiting = thread_ids(pid);
    let clients: Vec<_> = (0..20).map(|_| join(server.addr)).collect();
    assert_eq!(
        thread_ids(pid),
        waiting,
        "the 20 new clients are served by the waiting threads"
    );
    drop(clients);
    // Waiting for --thread-idle (4 s), then gone: an idle server gives its threads back.
    eventually("the waiting threads end", || threads_of(pid) == threads);
}

#[test]
fn a_client_quiet_for_longer_than_the_thread_idle_time_stays_connected() {
    // Waiting threads end after --thread-idle through the listening socket's receive
    // timeout, which accepted sockets inherit; a connection must not keep it.
    // A request already there when the thread first reads is read without the handshake
    // setting any timeout of its own: the server is stopped while the clients connect and
    // send theirs, so that it finds them all waiting.
    let server = ServerProc::start(&["--thread-idle", "1", "--history", "0"]);
    let pid = server.proc.pid().to_string();
    let signal = |name: &str| {
        let status = Command::new("kill").args([name, &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {name} {pid}");
    };
    signal("-STOP");
    let mut clients: Vec<Raw> = (0..5)
        .map(|_| {
            let mut raw = Raw::connect(server.addr);
            raw.handshake_request();
            raw
        })
        .collect();
    signal("-CONT");
    for raw in &mut clients {
        assert!(raw.read_head().starts_with("HTTP/1.1 101"));
        assert_eq!(raw.read_frame(), (1, WELCOME.as_bytes().to_vec()));
    }
    // The quiet spell is what is tested, so it is slept, not waited on.
    thread::sleep(ms(2500));
    for i in 0..clients.len() {
        let me = clients[i].stream.local_addr().expect("addr");
        clients[i].masked(0x81, b"still here");
        let echo = format!("{me}: still here").into_bytes();
        for raw in &mut clients {
            let to = raw.stream.local_addr().expect("addr");
            assert_eq!(raw.read_frame(), (1, echo.clone()), "{to} heard {me}");
        }
    }
}

#[test]
fn running_out_of_descriptors_does_not_end_the_server() {
    let mut command = Command::new("prlimit");
    command.args(["--nofile=48:48", env!("CARGO_BIN_EXE_server")]);
    let server = ServerProc::start_with(&mut command);
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(stream) = TcpStream::connect(server.addr) {
            held.push(stream);
        }
    }
    server.expect_log("cannot accept connections");
    drop(held);
    let (mut ws, me) = join(server.addr);
    send(&mut ws, "still serving");
    assert_eq!(recv_text(&mut ws), format!("{me}: still serving"));
}

#[test]
fn a_backlog_writer_thread_lives_only_while_its_client_is_behind() {
    let server = ServerProc::start(&[
        "--queue",
        "8",
        "--history",
        "0",
        "--rate",
        "0",
        "--thread-cache",
        "0",
    ]);
    let pid = server.proc.pid();
    let threads = threads_of(pid);
    let _stalled = stalled_client(server.addr);
    let (mut sender, tag) = join(server.addr);
    flood(&mut sender, &tag, 600, 16 * 1024);
    // Two clients and the stalled one's writer, until its unanswered close times out.
    eventually("a writer for the stalled client", || {
        threads_of(pid) == threads + 3
    });
    server.expect_log("fell 8 messages behind");
    eventually("the stalled client and its writer gone", || {
        threads_of(pid) == threads + 1
    });
    drop(sender);
    eventually("back to the start", || threads_of(pid) == threads);
}
