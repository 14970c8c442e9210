//! The dispatcher's event channel: what connection threads and the server tell it, and the
//! bell that wakes it.

use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::Instant;

use crossbeam_channel::{Receiver, SendError, Sender, TryRecvError};

use super::peer::PeerId;
use crate::message::Frame;

/// What connection threads and the server tell the dispatcher. `O` is a client's write side
/// (see [`super::dispatcher::Outlet`]).
#[derive(Debug)]
pub(crate) enum Event<O> {
    /// A client finished its handshake: greet it, replay the history, add it.
    Join(O),
    /// A tagged text frame to append to the history and send to everyone.
    Broadcast(Frame),
    /// In a fleet, the room's history as Redis has it (see
    /// [`backplane`](super::backplane)): it replaces the history without being sent to
    /// anyone. With `lost`, Redis lost what this node delivered last, so its clients are
    /// closed with 1012 to reconnect and see the new history.
    Reseed { frames: Vec<Frame>, lost: bool },
    /// A pong for one client, answering its ping.
    Pong(PeerId, Frame),
    /// A client is done. Send it `close` after everything broadcast before, then forget it.
    Leave(PeerId, Option<Frame>),
    /// The server is stopping: close every client with 1001 and refuse new ones.
    Shutdown,
}

/// The event channel: the sending side, shared by the connection threads, and the receiving
/// side. See [`Events`] for why it wraps a crossbeam channel.
pub(crate) fn channel<O>(capacity: usize) -> (Events<O>, Inbox<O>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let bell = Arc::new(Bell::default());
    (
        Events {
            tx,
            bell: Arc::clone(&bell),
        },
        Inbox { rx, bell },
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
}

impl<O> Clone for Events<O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            bell: Arc::clone(&self.bell),
        }
    }
}

/// The dispatcher's side of the event channel.
#[derive(Debug)]
pub(crate) struct Inbox<O> {
    rx: Receiver<Event<O>>,
    bell: Arc<Bell>,
}

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
        self.tx.send(event)?;
        self.bell.ring();
        Ok(())
    }
}

impl<O> Drop for Events<O> {
    /// The last sender is gone: let the dispatcher find out now rather than at its next timer.
    fn drop(&mut self) {
        self.bell.ring();
    }
}

impl<O> Inbox<O> {
    /// Make the calling thread the one the bell wakes. The dispatcher calls it once, first.
    pub(crate) fn listen(&self) {
        self.bell.dispatcher.get_or_init(thread::current);
    }

    /// The events waiting now, at most `max`, without waiting.
    pub(crate) fn ready(&self, max: usize) -> impl Iterator<Item = Event<O>> + '_ {
        self.rx.try_iter().take(max)
    }

    /// The next event, waiting no later than `deadline`; `Ok(None)` when woken without one.
    /// Fails once every sender is gone.
    pub(crate) fn wait(&self, deadline: Instant) -> Result<Option<Event<O>>, TryRecvError> {
        self.bell.asleep.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let event = match self.rx.try_recv() {
            Ok(event) => Ok(Some(event)),
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
