//! Connection threads that accept their own connections (leader/follower).
//!
//! Every connection gets a thread of its own, but no thread hands connections out: the
//! threads with nothing to do all wait in `accept()` on the listening socket, and the
//! kernel wakes one of them for each new connection. That thread serves the connection
//! itself, handshake to close, then goes back to `accept()`. A connection thus costs one
//! wake-up, the kernel's, where an acceptor thread handing it to a parked thread cost two
//! and a context switch more: measured over 10 000 clients reconnecting at once on one
//! core, 36 µs of server CPU per reconnection instead of 81–84.
//!
//! There is always a thread in `accept()`: the thread that takes a connection when no other
//! is waiting hands it to a new thread and goes on waiting. When none may be started (the
//! limit is reached), it refuses the connection at once, so that a full server still
//! answers every connection rather than leaving it queued.
//!
//! A thread whose connection ends waits again only if at most `cache` others wait, and for
//! at most `park_for` (the listening socket's receive timeout, which `accept()` honours,
//! and which each accepted socket inherits: the gate must clear it); then it ends, unless
//! it is the last one waiting, so an idle server gives its memory back. When the process
//! runs out of file descriptors, `accept()` fails in every thread that enters it: all but
//! the last end, and it retries every [`ACCEPT_BACKOFF`]. A thread that ends joins those
//! that ended before it, and each connection taken does the same, so on an idle server
//! only the last to end waits, mapped, to be joined.
//!
//! Threads never outnumber the limit the server gives (as many as it may have connections):
//! so however large the cache, the server holds no more threads than its connections may,
//! and the cache's default is that many: every client of a storm finds a thread waiting.

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use socket2::SockRef;

use crate::error::is_timeout;

/// Work for a connection thread: one connection, start to end.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// How long the last waiting thread pauses when `accept()` fails for want of resources
/// (file descriptors, memory), rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the server does with each connection a thread accepts.
pub(crate) trait Gate: Send + Sync + 'static {
    /// Room for a new connection, and the job that serves it; `None` when it was refused
    /// (and closed). `thread` is an error when no thread may start to serve it: the
    /// connection must be closed at once. The stream has inherited the listening socket's
    /// receive timeout, which the job must not rely on, and must clear before it waits.
    fn admit(&self, stream: TcpStream, addr: SocketAddr, thread: io::Result<()>) -> Option<Job>;
    /// `accept()` failed: log it, and say whether for want of resources (out of file
    /// descriptors, say), when fewer threads should wait and the last should pause.
    fn failed(&self, error: &io::Error) -> bool;
}

/// The connection threads, busy or waiting; each is joined once it ends.
pub(crate) struct Workers {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("waiting", &self.shared.waiting)
            .field("closed", &self.shared.closed)
            .finish_non_exhaustive()
    }
}

struct Shared {
    listener: Arc<TcpListener>,
    gate: Box<dyn Gate>,
    /// Threads in `accept()`, or on their way there.
    waiting: AtomicUsize,
    /// The server is stopping: no thread waits any more, and none starts.
    closed: AtomicBool,
    /// The most threads at once, busy or waiting.
    limit: usize,
    /// The most threads waiting at once, besides the one that always waits.
    cache: usize,
    stack_size: usize,
    threads: Threads,
}

/// Every thread not yet joined. Under a `std` mutex, which sleeps rather than yields when
/// thousands of threads ending at once want it.
struct Threads {
    joinable: StdMutex<Joinable>,
    /// Each thread sends its number here as its last act.
    ended_tx: Sender<u64>,
    /// Outside the lock, so that a connection taken while no thread has ended takes no lock
    /// to find that out.
    ended: Receiver<u64>,
}

struct Joinable {
    handles: HashMap<u64, JoinHandle<()>>,
    next: u64,
}

impl Workers {
    /// Start the first thread waiting on `listener`. At most `limit` threads with stacks of
    /// `stack_size` bytes, and besides the one always waiting, up to `cache` more waiting for
    /// up to `park_for` each.
    ///
    /// # Errors
    /// The listening socket's timeout cannot be set, or no thread can be started.
    pub(crate) fn start(
        listener: Arc<TcpListener>,
        gate: impl Gate,
        limit: usize,
        stack_size: usize,
        cache: usize,
        park_for: Duration,
    ) -> io::Result<Self> {
        // A zero timeout would mean none at all.
        let park_for = park_for.max(Duration::from_millis(1));
        SockRef::from(&*listener).set_read_timeout(Some(park_for))?;
        let (ended_tx, ended) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            listener,
            gate: Box::new(gate),
            waiting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            limit: limit.max(1),
            cache,
            stack_size,
            threads: Threads {
                joinable: StdMutex::new(Joinable {
                    handles: HashMap::new(),
                    next: 0,
                }),
                ended_tx,
                ended,
            },
        });
        Shared::spawn(&shared, None, shared.limit)?;
        Ok(Self { shared })
    }

    /// Stop accepting: every waiting thread ends, and busy ones end with their connections.
    pub(crate) fn close(&self) {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // On Linux, shutting a listening socket down wakes every thread in `accept()`.
        if let Err(e) = SockRef::from(&*self.shared.listener).shutdown(Shutdown::Both) {
            log::debug!("cannot shut the listening socket down ({e}); connecting instead");
            self.shared.wake_by_connecting();
        }
    }

    /// [`close`](Self::close), then join every thread; the busy ones must be ending (their
    /// connections cut) for this to return.
    pub(crate) fn stop(&self) {
        self.close();
        // Taken after `closed` is set, so no thread starts afterwards; joined without the
        // lock, which a thread ending meanwhile takes to reap.
        let handles = mem::take(&mut self.shared.threads.lock().handles);
        for (_, handle) in handles {
            join(handle);
        }
    }
}

impl Shared {
    /// Start a thread that serves `first`, or without one, waits for a connection (and
    /// counts as waiting from now), if fewer than `limit` threads run.
    ///
    /// Never inlined: `serve` calls it, and its frame (the thread builder, the handles'
    /// lock) would sit under every connection's blocking read, a stack page more per client.
    #[inline(never)]
    fn spawn(shared: &Arc<Shared>, first: Option<Job>, limit: usize) -> io::Result<()> {
        // Under the lock, so that no thread is joined before its handle is kept, and none
        // starts once `stop` has taken the handles.
        let mut joinable = shared.threads.lock();
        shared.room(&joinable, limit)?;
        joinable.next += 1;
        let number = joinable.next;
        let waits = first.is_none();
        if waits {
            shared.waiting.fetch_add(1, Ordering::SeqCst);
        }
        let mine = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .stack_size(shared.stack_size)
            .spawn(move || {
                let _ended = Ended {
                    number,
                    tx: mine.threads.ended_tx.clone(),
                };
                Shared::serve(&mine, first);
            });
        match spawned {
            Ok(handle) => {
                joinable.handles.insert(number, handle);
                Ok(())
            }
            Err(e) => {
                if waits {
                    shared.waiting.fetch_sub(1, Ordering::SeqCst);
                }
                Err(e)
            }
        }
    }

    /// Whether another thread may start while fewer than `limit` run.
    fn room(&self, joinable: &Joinable, limit: usize) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::other("the server is stopping"));
        }
        if joinable.handles.len() >= limit {
            return Err(io::Error::other(format!(
                "all {} connection threads are busy, some still ending connections that closed",
                self.limit
            )));
        }
        Ok(())
    }

    /// A thread's life: its first job if it has one, then wait for a connection and serve
    /// it, again and again, until there is no call for it. Without a first job it starts
    /// counted as waiting.
    fn serve(shared: &Arc<Shared>, first: Option<Job>) {
        if let Some(job) = first {
            job();
            if !shared.wait_again() {
                shared.threads.reap();
                return;
            }
        }
        while let Some((stream, addr)) = Shared::next(shared) {
            if shared.stop_waiting() {
                shared.threads.reap();
                if let Some(job) = shared.gate.admit(stream, addr, Ok(())) {
                    job();
                }
                if !shared.wait_again() {
                    break;
                }
                continue;
            }
            // The last one waiting: it goes on waiting, and the connection gets a new
            // thread, or is refused when none may start.
            let vigil = Vigil(shared);
            shared.threads.reap();
            let room = shared.room(&shared.threads.lock(), shared.limit);
            if let Some(job) = shared.gate.admit(stream, addr, room)
                && let Err(e) = Shared::spawn(shared, Some(job), shared.limit)
            {
                log::error!("cannot start a thread for {addr}: {e}; closing it");
            }
            drop(vigil);
        }
        shared.threads.reap();
    }

    /// Stop counting this thread as waiting, unless it is the last one: one always waits.
    fn stop_waiting(&self) -> bool {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > 1).then(|| n - 1)
            })
            .is_ok()
    }

    /// Wait in `accept()` for the next connection; `None` when this thread should end
    /// instead: the server is stopping, or it waited `park_for` (or is short of resources)
    /// and others wait too. Either way it no longer counts as waiting.
    fn next(shared: &Arc<Shared>) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = shared.listener.accept();
            if shared.closed.load(Ordering::SeqCst) {
                shared.waiting.fetch_sub(1, Ordering::SeqCst);
                return None;
            }
            let short = match accepted {
                Ok(connection) => return Some(connection),
                Err(e) if is_timeout(&e) => false,
                Err(e) => {
                    let vigil = Vigil(shared);
                    let short = shared.gate.failed(&e);
                    drop(vigil);
                    if !short {
                        continue;
                    }
                    true
                }
            };
            if shared.stop_waiting() {
                return None;
            }
            if short {
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }

    /// Count this thread as waiting again, if fewer than the cache allows wait already.
    fn wait_again(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
            && self
                .waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n <= self.cache).then_some(n + 1)
                })
                .is_ok()
    }

    /// Wake the waiting threads one connection each, where shutting the listening socket
    /// down does not.
    fn wake_by_connecting(&self) {
        let Ok(mut target) = self.listener.local_addr() else {
            return;
        };
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        for _ in 0..self.waiting.load(Ordering::SeqCst) {
            let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
        }
    }
}

impl Threads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Joinable> {
        self.joinable.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Join the threads that have ended: they have sent their number, so each join
    /// returns as soon as that thread is gone.
    fn reap(&self) {
        if self.ended.is_empty() {
            return;
        }
        let mut joinable = self.lock();
        while let Ok(number) = self.ended.try_recv() {
            if let Some(handle) = joinable.handles.remove(&number) {
                join(handle);
            }
        }
    }
}

fn join(handle: JoinHandle<()>) {
    // A panic was logged, with the client it cost, as the connection ended.
    let _ = handle.join();
}

/// Held while a thread counted as waiting runs the gate. Should the gate panic (a bug), the
/// thread stops counting as waiting, and a new one takes its place in `accept()`, so that
/// the server goes on accepting.
struct Vigil<'a>(&'a Arc<Shared>);

impl Drop for Vigil<'_> {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        log::error!("a connection thread panicked while taking a connection (a bug)");
        // In place of this one, which has not ended yet: so one more than the limit.
        if let Err(e) = Shared::spawn(self.0, None, self.0.limit + 1) {
            log::error!("no thread could take its place in accept(): {e}");
        }
    }
}

/// Tells [`Workers`] a thread has ended, even if it panicked.
struct Ended {
    number: u64,
    tx: Sender<u64>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.tx.send(self.number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;
    use std::time::Instant;

    const WAIT: Duration = Duration::from_secs(10);

    /// What the test gate saw: the thread a connection was served on, or a refusal.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Served(thread::ThreadId),
        Refused,
    }

    /// A gate whose jobs report their thread and then hold their connection until let go.
    struct TestGate {
        seen: Sender<Seen>,
        go: Receiver<()>,
        /// Panic at the next connection, as a bug in the server's gate would.
        panic_once: AtomicBool,
    }

    impl Gate for TestGate {
        fn admit(&self, stream: TcpStream, _: SocketAddr, thread: io::Result<()>) -> Option<Job> {
            assert!(
                !self.panic_once.swap(false, Ordering::SeqCst),
                "a bug in the gate"
            );
            if thread.is_err() {
                let _ = self.seen.send(Seen::Refused);
                return None;
            }
            let (seen, go) = (self.seen.clone(), self.go.clone());
            Some(Box::new(move || {
                let _ = seen.send(Seen::Served(thread::current().id()));
                let _ = go.recv_timeout(WAIT);
                drop(stream);
            }))
        }

        fn failed(&self, _: &io::Error) -> bool {
            false
        }
    }

    struct Fixture {
        workers: Arc<Workers>,
        addr: SocketAddr,
        seen: Receiver<Seen>,
        go: Sender<()>,
    }

    fn start(limit: usize, cache: usize, park_for: Duration, panic_once: bool) -> Fixture {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").expect("bind"));
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, seen) = bounded(64);
        let (go, go_rx) = bounded(64);
        let gate = TestGate {
            seen: seen_tx,
            go: go_rx,
            panic_once: AtomicBool::new(panic_once),
        };
        let workers =
            Workers::start(listener, gate, limit, 64 * 1024, cache, park_for).expect("start");
        Fixture {
            workers: Arc::new(workers),
            addr,
            seen,
            go,
        }
    }

    impl Drop for Fixture {
        /// A test that fails early leaves no thread waiting in `accept()`.
        fn drop(&mut self) {
            self.workers.close();
        }
    }

    impl Fixture {
        /// Connect, and what the gate made of it.
        fn connect(&self) -> (TcpStream, Seen) {
            let stream = TcpStream::connect(self.addr).expect("connect");
            let seen = self.seen.recv_timeout(WAIT).expect("the gate saw it");
            (stream, seen)
        }

        fn threads(&self) -> usize {
            self.workers.shared.threads.reap();
            self.workers.shared.threads.lock().handles.len()
        }

        fn waiting(&self) -> usize {
            self.workers.shared.waiting.load(Ordering::SeqCst)
        }

        fn eventually(&self, what: &str, done: impl Fn(&Self) -> bool) {
            let deadline = Instant::now() + WAIT;
            while !done(self) {
                assert!(Instant::now() < deadline, "{what}");
                thread::sleep(Duration::from_millis(5));
            }
        }

        /// Let `busy` jobs go, then stop, on a thread of its own: `stop` must return
        /// within the bound, not hang the test.
        fn stop(self, busy: usize) {
            for _ in 0..busy {
                self.go.send(()).expect("let go");
            }
            let (stopped_tx, stopped) = bounded(1);
            let workers = Arc::clone(&self.workers);
            let stopper = thread::spawn(move || {
                workers.stop();
                let _ = stopped_tx.send(());
            });
            stopped.recv_timeout(WAIT).expect("stop returns");
            stopper.join().expect("stopper");
        }
    }

    #[test]
    fn threads_accept_for_themselves_are_reused_bounded_and_refuse_at_the_limit() {
        // Waiting for long enough that a test held up on a busy machine still finds them.
        let f = start(3, 1, Duration::from_secs(3600), false);
        assert_eq!(
            (f.threads(), f.waiting()),
            (1, 1),
            "one thread waits from the start"
        );
        let (_c1, first) = f.connect();
        let (_c2, second) = f.connect();
        assert!(matches!(first, Seen::Served(_)) && matches!(second, Seen::Served(_)));
        assert_ne!(first, second, "each connection has a thread of its own");
        assert_eq!((f.threads(), f.waiting()), (3, 1), "two busy, one waiting");
        let (_c3, third) = f.connect();
        assert_eq!(
            third,
            Seen::Refused,
            "the last thread the limit allows only refuses"
        );
        assert_eq!(f.waiting(), 1, "and waits on");

        // One connection ends: its thread waits again (one waiting besides the cache's one)
        // and serves the next, with no thread started.
        f.go.send(()).expect("let one go");
        f.eventually("two waiting", |f| f.waiting() == 2);
        let (_c4, fourth) = f.connect();
        assert!(matches!(fourth, Seen::Served(_)));
        assert_eq!(f.threads(), 3);
        f.stop(2);
    }

    #[test]
    fn idle_threads_end_after_their_wait_but_one_always_waits() {
        let f = start(8, 8, Duration::from_millis(300), false);
        let clients: Vec<_> = (0..4).map(|_| f.connect()).collect();
        assert!(
            clients
                .iter()
                .all(|(_, seen)| matches!(seen, Seen::Served(_)))
        );
        assert_eq!(f.threads(), 5, "four busy, one waiting");
        for _ in 0..4 {
            f.go.send(()).expect("let go");
        }
        f.eventually("all but one ended", |f| {
            f.threads() == 1 && f.waiting() == 1
        });
        let (_c, seen) = f.connect();
        assert!(matches!(seen, Seen::Served(_)), "the last one still serves");
        f.stop(1);
    }

    #[test]
    fn without_a_cache_each_thread_ends_with_its_connection() {
        let f = start(8, 0, Duration::from_secs(3600), false);
        let clients: Vec<_> = (0..3).map(|_| f.connect()).collect();
        assert_eq!(f.threads(), 4);
        drop(clients);
        for _ in 0..3 {
            f.go.send(()).expect("let go");
        }
        f.eventually("only the waiting thread left", |f| f.threads() == 1);
        f.stop(0);
    }

    #[test]
    fn a_panic_taking_a_connection_costs_that_connection_and_another_thread_waits_in_its_place() {
        // With room, the next connection is served. At a limit of one the one thread only
        // ever refuses, and its replacement must be allowed although the panicking thread
        // still counts against the limit.
        for (limit, next) in [(8, "served"), (1, "refused")] {
            let f = start(limit, 8, Duration::from_secs(3600), true);
            let lost = TcpStream::connect(f.addr).expect("connect");
            f.eventually("a new thread waiting", |f| {
                f.waiting() == 1 && f.threads() == 1
            });
            let (_c, seen) = f.connect();
            let served = matches!(seen, Seen::Served(_));
            assert_eq!(served, next == "served", "limit {limit}: {seen:?}");
            drop(lost);
            f.stop(usize::from(served));
        }
    }

    #[test]
    fn stop_ends_waiting_threads_and_joins_the_busy_once_they_finish() {
        let f = start(8, 8, Duration::from_secs(3600), false);
        let _clients: Vec<_> = (0..3).map(|_| f.connect()).collect();
        f.go.send(()).expect("let one go");
        f.eventually("two waiting", |f| f.waiting() == 2);
        let (stopped_tx, stopped) = bounded(1);
        let workers = Arc::clone(&f.workers);
        let stopper = thread::spawn(move || {
            workers.stop();
            let _ = stopped_tx.send(());
        });
        assert!(
            stopped.recv_timeout(Duration::from_millis(200)).is_err(),
            "stop waits for the two busy threads"
        );
        f.go.send(()).expect("let go");
        f.go.send(()).expect("let go");
        stopped
            .recv_timeout(WAIT)
            .expect("stop returns once they finish");
        stopper.join().expect("stopper");
        assert_eq!(f.threads(), 0, "every thread joined");
    }
}
