//! A small WebSocket server for the client's tests, standing for servers that speak the
//! protocol differently from ours: some answer a close at once, some are slow to echo,
//! some never echo a message to its sender, some never answer a close. It serves one
//! connection at a time and reports what it saw.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tungstenite::Message;

use crate::support::WAIT;

/// How the fake server behaves.
#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    /// Broadcast each text back to its sender, tagged as ours are.
    pub echo: bool,
    /// How long to wait before each echo.
    pub echo_delay: Duration,
    /// Answer a close frame at once (most libraries do); otherwise never.
    pub answer_close: bool,
    /// Messages sent to each client as it connects, as a replayed history.
    pub history: &'static [&'static str],
    /// Close (1000, "going home") as soon as the first message arrives.
    pub close_first: bool,
}

impl Behaviour {
    /// Echoes at once, but never answers a close.
    pub const NEVER_ANSWERS_CLOSE: Behaviour = Behaviour {
        echo: true,
        echo_delay: Duration::ZERO,
        answer_close: false,
        history: &[],
        close_first: false,
    };
}

/// What the fake server saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Text(String),
    Close(Option<u16>),
    /// The connection ended.
    Gone,
}

pub struct Fake {
    pub addr: SocketAddr,
    pub seen: Receiver<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    pub fn start(behaviour: Behaviour) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, seen) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                if let Ok(stream) = stream {
                    serve(stream, behaviour, &tx, &stopping);
                }
            }
        });
        Fake {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Everything seen until the connection ended (at most [`WAIT`]).
    pub fn until_gone(&self) -> Vec<Seen> {
        let mut seen = Vec::new();
        loop {
            match self.seen.recv_timeout(WAIT).expect("the connection to end") {
                Seen::Gone => return seen,
                other => seen.push(other),
            }
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long a read waits before the server looks at its scheduled echoes.
const POLL: Duration = Duration::from_millis(5);

fn serve(stream: TcpStream, behaviour: Behaviour, seen: &Sender<Seen>, stop: &AtomicBool) {
    let peer = stream.peer_addr().expect("peer");
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    for line in behaviour.history {
        let _ = ws.send(Message::text(*line));
    }
    ws.get_ref().set_read_timeout(Some(POLL)).expect("timeout");
    // Echoes go out when due, apart from reading, as a server that broadcasts through a
    // queue does: a close can be answered while echoes are still on their way.
    let mut due: VecDeque<(Instant, String)> = VecDeque::new();
    let started = Instant::now();
    while !stop.load(Ordering::Acquire) && started.elapsed() < WAIT * 3 {
        while due.front().is_some_and(|(at, _)| *at <= Instant::now()) {
            if let Some((_, echo)) = due.pop_front() {
                let _ = ws.send(Message::text(echo));
            }
        }
        match ws.read() {
            Ok(Message::Text(text)) => {
                let _ = seen.send(Seen::Text(text.to_string()));
                if behaviour.close_first {
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    let _ = ws.get_ref().set_read_timeout(Some(WAIT));
                    let mut sink = [0u8; 4096];
                    while matches!(ws.get_mut().read(&mut sink), Ok(n) if n > 0) {}
                    break;
                }
                if behaviour.echo {
                    due.push_back((
                        Instant::now() + behaviour.echo_delay,
                        format!("{peer}: {text}"),
                    ));
                }
            }
            Ok(Message::Close(frame)) => {
                let _ = seen.send(Seen::Close(frame.map(|f| f.code.into())));
                if behaviour.answer_close {
                    let _ = ws.flush();
                } else {
                    // Hold the connection without a word (tungstenite would send its
                    // queued answer on the next read) until the client goes.
                    let _ = ws.get_ref().set_read_timeout(Some(WAIT));
                    let mut sink = [0u8; 64];
                    while matches!(ws.get_mut().read(&mut sink), Ok(n) if n > 0) {}
                }
                break;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = seen.send(Seen::Gone);
}
