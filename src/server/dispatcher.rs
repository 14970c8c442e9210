//! The dispatcher: the one thread that owns the client list and the ring of recent
//! messages, and fans every broadcast out.
//!
//! Because one thread owns both, a join is atomic (the replayed history and the first live
//! message meet with no gap and no duplicate) and every client sees the same global order.
//! Connection threads talk to it only through [`Event`]s on one channel; it never blocks on
//! a client (see [`peer`](super::peer) for how it writes).
//!
//! # The rolling scan
//!
//! Broadcasts are appended to the [`Ring`], and each client has a cursor into it. The
//! dispatcher visits the clients in turn and writes each one everything it lacks, in one
//! system call, checking for new events between visits. A message that arrives while a scan
//! is under way is picked up by every client not yet visited, so under load each write
//! carries all that arrived since that client's last visit: the more traffic, the fewer
//! system calls per delivery. When every client is up to date the dispatcher sleeps on the
//! channel.
//!
//! The dispatcher is generic over a client's write side, the [`Outlet`], so that its
//! bookkeeping can be checked against an in-memory outlet without sockets or threads (the
//! model test below).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;

use super::inbox::{Event, Inbox};
use super::metrics::{Closed, Metrics};
use super::peer::PeerId;
use super::ring::Ring;
use super::sched;
use crate::config::{ServerConfig, later};
use crate::message::{self, Frame};

/// The most frames handed to one [`Outlet::send`]: well under the kernel's `IOV_MAX` of
/// 1024, so that one `sendmsg` takes them all.
pub(crate) const MAX_BATCH: usize = 64;

/// What the dispatcher needs of one client's write side.
pub(crate) trait Outlet {
    /// The connection this outlet writes to.
    fn id(&self) -> PeerId;
    /// The client's address, for the log.
    fn addr(&self) -> SocketAddr;
    /// Send `frames` (at most [`MAX_BATCH`]) after everything sent before, never blocking.
    fn send(&mut self, frames: &[Frame]) -> Sent;
    /// Send the close frame after everything sent before; afterwards nothing more is taken.
    fn close(&mut self, frame: Frame);
    /// Cut the connection without ceremony.
    fn abort(&self);
    /// How long the client has said nothing, as of `now`.
    fn silent_for(&self, now: Instant) -> Duration;
    /// Release what a finished helper (a backlog writer) still holds.
    fn reap(&mut self);
}

/// What became of an [`Outlet::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written or queued.
    Done,
    /// The backlog is full: the client cannot keep up and must be closed.
    Overflow,
    /// The server's memory for slow TLS clients' backlogs is spent: this one, behind too,
    /// must be closed.
    OverBudget,
    /// The client is closing or gone; nothing was sent.
    Gone,
}

/// How often the dispatcher looks after timers.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// Client visits between two looks at the clock while busy.
const VISITS_PER_CLOCK: u32 = 64;

/// Events taken in between two client visits, at most.
const EVENTS_PER_VISIT: usize = 4 * MAX_BATCH;

struct Client<O> {
    outlet: O,
    /// The number of the next broadcast this client needs.
    next: u64,
    /// When the server sent this client a close it has not answered yet.
    closing_since: Option<Instant>,
}

/// The dispatcher's state; [`Dispatcher::run`] is the thread's body.
pub(crate) struct Dispatcher<O> {
    clients: Vec<Client<O>>,
    index: HashMap<PeerId, usize>,
    ring: Ring,
    /// The next client the scan visits.
    pos: usize,
    /// Visits in a row that left a client up to date with no broadcast since; once it
    /// covers every client there is nothing to write.
    settled: usize,
    queue: usize,
    ping_interval: Option<Duration>,
    close_timeout: Duration,
    next_ping: Instant,
    next_housekeeping: Instant,
    visits: u32,
    stopping: bool,
    metrics: Arc<Metrics>,
    /// Counts not yet added to `metrics`: kept here and added once per scan, so that a
    /// delivery costs no atomic operation.
    tally: Tally,
    /// Where a join puts its answer before the first of the history, for one write: kept,
    /// so that a join allocates nothing.
    greeting: Vec<Frame>,
}

#[derive(Debug, Default)]
struct Tally {
    broadcast: u64,
    deliveries: u64,
    bytes: u64,
}

impl<O: Outlet> Dispatcher<O> {
    pub(crate) fn new(config: &ServerConfig, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        Self {
            clients: Vec::new(),
            index: HashMap::new(),
            ring: Ring::new(config.history),
            pos: 0,
            settled: 0,
            queue: config.queue,
            ping_interval: config.ping_interval,
            close_timeout: config.close_timeout,
            next_ping: later(now, config.ping_interval.unwrap_or(HOUSEKEEPING)),
            next_housekeeping: now + HOUSEKEEPING,
            visits: 0,
            stopping: false,
            metrics,
            tally: Tally::default(),
            greeting: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Handle events until every sender is gone, which happens once the server has stopped
    /// and every connection thread has ended.
    pub(crate) fn run(mut self, inbox: &Inbox<O>) {
        inbox.listen();
        sched::run_as_batch("dispatcher");
        loop {
            if !self.is_idle() {
                self.take_ready(inbox);
                self.visit();
                // Under load, look at the clock only now and then, not once per delivery.
                self.visits = self.visits.wrapping_add(1);
                if !self.visits.is_multiple_of(VISITS_PER_CLOCK) {
                    continue;
                }
            } else {
                self.rest();
                match inbox.wait(self.next_housekeeping) {
                    Ok(Some(event)) => {
                        self.handle(event);
                        // Events that leave nothing to write (a storm of leaves, say) are
                        // taken together too, not each after a rest and a wait.
                        self.take_ready(inbox);
                    }
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= self.next_housekeeping {
                self.housekeeping(now);
                self.next_housekeeping = now + HOUSEKEEPING;
            }
        }
        debug!("dispatcher stopped");
    }

    /// Handle the events waiting, up to [`EVENTS_PER_VISIT`], and make room for as many
    /// senders.
    fn take_ready(&mut self, inbox: &Inbox<O>) {
        let mut taken = 0;
        for event in inbox.ready(EVENTS_PER_VISIT) {
            self.handle(event);
            taken += 1;
        }
        inbox.made_room(taken);
    }

    /// Whether every client is up to date, so there is nothing to write.
    fn is_idle(&self) -> bool {
        self.settled >= self.clients.len()
    }

    /// At the end of a scan or about to sleep: let go of what no client needs any more,
    /// and bring the metrics up to date.
    fn rest(&mut self) {
        let oldest_needed = self.clients.iter().map(|c| c.next).min();
        self.ring.trim(oldest_needed.unwrap_or(self.ring.head()));
        let tally = std::mem::take(&mut self.tally);
        self.metrics.broadcast.inc_by(tally.broadcast);
        self.metrics.deliveries.inc_by(tally.deliveries);
        self.metrics.bytes_written.inc_by(tally.bytes);
    }

    fn handle(&mut self, event: Event<O>) {
        match event {
            Event::Broadcast(frame) => self.broadcast([frame]),
            Event::Broadcasts(mut batch) => self.broadcast(batch.frames.drain(..)),
            Event::Restart(frames) => self.restart(frames),
            Event::Join(outlet, answer) => self.join(outlet, answer),
            Event::Pong(id, frame) => {
                if let Some(i) = self.index.get(&id).copied() {
                    let sent = self.clients[i].outlet.send(std::slice::from_ref(&frame));
                    self.settle(i, sent);
                }
            }
            Event::Leave(id, close) => self.leave(id, close),
            Event::Shutdown => {
                self.stopping = true;
                let now = Instant::now();
                let frame = message::close(CloseCode::Away, "server shutting down");
                self.close_all(&frame, Closed::Shutdown, now);
            }
        }
    }

    /// Append `frames` to the ring: the scan takes them to every client.
    fn broadcast(&mut self, frames: impl IntoIterator<Item = Frame>) {
        for frame in frames {
            self.ring.push(frame);
            self.tally.broadcast += 1;
        }
        self.settled = 0;
    }

    /// After everything broadcast before, close every client not closing already.
    fn close_all(&mut self, frame: &Frame, reason: Closed, now: Instant) {
        for i in 0..self.clients.len() {
            self.catch_up(i);
            let client = &mut self.clients[i];
            if client.closing_since.is_none() {
                self.metrics.closed(reason);
                client.outlet.close(frame.clone());
                client.closing_since = Some(now);
            }
        }
    }

    /// Close every client with 1012, after what it was sent before, and make `frames` the
    /// history, sent to no one: the fleet lost messages this node cannot account for, and
    /// a client that reconnects sees the room as it is now.
    fn restart(&mut self, frames: Vec<Frame>) {
        let frame = message::close(CloseCode::Restart, "service restart: reconnect");
        self.close_all(&frame, Closed::RedisReset, Instant::now());
        self.ring.restart(frames);
        let head = self.ring.head();
        for client in &mut self.clients {
            client.next = head;
        }
    }

    /// Answer the client's handshake (the 101 and the welcome), replay the history and add
    /// it, all before any later broadcast, and in one write when the history is short: the
    /// answer waits for the join, so a client that has it is in the room.
    fn join(&mut self, mut outlet: O, answer: Frame) {
        let mut closing_since = None;
        let mut sent = Sent::Done;
        if self.stopping {
            let _ = outlet.send(&[answer]);
            outlet.close(message::close(CloseCode::Away, "server shutting down"));
            closing_since = Some(Instant::now());
        } else {
            let recent = self.ring.recent();
            let first = recent.len().min(MAX_BATCH - 1);
            self.greeting.push(answer);
            self.greeting.extend_from_slice(&recent[..first]);
            sent = outlet.send(&self.greeting);
            self.greeting.clear();
            for chunk in recent[first..].chunks(MAX_BATCH) {
                if sent != Sent::Done {
                    break;
                }
                sent = outlet.send(chunk);
            }
        }
        self.index.insert(outlet.id(), self.clients.len());
        self.clients.push(Client {
            outlet,
            next: self.ring.head(),
            closing_since,
        });
        self.settle(self.clients.len() - 1, sent);
    }

    fn leave(&mut self, id: PeerId, close: Option<Frame>) {
        let Some(i) = self.index.remove(&id) else {
            return;
        };
        self.catch_up(i);
        let mut client = self.clients.swap_remove(i);
        // The leaver may have been counted as settled; the client moved into its place may
        // be skipped by this round of the scan, so bring it up to date now.
        self.settled = self.settled.saturating_sub(1);
        if let Some(moved) = self.clients.get(i) {
            self.index.insert(moved.outlet.id(), i);
            self.catch_up(i);
        }
        if let Some(frame) = close {
            client.outlet.close(frame);
        }
    }

    /// Bring the next client in turn up to date.
    fn visit(&mut self) {
        if self.pos >= self.clients.len() {
            self.pos = 0;
            self.rest();
        }
        if self.pos < self.clients.len() {
            self.catch_up(self.pos);
            self.pos += 1;
            self.settled += 1;
        }
    }

    /// Write client `i` every broadcast it lacks, in as few system calls as frames allow.
    fn catch_up(&mut self, i: usize) {
        let head = self.ring.head();
        let client = &mut self.clients[i];
        while client.next < head {
            let frames = self.ring.since(client.next, MAX_BATCH);
            let sent = client.outlet.send(frames);
            if sent == Sent::Done {
                self.tally.deliveries += frames.len() as u64;
                self.tally.bytes += frames.iter().map(|f| f.len() as u64).sum::<u64>();
            }
            client.next = match sent {
                Sent::Done => client.next + frames.len() as u64,
                Sent::Overflow | Sent::OverBudget | Sent::Gone => head,
            };
            if matches!(sent, Sent::Overflow | Sent::OverBudget) {
                self.settle(i, sent);
                return;
            }
        }
    }

    /// Close client `i` if its backlog overflowed.
    fn settle(&mut self, i: usize, sent: Sent) {
        let queue = self.queue;
        let (why, reason) = match sent {
            Sent::Overflow => (
                format!("fell {queue} messages behind"),
                format!("too slow: fell {queue} messages behind"),
            ),
            Sent::OverBudget => (
                "is behind, and the memory for slow TLS clients' backlogs is spent \
                 (--max-tls-backlog)"
                    .to_string(),
                "too slow: fell behind".to_string(),
            ),
            Sent::Done | Sent::Gone => return,
        };
        self.metrics.closed(Closed::Slow);
        let client = &mut self.clients[i];
        warn!(
            "closing {}: it is not reading and {why}",
            client.outlet.addr()
        );
        client
            .outlet
            .close(message::close(CloseCode::Policy, &reason));
        client.closing_since.get_or_insert_with(Instant::now);
    }

    /// Ping everyone when due, drop the silent, cut closes that were never answered, and
    /// join backlog writers that have finished.
    fn housekeeping(&mut self, now: Instant) {
        for client in &mut self.clients {
            client.outlet.reap();
            if let Some(since) = client.closing_since
                && now.duration_since(since) >= self.close_timeout
            {
                debug!("{} did not answer our close in time", client.outlet.addr());
                client.outlet.abort();
            }
        }
        let Some(interval) = self.ping_interval else {
            return;
        };
        if now < self.next_ping {
            return;
        }
        self.next_ping = later(now, interval);
        let ping = message::ping();
        for i in 0..self.clients.len() {
            let client = &mut self.clients[i];
            if client.closing_since.is_some() {
                continue;
            }
            let silent = client.outlet.silent_for(now);
            if silent >= interval.saturating_mul(2) {
                info!(
                    "dropping {}: silent for {} s, no answer to pings",
                    client.outlet.addr(),
                    silent.as_secs()
                );
                client.outlet.abort();
                client.closing_since = Some(now);
                self.metrics.closed(Closed::Silent);
            } else {
                let sent = client.outlet.send(std::slice::from_ref(&ping));
                self.settle(i, sent);
            }
        }
    }
}

#[cfg(test)]
mod model;
