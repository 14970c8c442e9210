//! The command-line client: send each input line, show each message received.
//!
//! Two threads and the caller's: the input thread reads lines (a line editor at a
//! terminal, [`terminal`]; plain lines from a pipe, [`console`]); the socket-reader thread
//! shows messages ([`link`]); the calling thread runs the session below. It sends the
//! lines, notices a lost connection and, at a terminal, reconnects with backoff, keeping
//! what was typed meanwhile; at the end it waits, in a pipe, until every line sent has come
//! back from the server ([`confirm`]), then closes properly.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, at, never, select};

use self::confirm::Confirm;
use self::console::{Input, PipeSink, Sink};
use self::link::Link;
use self::tls::Connector;
use self::url::Target;
use crate::config::{ClientConfig, later};
use crate::error::Result;
use crate::message::printable;

mod confirm;
mod console;
mod link;
mod terminal;
mod tls;
mod url;

pub use self::terminal::{is_interactive, put_terminal_back};

/// How often the session looks whether a pipe's reader has gone.
const TICK: Duration = Duration::from_millis(200);
/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Lines kept while the connection is down; more are not sent, and the user is told.
const OUTBOX: usize = 1000;
/// How long a pipe's input gets to show it had more to send, once the connection ended.
const INPUT_GRACE: Duration = Duration::from_millis(100);
/// A connection up this long resets the reconnect backoff.
const STABLE: Duration = Duration::from_secs(30);

/// Where lines come from and messages go.
pub enum Console {
    /// A person at a terminal: a line editor, messages above the prompt, reconnection.
    Terminal,
    /// A script: lines from this input, one message per line on stdout, status on stderr.
    Pipe(Box<dyn BufRead + Send>),
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Console::Terminal => "Terminal",
            Console::Pipe(_) => "Pipe",
        })
    }
}

/// How a client run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A close frame arrived: the server's own, or its answer to ours.
    Closed {
        /// The status code, if the frame had one.
        code: Option<u16>,
        /// The reason the server gave.
        reason: String,
    },
    /// The connection ended without a close frame.
    Lost(String),
    /// The output was closed (a pipe whose reader left); nothing more could be shown.
    OutputClosed,
    /// The output failed otherwise; nothing more could be shown.
    OutputFailed(String),
    /// A second Ctrl-C while waiting for the server: the user did not want to wait.
    Abandoned,
}

impl Ending {
    /// Whether this is a normal end: a close with 1000 or 1001 or without a code (the
    /// peer's way of saying nothing went wrong), or a closed output.
    pub fn is_clean(&self) -> bool {
        match self {
            Ending::Closed { code, .. } => matches!(code, Some(1000 | 1001) | None),
            Ending::OutputClosed => true,
            Ending::Lost(_) | Ending::OutputFailed(_) | Ending::Abandoned => false,
        }
    }

    /// Whether a person at a terminal would want the client to connect again: the
    /// connection dropped, or the server went away or restarts (1001, 1011, 1012, 1013),
    /// but not when the server closed it on purpose.
    fn calls_for_reconnect(&self) -> bool {
        match self {
            Ending::Lost(_) => true,
            Ending::Closed { code, .. } => matches!(code, Some(1001 | 1011 | 1012 | 1013)),
            Ending::OutputClosed | Ending::OutputFailed(_) | Ending::Abandoned => false,
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Closed {
                code: Some(code),
                reason,
            } if reason.is_empty() => write!(f, "connection closed ({code})"),
            Ending::Closed {
                code: Some(code),
                reason,
            } => write!(f, "connection closed ({code}: {})", printable(reason)),
            Ending::Closed { code: None, .. } => f.write_str("connection closed"),
            Ending::Lost(why) => write!(f, "connection lost: {why}"),
            Ending::OutputClosed => f.write_str("output closed"),
            Ending::OutputFailed(e) => write!(f, "cannot write the output: {e}"),
            Ending::Abandoned => f.write_str("interrupted again; not waiting for the server"),
        }
    }
}

/// What a client run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How it ended.
    pub ending: Ending,
    /// Lines sent.
    pub sent: usize,
    /// Lines sent that never came back from the server (in a pipe, with confirmation on),
    /// or that could not be sent at all.
    pub unconfirmed: usize,
}

impl Outcome {
    /// The exit status the README documents: 0 when all went well, 3 when the connection
    /// was lost or closed with an error, 4 when lines were not confirmed, 130 when a second
    /// Ctrl-C cut the wait short.
    pub fn exit_status(&self) -> u8 {
        match &self.ending {
            Ending::Abandoned => 130,
            ending if !ending.is_clean() => 3,
            _ if self.unconfirmed > 0 => 4,
            _ => 0,
        }
    }
}

/// Connect, then send every line of the input and show every message, until the input
/// ends, `interrupt` fires, or the server closes.
///
/// At the end of input or on Ctrl-C, the client waits (in a pipe) for its lines to come
/// back, at most `config.wait`, then sends a close (1000) and waits for the server's, at
/// most `config.close_timeout`. A second Ctrl-C stops waiting. The input thread is not
/// joined: it may be blocked reading a terminal, and ends with the process.
///
/// # Errors
/// [`Error::Url`](crate::Error::Url) for a URL that cannot be used,
/// [`Error::Connect`](crate::Error::Connect) or [`Error::Handshake`](crate::Error::Handshake)
/// when no connection could be made, each saying what to check.
pub fn run(config: &ClientConfig, console: Console, interrupt: &Receiver<()>) -> Result<Outcome> {
    let target = Target::parse(&config.url)?;
    let (lines_tx, lines) = crossbeam_channel::bounded(64);
    // Declared first, dropped last: the terminal is put back as the run ends.
    let mut _restore = None;
    let console = match console {
        Console::Terminal => match terminal::open(config.color) {
            Ok((sink, editor, restore)) => {
                _restore = Some(restore);
                Opened::Editor(Arc::from(sink), Box::new(editor))
            }
            Err(e) => {
                // A terminal the editor cannot drive (TERM=dumb, say): read plain lines.
                log::debug!("{e}; reading lines as from a pipe");
                Opened::Pipe(Box::new(io::BufReader::new(io::stdin())))
            }
        },
        Console::Pipe(input) => Opened::Pipe(input),
    };
    let interactive = matches!(console, Opened::Editor(..));
    let (sink, source): (Arc<dyn Sink>, Source) = match console {
        Opened::Editor(sink, editor) => (sink, Source::Editor(editor)),
        Opened::Pipe(input) => {
            let sink = PipeSink::new(Box::new(io::stdout()), config.color);
            (Arc::new(sink), Source::Pipe(input))
        }
    };
    let confirm = Arc::new(Confirm::new());
    if !target.tls && (config.ca.is_some() || config.insecure) {
        log::warn!(
            "--ca and --insecure are for wss:// URLs; {} does not use TLS",
            target.url
        );
    }
    let tls = target.tls.then(|| Connector::new(config)).transpose()?;
    let link = Link::open(
        config,
        &target,
        tls.as_ref(),
        Arc::clone(&sink),
        Arc::clone(&confirm),
    )?;
    sink.status(&if interactive {
        format!(
            "connected to {}; type a message and press Enter, Ctrl-D to quit",
            target.url
        )
    } else {
        format!("connected to {}", target.url)
    });
    match source {
        Source::Editor(editor) => terminal::start(*editor, lines_tx)?,
        Source::Pipe(input) => console::read_lines(input, lines_tx)?,
    }
    let mut session = Session {
        config,
        target,
        tls,
        sink,
        confirm,
        link: Some(link),
        outbox: VecDeque::new(),
        sent: 0,
        interactive,
        input_open: true,
        skipped: 0,
        retry: None,
        backoff: FIRST_BACKOFF,
        up_since: Instant::now(),
    };
    let stop = session.chat(&lines, interrupt);
    Ok(session.finish(stop, &lines, interrupt))
}

/// The console, set up.
enum Opened {
    Editor(Arc<dyn Sink>, Box<terminal::Editor>),
    Pipe(Box<dyn BufRead + Send>),
}

/// Where lines will come from, once connected.
enum Source {
    Editor(Box<terminal::Editor>),
    Pipe(Box<dyn BufRead + Send>),
}

/// Why the conversation stopped.
enum Stop {
    /// The input ended, or Ctrl-C: close properly.
    Done,
    /// The connection ended, for good.
    Ended(Ending),
}

struct Session<'a> {
    config: &'a ClientConfig,
    target: Target,
    /// How to start TLS, for a `wss://` URL.
    tls: Option<Connector>,
    sink: Arc<dyn Sink>,
    confirm: Arc<Confirm>,
    /// The connection, while there is one.
    link: Option<Link>,
    /// Lines typed while there was no connection, to send once there is.
    outbox: VecDeque<String>,
    sent: usize,
    interactive: bool,
    /// The input thread has not ended.
    input_open: bool,
    /// Input lines that could not be sent (not UTF-8, or the input failed).
    skipped: usize,
    /// When to try to reconnect, while disconnected.
    retry: Option<Instant>,
    backoff: Duration,
    /// When the current connection was made.
    up_since: Instant,
}

impl Session<'_> {
    fn chat(&mut self, lines: &Receiver<Input>, interrupt: &Receiver<()>) -> Stop {
        loop {
            let ended = self.link.as_ref().map_or_else(never, |l| l.ended.clone());
            let retry = self.retry.map_or_else(never, at);
            select! {
                recv(lines) -> input => match input {
                    Ok(Input::Line(text)) => self.send(text),
                    Ok(Input::Skipped) => self.skipped += 1,
                    Ok(Input::End | Input::Interrupted) | Err(_) => {
                        self.input_open = false;
                        return Stop::Done;
                    }
                },
                recv(ended) -> ending => {
                    let ending = ending.unwrap_or(Ending::Lost("the reader ended".into()));
                    if let Some(stop) = self.lost(ending) {
                        return stop;
                    }
                }
                recv(retry) -> _ => self.reconnect(),
                recv(interrupt) -> _ => return Stop::Done,
                default(TICK) => {
                    if !self.interactive && console::is_gone(&io::stdout()) {
                        return Stop::Ended(Ending::OutputClosed);
                    }
                }
            }
        }
    }

    fn send(&mut self, text: String) {
        let Some(link) = &self.link else {
            self.keep(text);
            return;
        };
        // Counted first, so that its echo cannot come back before it is expected. Only
        // where someone looks: a pipe with --no-confirm against a server that does not echo
        // would otherwise keep every line it ever sent.
        if self.interactive || self.config.confirm {
            self.confirm.sent(&text);
        }
        self.sent += 1;
        if link.send(&text).is_err() && self.interactive {
            // Sent again after the reconnect; in a pipe it stays unconfirmed.
            self.keep(text);
        }
    }

    /// Keep a line for after the reconnect.
    fn keep(&mut self, text: String) {
        if self.outbox.len() >= OUTBOX {
            self.sink.status(&format!(
                "not connected and {OUTBOX} lines are waiting already; this one was not kept"
            ));
            return;
        }
        if self.outbox.is_empty() {
            self.sink
                .status("not connected; what you type is sent once the connection is back");
        }
        self.outbox.push_back(text);
    }

    /// The connection ended: reconnect later if that is what a person would want, or stop.
    fn lost(&mut self, ending: Ending) -> Option<Stop> {
        if !(self.interactive && self.config.reconnect && ending.calls_for_reconnect()) {
            // The link stays, so that the close can still be sent if it is up.
            return Some(Stop::Ended(ending));
        }
        self.link = None;
        // A connection that lasted a while starts the backoff afresh; one that failed at
        // once (a server that accepts and closes) keeps doubling it.
        if self.up_since.elapsed() >= STABLE {
            self.backoff = FIRST_BACKOFF;
        }
        let unsure = self.confirm.unconfirmed();
        if unsure > 0 {
            self.sink.status(&format!(
                "{unsure} line(s) you sent just before may not have reached the room"
            ));
        }
        self.sink.status(&format!(
            "{ending}; reconnecting in {} s",
            self.backoff.as_secs()
        ));
        self.retry = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        None
    }

    fn reconnect(&mut self) {
        let opened = Link::open(
            self.config,
            &self.target,
            self.tls.as_ref(),
            Arc::clone(&self.sink),
            Arc::clone(&self.confirm),
        );
        match opened {
            Ok(link) => {
                self.link = Some(link);
                self.retry = None;
                self.up_since = Instant::now();
                self.sink
                    .status(&format!("reconnected to {}", self.target.url));
                let waiting = std::mem::take(&mut self.outbox);
                let count = waiting.len();
                for text in waiting {
                    self.send(text);
                }
                if count > 0 && self.link.is_some() {
                    self.sink
                        .status(&format!("sent the {count} line(s) typed meanwhile"));
                }
            }
            Err(e) => {
                self.sink
                    .status(&format!("{e}; next try in {} s", self.backoff.as_secs()));
                self.retry = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Wind down: confirm (in a pipe), close, and wait for the server's answer.
    fn finish(mut self, stop: Stop, lines: &Receiver<Input>, interrupt: &Receiver<()>) -> Outcome {
        let ending = match (stop, self.link.take()) {
            (Stop::Ended(ending), link) => {
                if let Some(link) = &link {
                    // The output went away, or the server closed: still say goodbye.
                    link.close();
                }
                self.cut_short(ending, lines)
            }
            (Stop::Done, None) => {
                let unsent = self.outbox.len();
                if unsent > 0 {
                    self.sink.status(&format!(
                        "{unsent} line(s) typed while disconnected were not sent"
                    ));
                }
                Ending::Lost("not connected".to_string())
            }
            (Stop::Done, Some(link)) => self.close(&link, lines, interrupt),
        };
        let confirming = !self.interactive && self.config.confirm;
        let unconfirmed = match ending {
            // Nobody is reading any more: there is no one to report to.
            Ending::OutputClosed => 0,
            _ if confirming => self.confirm.unconfirmed(),
            _ => 0,
        } + self.outbox.len()
            + self.skipped;
        Outcome {
            ending,
            sent: self.sent,
            unconfirmed,
        }
    }

    /// In a pipe, a connection that ended while more input was ready to send is a failure
    /// whatever the close said: that input was never sent. An input that has nothing to
    /// say for a moment (a script that only listens) is not held against the close.
    fn cut_short(&mut self, ending: Ending, lines: &Receiver<Input>) -> Ending {
        if self.interactive || !self.input_open || ending == Ending::OutputClosed {
            return ending;
        }
        let cut = |what: &dyn fmt::Display| {
            Ending::Lost(format!(
                "{what} before the input ended; the rest was not sent"
            ))
        };
        match lines.recv_timeout(INPUT_GRACE) {
            Ok(Input::Line(_) | Input::Skipped) => match &ending {
                Ending::Lost(why) => cut(why),
                _ => cut(&ending),
            },
            Ok(Input::End | Input::Interrupted) | Err(_) => ending,
        }
    }

    fn close(&mut self, link: &Link, lines: &Receiver<Input>, interrupt: &Receiver<()>) -> Ending {
        let mut lines = if self.input_open {
            lines.clone()
        } else {
            never()
        };
        if !self.interactive && self.config.confirm {
            let deadline = later(Instant::now(), self.config.wait);
            while self.confirm.unconfirmed() > 0 {
                select! {
                    recv(self.confirm.changed()) -> _ => {}
                    recv(link.ended) -> ending => {
                        let ending = ending.unwrap_or(Ending::Lost("the reader ended".into()));
                        if matches!(ending, Ending::OutputClosed | Ending::OutputFailed(_)) {
                            link.close();
                        }
                        return ending;
                    }
                    recv(interrupt) -> _ => return Ending::Abandoned,
                    recv(at(deadline)) -> _ => break,
                }
            }
        }
        link.close();
        let waited = self.config.close_timeout;
        let timeout = at(later(Instant::now(), waited));
        loop {
            select! {
                recv(link.ended) -> ending => {
                    return ending.unwrap_or(Ending::Lost("the reader ended".into()));
                }
                recv(interrupt) -> _ => return Ending::Abandoned,
                recv(lines) -> input => match input {
                    Ok(Input::Interrupted) => return Ending::Abandoned,
                    Ok(Input::Line(_) | Input::Skipped) => {}
                    Ok(Input::End) | Err(_) => lines = never(),
                },
                recv(timeout) -> _ => {
                    return Ending::Lost(format!(
                        "the server did not answer our close within {} s",
                        waited.as_secs_f32()
                    ));
                }
            }
        }
    }
}
