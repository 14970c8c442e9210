//! The interactive client in a real terminal: tmux (Debian's `tmux`) runs it in a pane,
//! types into it with `send-keys`, and reads the screen with `capture-pane`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

use broadcast_chat::{Server, ServerConfig, WELCOME};

use crate::fake::{Behaviour, Fake, Seen};
use crate::support::*;

const TMUX: &str = "/usr/bin/tmux";

/// tmux, or `None` (and why, on stderr) to skip. Under `CI=true` a missing tmux fails the
/// test: `.ci/run` installs it.
fn tmux() -> Option<PathBuf> {
    let path = PathBuf::from(TMUX);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but there is no tmux at {TMUX}; .ci/run installs Debian's tmux"
    );
    eprintln!("terminal test skipped: no tmux at {TMUX} (apt-get install tmux)");
    None
}

/// A tmux server of our own (its own socket) with one pane running a command.
struct Pane {
    tmux: PathBuf,
    socket: String,
}

impl Pane {
    fn start(tmux: PathBuf, command: &[&str]) -> Pane {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let socket = format!(
            "broadcast-chat-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pane = Pane { tmux, socket };
        let started = pane.run(
            &[
                &[
                    "new-session",
                    "-d",
                    "-x",
                    "100",
                    "-y",
                    "30",
                    "-s",
                    "chat",
                    "--",
                ],
                command,
            ]
            .concat(),
        );
        assert!(started.status.success(), "tmux starts: {started:?}");
        pane
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.tmux)
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .expect("tmux runs")
    }

    /// The screen's lines, without trailing blank ones.
    fn screen(&self) -> Vec<String> {
        let output = self.run(&["capture-pane", "-p", "-t", "chat"]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut lines: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        lines
    }

    /// Wait until the screen satisfies `condition`; returns it.
    fn wait_for(&self, what: &str, condition: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if condition(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{}",
                screen.join("\n")
            );
            thread::sleep(ms(20));
        }
    }

    /// Type `text` as it is (no key names).
    fn type_text(&self, text: &str) {
        let typed = self.run(&["send-keys", "-t", "chat", "-l", text]);
        assert!(typed.status.success(), "{typed:?}");
    }

    /// The process the pane's shell runs in the foreground.
    fn foreground_child(&self) -> u32 {
        let shown = self.run(&["display-message", "-p", "-t", "chat", "#{pane_pid}"]);
        let shell = String::from_utf8_lossy(&shown.stdout).trim().to_string();
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .expect("the shell's children");
        children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .expect("the shell runs a command")
    }

    fn enter(&self) {
        self.run(&["send-keys", "-t", "chat", "Enter"]);
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn client_in_pane(tmux: PathBuf, url: &str) -> Pane {
    Pane::start(tmux, &[env!("CARGO_BIN_EXE_client"), url])
}

fn last_is(screen: &[String], line: &str) -> bool {
    screen.last().is_some_and(|l| l == line)
}

#[test]
fn a_message_arriving_mid_line_goes_above_and_the_draft_stays_whole() {
    let Some(tmux) = tmux() else { return };
    let server = default_server();
    let addr = server.local_addr();
    let pane = client_in_pane(tmux, &format!("ws://{addr}"));
    pane.wait_for("the welcome and the prompt", |s| {
        s.iter().any(|l| l == WELCOME) && last_is(s, ">")
    });
    let (mut other, other_tag) = join(addr);

    pane.type_text("half a li");
    pane.wait_for("the draft", |s| last_is(s, "> half a li"));
    send(&mut other, "hello from elsewhere");
    // The repaint is several writes, and tmux may be read between them: wait for both.
    pane.wait_for("the message above the prompt, the draft whole below", |s| {
        s.iter()
            .any(|l| l == &format!("{other_tag}: hello from elsewhere"))
            && last_is(s, "> half a li")
    });
    recv_text(&mut other);

    pane.type_text("ne");
    pane.enter();
    let line = recv_text(&mut other);
    let (tag, text) = line.split_once(": ").expect("tagged");
    assert_eq!(text, "half a line", "what was typed, whole");
    pane.wait_for("our own message, marked", |s| {
        s.iter().any(|l| l == &format!("{tag} (you): half a line"))
    });
}

#[test]
fn a_long_pasted_line_is_sent_whole() {
    let Some(tmux) = tmux() else { return };
    let server = default_server();
    let addr = server.local_addr();
    let pane = client_in_pane(tmux, &format!("ws://{addr}"));
    pane.wait_for("the prompt", |s| last_is(s, ">"));
    let (mut other, _) = join(addr);
    let long = "0123456789".repeat(500);
    pane.type_text(&long);
    pane.enter();
    let line = recv_text(&mut other);
    assert_eq!(
        line.split_once(": ").map(|(_, t)| t.len()),
        Some(long.len())
    );
}

#[test]
fn the_client_reconnects_after_a_restart_and_sends_what_was_typed_meanwhile() {
    let Some(tmux) = tmux() else { return };
    let server = default_server();
    let addr = server.local_addr();
    let pane = client_in_pane(tmux, &format!("ws://{addr}"));
    pane.wait_for("the prompt", |s| last_is(s, ">"));

    server.shutdown().expect("clean shutdown");
    pane.wait_for("the news of the close", |s| {
        s.iter()
            .any(|l| l.contains("1001") && l.contains("reconnecting in"))
    });
    pane.type_text("typed while it was down");
    pane.enter();
    pane.wait_for("word that it will be sent later", |s| {
        s.iter().any(|l| l.contains("not connected"))
    });

    let restarted = Server::with_config(ServerConfig::default().bind(addr)).expect("same port");
    let (mut other, _) = join(restarted.local_addr());
    pane.wait_for("the reconnect", |s| {
        s.iter().any(|l| l.contains("reconnected"))
    });
    let mut line = recv_text(&mut other);
    while !line.ends_with(": typed while it was down") {
        line = recv_text(&mut other);
    }
    pane.type_text("and after");
    pane.enter();
    assert!(recv_text(&mut other).ends_with(": and after"));
}

#[test]
fn ctrl_c_leaves_the_draft_and_the_goodbye_starts_a_line_of_its_own() {
    let Some(tmux) = tmux() else { return };
    let server = default_server();
    let script = format!(
        "{} ws://{}; echo \"exit status $?\"; sleep 30",
        env!("CARGO_BIN_EXE_client"),
        server.local_addr()
    );
    let pane = Pane::start(tmux, &["sh", "-c", &script]);
    pane.wait_for("the prompt", |s| last_is(s, ">"));
    pane.type_text("an unsent dra");
    pane.wait_for("the draft", |s| last_is(s, "> an unsent dra"));
    pane.run(&["send-keys", "-t", "chat", "C-c"]);
    let screen = pane.wait_for("the exit", |s| last_is(s, "exit status 0"));
    let at = screen
        .iter()
        .position(|l| l == "> an unsent dra")
        .expect("the draft stays on screen");
    assert_eq!(
        screen[at + 1],
        "connection closed (1000)",
        "on a line of its own: {screen:?}"
    );
}

#[test]
fn a_second_signal_exits_at_once_and_leaves_the_terminal_as_it_was() {
    let Some(tmux) = tmux() else { return };
    // A server that never answers the close: the first signal leaves the client waiting.
    let fake = Fake::start(Behaviour::NEVER_ANSWERS_CLOSE);
    let script = format!(
        "{} {}; echo \"exit status $?\"; stty -a | tr ' ;' '\\n\\n' | grep -x -e -icanon \
         -e icanon -e -echo -e echo; sleep 30",
        env!("CARGO_BIN_EXE_client"),
        fake.url()
    );
    let pane = Pane::start(tmux, &["sh", "-c", &script]);
    pane.wait_for("the prompt", |s| last_is(s, ">"));
    let client = pane.foreground_child();
    signal(client, "TERM");
    assert_eq!(
        fake.seen.recv_timeout(WAIT).expect("the close"),
        Seen::Close(Some(1000))
    );
    // The editor still holds the terminal in raw mode while the client waits.
    signal(client, "TERM");
    let screen = pane.wait_for("the settings after the exit", |s| {
        s.iter().any(|l| l == "exit status 130") && s.iter().any(|l| l.ends_with("echo"))
    });
    let at = screen
        .iter()
        .position(|l| l == "exit status 130")
        .expect("the exit");
    assert_eq!(
        screen[at + 1..],
        ["icanon", "echo"],
        "back in cooked mode, as before the client: {screen:?}"
    );
}
