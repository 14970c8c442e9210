use std::net::TcpListener;
use std::process::Command;

use tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

fn server_binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_server"))
}

#[test]
fn help_documents_every_option_with_its_default() {
    let output = server_binary().arg("--help").output().expect("run --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for (option, default) in [
        ("--bind", "127.0.0.1:8080"),
        ("--history", "16"),
        ("--max-message-size", "65536"),
        ("--queue", "256"),
        ("--ping-interval", "30"),
        ("--handshake-timeout", "10"),
        ("--max-clients", "12000"),
        ("--log-level", "info"),
    ] {
        let at = help
            .find(option)
            .unwrap_or_else(|| panic!("{option} is documented"));
        let rest = &help[at..];
        let entry = &rest[..rest.find("\n  -").unwrap_or(rest.len())];
        assert!(
            entry.contains(&format!("[default: {default}]")),
            "{option}: {entry}"
        );
    }
    assert!(help.contains("--no-web"));
    assert!(help.contains("chat page"), "the page is mentioned");
}

#[test]
fn a_bad_option_is_one_line_and_exit_status_2() {
    for args in [
        &["--queue", "many"][..],
        &["--bind", "nowhere"],
        &["--frobnicate"],
    ] {
        let output = server_binary().args(args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line for {args:?}: {stderr}"
        );
    }
}

#[test]
fn joins_and_departures_are_logged_with_addresses_and_messages_only_at_debug() {
    let server = ServerProc::start(&[]);
    let (mut ws, me) = join(server.addr);
    send(&mut ws, "private words");
    recv_text(&mut ws);
    close(&mut ws, CloseCode::Normal);
    recv_until_close(&mut ws);
    let lines = server.log_until(&format!("{me} left: closed by the client (1000)"));
    assert!(
        lines.iter().any(|l| l.contains(&format!("{me} joined"))),
        "a join is logged: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("private words") && !l.contains("connection from")),
        "what clients say, and each accepted connection, stay out of the default log: \
         {lines:?}"
    );

    let server = ServerProc::start(&["--log-level", "debug"]);
    let (mut ws, me) = join(server.addr);
    server.expect_log(&format!("connection from {me}"));
    send(&mut ws, "log me \"quoted\"");
    recv_text(&mut ws);
    server.expect_log(&format!("{me} says \"log me \\\"quoted\\\"\""));
}

#[test]
fn log_level_warn_leaves_out_the_routine() {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr").port()
    };
    let bind = format!("127.0.0.1:{port}");
    let mut proc = Proc::spawn(
        server_binary()
            .args(["--bind", &bind, "--log-level", "warn"])
            .stderr(std::process::Stdio::piped()),
    );
    let log = lines(proc.child.stderr.take().expect("stderr"));
    let addr = bind.parse().expect("addr");
    eventually("the server to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let (mut ws, me) = join(addr);
    send(&mut ws, "quiet please");
    assert_eq!(recv_text(&mut ws), format!("{me}: quiet please"));
    proc.signal("TERM");
    assert!(proc.wait().success());
    // Every line, up to the end of the process's stderr, not just those read so far.
    let deadline = std::time::Instant::now() + WAIT;
    let logged: Vec<String> = std::iter::from_fn(|| log.recv_deadline(deadline).ok()).collect();
    assert!(
        std::time::Instant::now() < deadline,
        "stderr did not end with the process"
    );
    assert!(logged.iter().all(|l| !l.contains("[INFO]")), "{logged:?}");
}

#[test]
fn an_ipv6_address_can_be_bound() {
    let server = ServerProc::start(&["--bind", "[::1]:0"]);
    assert!(server.addr.is_ipv6());
    let (mut ws, me) = join(server.addr);
    assert!(me.starts_with("[::1]:"));
    send(&mut ws, "six");
    assert_eq!(recv_text(&mut ws), format!("{me}: six"));
}

#[test]
fn an_address_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = server_binary()
        .args(["--bind", &addr])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is another server running?"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn numbers_out_of_range_are_one_line_and_exit_2_never_a_panic() {
    for args in [
        &["--ping-interval", "18446744073709551615"][..],
        &["--handshake-timeout", "99999999999"],
        &["--write-timeout", "0"],
        &["--rate", "-1"],
        &["--max-pending-per-ip", "0"],
        &["--history", "100000"],
    ] {
        let output = server_binary().args(args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(args[0]) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// The soft and hard open-file limits of process `pid` ("self" for this one).
fn open_file_limits(pid: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-file limit");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    // Whatever hard limit the test itself runs under, with a soft limit far below it.
    let (_, hard) = open_file_limits("self");
    let mut command = Command::new("prlimit");
    command.args([
        &format!("--nofile=256:{hard}"),
        env!("CARGO_BIN_EXE_server"),
    ]);
    let server = ServerProc::start_with(&mut command);
    assert_eq!(
        open_file_limits(&server.proc.pid().to_string()),
        (hard.clone(), hard)
    );
}

#[test]
fn a_client_limit_the_open_file_limit_cannot_hold_is_warned_about() {
    let mut command = Command::new("prlimit");
    command.args(["--nofile=512:512", env!("CARGO_BIN_EXE_server")]);
    let server = ServerProc::start_with(&mut command);
    let line = server.expect_log("the open-file limit is 512");
    assert!(
        line.contains("ulimit -n") && line.contains("--max-clients"),
        "{line}"
    );
}
