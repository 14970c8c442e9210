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
//! The writer's blocking writes carry the socket's send timeout (`--write-timeout`): a
//! client whose output makes no progress for that long is cut, so a client that never reads
//! cannot keep a writer thread forever, even if it keeps pinging. And there are at most
//! `--max-writers` writer threads at once ([`Backlogs`]), so that clients that stop reading
//! cannot double the server's threads: a backlog that begins when none is free waits,
//! parked, until the dispatcher's housekeeping finds one free, and its client is cut if
//! that takes `--write-timeout`.
//!
//! Over TLS the frames are encrypted first, under the same lock and into one run of
//! records, which then takes the path above as one frame: the order in which records are
//! sealed is the order in which they are sent, as TLS requires. Sealed records are each
//! client's own copies, so in backlogs they count against a server-wide budget
//! (`--max-tls-backlog`, [`Backlogs`]); a client whose backlog would pass it is closed as
//! too slow, checked before sealing, so that it can still read its close.
//!
//! One [`WriteState`] under a `parking_lot` mutex settles who may write. The dispatcher
//! holds it during its non-blocking write; the writer thread only takes it to hand the
//! socket back, never across a blocking write.

use std::borrow::Cow;
use std::io::{self, IoSlice};
use std::mem;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, error, warn};
use parking_lot::{Condvar, Mutex};
use socket2::SockRef;

use super::Throttle;
use super::dispatcher::{MAX_BATCH, Outlet, Sent};
use super::metrics::{Closed, Metrics};
use crate::config::{MAX_QUEUE, later};
use crate::error::{is_timeout, timed_out};
use crate::message::Frame;
use crate::tls::{Tls, Wire, send_now};

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
    /// The connection's TLS, once its handshake is done; never set on a plaintext port.
    /// Boxed: rustls's state is over a kilobyte, which a plaintext client should not carry.
    pub(crate) tls: OnceLock<Box<Tls>>,
    /// For counting a client cut because its output stalled, which only the backlog
    /// writer sees.
    metrics: Arc<Metrics>,
    born: Instant,
    last_heard_ms: AtomicU64,
    /// The server is done with this connection: its thread stops reading.
    cut: AtomicBool,
    /// The close is queued behind a full backlog: the writer drops what is left of the
    /// backlog and sends the close next, so that a slow client reads its 1008 in time.
    hurry: AtomicBool,
    write: Mutex<Writing>,
    changed: Condvar,
}

#[derive(Debug)]
struct Writing {
    state: WriteState,
    /// The current or last backlog writer, joined once it has finished.
    writer: Option<JoinHandle<()>>,
}

/// Who may write to a client, and what is left to send. Every variant is a state the write
/// side can really be in; the transitions are:
///
/// ```text
/// Direct ──socket full──► Draining ──backlog written──► Direct
///   │                        │
///   │ close                  │ close
///   ▼                        ▼
/// Closed ◄──written── CloseSending ◄──backlog written── CloseQueued
///   ▲                                                      ▲
///   └──────────── close, written ── Direct ── close, part written
///
/// any state ──socket failed, write timed out, connection ended──► Gone
/// ```
///
/// A backlog's writer thread may not have started yet: when every writer is busy, the
/// backlog waits, parked ([`Parked`]), in `Draining` or `CloseQueued` all the same.
#[derive(Debug)]
enum WriteState {
    /// The dispatcher writes straight into the socket, without blocking.
    Direct,
    /// A writer thread (started, or to start once one is free) owns the write side until
    /// the backlog is written.
    Draining,
    /// As `Draining`, then this close frame (or what is left of it); no more data is taken.
    CloseQueued(Frame),
    /// The writer is writing the close frame.
    CloseSending,
    /// The close frame is out: nothing more is ever sent.
    Closed,
    /// The socket failed or the connection ended: nobody writes any more.
    Gone,
}

impl WriteState {
    /// Whether more data may still be sent.
    fn takes_data(&self) -> bool {
        matches!(self, WriteState::Direct | WriteState::Draining)
    }

    /// Whether a writer thread owns the write side.
    fn has_writer(&self) -> bool {
        matches!(
            self,
            WriteState::Draining | WriteState::CloseQueued(_) | WriteState::CloseSending
        )
    }
}

impl Peer {
    pub(crate) fn new(
        id: PeerId,
        stream: TcpStream,
        addr: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            id,
            addr,
            stream,
            tls: OnceLock::new(),
            metrics,
            born: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            hurry: AtomicBool::new(false),
            write: Mutex::new(Writing {
                state: WriteState::Direct,
                writer: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// The connection as the WebSocket protocol sees it, through TLS if it has any.
    pub(crate) fn wire(&self) -> Wire<'_> {
        Wire {
            sock: &self.stream,
            tls: self.tls.get().map(|tls| &**tls),
        }
    }

    /// `frames` as they go on the wire: themselves, or sealed into TLS records, all in one
    /// run when `one_run` (for a write now), else each on its own (for the backlog, so
    /// that `--queue` still counts messages). Only under the write lock, which keeps
    /// records in the order they are sealed.
    fn sealed<'f>(&self, frames: &'f [Frame], one_run: bool) -> io::Result<Cow<'f, [Frame]>> {
        let Some(tls) = self.tls.get() else {
            return Ok(Cow::Borrowed(frames));
        };
        if !one_run {
            let each = frames
                .iter()
                .map(|f| Ok(Frame::from(tls.seal(&mut [IoSlice::new(f)])?)));
            return each.collect::<io::Result<Vec<_>>>().map(Cow::Owned);
        }
        // The slices on the stack, as for a plaintext write.
        let (mut iov, n) = slices(frames);
        let records = tls.seal(&mut iov[..n])?;
        Ok(Cow::Owned(vec![Frame::from(records)]))
    }

    /// A close frame as it goes on the wire: over TLS, sealed and followed by TLS's own
    /// goodbye, since nothing comes after it.
    fn sealed_close(&self, frame: Frame) -> io::Result<Frame> {
        match self.tls.get() {
            Some(tls) => Ok(Frame::from(tls.seal_last(&frame)?)),
            None => Ok(frame),
        }
    }

    /// Note that the client just sent something, which proves it is alive.
    pub(crate) fn heard(&self) {
        self.heard_until(Duration::ZERO);
    }

    /// Note that the client is alive and will count as heard for `wait` more: flood
    /// control holds it back that long, which is not its silence.
    pub(crate) fn heard_until(&self, wait: Duration) {
        let ms = self.born.elapsed().saturating_add(wait).as_millis();
        self.last_heard_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long the client has said nothing, as of `now`.
    pub(crate) fn silent_for(&self, now: Instant) -> Duration {
        let heard = Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(self.born)
            .saturating_sub(heard)
    }

    /// Cut the connection without ceremony: wakes the connection thread's read and any
    /// writer's blocked write, which then end. The connection thread stops even if the
    /// client's data is still buffered (a flooder's, say: reading it at its rate could
    /// take hours).
    pub(crate) fn abort(&self) {
        self.cut.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Whether the connection was cut and its thread should stop reading.
    pub(crate) fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Whether the server has already sent or queued its close frame to this client.
    pub(crate) fn is_closing(&self) -> bool {
        !self.write.lock().state.takes_data()
    }

    /// Wait until the close frame has been written or the socket has failed, at most
    /// `timeout`.
    pub(crate) fn wait_close_written(&self, timeout: Duration) {
        let deadline = later(Instant::now(), timeout);
        let mut write = self.write.lock();
        while !matches!(write.state, WriteState::Closed | WriteState::Gone) {
            if self.changed.wait_until(&mut write, deadline).timed_out() {
                return;
            }
        }
    }

    /// End all writing: no writer may start after this, the socket is shut down, and the
    /// writer thread, if any, is joined. Called once by the connection thread as it ends.
    pub(crate) fn finish(&self) {
        let writer = {
            let mut write = self.write.lock();
            self.set(&mut write, WriteState::Gone);
            write.writer.take()
        };
        self.abort();
        if let Some(writer) = writer {
            join_writer(writer, self.addr);
        }
    }

    fn set(&self, write: &mut Writing, state: WriteState) {
        write.state = state;
        self.changed.notify_all();
    }

    /// The close frame is out, and it is the last thing we send: shut the sending side
    /// down at once, so the client sees the end of the connection without waiting for the
    /// connection thread. Reading goes on, for the client's answer.
    fn close_written(&self, write: &mut Writing) {
        self.set(write, WriteState::Closed);
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Give up on the client: nothing more is written, and its connection is cut.
    fn fail(&self, write: &mut Writing) {
        self.set(write, WriteState::Gone);
        self.abort();
    }

    /// Write `frames` without blocking. Returns how many bytes the kernel took.
    fn write_now(&self, frames: &[Frame]) -> io::Result<usize> {
        let (iov, n) = slices(frames);
        send_now(&self.stream, &iov[..n])
    }

    /// Write `frames` completely, blocking while the client makes progress. Fails with
    /// `TimedOut` once a write has made none for the socket's send timeout. Only a writer
    /// thread calls this, without the lock held.
    fn write_all<'f>(&self, frames: impl Iterator<Item = &'f Frame>) -> io::Result<()> {
        let mut storage: Vec<IoSlice<'_>> = frames.map(|f| IoSlice::new(f)).collect();
        let mut iov = &mut storage[..];
        while !iov.is_empty() {
            match SockRef::from(&self.stream).send_vectored_with_flags(iov, libc::MSG_NOSIGNAL) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut iov, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timed_out(e)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn join_writer(writer: JoinHandle<()>, addr: SocketAddr) {
    if writer.join().is_err() {
        error!("the writer thread for {addr} panicked (this is a bug)");
    }
}

/// What all clients' backlogs may take together: writer threads (`--max-writers`) and,
/// over TLS, memory. A plaintext backlog holds the frames every client shares; a TLS one
/// holds this client's own sealed copies, so a few thousand TLS clients that stop reading
/// would otherwise hold a copy of the whole queue each.
#[derive(Debug)]
pub(crate) struct Backlogs {
    running: AtomicUsize,
    limit: usize,
    /// Bytes of sealed records in TLS backlogs, against `sealed_limit`.
    sealed: AtomicUsize,
    sealed_limit: usize,
    /// For the warning when no writer is left, at most once a second.
    refused: Mutex<Throttle>,
    /// How long a backlog may wait for a writer thread, as a writer may wait for its
    /// client (`--write-timeout`; `None` is for ever). Kept here rather than asked of each
    /// socket: housekeeping checks every parked backlog four times a second.
    patience: Option<Duration>,
}

impl Backlogs {
    /// At most `writers` writer threads and `sealed` bytes of sealed records; a backlog
    /// waits for a writer thread at most `patience`.
    pub(crate) fn new(writers: usize, sealed: usize, patience: Option<Duration>) -> Arc<Self> {
        Arc::new(Backlogs {
            running: AtomicUsize::new(0),
            limit: writers,
            sealed: AtomicUsize::new(0),
            sealed_limit: sealed,
            refused: Mutex::new(Throttle::default()),
            patience,
        })
    }

    /// Room for `bytes` more of sealed records, if there is; `force` takes it even past
    /// the limit (for records sealed already, which must be sent).
    fn charge(self: &Arc<Self>, bytes: usize, force: bool) -> Option<Charge> {
        let limit = self.sealed_limit;
        let taken = self
            .sealed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                let after = n.saturating_add(bytes);
                (force || after <= limit).then_some(after)
            });
        taken.ok().map(|_| Charge {
            bytes,
            backlogs: Arc::clone(self),
        })
    }

    /// A place for one more writer, held until the writer ends, if one is left.
    fn enlist(self: &Arc<Self>) -> Option<Enlisted> {
        let limit = self.limit;
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Enlisted(Arc::clone(self)))
    }
}

/// A writer's place among [`Backlogs`], given back when the writer thread ends, however.
struct Enlisted(Arc<Backlogs>);

impl Drop for Enlisted {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sealed records' share of [`Backlogs`], given back when they are written or dropped.
#[derive(Debug)]
struct Charge {
    bytes: usize,
    backlogs: Arc<Backlogs>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.backlogs.sealed.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A frame in a backlog, with the charge for it when it is a TLS client's own sealed copy.
#[derive(Debug)]
struct Queued {
    frame: Frame,
    _charge: Option<Charge>,
}

/// An upper bound on the size of `frames` once sealed into TLS records: each record of up
/// to 16 KiB adds at most 29 bytes (TLS 1.2 with AES-GCM: header, explicit nonce, tag).
fn sealed_size(frames: &[Frame]) -> usize {
    let plain: usize = frames.iter().map(Frame::len).sum();
    plain + (plain / (16 * 1024) + frames.len()) * 29
}

/// The dispatcher's handle for writing to one client: the shared [`Peer`] plus the sending
/// end of its backlog channel, which exists only while a writer thread drains it.
#[derive(Debug)]
pub(crate) struct PeerOutlet {
    peer: Arc<Peer>,
    backlog: Backlog,
}

/// The sending end of a client's backlog channel, while a writer thread drains it.
#[derive(Debug)]
struct Backlog {
    tx: Option<Sender<Queued>>,
    capacity: usize,
    /// The backlog was given a writer thread, or parked to wait for one, and that has not
    /// been reaped yet: lets the dispatcher's housekeeping pass over the many clients that
    /// never had a backlog without taking their locks.
    started_writer: bool,
    backlogs: Arc<Backlogs>,
    /// The backlog overflowed: the client is being closed as too slow.
    overflowed: bool,
    /// The backlog, while it waits for a writer thread to be free.
    parked: Option<Parked>,
}

/// A backlog without a writer thread yet: every writer was busy when it began.
#[derive(Debug)]
struct Parked {
    rx: Receiver<Queued>,
    since: Instant,
}

impl PeerOutlet {
    /// `capacity` bounds the backlog, in frames; what it takes counts among `backlogs`.
    pub(crate) fn new(peer: Arc<Peer>, capacity: usize, backlogs: Arc<Backlogs>) -> Self {
        Self {
            peer,
            backlog: Backlog {
                tx: None,
                capacity: capacity.clamp(1, MAX_QUEUE),
                started_writer: false,
                backlogs,
                overflowed: false,
                parked: None,
            },
        }
    }
}

impl Outlet for PeerOutlet {
    fn id(&self) -> PeerId {
        self.peer.id
    }

    fn addr(&self) -> SocketAddr {
        self.peer.addr
    }

    fn send(&mut self, frames: &[Frame]) -> Sent {
        let peer = &self.peer;
        let mut write = peer.write.lock();
        let draining = match write.state {
            WriteState::Direct => false,
            WriteState::Draining => true,
            _ => return Sent::Gone,
        };
        // Checked before sealing: over TLS, records sealed and then not sent would leave a
        // gap the client cannot decrypt past, and it would never read its 1008.
        if draining && !self.backlog.has_room(frames.len()) {
            self.backlog.overflowed = true;
            return Sent::Overflow;
        }
        let charge = match peer.tls.get() {
            Some(_) if draining => match self.backlog.backlogs.charge(sealed_size(frames), false) {
                Some(charge) => Some(charge),
                None => return Sent::OverBudget,
            },
            _ => None,
        };
        let frames = match peer.sealed(frames, !draining) {
            Ok(frames) => frames,
            Err(e) => {
                debug!("cannot encrypt for {}: {e}", peer.addr);
                peer.fail(&mut write);
                return Sent::Gone;
            }
        };
        if draining {
            return match frames {
                Cow::Borrowed(frames) => self.backlog.enqueue(frames.iter().cloned(), None),
                Cow::Owned(sealed) => self.backlog.enqueue(sealed.into_iter(), charge),
            };
        }
        match peer.write_now(&frames) {
            Ok(written) => match leftover(&frames, written) {
                None => Sent::Done,
                Some((partial, rest)) => {
                    // Over TLS, the rest of a run sealed already: it must go, budget or not.
                    let charge = peer.tls.get().map(|_| {
                        let bytes = partial.len() + rest.iter().map(Frame::len).sum::<usize>();
                        self.backlog.backlogs.charge(bytes, true)
                    });
                    let frames = std::iter::once(partial).chain(rest.iter().cloned());
                    self.backlog
                        .start(peer, &mut write, frames, charge.flatten())
                }
            },
            Err(e) => {
                debug!("write to {} failed: {e}", peer.addr);
                peer.fail(&mut write);
                Sent::Gone
            }
        }
    }

    fn close(&mut self, frame: Frame) {
        // After an overflow, the close goes before the backlog. Not over TLS: records
        // sealed and then dropped would leave a gap the client cannot read past.
        let hurry = self.peer.tls.get().is_none() && self.backlog.overflowed;
        self.queue_close(frame, hurry);
        // The channel has served its purpose once the close is queued: dropping its sender
        // lets the writer end as soon as the queue is empty.
        self.backlog.tx = None;
    }

    fn abort(&self) {
        self.peer.abort();
    }

    fn silent_for(&self, now: Instant) -> Duration {
        self.peer.silent_for(now)
    }

    fn reap(&mut self) {
        if !self.backlog.started_writer {
            return;
        }
        if self.backlog.parked.is_some() {
            self.backlog.unpark(&self.peer);
            return;
        }
        let finished = {
            let mut write = self.peer.write.lock();
            if write.state.has_writer()
                || !write.writer.as_ref().is_none_or(JoinHandle::is_finished)
            {
                return;
            }
            // Written, or given up on: what is still queued (and its share of the budget)
            // goes now, not when the client leaves.
            self.backlog.tx = None;
            write.writer.take()
        };
        self.backlog.started_writer = false;
        if let Some(writer) = finished {
            join_writer(writer, self.peer.addr);
        }
    }
}

impl Drop for PeerOutlet {
    /// The dispatcher lets go of a client (it left) whose backlog is parked: what is queued
    /// (its answer to the client's close, say) goes to a writer if one is free now, and is
    /// given up on otherwise, so that the connection thread waiting for it ends at once.
    fn drop(&mut self) {
        let Some(parked) = self.backlog.parked.take() else {
            return;
        };
        let peer = &self.peer;
        let mut write = peer.write.lock();
        if !matches!(write.state, WriteState::CloseQueued(_)) {
            // Nothing anyone waits for: the client left without a close to answer.
            if write.state.has_writer() {
                peer.fail(&mut write);
            }
            return;
        }
        // A writer started here is joined by the connection thread as it finishes.
        if self.backlog.hand_over(peer, &mut write, parked.rx).is_err() {
            peer.fail(&mut write);
        }
    }
}

impl PeerOutlet {
    /// Send `frame` as the last thing the client gets: now, or after its backlog (or with
    /// `hurry`, after the frames its writer is writing already).
    fn queue_close(&mut self, frame: Frame, hurry: bool) {
        let peer = &self.peer;
        let mut write = peer.write.lock();
        if !write.state.takes_data() {
            return;
        }
        let frame = match peer.sealed_close(frame) {
            Ok(frame) => frame,
            Err(e) => {
                debug!("cannot encrypt the close for {}: {e}", peer.addr);
                peer.fail(&mut write);
                return;
            }
        };
        match write.state {
            WriteState::Direct => match peer.write_now(std::slice::from_ref(&frame)) {
                Ok(written) if written == frame.len() => peer.close_written(&mut write),
                Ok(written) => {
                    write.state = WriteState::CloseQueued(frame.slice(written..));
                    self.backlog
                        .start(peer, &mut write, std::iter::empty(), None);
                }
                Err(e) => {
                    debug!("close to {} failed: {e}", peer.addr);
                    peer.fail(&mut write);
                }
            },
            _ => {
                write.state = WriteState::CloseQueued(frame);
                peer.hurry.store(hurry, Ordering::Release);
            }
        }
    }
}

impl Backlog {
    /// Whether `n` more frames fit in the channel. Only the dispatcher adds to it, so
    /// they still fit when it adds them.
    fn has_room(&self, n: usize) -> bool {
        self.tx
            .as_ref()
            .is_none_or(|tx| tx.len().saturating_add(n) <= self.capacity)
    }

    /// Queue `frames`; `charge`, for all of them, goes with the last, so that it is given
    /// back once they are all written or dropped.
    fn enqueue(&mut self, frames: impl Iterator<Item = Frame>, charge: Option<Charge>) -> Sent {
        let Some(tx) = &self.tx else {
            return Sent::Gone;
        };
        let mut frames = frames.peekable();
        let mut charge = charge;
        while let Some(frame) = frames.next() {
            let charge = if frames.peek().is_none() {
                charge.take()
            } else {
                None
            };
            let queued = Queued {
                frame,
                _charge: charge,
            };
            match tx.try_send(queued) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.overflowed = true;
                    return Sent::Overflow;
                }
                Err(TrySendError::Disconnected(_)) => return Sent::Gone,
            }
        }
        Sent::Done
    }

    /// Hand `frames` to a new writer thread, which owns the socket until they are written;
    /// when every writer is busy, park them until one is free (see [`Self::unpark`]).
    fn start(
        &mut self,
        peer: &Arc<Peer>,
        write: &mut Writing,
        frames: impl Iterator<Item = Frame>,
        charge: Option<Charge>,
    ) -> Sent {
        if let Some(previous) = write.writer.take() {
            // The write side is `Direct` (only then does a new writer start), and only the
            // previous writer sets `Direct`, as its last act before it returns: so it has
            // ended, or is about to, and this join under the lock returns at once.
            join_writer(previous, peer.addr);
        }
        let (tx, rx) = crossbeam_channel::bounded(self.capacity);
        self.tx = Some(tx);
        let sent = self.enqueue(frames, charge);
        if !matches!(write.state, WriteState::CloseQueued(_)) {
            write.state = WriteState::Draining;
        }
        self.started_writer = true;
        match self.hand_over(peer, write, rx) {
            Ok(true) => sent,
            Ok(false) => Sent::Gone,
            Err(rx) => {
                if let Some(note) = self.backlogs.refused.lock().ready() {
                    warn!(
                        "{} is behind, and all {} backlog writer threads are busy with \
                         clients that read slowly or not at all (--max-writers): it waits \
                         for one, for up to --write-timeout{note}",
                        peer.addr, self.backlogs.limit
                    );
                }
                self.parked = Some(Parked {
                    rx,
                    since: Instant::now(),
                });
                sent
            }
        }
    }

    /// Start a writer thread to drain `rx`, if one is free: whether it started (if not,
    /// the client is dropped), or `rx` back when every writer is busy.
    fn hand_over(
        &mut self,
        peer: &Arc<Peer>,
        write: &mut Writing,
        rx: Receiver<Queued>,
    ) -> Result<bool, Receiver<Queued>> {
        let Some(enlisted) = self.backlogs.enlist() else {
            return Err(rx);
        };
        let writer_peer = Arc::clone(peer);
        let spawned = thread::Builder::new()
            .name(format!("writer {}", peer.id))
            .stack_size(WRITER_STACK)
            .spawn(move || {
                let _enlisted = enlisted;
                drain_backlog(&writer_peer, &rx);
            });
        match spawned {
            Ok(handle) => {
                write.writer = Some(handle);
                Ok(true)
            }
            Err(e) => {
                error!(
                    "cannot start a writer thread for {}: {e}; dropping the client",
                    peer.addr
                );
                self.tx = None;
                peer.fail(write);
                Ok(false)
            }
        }
    }

    /// A parked backlog, at housekeeping: hand it to a writer if one is free now; cut the
    /// client once it has waited `--write-timeout` for one, as a client whose writes made
    /// no progress that long.
    fn unpark(&mut self, peer: &Arc<Peer>) {
        let Some(parked) = self.parked.take() else {
            return;
        };
        let mut write = peer.write.lock();
        if !write.state.has_writer() {
            // The connection ended meanwhile: nothing is to be written.
            self.tx = None;
            self.started_writer = false;
            return;
        }
        let Parked { rx, since } = parked;
        let Err(rx) = self.hand_over(peer, &mut write, rx) else {
            return;
        };
        if self
            .backlogs
            .patience
            .is_some_and(|patience| since.elapsed() >= patience)
        {
            // A client already being closed (as a slow consumer, say) was counted then.
            if write.state.takes_data() {
                peer.metrics.closed(Closed::Stalled);
            }
            warn!(
                "cutting {}: no backlog writer thread came free for it within \
                 --write-timeout (--max-writers {})",
                peer.addr, self.backlogs.limit
            );
            peer.fail(&mut write);
            return;
        }
        self.parked = Some(Parked { rx, since });
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
fn drain_backlog(peer: &Peer, rx: &Receiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        batch.extend(rx.try_iter().take(MAX_BATCH));
        if batch.is_empty() {
            let mut write = peer.write.lock();
            if !rx.is_empty() {
                continue;
            }
            match mem::replace(&mut write.state, WriteState::CloseSending) {
                WriteState::CloseQueued(frame) => {
                    drop(write);
                    let result = peer.write_all(std::iter::once(&frame));
                    write = peer.write.lock();
                    match result {
                        Ok(()) if matches!(write.state, WriteState::CloseSending) => {
                            peer.close_written(&mut write);
                        }
                        Ok(()) => {}
                        Err(e) => write_failed(peer, &mut write, &e),
                    }
                }
                WriteState::Draining => peer.set(&mut write, WriteState::Direct),
                other => peer.set(&mut write, other),
            }
            return;
        }
        if let Err(e) = peer.write_all(batch.iter().map(|queued| &queued.frame)) {
            write_failed(peer, &mut peer.write.lock(), &e);
            return;
        }
        batch.clear();
        // Not before the first batch is out: it starts with the rest of a frame already
        // partly sent. Every frame after it is whole and not started.
        if peer.hurry.load(Ordering::Acquire) {
            rx.try_iter().for_each(drop);
        }
    }
}

fn write_failed(peer: &Peer, write: &mut Writing, e: &io::Error) {
    if e.kind() == io::ErrorKind::TimedOut {
        // A client already being closed (as a slow consumer, say) was counted then.
        if write.state.takes_data() {
            peer.metrics.closed(Closed::Stalled);
        }
        let waited = peer
            .stream
            .write_timeout()
            .ok()
            .flatten()
            .unwrap_or_default();
        warn!(
            "cutting {}: it has not read anything for {} s while messages waited for it \
             (--write-timeout)",
            peer.addr,
            waited.as_secs()
        );
    } else {
        debug!("write to {} failed: {e}", peer.addr);
    }
    peer.fail(write);
}

/// The first [`MAX_BATCH`] of `frames` (all of them, as [`Outlet::send`] promises) as
/// slices on the stack for one system call, and how many there are.
fn slices(frames: &[Frame]) -> ([IoSlice<'_>; MAX_BATCH], usize) {
    debug_assert!(
        frames.len() <= MAX_BATCH,
        "Outlet::send takes at most MAX_BATCH"
    );
    let mut iov = [IoSlice::new(&[]); MAX_BATCH];
    for (slot, frame) in iov.iter_mut().zip(frames) {
        *slot = IoSlice::new(frame);
    }
    (iov, frames.len().min(MAX_BATCH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message;
    use std::io::Read;
    use std::net::TcpListener;
    use tungstenite::Bytes;
    use tungstenite::protocol::frame::coding::CloseCode;

    /// A client that does not read yet, and the server's side of it as a [`Peer`], both with
    /// small socket buffers so that a few frames fill them.
    fn stalled_pair() -> (TcpStream, Arc<Peer>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        client.set_recv_buffer_size(4096).expect("receive buffer");
        client.connect(&addr.into()).expect("connect");
        let (server, from) = listener.accept().expect("accept");
        SockRef::from(&server)
            .set_send_buffer_size(4096)
            .expect("send buffer");
        let peer = Peer::new(1, server, from, Arc::new(Metrics::new()));
        (client.into(), Arc::new(peer))
    }

    /// The opcodes of the frames `stream` receives, up to and with the first close.
    fn opcodes_until_close(mut stream: TcpStream) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let (mut bytes, mut opcodes, mut at) = (Vec::new(), Vec::new(), 0);
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut chunk).expect("the close before the end");
            assert!(n > 0, "the connection ended before the close");
            bytes.extend_from_slice(&chunk[..n]);
            // Server frames here are under 64 KiB: a 2- or 4-byte header.
            while let Some(&[first, second]) = bytes.get(at..at + 2) {
                let (len, header) = match second {
                    126 => match bytes.get(at + 2..at + 4) {
                        Some(&[hi, lo]) => (usize::from(u16::from_be_bytes([hi, lo])), 4),
                        _ => break,
                    },
                    len => (usize::from(len), 2),
                };
                if bytes.len() < at + header + len {
                    break;
                }
                opcodes.push(first & 0x0f);
                if first & 0x0f == 8 {
                    return opcodes;
                }
                at += header + len;
            }
        }
    }

    /// Send `frame` to `outlet` until its backlog has begun; bounded.
    fn until_backlog(outlet: &mut PeerOutlet, frame: &Frame) {
        for _ in 0..10_000 {
            assert_eq!(outlet.send(std::slice::from_ref(frame)), Sent::Done);
            if outlet.backlog.started_writer {
                return;
            }
        }
        panic!("the socket never filled");
    }

    #[test]
    fn with_no_writer_free_a_backlog_waits_for_one_and_gets_it() {
        let (_client, peer) = stalled_pair();
        let writers = Backlogs::new(1, usize::MAX, None);
        let busy = writers.enlist().expect("the one place");
        let mut outlet = PeerOutlet::new(Arc::clone(&peer), 100, Arc::clone(&writers));
        until_backlog(&mut outlet, &message::text("t: ", &"x".repeat(1000)));
        assert!(outlet.backlog.parked.is_some(), "parked, no thread");
        outlet.reap();
        assert!(outlet.backlog.parked.is_some(), "still waiting");
        drop(busy);
        outlet.reap();
        assert!(outlet.backlog.parked.is_none());
        assert!(peer.write.lock().writer.is_some(), "a writer took it");
        assert!(writers.enlist().is_none(), "and holds the one place");
        peer.finish();
    }

    #[test]
    fn a_parked_client_that_leaves_is_not_left_waiting_for_its_close() {
        for free in [0, 1] {
            let (client, peer) = stalled_pair();
            let mut outlet = PeerOutlet::new(Arc::clone(&peer), 100, Backlogs::new(free, 0, None));
            let _busy = (free == 1).then(|| outlet.backlog.backlogs.enlist());
            until_backlog(&mut outlet, &message::text("t: ", &"x".repeat(1000)));
            outlet.close(message::close(CloseCode::Normal, ""));
            let waited = Instant::now();
            drop(_busy);
            drop(outlet);
            if free == 1 {
                // A writer took it: the close goes out once the client reads.
                drop(opcodes_until_close(client));
            }
            peer.wait_close_written(Duration::from_secs(10));
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "no wait for a close that cannot come ({free} free)"
            );
            peer.finish();
        }
    }

    #[test]
    fn a_backlog_that_waits_for_a_writer_past_the_write_timeout_is_cut() {
        let (_client, peer) = stalled_pair();
        let timeout = Duration::from_millis(50);
        let mut outlet = PeerOutlet::new(
            Arc::clone(&peer),
            100,
            Backlogs::new(0, usize::MAX, Some(timeout)),
        );
        let parked_at = Instant::now();
        until_backlog(&mut outlet, &message::text("t: ", &"x".repeat(1000)));
        while !peer.is_cut() {
            assert!(parked_at.elapsed() < Duration::from_secs(10), "never cut");
            outlet.reap();
            thread::sleep(Duration::from_millis(5));
        }
        assert!(parked_at.elapsed() >= timeout, "not before its time");
        assert!(outlet.backlog.parked.is_none());
    }

    #[test]
    fn a_slow_consumers_close_goes_out_before_the_rest_of_its_backlog() {
        const CAPACITY: usize = 1000;
        let (client, peer) = stalled_pair();
        let mut outlet = PeerOutlet::new(
            Arc::clone(&peer),
            CAPACITY,
            Backlogs::new(1, usize::MAX, None),
        );
        let frame = message::text("10.0.0.1:1: ", &"x".repeat(1000));
        let mut sent = 0;
        loop {
            match outlet.send(std::slice::from_ref(&frame)) {
                Sent::Done => sent += 1,
                Sent::Overflow => break,
                Sent::Gone | Sent::OverBudget => panic!("the client is there, plaintext"),
            }
            assert!(sent < 10 * CAPACITY, "the backlog never filled");
        }
        assert!(sent >= CAPACITY, "the backlog holds {CAPACITY} frames");
        outlet.close(message::close(CloseCode::Policy, "too slow"));
        let opcodes = opcodes_until_close(client);
        let texts = opcodes.iter().filter(|&&op| op == 1).count();
        // What the kernel held and the batch being written went out; the rest did not.
        assert!(
            texts < sent - CAPACITY + 2 * MAX_BATCH,
            "{texts} of {sent} frames went out before the close"
        );
        peer.finish();
    }

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
