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
//! its memory back. A thread that ends joins those that ended before it, and the acceptor
//! joins the rest as it wakes: on an idle server only the last to end waits, mapped, for
//! the next connection. Parking is `thread::park`, with no spinning or yielding first: when
//! thousands of clients leave at once, thousands of threads park at once on one core, and
//! every yield would hand the core to another of them.
//!
//! Threads never outnumber the limit the server gives (as many as it may have
//! connections): with none parked and that many busy, some still finishing connections
//! that have ended, a new connection is closed at once rather than given one more. So
//! however large the cache, the server holds no more threads than its connections may,
//! and the cache's default is that many: every client of a storm finds a thread waiting.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
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
    threads: Arc<Threads>,
    /// The most threads at once, busy or parked.
    limit: usize,
    stack_size: usize,
}

/// Every thread not yet joined. Under a `std` mutex, which sleeps rather than yields when
/// thousands of threads ending at once want it.
#[derive(Debug)]
struct Threads {
    joinable: StdMutex<Joinable>,
    /// Each thread sends its number here as its last act.
    ended_tx: Sender<u64>,
}

#[derive(Debug)]
struct Joinable {
    handles: HashMap<u64, JoinHandle<()>>,
    next: u64,
    ended: Receiver<u64>,
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
    /// It waited too long and ended; its entry is dropped once it reaches the front.
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
    /// At most `limit` threads with stacks of `stack_size` bytes, up to `cache` of them
    /// parked for up to `park_for` each.
    pub(crate) fn new(limit: usize, stack_size: usize, cache: usize, park_for: Duration) -> Self {
        let (ended_tx, ended) = crossbeam_channel::unbounded();
        Self {
            parked: Arc::new(Mutex::new(Parked {
                stack: VecDeque::new(),
                cache,
                park_for,
                closed: false,
            })),
            threads: Arc::new(Threads {
                joinable: StdMutex::new(Joinable {
                    handles: HashMap::new(),
                    next: 0,
                    ended,
                }),
                ended_tx,
            }),
            limit,
            stack_size,
        }
    }

    /// Run `job` on the thread parked last, or on a new one.
    ///
    /// # Errors
    /// Every thread the limit allows is busy, or no thread could be started (the system
    /// is out of threads or memory maps). `job` is dropped.
    pub(crate) fn run(&self, job: Job) -> std::io::Result<()> {
        let job = match hand_over(&self.parked, job) {
            None => return Ok(()),
            Some(job) => job,
        };
        // Started under the lock, so that no thread is joined before its handle is kept.
        let mut joinable = self.threads.lock();
        if joinable.handles.len() >= self.limit {
            return Err(std::io::Error::other(format!(
                "all {} connection threads are busy, some still ending connections",
                self.limit
            )));
        }
        joinable.next += 1;
        let number = joinable.next;
        let parked = Arc::clone(&self.parked);
        let threads = Arc::clone(&self.threads);
        // Unnamed (`top -H` shows the acceptor's name): a name costs each thread 1 KiB of
        // resident memory and a tenth of the connection rate (measured with `--only
        // connections`).
        let handle = thread::Builder::new()
            .stack_size(self.stack_size)
            .spawn(move || {
                let _ended = Ended {
                    number,
                    tx: threads.ended_tx.clone(),
                };
                serve(job, &parked, &threads);
            })?;
        joinable.handles.insert(number, handle);
        Ok(())
    }

    /// Whether [`run`](Self::run) has a thread for another job: one is parked, or the
    /// limit allows another. Only the caller of `run` adds threads, so a yes holds.
    pub(crate) fn has_room(&self) -> bool {
        !self.parked.lock().stack.is_empty() || self.threads.lock().handles.len() < self.limit
    }

    /// Join the threads that have ended.
    pub(crate) fn reap(&self) {
        self.threads.reap();
    }

    /// End the parked threads and join every thread; the busy ones must be ending (their
    /// connections cut) for this to return.
    pub(crate) fn stop(&self) {
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
        // Joined without the lock, which a thread ending meanwhile takes to reap.
        let handles = mem::take(&mut self.threads.lock().handles);
        for (_, handle) in handles {
            join(handle);
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
        let mut joinable = self.lock();
        while let Ok(number) = joinable.ended.try_recv() {
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
/// A thread that ends joins those that ended before it.
fn serve(first: Job, parked: &Mutex<Parked>, threads: &Threads) {
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
                drop(parked);
                threads.reap();
                return;
            }
            parked.stack.push_back(Arc::clone(&me));
            parked.park_for
        };
        match wait(&me, later(Instant::now(), park_for)) {
            Some(next) => job = next,
            None => {
                take_off_the_gone(parked);
                threads.reap();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A job that reports the thread it ran on and then waits to be let go.
    fn job(ran_on: &Sender<thread::ThreadId>, go: &Receiver<()>) -> Job {
        counted_job(ran_on, go, &Arc::new(AtomicUsize::new(0)))
    }

    /// As [`job`], counting in `finished` once it is let go.
    fn counted_job(
        ran_on: &Sender<thread::ThreadId>,
        go: &Receiver<()>,
        finished: &Arc<AtomicUsize>,
    ) -> Job {
        let (ran_on, go, finished) = (ran_on.clone(), go.clone(), Arc::clone(finished));
        Box::new(move || {
            let _ = ran_on.send(thread::current().id());
            let _ = go.recv_timeout(Duration::from_secs(10));
            finished.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn threads(workers: &Workers) -> usize {
        workers.threads.lock().handles.len()
    }

    #[test]
    fn threads_are_reused_bounded_refused_at_the_limit_and_joined() {
        // Parked for long enough that a test thread held up on a busy machine still finds
        // the parked thread there.
        let workers = Workers::new(2, 64 * 1024, 2, Duration::from_secs(2));
        let (ran_on_tx, ran_on) = bounded(8);
        let (go_tx, go) = bounded::<()>(8);
        let wait = Duration::from_secs(10);
        workers.run(job(&ran_on_tx, &go)).expect("a first thread");
        workers.run(job(&ran_on_tx, &go)).expect("a second thread");
        let first = ran_on.recv_timeout(wait).expect("ran");
        let second = ran_on.recv_timeout(wait).expect("ran");
        assert_ne!(first, second);
        assert!(!workers.has_room(), "both threads busy at the limit");
        assert!(
            workers.run(job(&ran_on_tx, &go)).is_err(),
            "refused at the limit"
        );

        // One job ends: its thread parks and takes the next job, no third thread.
        go_tx.send(()).expect("let one go");
        let deadline = Instant::now() + wait;
        while !workers.has_room() {
            assert!(Instant::now() < deadline, "no thread parked");
            thread::sleep(Duration::from_millis(5));
        }
        workers.run(job(&ran_on_tx, &go)).expect("a parked thread");
        let third = ran_on.recv_timeout(wait).expect("ran");
        assert!(third == first || third == second, "ran on a parked thread");
        assert_eq!(threads(&workers), 2);

        // Both let go: they park, wait their 2 s, end and are joined.
        go_tx.send(()).expect("let go");
        go_tx.send(()).expect("let go");
        let deadline = Instant::now() + wait;
        while threads(&workers) > 0 {
            assert!(Instant::now() < deadline, "parked threads did not end");
            workers.reap();
            thread::sleep(Duration::from_millis(20));
        }
        workers.stop();
    }

    #[test]
    fn stop_ends_parked_threads_and_joins_every_thread() {
        let workers = Workers::new(4, 64 * 1024, 4, Duration::from_secs(3600));
        let (ran_on_tx, ran_on) = bounded(8);
        let (go_tx, go) = bounded::<()>(8);
        let finished = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            workers
                .run(counted_job(&ran_on_tx, &go, &finished))
                .expect("a thread");
        }
        for _ in 0..3 {
            ran_on.recv_timeout(Duration::from_secs(10)).expect("ran");
        }
        // Two end their jobs and park for an hour; one is still busy when stop begins.
        go_tx.send(()).expect("let go");
        go_tx.send(()).expect("let go");
        let deadline = Instant::now() + Duration::from_secs(10);
        while workers.parked.lock().stack.len() < 2 {
            assert!(Instant::now() < deadline, "the two threads did not park");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(finished.load(Ordering::SeqCst), 2, "one job still busy");
        let releaser = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            let _ = go_tx.send(());
        });
        let (stopped_tx, stopped) = bounded(1);
        let counted = Arc::clone(&finished);
        thread::spawn(move || {
            workers.stop();
            let _ = stopped_tx.send(counted.load(Ordering::SeqCst));
        });
        let finished_at_stop = stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("stop returns");
        assert_eq!(
            finished_at_stop, 3,
            "stop joined the busy thread after its job"
        );
        releaser.join().expect("releaser");
    }
}
