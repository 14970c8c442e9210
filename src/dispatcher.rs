//! The dispatcher: the one thread that owns the client list and the ring of recent
//! messages, and fans every broadcast out.
//!
//! Because one thread owns both, a join is atomic (the replayed history and the first live
//! message meet with no gap and no duplicate) and every client sees the same global order.
//! Connection threads talk to it only through [`Event`]s on one channel; it never blocks on
//! a client (see [`crate::peer`] for how it writes).
//!
//! Events arriving together are handled as a batch: consecutive broadcasts are written to
//! each client with one system call, which is where the fan-out's speed comes from.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::config::ServerConfig;
use crate::message::{self, Frame};
use crate::peer::{MAX_BATCH, Outlet, Peer, PeerId, Sent};

/// What connection threads and the server tell the dispatcher.
#[derive(Debug)]
pub(crate) enum Event {
    /// A client finished its handshake: greet it, replay the history, add it.
    Join(Arc<Peer>),
    /// A tagged text frame to append to the history and send to everyone.
    Broadcast(Frame),
    /// A pong for one client, answering its ping.
    Pong(PeerId, Frame),
    /// A client is done. Send it `close` after everything queued before it, then forget it.
    Leave(PeerId, Option<Frame>),
    /// The server is stopping: close every client with 1001 and refuse new ones.
    Shutdown,
}

/// How often the dispatcher looks after timers when no event wakes it.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

struct Client {
    outlet: Outlet,
    /// When the server sent this client a close it has not answered yet.
    closing_since: Option<Instant>,
}

/// The dispatcher's state; [`Dispatcher::run`] is the thread's body.
pub(crate) struct Dispatcher {
    clients: Vec<Client>,
    index: HashMap<PeerId, usize>,
    ring: VecDeque<Frame>,
    batch: Vec<Frame>,
    welcome: Frame,
    history: usize,
    queue: usize,
    ping_interval: Option<Duration>,
    close_timeout: Duration,
    next_ping: Instant,
    stopping: bool,
}

impl Dispatcher {
    pub(crate) fn new(config: &ServerConfig) -> Self {
        let now = Instant::now();
        Self {
            clients: Vec::new(),
            index: HashMap::new(),
            ring: VecDeque::with_capacity(config.history),
            batch: Vec::with_capacity(MAX_BATCH),
            welcome: message::welcome(),
            history: config.history,
            queue: config.queue,
            ping_interval: config.ping_interval,
            close_timeout: config.close_timeout,
            next_ping: now + config.ping_interval.unwrap_or(HOUSEKEEPING),
            stopping: false,
        }
    }

    /// Handle events until every sender is gone, which happens once the server has stopped
    /// and every connection thread has ended.
    pub(crate) fn run(mut self, events: &Receiver<Event>) {
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        loop {
            match events.recv_deadline(next_housekeeping) {
                Ok(event) => {
                    self.handle(event);
                    for event in events.try_iter().take(4 * MAX_BATCH) {
                        self.handle(event);
                    }
                    self.flush();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_housekeeping {
                self.housekeeping(now);
                next_housekeeping = now + HOUSEKEEPING;
            }
        }
        debug!("dispatcher stopped");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Broadcast(frame) => {
                if self.history > 0 {
                    if self.ring.len() == self.history {
                        self.ring.pop_front();
                    }
                    self.ring.push_back(frame.clone());
                }
                self.batch.push(frame);
                if self.batch.len() == MAX_BATCH {
                    self.flush();
                }
            }
            Event::Join(peer) => {
                self.flush();
                self.join(peer);
            }
            Event::Pong(id, frame) => {
                self.flush();
                if let Some(client) = self.client(id) {
                    let sent = client.outlet.send(std::slice::from_ref(&frame));
                    self.settle(id, sent);
                }
            }
            Event::Leave(id, close) => {
                self.flush();
                self.leave(id, close);
            }
            Event::Shutdown => {
                self.flush();
                self.stopping = true;
                let now = Instant::now();
                let frame = message::close(CloseCode::Away, "server shutting down");
                for client in &mut self.clients {
                    client.outlet.close(frame.clone());
                    client.closing_since.get_or_insert(now);
                }
            }
        }
    }

    /// Greet `peer`, replay the history and add it, all before any later broadcast.
    fn join(&mut self, peer: Arc<Peer>) {
        let id = peer.id;
        let mut outlet = Outlet::new(peer, self.queue);
        if self.stopping {
            outlet.close(message::close(CloseCode::Away, "server shutting down"));
            self.add(outlet, Some(Instant::now()));
            return;
        }
        let greeting: Vec<Frame> = std::iter::once(self.welcome.clone())
            .chain(self.ring.iter().cloned())
            .collect();
        let mut sent = Sent::Done;
        for chunk in greeting.chunks(MAX_BATCH) {
            sent = outlet.send(chunk);
            if sent != Sent::Done {
                break;
            }
        }
        self.add(outlet, None);
        self.settle(id, sent);
    }

    fn add(&mut self, outlet: Outlet, closing_since: Option<Instant>) {
        self.index.insert(outlet.peer.id, self.clients.len());
        self.clients.push(Client {
            outlet,
            closing_since,
        });
    }

    fn leave(&mut self, id: PeerId, close: Option<Frame>) {
        let Some(i) = self.index.remove(&id) else {
            return;
        };
        let mut client = self.clients.swap_remove(i);
        if let Some(moved) = self.clients.get(i) {
            self.index.insert(moved.outlet.peer.id, i);
        }
        if let Some(frame) = close {
            client.outlet.close(frame);
        }
    }

    fn client(&mut self, id: PeerId) -> Option<&mut Client> {
        let i = *self.index.get(&id)?;
        self.clients.get_mut(i)
    }

    /// Write the pending broadcasts to every client, each with one system call.
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut overflowed = Vec::new();
        for client in &mut self.clients {
            if client.outlet.send(&self.batch) == Sent::Overflow {
                overflowed.push(client.outlet.peer.id);
            }
        }
        self.batch.clear();
        for id in overflowed {
            self.settle(id, Sent::Overflow);
        }
    }

    /// Close a client whose backlog overflowed.
    fn settle(&mut self, id: PeerId, sent: Sent) {
        if sent != Sent::Overflow {
            return;
        }
        let queue = self.queue;
        if let Some(client) = self.client(id) {
            warn!(
                "closing {}: it is not reading and fell {queue} messages behind",
                client.outlet.peer.addr
            );
            let reason = format!("too slow: fell {queue} messages behind");
            client
                .outlet
                .close(message::close(CloseCode::Policy, &reason));
            client.closing_since.get_or_insert_with(Instant::now);
        }
    }

    /// Ping everyone when due, drop the silent, and cut closes that were never answered.
    fn housekeeping(&mut self, now: Instant) {
        for client in &mut self.clients {
            if let Some(since) = client.closing_since
                && now.duration_since(since) >= self.close_timeout
            {
                debug!(
                    "{} did not answer our close in time",
                    client.outlet.peer.addr
                );
                client.outlet.peer.abort();
            }
        }
        let Some(interval) = self.ping_interval else {
            return;
        };
        if now < self.next_ping {
            return;
        }
        self.next_ping = now + interval;
        let ping = message::ping();
        for client in &mut self.clients {
            if client.closing_since.is_some() {
                continue;
            }
            let silent = client.outlet.peer.silent_for(now);
            if silent >= 2 * interval {
                info!(
                    "dropping {}: silent for {} s, no answer to pings",
                    client.outlet.peer.addr,
                    silent.as_secs()
                );
                client.outlet.peer.abort();
                client.closing_since = Some(now);
            } else {
                client.outlet.send(std::slice::from_ref(&ping));
            }
        }
    }
}
