//! Where the client's lines come from and its messages go: the [`Sink`] that shows them,
//! and, for scripts, the pipe on both ends.
//!
//! In a pipe, stdout gets exactly one message per line, as the server wrote it (with
//! control characters escaped), and status lines go to stderr through the log, so that a
//! script can read one and a person the other.

use std::hash::{Hash, Hasher};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsFd;
use std::thread;

use crossbeam_channel::Sender;
use log::info;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::message::{LONGEST_MESSAGE, printable};

/// What the input thread tells the session.
#[derive(Debug)]
pub(crate) enum Input {
    /// A line to send.
    Line(String),
    /// Ctrl-C at the prompt.
    Interrupted,
    /// A line that could not be sent: not UTF-8, or the input failed.
    Skipped,
    /// The input ended: Ctrl-D, or the end of the pipe.
    End,
}

/// Shows messages and status lines.
pub(crate) trait Sink: Send + Sync {
    /// Show one message from the server; `own` when it is one of ours.
    ///
    /// # Errors
    /// The output is gone (a pipe whose reader left), or failed.
    fn message(&self, text: &str, own: bool) -> io::Result<()>;

    /// Show a status line: connected, lost, reconnecting.
    fn status(&self, line: &str);
}

/// Messages to a writer (stdout), status lines to the log (stderr).
pub(crate) struct PipeSink {
    output: Mutex<Box<dyn Write + Send>>,
    color: bool,
}

impl PipeSink {
    pub(crate) fn new(output: Box<dyn Write + Send>, color: bool) -> Self {
        Self {
            output: Mutex::new(output),
            color,
        }
    }
}

impl Sink for PipeSink {
    fn message(&self, text: &str, _own: bool) -> io::Result<()> {
        let line = if self.color {
            paint(text, None)
        } else {
            printable(text).into_owned()
        };
        let mut output = self.output.lock();
        writeln!(output, "{line}")?;
        output.flush()
    }

    fn status(&self, line: &str) {
        info!("{line}");
    }
}

/// `text` made printable, its sender's tag coloured by address (the same address gets the
/// same colour every time), and marked as ours when `own` says so. `own` is `None` where
/// messages are not marked (a pipe keeps the server's exact format).
pub(crate) fn paint(text: &str, own: Option<bool>) -> String {
    let text = printable(text);
    let Some((tag, body)) = text.split_once(": ") else {
        return format!("\x1b[2m{text}\x1b[0m");
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    tag.hash(&mut hasher);
    let hue = 31 + hasher.finish() % 6;
    match own {
        Some(true) => format!("\x1b[1;{hue}m{tag} (you)\x1b[0m: {body}"),
        _ => format!("\x1b[{hue}m{tag}\x1b[0m: {body}"),
    }
}

/// Start the thread that reads lines from a pipe and hands them to the session. It ends
/// at the end of the input; the session does not wait for it, since it may be blocked
/// reading a terminal that nobody types into.
///
/// # Errors
/// [`Error::Spawn`] when the thread cannot be started.
pub(crate) fn read_lines(input: Box<dyn BufRead + Send>, lines: Sender<Input>) -> Result<()> {
    spawn_input(move || forward_lines(input, &lines))
}

/// Start the input thread, whichever way it reads. It is not joined: it ends at the end
/// of its input, or with the process.
///
/// # Errors
/// [`Error::Spawn`] when the thread cannot be started.
pub(crate) fn spawn_input(body: impl FnOnce() + Send + 'static) -> Result<()> {
    thread::Builder::new()
        .name("stdin".into())
        .spawn(body)
        .map(drop)
        .map_err(|source| Error::Spawn {
            what: "stdin",
            source,
        })
}

fn forward_lines(mut input: Box<dyn BufRead + Send>, lines: &Sender<Input>) {
    let mut line = Vec::new();
    // At most the longest message and its line end: input without newlines (`yes | tr -d
    // '\n'`) must not grow without end.
    let longest = LONGEST_MESSAGE as u64 + 2;
    loop {
        line.clear();
        let read = match (&mut input).take(longest).read_until(b'\n', &mut line) {
            // The rest of a line too long is read and dropped, through its newline.
            Ok(_) if line.len() as u64 == longest && !line.ends_with(b"\n") => {
                input.skip_until(b'\n').map(|_| None)
            }
            read => read.map(Some),
        };
        match read {
            Ok(Some(0)) => break,
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = writeln!(
                    io::stderr(),
                    "client: skipped a line longer than {LONGEST_MESSAGE} bytes, more than any \
                     server of ours takes"
                );
                let _ = lines.send(Input::Skipped);
                continue;
            }
            Err(e) => {
                let _ = writeln!(io::stderr(), "client: cannot read the input: {e}");
                let _ = lines.send(Input::Skipped);
                break;
            }
        }
        let text = match std::str::from_utf8(&line) {
            Ok(text) => text.trim_end_matches(['\n', '\r']),
            Err(_) => {
                let _ = writeln!(
                    io::stderr(),
                    "client: skipped a line that is not valid UTF-8"
                );
                let _ = lines.send(Input::Skipped);
                continue;
            }
        };
        if !text.is_empty() && lines.send(Input::Line(text.to_string())).is_err() {
            return;
        }
    }
    let _ = lines.send(Input::End);
}

/// Whether the reader of `output` has gone away (`client URL | head -1` after `head`
/// exits), without writing to it: a pipe whose reader closed polls as an error.
pub(crate) fn is_gone(output: &impl AsFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(output.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paint_colours_by_address_marks_our_own_and_escapes() {
        let a = paint("10.0.0.1:5: hi", Some(false));
        assert_eq!(
            a,
            paint("10.0.0.1:5: other text", Some(false)).replace("other text", "hi")
        );
        assert!(paint("10.0.0.1:5: hi", Some(true)).contains("10.0.0.1:5 (you)"));
        assert!(
            paint("x:1: \u{1b}[2J", None).contains("\\u{1b}[2J"),
            "escaped first"
        );
        assert!(paint("Welcome to chat!", None).contains("Welcome to chat!"));
    }
}
