//! The server: the accept loop, one thread per connection, and an orderly shutdown.
//!
//! Threads and their owners:
//! - each **connection thread** waits in `accept()` (see [`workers`]), does the handshake
//!   of the connection it gets and reads its client (see [`super::connection`]), then
//!   waits in `accept()` again; it joins its client's short-lived writer thread, if any,
//!   and the connection threads that have ended; [`Server::shutdown`] wakes the waiting
//!   ones and joins them all;
//! - in a fleet, a **Redis writer** and a **Redis reader** (see [`backplane`]);
//!   [`Server::shutdown`] stops the writer once the connection threads are cut, and the
//!   reader after they have ended;
//! - the **dispatcher** (see [`dispatcher`]) ends when the last event sender is gone, that
//!   is after every connection thread and the Redis reader; [`Server::shutdown`] joins it
//!   last.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, warn};
use parking_lot::Mutex;
use socket2::{Domain, Socket, Type};

use self::admission::{Admission, Pending, Refusal};
use self::backplane::{Backplane, Fleet};
use self::connection::Context;
use self::dispatcher::Dispatcher;
use self::inbox::Event;
use self::metrics::{Metrics, Refused};
use self::peer::{Backlogs, Peer, PeerId, PeerOutlet};
use self::tls::ServerTls;
use self::web::Site;
use self::workers::{Gate, Job, Workers};
use crate::config::{ServerConfig, later};
use crate::error::{Error, Result};

pub(crate) use self::backplane::check_url as check_redis_url;
pub use self::limits::raise_open_file_limit;
pub(crate) use self::origin::Origin;

mod admission;
mod backplane;
mod connection;
mod dispatcher;
mod flood;
mod handshake;
mod inbox;
mod limits;
mod metrics;
mod origin;
mod peer;
mod ring;
mod sched;
mod tls;
mod web;
mod workers;

/// Stack for a connection thread. Measured: the whole suite passes with 16 KiB stacks
/// (logging at info included), and an idle client's thread has touched two pages, one of
/// them glibc's thread control block. A TLS handshake touches 20 KiB (an ECDSA P-256 key)
/// to 28 KiB (RSA 4096), which stay resident. Only touched pages cost memory, so 128 KiB
/// buys headroom at no cost.
const CONNECTION_STACK: usize = 128 * 1024;

/// Connections allowed beyond `max_clients + max_pending`: handshakes just cut to make
/// room, whose threads are still ending them. Past this, new connections are closed at
/// once, without a thread.
const ENDING_THREADS: usize = 64;

/// Events that may wait for the dispatcher; a connection thread that finds the queue full
/// waits, which slows its client down rather than growing memory.
const EVENT_QUEUE: usize = 4096;

/// Connections the kernel may hold for us before `accept` (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 1024;

/// At shutdown, how long clients get to answer the close before their sockets are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running chat server: it serves on threads of its own from the moment it is created.
/// Dropping it shuts it down, as [`Server::shutdown`] does. It is `Send`, so whichever
/// thread learns it is time to stop (one waiting for a signal, say) can own it and stop it.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    /// Shared with every connection thread; taken at shutdown so the dispatcher can end.
    context: Option<Arc<Context>>,
    connections: Arc<Mutex<Connections>>,
    /// The connection threads, and through the acceptor they share, the context: dropped
    /// at shutdown once they are joined.
    workers: Option<Workers>,
    /// The Redis threads, in a fleet.
    fleet: Option<Fleet>,
    dispatcher: Option<JoinHandle<()>>,
}

impl Server {
    /// Listen on `addr` with every other setting at its default.
    ///
    /// # Errors
    /// See [`Server::with_config`].
    pub fn bind(addr: SocketAddr) -> Result<Server> {
        Server::with_config(ServerConfig::default().bind(addr))
    }

    /// Listen as `config` says and start serving at once, on threads of the server's own.
    ///
    /// # Errors
    /// [`Error::Bind`] when the address cannot be listened on, [`Error::Spawn`] when the
    /// server's threads cannot be started, [`Error::Redis`] when the Redis URL cannot be
    /// used, [`Error::Certificate`] when the TLS certificate or key cannot be. An
    /// unreachable Redis is not an error: the server starts, reports itself unhealthy and
    /// keeps trying.
    pub fn with_config(config: ServerConfig) -> Result<Server> {
        let tls = config.tls.clone().map(ServerTls::load).transpose()?;
        let listener =
            listen(config.bind, config.socket_write_timeout()).map_err(|source| Error::Bind {
                addr: config.bind,
                source,
            })?;
        let local_addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let (events, inbox) = inbox::channel(EVENT_QUEUE);
        let metrics = Arc::new(Metrics::new());
        let dispatcher = Dispatcher::<PeerOutlet>::new(&config, Arc::clone(&metrics));
        let dispatcher = thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || dispatcher.run(&inbox))
            .map_err(|source| Error::Spawn {
                what: "dispatcher",
                source,
            })?;
        let (backplane, fleet) = match Backplane::start(&config, &events, &metrics) {
            Ok(started) => started,
            Err(e) => {
                // The dispatcher ends with its last event sender.
                drop(events);
                let _ = dispatcher.join();
                return Err(e);
            }
        };
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let backlogs = Backlogs::new(
            config.max_writers,
            config.max_tls_backlog,
            config.socket_write_timeout(),
        );
        let context = Arc::new(Context {
            admission: Arc::new(Admission::new(&config)),
            site: Site::new(&config),
            config,
            events,
            backplane,
            metrics,
            backlogs,
            stopping: AtomicBool::new(false),
            tls,
        });
        let connections = Arc::new(Mutex::new(Connections {
            live: HashMap::new(),
            done: done_rx,
        }));
        let config = &context.config;
        let cache = config
            .thread_cache
            .unwrap_or(config.max_clients.saturating_add(config.max_pending));
        let (limit, idle) = (thread_cap(config), config.thread_idle);
        let acceptor = Mutex::new(Acceptor {
            context: Arc::clone(&context),
            connections: Arc::clone(&connections),
            done: done_tx,
            next_id: 0,
            refusals: Throttle::default(),
            evictions: Throttle::default(),
            failures: Throttle::default(),
        });
        let mut server = Server {
            local_addr,
            context: Some(context),
            connections,
            workers: None,
            fleet,
            dispatcher: Some(dispatcher),
        };
        // On failure the acceptor, and its context with it, is dropped before `stop_all`
        // waits for the dispatcher.
        match Workers::start(listener, acceptor, limit, CONNECTION_STACK, cache, idle) {
            Ok(workers) => server.workers = Some(workers),
            Err(source) => {
                let _ = server.stop_all();
                return Err(Error::Spawn {
                    what: "connection",
                    source,
                });
            }
        }
        Ok(server)
    }

    /// The address the server listens on, with the real port when bound to port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Read the TLS certificate and key again, for the connections that start from now on
    /// (the ones open keep theirs). If they cannot be used, the ones in use stay. Without
    /// TLS there is nothing to read, and this does nothing.
    ///
    /// # Errors
    /// [`Error::Certificate`], saying which file is wrong and how.
    pub fn reload_tls(&self) -> Result<()> {
        match self.context.as_ref().and_then(|c| c.tls.as_ref()) {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Whether the port speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.context.as_ref().is_some_and(|c| c.tls.is_some())
    }

    /// How many clients are past the handshake right now.
    pub fn client_count(&self) -> usize {
        self.context.as_ref().map_or(0, |c| c.admission.clients())
    }

    /// Stop accepting, deliver what is already queued, send every client a close frame
    /// (1001), give them a moment to answer, then end and join every thread.
    ///
    /// # Errors
    /// [`Error::Panicked`] if one of the server's own threads panicked (a bug).
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(context) = &self.context {
            context.stopping.store(true, Ordering::Release);
        }
        if let Some(workers) = &self.workers {
            workers.close();
        }
        if let Some(context) = self.context.take() {
            let _ = context.events.send(Event::Shutdown);
            let grace = SHUTDOWN_GRACE.min(context.config.close_timeout);
            let mut connections = self.connections.lock();
            connections.wait(later(Instant::now(), grace));
            connections.abort_all();
            // No connection thread may stay waiting for the Redis writer's queue.
            if let Some(fleet) = &mut self.fleet {
                fleet.stop_writer();
            }
            connections.wait_all();
        }
        if let Some(workers) = self.workers.take() {
            workers.stop();
        }
        if let Some(fleet) = self.fleet.take() {
            fleet.stop();
        }
        // The dispatcher ends once the last event sender is gone: the connection threads'
        // went with them, the acceptor's with the workers, the Redis reader's with the
        // fleet, and the server's with `context` above.
        if let Some(dispatcher) = self.dispatcher.take()
            && dispatcher.join().is_err()
        {
            result = Err(Error::Panicked { what: "dispatcher" });
        }
        result
    }
}

const _: () = {
    const fn send<T: Send>() {}
    send::<Server>();
};

impl Drop for Server {
    fn drop(&mut self) {
        if self.context.is_some()
            && let Err(e) = self.stop_all()
        {
            error!("{e}");
        }
    }
}

/// A listening socket with room for a burst of connections: `std` listens with a backlog
/// of 128, and ten thousand clients connecting at once would see SYNs dropped and retried
/// a second later.
///
/// Every accepted socket inherits the listening socket's options (on Linux), so those each
/// connection needs are set here once: `TCP_NODELAY` (a chat message is small and should go
/// out at once) and the write timeout (a blocked write gives up after `write_timeout`
/// without progress). Set per connection, they took two of the twenty system calls a
/// connection cost.
fn listen(addr: SocketAddr, write_timeout: Option<Duration>) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_write_timeout(write_timeout)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The connections being served.
#[derive(Debug)]
struct Connections {
    /// Weak, so that the registry never keeps a finished client's socket open.
    live: HashMap<PeerId, Weak<Peer>>,
    /// Each connection sends its id here as it ends.
    done: Receiver<PeerId>,
}

impl Connections {
    /// Forget the connections that have ended.
    fn reap(&mut self) {
        while let Ok(id) = self.done.try_recv() {
            self.live.remove(&id);
        }
    }

    /// Wait for connections to end, until all have or `deadline` passes.
    fn wait(&mut self, deadline: Instant) {
        while !self.live.is_empty() {
            match self.done.recv_deadline(deadline) {
                Ok(id) => {
                    self.live.remove(&id);
                }
                Err(_) => return,
            }
        }
    }

    /// Wait for every connection to end (they have been cut).
    fn wait_all(&mut self) {
        while !self.live.is_empty() {
            match self.done.recv() {
                Ok(id) => {
                    self.live.remove(&id);
                }
                Err(_) => break,
            }
        }
    }

    fn abort_all(&self) {
        for peer in self.live.values().filter_map(Weak::upgrade) {
            peer.abort();
        }
    }
}

/// What every connection thread consults with the connection it accepted: whether there
/// is room for it, and the job that serves it. Under a mutex the threads share, held for
/// the bookkeeping only (no system call).
struct Acceptor {
    context: Arc<Context>,
    connections: Arc<Mutex<Connections>>,
    done: Sender<PeerId>,
    next_id: PeerId,
    refusals: Throttle,
    evictions: Throttle,
    failures: Throttle,
}

impl Gate for Mutex<Acceptor> {
    fn admit(&self, stream: TcpStream, addr: SocketAddr, thread: io::Result<()>) -> Option<Job> {
        self.lock().start(stream, addr, thread)
    }

    fn failed(&self, error: &io::Error) -> bool {
        self.lock().accept_failed(error)
    }
}

impl Acceptor {
    /// Give a new connection room for its handshake and the job that serves it, or close
    /// it at once. `thread` says whether a thread may serve it.
    fn start(
        &mut self,
        stream: TcpStream,
        addr: SocketAddr,
        thread: io::Result<()>,
    ) -> Option<Job> {
        let registry = Arc::clone(&self.connections);
        let mut connections = registry.lock();
        if self.context.stopping.load(Ordering::Acquire) {
            // Accepted as shutdown began: it would not be cut with the others.
            debug!("closing {addr} at once: the server is stopping");
            return None;
        }
        connections.reap();
        let threads = thread_cap(&self.context.config);
        let full = connections.live.len() >= threads;
        // Checked before admission, which may cut another handshake to make room.
        if full || thread.is_err() {
            self.context.metrics.refused(Refused::Busy);
            if let Some(more) = self.refusals.ready() {
                match thread {
                    Err(e) if !full => warn!("closing {addr} at once: {e}{more}"),
                    _ => warn!(
                        "closing {addr} at once: {threads} connections are open, the most \
                         --max-clients and --max-pending allow{more}"
                    ),
                }
            }
            return None;
        }
        self.next_id += 1;
        let metrics = Arc::clone(&self.context.metrics);
        let peer = Arc::new(Peer::new(self.next_id, stream, addr, metrics));
        let pending = self.admit(&peer)?;
        debug!("connection from {addr}");
        connections.live.insert(peer.id, Arc::downgrade(&peer));
        let done = DoneSignal {
            id: peer.id,
            addr,
            done: self.done.clone(),
        };
        let context = Arc::clone(&self.context);
        Some(Box::new(move || {
            let _done = done;
            connection::run(&peer, &context, pending);
        }))
    }

    /// Room for `peer`'s handshake, logging (at most once a second) a refusal or a
    /// handshake cut to make room.
    fn admit(&mut self, peer: &Arc<Peer>) -> Option<Pending> {
        let config = &self.context.config;
        match self.context.admission.begin(peer, Instant::now()) {
            Ok((pending, evicted)) => {
                if evicted.is_some() {
                    self.context.metrics.refused(Refused::Evicted);
                }
                if let Some(cut) = evicted
                    && let Some(more) = self.evictions.ready()
                {
                    warn!(
                        "cut the handshake of {cut} to make room: {} handshakes were under \
                         way and it had waited longest (--max-pending){more}",
                        config.max_pending
                    );
                }
                Some(pending)
            }
            Err(refusal) => {
                self.context.metrics.refused(Refused::Busy);
                if let Some(more) = self.refusals.ready() {
                    warn!(
                        "closing {} at once: {}{more}",
                        peer.addr,
                        refused(refusal, config)
                    );
                }
                None
            }
        }
    }

    /// Log a failed `accept()`; whether it failed for want of resources.
    fn accept_failed(&mut self, e: &io::Error) -> bool {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                if let Some(more) = self.failures.ready() {
                    error!(
                        "cannot accept connections: {e}; pausing briefly. Raise the open-file \
                         limit (ulimit -n) or lower --max-clients{more}"
                    );
                }
                true
            }
            _ => {
                debug!("accept failed: {e}");
                false
            }
        }
    }
}

/// Why a connection got no room, for the log.
fn refused(refusal: Refusal, config: &ServerConfig) -> String {
    match refusal {
        Refusal::Source(source) => format!(
            "{} handshakes from {source} are under way already (--max-pending-per-ip)",
            config.max_pending_per_ip
        ),
        Refusal::Full => format!(
            "{} handshakes are under way already, none for over a second (--max-pending)",
            config.max_pending
        ),
    }
}

/// The most connection threads the server runs: every client, every handshake, and a few
/// handshakes just cut whose threads are still ending.
fn thread_cap(config: &ServerConfig) -> usize {
    config
        .max_clients
        .saturating_add(config.max_pending)
        .saturating_add(ENDING_THREADS)
}

/// Tells the registry a connection has ended, even if its thread panicked.
struct DoneSignal {
    id: PeerId,
    addr: SocketAddr,
    done: Sender<PeerId>,
}

impl Drop for DoneSignal {
    fn drop(&mut self) {
        if thread::panicking() {
            error!(
                "the thread serving {} panicked (a bug); only that client was lost",
                self.addr
            );
        }
        let _ = self.done.send(self.id);
    }
}

/// Lets a repeated warning through at most once a second, counting the ones held back.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// `Some(note)` when the message may be logged now; the note counts the held-back ones.
    fn ready(&mut self) -> Option<String> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        let note = match std::mem::take(&mut self.held_back) {
            0 => String::new(),
            n => format!(" ({n} more like this not shown)"),
        };
        Some(note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_no_delay_and_the_write_timeout_from_the_listener() {
        let accepted = |write_timeout: Duration| {
            let config = ServerConfig::default().write_timeout(write_timeout);
            let listener = listen(
                "127.0.0.1:0".parse().expect("address"),
                config.socket_write_timeout(),
            )
            .expect("listen");
            let _client =
                TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
            listener.accept().expect("accept").0
        };
        let stream = accepted(Duration::from_secs(7));
        assert!(stream.nodelay().expect("TCP_NODELAY"));
        assert_eq!(
            stream.write_timeout().expect("SO_SNDTIMEO"),
            Some(Duration::from_secs(7))
        );
        // Zero is no limit; under a microsecond is a limit still (the kernel rounds it up
        // to a clock tick), not none.
        assert_eq!(
            accepted(Duration::ZERO)
                .write_timeout()
                .expect("SO_SNDTIMEO"),
            None
        );
        assert!(
            accepted(Duration::from_nanos(500))
                .write_timeout()
                .expect("SO_SNDTIMEO")
                .is_some()
        );
    }
}
