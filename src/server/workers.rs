//! Connection threads that outlive their connection: a thread cache.
//!
//! Starting a thread and ending it costs more than the rest of a WebSocket handshake: a
//! kernel task and its stack, a memory map for the thread's stack and another for its
//! signal stack, a dozen system calls, and page faults on all of them. When a client
//! leaves, its thread therefore parks for a while and takes the next connection the
//! acceptor hands it, as database servers have done for decades. When clients come back
//! together after a network blip or a load balancer's failover, most find a thread waiting.
//!
//! The acceptor hands a connection over a channel of zero capacity, which succeeds only
//! when a parked thread is waiting in it; otherwise it starts a new thread. A thread whose
//! connection ends parks only if fewer than `--thread-cache` are parked already, and for
//! at most `--thread-idle`; then it ends, so an idle server gives its memory back.
//!
//! Parking never adds a thread: a thread parks in place of the connection that ended, and
//! a new one starts only when none is parked. So however large the cache, the server holds
//! no more threads than its connections may (`--max-clients` plus `--max-pending`), and
//! the cache's default is that many: every client of a storm finds a thread waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Work for a connection thread: one connection, start to end.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The connection threads, busy or parked; each is joined once it ends.
#[derive(Debug)]
pub(crate) struct Workers {
    /// To a parked thread; gone once the server stops, which ends every parked thread.
    handoff: Option<Sender<Job>>,
    parked: Receiver<Job>,
    idle: Arc<AtomicUsize>,
    /// The most threads parked at once, and for how long.
    cache: usize,
    park_for: Duration,
    stack_size: usize,
    threads: HashMap<u64, JoinHandle<()>>,
    next: u64,
    /// Each thread sends its number here as its last act.
    ended: Receiver<u64>,
    ended_tx: Sender<u64>,
}

impl Workers {
    /// Threads with stacks of `stack_size` bytes, up to `cache` of them parked for up to
    /// `park_for` each.
    pub(crate) fn new(stack_size: usize, cache: usize, park_for: Duration) -> Self {
        let (handoff, parked) = crossbeam_channel::bounded(0);
        let (ended_tx, ended) = crossbeam_channel::unbounded();
        Self {
            handoff: Some(handoff),
            parked,
            idle: Arc::new(AtomicUsize::new(0)),
            cache,
            park_for,
            stack_size,
            threads: HashMap::new(),
            next: 0,
            ended,
            ended_tx,
        }
    }

    /// Run `job` on a parked thread, or on a new one.
    ///
    /// # Errors
    /// No thread could be started (the system is out of threads or memory maps).
    pub(crate) fn run(&mut self, job: Job) -> std::io::Result<()> {
        self.reap();
        let job = match self.handoff.as_ref().map(|h| h.try_send(job)) {
            Some(Ok(())) => return Ok(()),
            Some(Err(TrySendError::Full(job) | TrySendError::Disconnected(job))) => job,
            None => return Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        self.next += 1;
        let number = self.next;
        let parked = self.parked.clone();
        let idle = Arc::clone(&self.idle);
        let (cache, park_for) = (self.cache, self.park_for);
        let ended = Ended {
            number,
            tx: self.ended_tx.clone(),
        };
        let thread = thread::Builder::new()
            .stack_size(self.stack_size)
            .spawn(move || {
                let _ended = ended;
                serve(job, &parked, &idle, cache, park_for);
            })?;
        self.threads.insert(number, thread);
        Ok(())
    }

    /// Join the threads that have ended.
    pub(crate) fn reap(&mut self) {
        while let Ok(number) = self.ended.try_recv() {
            self.join(number);
        }
    }

    /// End the parked threads and join every thread; the busy ones must be ending (their
    /// connections cut) for this to return.
    pub(crate) fn stop(&mut self) {
        self.handoff = None;
        let numbers: Vec<u64> = self.threads.keys().copied().collect();
        for number in numbers {
            self.join(number);
        }
    }

    fn join(&mut self, number: u64) {
        if let Some(thread) = self.threads.remove(&number) {
            // A panic was logged, with the client it cost, as the connection ended.
            let _ = thread.join();
        }
    }
}

/// A connection thread's life: its first job, then whatever it is handed while parked.
fn serve(first: Job, parked: &Receiver<Job>, idle: &AtomicUsize, cache: usize, park_for: Duration) {
    let mut job = first;
    loop {
        job();
        if idle.fetch_add(1, Ordering::AcqRel) >= cache {
            idle.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let next = parked.recv_timeout(park_for);
        idle.fetch_sub(1, Ordering::AcqRel);
        match next {
            Ok(next) => job = next,
            Err(_) => return,
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
