//! Connection threads that outlive their connection: a thread cache.
//!
//! Starting a thread and ending it costs more than the rest of a WebSocket handshake: a
//! kernel task and its stack, a memory map for the thread's stack and another for its
//! signal stack, a dozen system calls, and page faults on all of them. When a client
//! leaves, its thread therefore parks for a while and takes the next connection the
//! acceptor hands it, as database servers have done for decades. When clients come back
//! together after a network blip or a load balancer's failover, most find a thread waiting.
//!
//! Parked threads wait on a stack: the acceptor hands a connection to the one parked last
//! (whose stack and caches are warmest) and wakes it, or starts a new thread when none is
//! parked. A thread whose connection ends parks only if fewer than `--thread-cache` are
//! parked already, and for at most `--thread-idle`; then it ends, so an idle server gives
//! its memory back. Parking is `thread::park`, with no spinning or yielding first: when
//! thousands of clients leave at once, thousands of threads park at once on one core, and
//! every yield would hand the core to another of them.
//!
//! Parking never adds a thread: a thread parks in place of the connection that ended, and
//! a new one starts only when none is parked. So however large the cache, the server holds
//! no more threads than its connections may (`--max-clients` plus `--max-pending`), and
//! the cache's default is that many: every client of a storm finds a thread waiting.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::config::later;

/// Work for a connection thread: one connection, start to end.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The connection threads, busy or parked; each is joined once it ends.
#[derive(Debug)]
pub(crate) struct Workers {
    parked: Arc<Mutex<Parked>>,
    stack_size: usize,
    threads: HashMap<u64, JoinHandle<()>>,
    next: u64,
    /// Each thread sends its number here as its last act.
    ended: Receiver<u64>,
    ended_tx: Sender<u64>,
}

/// The parked threads, the one parked last at the back. Those that waited longest, and
/// so end first, are at the front, where they take themselves off.
#[derive(Debug)]
struct Parked {
    stack: VecDeque<Arc<Waiting>>,
    /// The most threads parked at once, and for how long.
    cache: usize,
    park_for: Duration,
    /// The server is stopping: no thread parks any more.
    closed: bool,
}

/// One parked thread, and what it is waiting for.
#[derive(Debug)]
struct Waiting {
    thread: Thread,
    slot: Mutex<Slot>,
}

enum Slot {
    /// On the stack, waiting.
    Parked,
    /// Handed a connection.
    Job(Job),
    /// Told to end: the server is stopping.
    Closed,
    /// It waited too long and ended; its entry is dropped when it comes to the top.
    Gone,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::Parked => "Parked",
            Slot::Job(_) => "Job",
            Slot::Closed => "Closed",
            Slot::Gone => "Gone",
        })
    }
}

impl Workers {
    /// Threads with stacks of `stack_size` bytes, up to `cache` of them parked for up to
    /// `park_for` each.
    pub(crate) fn new(stack_size: usize, cache: usize, park_for: Duration) -> Self {
        let (ended_tx, ended) = crossbeam_channel::unbounded();
        Self {
            parked: Arc::new(Mutex::new(Parked {
                stack: VecDeque::new(),
                cache,
                park_for,
                closed: false,
            })),
            stack_size,
            threads: HashMap::new(),
            next: 0,
            ended,
            ended_tx,
        }
    }

    /// Run `job` on the thread parked last, or on a new one.
    ///
    /// # Errors
    /// No thread could be started (the system is out of threads or memory maps).
    pub(crate) fn run(&mut self, job: Job) -> std::io::Result<()> {
        self.reap();
        let job = match hand_over(&self.parked, job) {
            None => return Ok(()),
            Some(job) => job,
        };
        self.next += 1;
        let number = self.next;
        let parked = Arc::clone(&self.parked);
        let ended = Ended {
            number,
            tx: self.ended_tx.clone(),
        };
        let thread = thread::Builder::new()
            .stack_size(self.stack_size)
            .spawn(move || {
                let _ended = ended;
                serve(job, &parked);
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
        let waiting = {
            let mut parked = self.parked.lock();
            parked.closed = true;
            mem::take(&mut parked.stack)
        };
        for thread in waiting {
            let mut slot = thread.slot.lock();
            if matches!(*slot, Slot::Parked) {
                *slot = Slot::Closed;
                thread.thread.unpark();
            }
        }
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

/// Give `job` to the thread parked last and wake it; `job` back if none is parked.
fn hand_over(parked: &Mutex<Parked>, job: Job) -> Option<Job> {
    let mut parked = parked.lock();
    while let Some(waiting) = parked.stack.pop_back() {
        let mut slot = waiting.slot.lock();
        if matches!(*slot, Slot::Parked) {
            *slot = Slot::Job(job);
            drop(slot);
            waiting.thread.unpark();
            return None;
        }
    }
    Some(job)
}

/// A connection thread's life: its first job, then whatever it is handed while parked.
fn serve(first: Job, parked: &Mutex<Parked>) {
    let me = Arc::new(Waiting {
        thread: thread::current(),
        slot: Mutex::new(Slot::Parked),
    });
    let mut job = first;
    loop {
        job();
        let park_for = {
            let mut parked = parked.lock();
            if parked.closed || parked.stack.len() >= parked.cache {
                return;
            }
            *me.slot.lock() = Slot::Parked;
            parked.stack.push_back(Arc::clone(&me));
            parked.park_for
        };
        match wait(&me, later(Instant::now(), park_for)) {
            Some(next) => job = next,
            None => {
                take_off_the_gone(parked);
                return;
            }
        }
    }
}

/// Drop the entries of threads that have ended from the front of the stack. (Not under
/// a thread's own slot lock: the stack's lock comes first.)
fn take_off_the_gone(parked: &Mutex<Parked>) {
    let mut parked = parked.lock();
    while parked
        .stack
        .front()
        .is_some_and(|front| matches!(*front.slot.lock(), Slot::Gone))
    {
        parked.stack.pop_front();
    }
}

/// Wait on the stack until handed a job, told to end, or `deadline`.
fn wait(me: &Waiting, deadline: Instant) -> Option<Job> {
    loop {
        {
            let mut slot = me.slot.lock();
            match mem::replace(&mut *slot, Slot::Parked) {
                Slot::Job(job) => return Some(job),
                Slot::Closed | Slot::Gone => return None,
                Slot::Parked if Instant::now() >= deadline => {
                    *slot = Slot::Gone;
                    return None;
                }
                Slot::Parked => {}
            }
        }
        thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
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
