//! One client as the dispatcher and its connection thread share it: the socket, the
//! address, when it last spoke, and who may write to it right now.
//!
//! # The write path
//!
//! The connection thread only ever reads. Writes start on the dispatcher: it writes all a
//! client lacks, as shared frames, straight into the socket with `MSG_DONTWAIT`, so it
//! never blocks, and almost always the kernel takes it all in one system call. Only when a
//! socket's buffer is full does a leftover remain. That backlog goes into a bounded
//! crossbeam channel drained by a writer thread that exists only while the backlog does;
//! while it lives, the dispatcher queues behind it instead of writing, so frames keep their
//! order and are never interleaved. A client whose backlog outgrows the channel is closed.
//!
//! The small [`WriteState`] under a `parking_lot` mutex settles who may write. The
//! dispatcher holds it during its non-blocking write; the writer thread only takes it to
//! hand the socket back, never across a blocking write.

use std::io::{self, IoSlice};
use std::mem;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, error};
use parking_lot::{Condvar, Mutex};
use socket2::SockRef;

use crate::message::Frame;

/// The most frames gathered into one `sendmsg`, well under the kernel's `IOV_MAX` of 1024.
pub(crate) const MAX_BATCH: usize = 64;

/// Stack for a backlog writer: it only moves bytes, so a small one suffices.
const WRITER_STACK: usize = 64 * 1024;

/// A server-assigned number that names one connection in events and logs.
pub(crate) type PeerId = u64;

/// What the dispatcher and a connection thread share about one client.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) id: PeerId,
    pub(crate) addr: SocketAddr,
    pub(crate) stream: TcpStream,
    born: Instant,
    last_heard_ms: AtomicU64,
    write: Mutex<WriteState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct WriteState {
    /// A writer thread owns the socket's write side and drains the backlog.
    draining: bool,
    /// The close frame's progress; once it is queued, no more data is accepted.
    close: Close,
    /// The socket failed or the connection ended: nobody writes any more.
    gone: bool,
    /// The current or last writer thread, joined before a new one starts and at the end.
    writer: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
enum Close {
    #[default]
    Open,
    /// Waiting behind the backlog; the writer sends it last.
    Pending(Frame),
    Sending,
    Written,
}

/// What became of a [`Outlet::send`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written or queued.
    Done,
    /// The backlog is full: the client cannot keep up and must be closed.
    Overflow,
    /// The client is closing or gone; nothing was sent.
    Gone,
}

impl Peer {
    pub(crate) fn new(id: PeerId, stream: TcpStream, addr: SocketAddr) -> Self {
        Self {
            id,
            addr,
            stream,
            born: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            write: Mutex::new(WriteState::default()),
            changed: Condvar::new(),
        }
    }

    /// Note that the client just sent something, which proves it is alive.
    pub(crate) fn heard(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_heard_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the client has said nothing, as of `now`.
    pub(crate) fn silent_for(&self, now: Instant) -> Duration {
        let heard = self.born + Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(heard)
    }

    /// Cut the connection without ceremony: wakes the connection thread's read and any
    /// writer's blocked write, which then end.
    pub(crate) fn abort(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Whether the server has already sent or queued its close frame to this client.
    pub(crate) fn is_closing(&self) -> bool {
        !matches!(self.write.lock().close, Close::Open)
    }

    /// Wait until the close frame has been written or the socket has failed, at most
    /// `timeout`.
    pub(crate) fn wait_close_written(&self, timeout: Duration) {
        let mut state = self.write.lock();
        let deadline = Instant::now() + timeout;
        while !state.gone && !matches!(state.close, Close::Written) {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return;
            }
        }
    }

    /// End all writing: no writer may start after this, the socket is shut down, and the
    /// writer thread, if any, is joined. Called once by the connection thread as it ends.
    pub(crate) fn finish(&self) {
        let writer = {
            let mut state = self.write.lock();
            state.gone = true;
            self.changed.notify_all();
            state.writer.take()
        };
        self.abort();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            error!(
                "the writer thread for {} panicked (this is a bug)",
                self.addr
            );
        }
    }

    /// Write `frames` without blocking. Returns how many bytes the kernel took.
    fn write_now(&self, frames: &[Frame]) -> io::Result<usize> {
        let mut iov = [IoSlice::new(&[]); MAX_BATCH];
        let n = frames.len().min(MAX_BATCH);
        for (slot, frame) in iov.iter_mut().zip(frames) {
            *slot = IoSlice::new(frame);
        }
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        loop {
            match SockRef::from(&self.stream).send_vectored_with_flags(&iov[..n], flags) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                result => return result,
            }
        }
    }

    /// Write `frames` completely, blocking as long as the client needs. Only a writer
    /// thread calls this, without the lock held.
    fn write_all(&self, frames: &[Frame]) -> io::Result<()> {
        let mut storage: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let mut iov = &mut storage[..];
        while !iov.is_empty() {
            match SockRef::from(&self.stream).send_vectored_with_flags(iov, libc::MSG_NOSIGNAL) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut iov, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The close frame is out, and it is the last thing we send: shut the sending side
    /// down at once, so the client sees the end of the connection without waiting for the
    /// connection thread. Reading goes on, for the client's answer.
    fn close_written(&self, state: &mut WriteState) {
        state.close = Close::Written;
        let _ = self.stream.shutdown(Shutdown::Write);
        self.changed.notify_all();
    }

    fn mark_gone(&self, state: &mut WriteState) {
        state.gone = true;
        self.changed.notify_all();
    }
}

/// The dispatcher's handle for writing to one client: the shared [`Peer`] plus the sending
/// end of its backlog channel, which exists only while a writer thread drains it.
#[derive(Debug)]
pub(crate) struct Outlet {
    pub(crate) peer: Arc<Peer>,
    backlog: Backlog,
}

/// The sending end of a client's backlog channel, while a writer thread drains it.
#[derive(Debug)]
struct Backlog {
    tx: Option<Sender<Frame>>,
    capacity: usize,
}

impl Outlet {
    /// `capacity` bounds the backlog, in frames.
    pub(crate) fn new(peer: Arc<Peer>, capacity: usize) -> Self {
        Self {
            peer,
            backlog: Backlog {
                tx: None,
                capacity: capacity.max(1),
            },
        }
    }

    /// Send `frames` (at most [`MAX_BATCH`]) in order, never blocking.
    pub(crate) fn send(&mut self, frames: &[Frame]) -> Sent {
        let peer = &self.peer;
        let mut state = peer.write.lock();
        if state.gone || !matches!(state.close, Close::Open) {
            return Sent::Gone;
        }
        if state.draining {
            return self.backlog.enqueue(frames.iter().cloned());
        }
        match peer.write_now(frames) {
            Ok(written) => match leftover(frames, written) {
                None => Sent::Done,
                Some((partial, rest)) => {
                    let frames = std::iter::once(partial).chain(rest.iter().cloned());
                    self.backlog.start(peer, &mut state, frames)
                }
            },
            Err(e) => {
                debug!("write to {} failed: {e}", peer.addr);
                peer.mark_gone(&mut state);
                drop(state);
                peer.abort();
                Sent::Gone
            }
        }
    }

    /// Send the close frame after everything already sent. Afterwards the client takes
    /// nothing more; a second close is ignored.
    pub(crate) fn close(&mut self, frame: Frame) {
        let peer = &self.peer;
        let mut state = peer.write.lock();
        if state.gone || !matches!(state.close, Close::Open) {
            return;
        }
        if state.draining {
            state.close = Close::Pending(frame);
        } else {
            match peer.write_now(std::slice::from_ref(&frame)) {
                Ok(written) if written == frame.len() => peer.close_written(&mut state),
                Ok(written) => {
                    state.close = Close::Pending(frame.slice(written..));
                    self.backlog.start(peer, &mut state, std::iter::empty());
                }
                Err(e) => {
                    debug!("close to {} failed: {e}", peer.addr);
                    peer.mark_gone(&mut state);
                }
            }
        }
        // The channel has served its purpose once the close is queued: dropping its sender
        // lets the writer end as soon as the queue is empty.
        self.backlog.tx = None;
    }
}

impl Backlog {
    fn enqueue(&self, frames: impl Iterator<Item = Frame>) -> Sent {
        let Some(tx) = &self.tx else {
            return Sent::Gone;
        };
        for frame in frames {
            match tx.try_send(frame) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Sent::Overflow,
                Err(TrySendError::Disconnected(_)) => return Sent::Gone,
            }
        }
        Sent::Done
    }

    /// Hand `frames` to a new writer thread, which owns the socket until they are written.
    fn start(
        &mut self,
        peer: &Arc<Peer>,
        state: &mut WriteState,
        frames: impl Iterator<Item = Frame>,
    ) -> Sent {
        if let Some(previous) = state.writer.take() {
            // It cleared `draining` as its last act, so this join returns at once.
            let _ = previous.join();
        }
        let (tx, rx) = crossbeam_channel::bounded(self.capacity);
        self.tx = Some(tx);
        let sent = self.enqueue(frames);
        let writer_peer = Arc::clone(peer);
        let spawned = thread::Builder::new()
            .name(format!("writer {}", peer.id))
            .stack_size(WRITER_STACK)
            .spawn(move || drain_backlog(&writer_peer, &rx));
        match spawned {
            Ok(handle) => {
                state.draining = true;
                state.writer = Some(handle);
                sent
            }
            Err(e) => {
                error!(
                    "cannot start a writer thread for {}: {e}; dropping the client",
                    peer.addr
                );
                self.tx = None;
                peer.mark_gone(state);
                peer.abort();
                Sent::Gone
            }
        }
    }
}

/// Where a non-blocking write of `frames` stopped, if it did not finish: the unsent tail
/// of the frame it stopped in, and the frames after it.
fn leftover(frames: &[Frame], mut written: usize) -> Option<(Frame, &[Frame])> {
    for (i, frame) in frames.iter().enumerate() {
        if written < frame.len() {
            return Some((frame.slice(written..), &frames[i + 1..]));
        }
        written -= frame.len();
    }
    None
}

/// The writer thread: write everything queued, then the pending close if there is one,
/// then give the socket back to the dispatcher and end.
fn drain_backlog(peer: &Peer, rx: &Receiver<Frame>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        batch.extend(rx.try_iter().take(MAX_BATCH));
        if batch.is_empty() {
            let mut state = peer.write.lock();
            if !rx.is_empty() {
                continue;
            }
            if let Close::Pending(frame) = mem::replace(&mut state.close, Close::Sending) {
                drop(state);
                let result = peer.write_all(std::slice::from_ref(&frame));
                state = peer.write.lock();
                match result {
                    Ok(()) => peer.close_written(&mut state),
                    Err(_) => state.gone = true,
                }
            }
            state.draining = false;
            peer.changed.notify_all();
            return;
        }
        if let Err(e) = peer.write_all(&batch) {
            debug!("write to {} failed: {e}", peer.addr);
            let mut state = peer.write.lock();
            peer.mark_gone(&mut state);
            state.draining = false;
            drop(state);
            peer.abort();
            return;
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::Bytes;

    #[test]
    fn leftover_finds_the_frame_a_write_stopped_in() {
        let frames = [Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
        assert_eq!(leftover(&frames, 7), None);
        let (partial, rest) = leftover(&frames, 0).expect("nothing written");
        assert_eq!((&partial[..], rest.len()), (&b"abc"[..], 1));
        let (partial, rest) = leftover(&frames, 4).expect("stopped in the second frame");
        assert_eq!((&partial[..], rest.len()), (&b"efg"[..], 0));
    }
}
