//! The dispatcher's event channel: what connection threads and the server tell it, and the
//! bell that wakes it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendError, Sender, TryRecvError, TrySendError};

use super::peer::PeerId;
use crate::message::Frame;

/// What connection threads and the server tell the dispatcher. `O` is a client's write side
/// (see [`super::dispatcher::Outlet`]).
#[derive(Debug)]
pub(crate) enum Event<O> {
    /// A client's handshake is valid: send it the answer given (the 101 and the welcome),
    /// replay the history, add it.
    Join(O, Frame),
    /// A tagged text frame to append to the history and send to everyone.
    Broadcast(Frame),
    /// Frames read together from a fleet's stream (see [`backplane`](super::backplane)), in
    /// order: one event where a [`Event::Broadcast`] each would wake the dispatcher as
    /// often.
    Broadcasts(Batch),
    /// In a fleet, Redis lost what this node delivered last: close every client with 1012
    /// to reconnect, and make `frames`, the room as Redis has it now, the history they
    /// will be shown.
    Restart(Vec<Frame>),
    /// A pong for one client, answering its ping.
    Pong(PeerId, Frame),
    /// A client is done. Send it `close` after everything broadcast before, then forget it.
    Leave(PeerId, Option<Frame>),
    /// The server is stopping: close every client with 1001 and refuse new ones.
    Shutdown,
}

/// Frames for [`Event::Broadcasts`]. The channel bounds events, not frames, so a batch
/// holds one of its sender's few credits and gives it back when the dispatcher drops it:
/// however many frames a read brings, only so many batches wait for the dispatcher.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) frames: Vec<Frame>,
    /// Where the credit goes back once the frames are taken.
    credits: Sender<()>,
}

impl Batch {
    /// `frames`, holding a credit that goes back to `credits` once they are taken.
    pub(crate) fn new(frames: Vec<Frame>, credits: Sender<()>) -> Self {
        Batch { frames, credits }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // The credits channel holds one slot per credit, so there is always room.
        let _ = self.credits.try_send(());
    }
}

/// The event channel: the sending side, shared by the connection threads, and the receiving
/// side. See [`Events`] for why it wraps a crossbeam channel.
pub(crate) fn channel<O>(capacity: usize) -> (Events<O>, Inbox<O>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let bell = Arc::new(Bell::default());
    let room = Arc::new(Room::default());
    (
        Events {
            tx,
            bell: Arc::clone(&bell),
            room: Arc::clone(&room),
        },
        Inbox { rx, bell, room },
    )
}

/// The connection threads' side of the dispatcher's event channel.
///
/// A crossbeam receiver spins and yields before it sleeps, which pays off when its sender
/// runs on another core. A busy server has one core's worth of work, and those cycles are
/// taken from the very thread about to send. So the dispatcher sleeps at once
/// (`thread::park`), and a sender rings it awake only if it sleeps. Measured with one
/// receiver (where the hand-off is most of the work): 4.9 µs of server CPU per delivery
/// with crossbeam's wait, 4.1 with this one.
#[derive(Debug)]
pub(crate) struct Events<O> {
    tx: Sender<Event<O>>,
    bell: Arc<Bell>,
    room: Arc<Room>,
}

impl<O> Clone for Events<O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            bell: Arc::clone(&self.bell),
            room: Arc::clone(&self.room),
        }
    }
}

/// The dispatcher's side of the event channel.
#[derive(Debug)]
pub(crate) struct Inbox<O> {
    rx: Receiver<Event<O>>,
    bell: Arc<Bell>,
    room: Arc<Room>,
}

/// Where senders wait while the queue is full. crossbeam's blocking send spins and yields
/// before it sleeps; when every client leaves at once, thousands of connection threads on
/// one core each yield the core to another that yields in turn, while the dispatcher that
/// would make room waits behind them all (measured in a storm of 10 000 reconnects: 48 000
/// `sched_yield` calls). So a sender that finds the queue full sleeps on a condition
/// variable at once, and the dispatcher wakes the sleepers when it has taken events.
#[derive(Debug, Default)]
struct Room {
    waiting: AtomicUsize,
    lock: Mutex<()>,
    freed: Condvar,
}

/// How long a sender waits for room before it looks again, should a wake-up be missed
/// (none should: this only bounds the cost of a bug).
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Bell {
    asleep: AtomicBool,
    dispatcher: OnceLock<Thread>,
}

impl Bell {
    /// Wake the dispatcher if it sleeps. The fence pairs with the one in [`Inbox::wait`]:
    /// either the dispatcher sees the event, or this sees it asleep and unparks it.
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed)
            && let Some(dispatcher) = self.dispatcher.get()
        {
            dispatcher.unpark();
        }
    }
}

impl<O> Events<O> {
    /// Queue `event`, waiting while the queue is full; fails once the dispatcher is gone.
    pub(crate) fn send(&self, event: Event<O>) -> Result<(), SendError<Event<O>>> {
        let result = match self.tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(event)) => Err(SendError(event)),
            Err(TrySendError::Full(event)) => {
                self.bell.ring();
                self.send_when_room(event)
            }
        };
        if result.is_ok() {
            self.bell.ring();
        }
        result
    }

    /// Sleep until the dispatcher has made room, then queue `event`.
    fn send_when_room(&self, mut event: Event<O>) -> Result<(), SendError<Event<O>>> {
        let room = &*self.room;
        let mut guard = room.lock.lock().unwrap_or_else(PoisonError::into_inner);
        room.waiting.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            match self.tx.try_send(event) {
                Ok(()) => break Ok(()),
                Err(TrySendError::Disconnected(back)) => break Err(SendError(back)),
                Err(TrySendError::Full(back)) => event = back,
            }
            guard = match room.freed.wait_timeout(guard, RECHECK) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        };
        room.waiting.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl<O> Drop for Events<O> {
    /// The last sender is gone: let the dispatcher find out now rather than at its next timer.
    fn drop(&mut self) {
        self.bell.ring();
    }
}

impl<O> Drop for Inbox<O> {
    /// The dispatcher is gone (even by a panic): senders waiting for room go on now, not
    /// at their next look. The queue is emptied so that they find room; what they send
    /// after that fails, as the channel closes.
    fn drop(&mut self) {
        while self.rx.try_recv().is_ok() {}
        let _guard = self
            .room
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.room.freed.notify_all();
    }
}

impl<O> Inbox<O> {
    /// Make the calling thread the one the bell wakes. The dispatcher calls it once, first.
    pub(crate) fn listen(&self) {
        self.bell.dispatcher.get_or_init(thread::current);
    }

    /// The events waiting now, at most `max`, without waiting. Call
    /// [`made_room`](Self::made_room) with how many were taken.
    pub(crate) fn ready(&self, max: usize) -> impl Iterator<Item = Event<O>> + '_ {
        self.rx.try_iter().take(max)
    }

    /// `taken` events have left the queue: wake as many of the senders waiting for room,
    /// if any, one each, so that a storm of them does not all wake for a few places. The
    /// lock orders this after a sender's last look at the queue, or before it.
    pub(crate) fn made_room(&self, taken: usize) {
        let waiting = self.room.waiting.load(Ordering::SeqCst);
        if waiting == 0 || taken == 0 {
            return;
        }
        let _guard = self
            .room
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for _ in 0..waiting.min(taken) {
            self.room.freed.notify_one();
        }
    }

    /// The next event, waiting no later than `deadline`; `Ok(None)` when woken without one.
    /// Fails once every sender is gone.
    pub(crate) fn wait(&self, deadline: Instant) -> Result<Option<Event<O>>, TryRecvError> {
        self.bell.asleep.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let event = match self.rx.try_recv() {
            Ok(event) => {
                self.made_room(1);
                Ok(Some(event))
            }
            Err(TryRecvError::Empty) => {
                thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
                Ok(None)
            }
            Err(e) => Err(e),
        };
        self.bell.asleep.store(false, Ordering::Relaxed);
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn senders_that_find_the_queue_full_sleep_and_all_get_through_in_order() {
        const SENDERS: u64 = 8;
        const EACH: u64 = 500;
        let (events, inbox) = channel::<()>(4);
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let events = events.clone();
                thread::spawn(move || {
                    for i in 0..EACH {
                        let event =
                            Event::Pong(s, Frame::from((s * EACH + i).to_be_bytes().to_vec()));
                        assert!(events.send(event).is_ok(), "the dispatcher is there");
                    }
                })
            })
            .collect();
        drop(events);
        inbox.listen();
        // Were a wake-up missed, a sender would wait a second (RECHECK) for each event.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut next = [0u64; SENDERS as usize];
        let mut received = 0;
        while received < SENDERS * EACH {
            assert!(Instant::now() < deadline, "stuck after {received} events");
            let mut taken: Vec<Event<()>> = inbox.ready(3).collect();
            inbox.made_room(taken.len());
            if taken.is_empty()
                && let Ok(Some(event)) = inbox.wait(Instant::now() + Duration::from_millis(50))
            {
                taken.push(event);
            }
            for event in taken {
                let Event::Pong(s, frame) = event else {
                    panic!("only pongs were sent")
                };
                let n = u64::from_be_bytes(frame[..].try_into().expect("eight bytes"));
                assert_eq!(
                    n,
                    s * EACH + next[s as usize],
                    "each sender's events in order"
                );
                next[s as usize] += 1;
                received += 1;
            }
        }
        for sender in senders {
            sender.join().expect("a sender");
        }
        assert_eq!(inbox.room.waiting.load(Ordering::SeqCst), 0);
    }
}
