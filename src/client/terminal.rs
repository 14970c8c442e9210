//! The client at a terminal: a line editor (rustyline: the usual keys, and the history of
//! what was typed this session), with incoming messages printed above the line being
//! typed, which stays whole and in place.
//!
//! rustyline's external printer is how the socket-reader thread prints while the input
//! thread sits in `readline`: it hands the text to the editor, which clears the prompt
//! line, prints, and redraws the prompt with the draft as it was.

use std::io::{self, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::Sender;
use log::{debug, log_enabled};
use nix::sys::termios::{self, SetArg, Termios};
use parking_lot::Mutex;
use rustyline::error::ReadlineError;
use rustyline::{Config, DefaultEditor, ExternalPrinter};

use super::console::{Input, Sink, paint, spawn_input};
use crate::error::{Error, Result};
use crate::message::printable;

/// Lines of history kept for recall with the arrow keys.
const HISTORY: usize = 1000;

/// Messages and status lines printed above the prompt.
pub(crate) struct TerminalSink<P> {
    printer: Mutex<P>,
    color: bool,
}

impl<P: ExternalPrinter + Send> Sink for TerminalSink<P> {
    fn message(&self, text: &str, own: bool) -> io::Result<()> {
        let line = if self.color {
            paint(text, Some(own))
        } else if own && let Some((tag, body)) = text.split_once(": ") {
            printable(&format!("{tag} (you): {body}")).into_owned()
        } else {
            printable(text).into_owned()
        };
        self.print(line)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn status(&self, line: &str) {
        if !log_enabled!(log::Level::Info) {
            return;
        }
        if !io::stderr().is_terminal() {
            // Status goes to stderr; above the prompt only when that is this terminal.
            log::info!("{line}");
            return;
        }
        let line = if self.color {
            format!("\x1b[2m* {line}\x1b[0m")
        } else {
            format!("* {line}")
        };
        let _ = self.print(line);
    }
}

impl<P: ExternalPrinter> TerminalSink<P> {
    /// Print one line. The newline is ours: while the editor is reading, it would add one,
    /// but before it starts the printer writes straight to the terminal.
    fn print(&self, mut line: String) -> rustyline::Result<()> {
        line.push('\n');
        self.printer.lock().print(line)
    }
}

/// What the editor thread and the guard below share.
#[derive(Debug, Default)]
struct Editing {
    /// The editor is inside `readline`, with the terminal in raw mode.
    reading: AtomicBool,
    /// The session is over: do not start reading again.
    over: AtomicBool,
}

/// The terminal's settings as they were before the editor changed them, put back when
/// dropped: the process may end while the input thread is still inside `readline`, with
/// the terminal in raw mode. Then the line being typed is left as it is, and what comes
/// next starts on a line of its own.
struct Restore {
    saved: Option<Termios>,
    editing: Arc<Editing>,
}

/// The terminal in use, where [`put_terminal_back`] finds it.
static IN_USE: Mutex<Option<Restore>> = Mutex::new(None);

/// Put the terminal back as it was before the client took it, if it took it: for an exit
/// that skips the usual way out (a second Ctrl-C exits at once, from the signal handler's
/// thread, while the editor may hold the terminal in raw mode).
pub fn put_terminal_back() {
    // Whoever holds the lock is putting the terminal back already (or taking it): wait a
    // little for them to finish, so that an exit from here does not overtake them, but
    // never for ever at an exit.
    if let Some(mut in_use) = IN_USE.try_lock_for(Duration::from_millis(100)) {
        drop(in_use.take());
    }
}

/// Puts the terminal back when the run ends, whichever way it ends.
pub(crate) struct Restored(());

impl Drop for Restored {
    fn drop(&mut self) {
        put_terminal_back();
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        self.editing.over.store(true, Ordering::Release);
        if self.editing.reading.load(Ordering::Acquire) {
            // A new line, and bracketed paste off again, as the editor would on its way out;
            // straight to the descriptor, not through the stdout lock another thread may
            // hold while it waits on the terminal.
            let _ = nix::unistd::write(io::stdout(), b"\r\n\x1b[?2004l");
        }
        if let Some(saved) = &self.saved
            && let Err(e) = termios::tcsetattr(io::stdin(), SetArg::TCSANOW, saved)
        {
            debug!("cannot restore the terminal's settings: {e}");
        }
    }
}

/// The line editor, set up but not reading yet.
pub(crate) struct Editor {
    editor: DefaultEditor,
    editing: Arc<Editing>,
}

/// Set up the line editor; returns where messages are to be shown, the editor (to be
/// started once connected), and the guard that puts the terminal back.
///
/// # Errors
/// [`Error::Io`] when the terminal cannot be set up (a `TERM=dumb` terminal, say).
pub(crate) fn open(color: bool) -> Result<(Box<dyn Sink>, Editor, Restored)> {
    let editing = Arc::new(Editing::default());
    *IN_USE.lock() = Some(Restore {
        saved: termios::tcgetattr(io::stdin()).ok(),
        editing: Arc::clone(&editing),
    });
    let restore = Restored(());
    let config = Config::builder()
        .max_history_size(HISTORY)
        .map_err(terminal_error)?
        .auto_add_history(true)
        .build();
    let mut editor = DefaultEditor::with_config(config).map_err(terminal_error)?;
    let printer = editor.create_external_printer().map_err(terminal_error)?;
    let sink = TerminalSink {
        printer: Mutex::new(printer),
        color,
    };
    Ok((Box::new(sink), Editor { editor, editing }, restore))
}

/// Read lines with the editor on a thread of its own, handing them to the session.
///
/// # Errors
/// [`Error::Spawn`] when the thread cannot be started.
pub(crate) fn start(editor: Editor, lines: Sender<Input>) -> Result<()> {
    spawn_input(move || edit_lines(editor, &lines))
}

fn terminal_error(e: ReadlineError) -> Error {
    Error::Io(io::Error::other(format!("cannot use the terminal: {e}")))
}

fn edit_lines(mut editor: Editor, lines: &Sender<Input>) {
    let editing = Arc::clone(&editor.editing);
    let end = loop {
        if editing.over.load(Ordering::Acquire) {
            return;
        }
        editing.reading.store(true, Ordering::Release);
        let read = editor.editor.readline("> ");
        editing.reading.store(false, Ordering::Release);
        match read {
            Ok(line) => {
                // A multi-line paste arrives as one buffer: each line is a message.
                for part in line.split(['\n', '\r']).filter(|p| !p.is_empty()) {
                    if lines.send(Input::Line(part.to_string())).is_err() {
                        return;
                    }
                }
            }
            Err(ReadlineError::Interrupted) => break Input::Interrupted,
            Err(ReadlineError::Eof) => break Input::End,
            Err(e) => {
                let _ = writeln!(io::stderr(), "client: cannot read the terminal: {e}");
                break Input::End;
            }
        }
    };
    // After Ctrl-C or Ctrl-D the editor lets go of the terminal and this thread ends: what
    // the session says next starts on a line of its own, and a second Ctrl-C reaches the
    // signal handler.
    let _ = lines.send(end);
}

/// Whether the client is talking to a person: both stdin and stdout are terminals.
pub fn is_interactive() -> bool {
    io::stdin().is_terminal() && io::stdout().is_terminal()
}
