//! A fleet node's two Redis connections, each on a thread of its own.
//!
//! - The **writer** takes the tagged texts this node's clients send from a bounded queue
//!   and adds them to the stream (`XADD … MAXLEN ~ window`), all those waiting as one
//!   entry. Each entry carries this node's id and a sequence number (see
//!   [`entry`](super::entry)), so an entry sent again after a failure cannot be delivered
//!   twice. While Redis is away the entry is kept and retried; when the queue is full too,
//!   the connection threads wait, and TCP slows their clients down: nothing is lost.
//! - The **reader** blocks in `XREAD` after the last entry it delivered and hands entries
//!   to the dispatcher in batches of at most [`BATCH_MESSAGES`], with at most [`BATCHES`]
//!   batches waiting there.
//!   Its first read takes the stream's newest entries (`XREVRANGE`), delivered as the
//!   broadcasts before any other: the history of every client, including those that
//!   joined before it. It reads on from the newest of them, so nothing added after that
//!   is skipped, and only then does `/healthz` say 200. Each read is followed, in the same
//!   pipeline, by an `XRANGE` of the entry it read after: while Redis still has that one, it
//!   had everything after it when the read was answered (trimming removes the oldest
//!   first). When it is gone (Redis restarted empty, the stream was trimmed or deleted
//!   under the node, or the node was away longer than the window), there may be a gap the
//!   node cannot fill, and its history is no longer the room's: it restarts its clients
//!   with 1012 and reseeds, rather than go on as if nothing happened.
//!
//! Both reconnect by themselves with a capped, jittered backoff; the writer waits for the
//! reader's first read before its first `XADD`, so that this node's own first messages
//! come back as read live, never cut from the first read by its `history` limit.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ::redis::{Client, Connection, IntoConnectionInfo, RedisError, Value};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::{debug, error, info, warn};

use super::entry::{self, Dedupe, Item, Malformed};
use crate::config::{RedisConfig, ServerConfig};
use crate::error::{Error, Result};
use crate::message::{self, Frame};
use crate::server::inbox::{Batch, Event, Events};
use crate::server::metrics::{Link, Metrics};
use crate::server::peer::PeerOutlet;
use crate::server::sched;

/// Messages that may wait for the writer. Past this, connection threads wait. At the
/// default largest message (64 KiB) this is 256 MiB in the worst case, and more with a
/// larger `--max-message-size`; chat lines make it well under a megabyte, and several
/// seconds of a busy room.
const WRITER_QUEUE: usize = 4096;

/// The longest entry text delivered. It does not depend on this node's own limit, so that
/// nodes configured differently still deliver the same sequence.
const MAX_ENTRY: usize = message::LONGEST_TEXT;

/// Entries taken in one `XREAD`, at most: 64 messages when the writers are quiet (an entry
/// each), up to 16 384 when they are busy, and at most 64 × [`entry::ENTRY_BYTES`] of text and a
/// message each.
const READ_COUNT: usize = 64;

/// Messages in one batch for the dispatcher, at most: a read that brings more is handed
/// over in several, each taking a credit, so that no client is sent more at once than a
/// read of one message per entry brought before entries held several.
const BATCH_MESSAGES: usize = 1024;

/// Entries taken in one `XREVRANGE` while seeding the history.
const SEED_PAGE: usize = 64;

/// Batches read and not yet taken by the dispatcher, at most: with [`BATCH_MESSAGES`], and
/// the rest of the read that waits for a credit, the messages a node holds for a dispatcher that
/// falls behind. The rest waits in Redis (and past `--redis-window`, the node restarts its
/// clients rather than miss any). A first read, or the history after Redis lost data, is
/// at most `--history` messages (see [`Reader::newest`] for what it reads).
const BATCHES: usize = 4;

/// How long `XREAD` blocks in Redis. It bounds how long the reader takes to notice that
/// the server is stopping.
const BLOCK: Duration = Duration::from_millis(500);

/// How long to wait for a reply beyond the `BLOCK` before calling the link dead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An idle writer pings this often, so that `/healthz` learns of a dead link.
const IDLE_PING: Duration = Duration::from_secs(2);

/// While the link stays down, the log says so again this often.
const STILL_DOWN: Duration = Duration::from_secs(60);

/// The smallest window: a node must be able to resume across at least a few batches.
const MIN_WINDOW: u64 = 100;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the fleet link is doing, for `/healthz`.
#[derive(Debug, Default)]
pub(crate) struct Health {
    writer_up: AtomicBool,
    reader_up: AtomicBool,
    /// The reader has made its first read: the node has the room's history.
    read: AtomicBool,
}

impl Health {
    /// Why this node should not be sent new clients, if it should not.
    pub(crate) fn trouble(&self) -> Option<&'static str> {
        let up = self.writer_up.load(Ordering::Relaxed) && self.reader_up.load(Ordering::Relaxed);
        if !up {
            Some("the Redis link is down")
        } else if !self.read.load(Ordering::Relaxed) {
            Some("the room's history is not read from Redis yet")
        } else {
            None
        }
    }
}

/// A fleet node's Redis threads. The server stops the writer once its connection threads
/// are cut (so none waits on a full queue), and the reader last, before the dispatcher.
#[derive(Debug)]
pub(crate) struct Fleet {
    writer: Option<Worker>,
    reader: Option<Worker>,
}

#[derive(Debug)]
struct Worker {
    /// Dropped to tell the thread to stop.
    stop: Sender<()>,
    thread: JoinHandle<()>,
    name: &'static str,
}

impl Worker {
    fn spawn(name: &'static str, body: impl FnOnce(Receiver<()>) + Send + 'static) -> Result<Self> {
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || body(stopped))
            .map_err(|source| Error::Spawn { what: name, source })?;
        Ok(Worker { stop, thread, name })
    }

    /// Tell the thread to stop, without waiting for it.
    fn signal(self) -> Stopping {
        drop(self.stop);
        Stopping {
            thread: self.thread,
            name: self.name,
        }
    }
}

/// A Redis thread told to stop.
struct Stopping {
    thread: JoinHandle<()>,
    name: &'static str,
}

impl Stopping {
    fn join(self) {
        if self.thread.join().is_err() {
            error!("the Redis {} thread panicked (a bug)", self.name);
        }
    }
}

impl Fleet {
    /// Start the writer and the reader. Returns the writer's queue and the link's health.
    pub(crate) fn start(
        redis: &RedisConfig,
        config: &ServerConfig,
        events: Events<PeerOutlet>,
        metrics: &Arc<Metrics>,
    ) -> Result<(Fleet, Sender<String>, Arc<Health>)> {
        let client = client(&redis.url)?;
        let health = Arc::new(Health::default());
        metrics.redis_up(Link::Writer, false);
        metrics.redis_up(Link::Reader, false);
        let (tx, rx) = crossbeam_channel::bounded(WRITER_QUEUE);
        let (seeded_tx, seeded_rx) = crossbeam_channel::bounded(0);
        let writer = Writer {
            con: Reconnecting::new(
                client.clone(),
                Link::Writer,
                REPLY_TIMEOUT,
                &health,
                metrics,
            ),
            key: redis.key.clone(),
            window: redis.window.max(MIN_WINDOW),
            node: entry::node_field(random()),
            queue: rx,
            seeded: Some(seeded_rx),
        };
        info!(
            "a node of the fleet on {} (stream {:?}, node {})",
            redacted(&redis.url),
            redis.key,
            writer.node
        );
        let (credit, credits) = credits();
        let reader = Reader {
            con: Reconnecting::new(
                client,
                Link::Reader,
                BLOCK + REPLY_TIMEOUT,
                &health,
                metrics,
            ),
            key: redis.key.clone(),
            history: config.history,
            events,
            seeded: Some(seeded_tx),
            metrics: Arc::clone(metrics),
            last: None,
            dedupe: Dedupe::default(),
            credit,
            credits,
        };
        let reader = Worker::spawn("redis reader", move |stop| reader.run(&stop))?;
        let writer = match Worker::spawn("redis writer", move |stop| writer.run(&stop)) {
            Ok(writer) => writer,
            Err(e) => {
                reader.signal().join();
                return Err(e);
            }
        };
        let fleet = Fleet {
            writer: Some(writer),
            reader: Some(reader),
        };
        Ok((fleet, tx, health))
    }

    /// Stop the writer, letting go of connection threads waiting on its queue. It sends
    /// what is waiting once if Redis is up, and drops it if not.
    pub(crate) fn stop_writer(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.signal().join();
        }
    }

    /// Stop both threads, together, and join them.
    pub(crate) fn stop(mut self) {
        let stopping: Vec<Stopping> = [self.writer.take(), self.reader.take()]
            .into_iter()
            .flatten()
            .map(Worker::signal)
            .collect();
        stopping.into_iter().for_each(Stopping::join);
    }
}

/// A Redis client for `url`, with `TCP_NODELAY`: the writer's small entries must not wait
/// for the previous reply's acknowledgement.
pub(crate) fn client(url: &str) -> Result<Client> {
    let invalid = |reason: String| Error::Redis {
        url: redacted(url),
        reason,
    };
    if !url.starts_with("redis://") {
        return Err(invalid("it is not a redis:// URL".to_string()));
    }
    if url.contains("protocol=") {
        return Err(invalid("only RESP2, the default, is supported".to_string()));
    }
    let info = url
        .into_connection_info()
        .map_err(|e| invalid(e.to_string()))?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    Client::open(info.set_tcp_settings(tcp)).map_err(|e| invalid(e.to_string()))
}

/// `url` without its password, for the log.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The reader's [`BATCHES`] credits: where batches give them back, and where it takes them.
fn credits() -> (Sender<()>, Receiver<()>) {
    let (credit, credits) = crossbeam_channel::bounded(BATCHES);
    for _ in 0..BATCHES {
        // As many as the channel holds: each fits.
        let _ = credit.try_send(());
    }
    (credit, credits)
}

/// A random 64-bit number, from the standard library's per-process random keys.
fn random() -> u64 {
    RandomState::new().hash_one(Instant::now())
}

/// What went wrong with a command.
#[derive(Debug)]
enum Failure {
    Redis(RedisError),
    Reply(Malformed),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Redis(e) => write!(f, "{e}"),
            Failure::Reply(Malformed(what)) => write!(f, "unexpected reply from Redis: {what}"),
        }
    }
}

impl From<RedisError> for Failure {
    fn from(e: RedisError) -> Self {
        Failure::Redis(e)
    }
}

impl From<Malformed> for Failure {
    fn from(e: Malformed) -> Self {
        Failure::Reply(e)
    }
}

/// One of the two connections, remade after a failure with backoff, and what the log,
/// the metrics and `/healthz` say about it.
struct Reconnecting {
    client: Client,
    name: Link,
    reply_timeout: Duration,
    con: Option<Connection>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// When the link went down, while it is.
    down_since: Option<Instant>,
    /// When the log last said the link is down.
    told: Instant,
    failures: u32,
    ever_connected: bool,
}

impl Reconnecting {
    fn new(
        client: Client,
        name: Link,
        reply_timeout: Duration,
        health: &Arc<Health>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Reconnecting {
            client,
            name,
            reply_timeout,
            con: None,
            health: Arc::clone(health),
            metrics: Arc::clone(metrics),
            down_since: None,
            told: Instant::now(),
            failures: 0,
            ever_connected: false,
        }
    }

    fn label(&self) -> &'static str {
        self.name.label()
    }

    fn flag(&self) -> &AtomicBool {
        match self.name {
            Link::Writer => &self.health.writer_up,
            Link::Reader => &self.health.reader_up,
        }
    }

    /// The connection, made now if there is none. After a failure to connect, `None` once
    /// the backoff is over, or at once when told to stop.
    fn take(&mut self, stop: &Receiver<()>) -> Option<Connection> {
        if let Some(con) = self.con.take() {
            return Some(con);
        }
        match self.connect() {
            Ok(con) => {
                if self.ever_connected {
                    self.metrics.redis_reconnected(self.name);
                }
                self.ever_connected = true;
                self.up();
                Some(con)
            }
            Err(e) => {
                self.failed(&Failure::Redis(e));
                self.pause(stop);
                None
            }
        }
    }

    /// A connection that has answered a `PING`, so that `/healthz` can say the link is up
    /// at once rather than at the first real command.
    fn connect(&self) -> Result<Connection, RedisError> {
        let mut con = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        con.set_read_timeout(Some(self.reply_timeout))?;
        con.set_write_timeout(Some(REPLY_TIMEOUT))?;
        ::redis::cmd("PING").exec(&mut con)?;
        Ok(con)
    }

    /// A command on `con` worked: keep it.
    fn worked(&mut self, con: Connection) {
        self.con = Some(con);
        self.up();
    }

    /// The link works.
    fn up(&mut self) {
        if let Some(since) = self.down_since.take() {
            info!(
                "the Redis {} link is back after {:.1} s",
                self.label(),
                since.elapsed().as_secs_f32()
            );
        }
        self.failures = 0;
        if !self.flag().swap(true, Ordering::Relaxed) {
            self.metrics.redis_up(self.name, true);
        }
    }

    /// A command or a connection failed (its connection is dropped): say so, loudly the
    /// first time only.
    fn failed(&mut self, e: &Failure) {
        self.failures = self.failures.saturating_add(1);
        self.flag().store(false, Ordering::Relaxed);
        self.metrics.redis_up(self.name, false);
        let now = Instant::now();
        match self.down_since {
            None => {
                self.down_since = Some(now);
                self.told = now;
                warn!(
                    "the Redis {} link failed: {e}. Retrying; clients stay connected, and \
                     this node reports 503 on /healthz until Redis is back",
                    self.label()
                );
            }
            Some(since) if now.duration_since(self.told) >= STILL_DOWN => {
                self.told = now;
                warn!(
                    "the Redis {} link is still down after {} s: {e}. Check that Redis runs \
                     and that --redis names it",
                    self.label(),
                    now.duration_since(since).as_secs()
                );
            }
            Some(_) => debug!("the Redis {} link is still down: {e}", self.label()),
        }
    }

    /// Wait out the backoff (100 ms doubling to 5 s, each between half and all of it, so
    /// that a fleet does not reconnect in step); `false` when told to stop.
    fn pause(&self, stop: &Receiver<()>) -> bool {
        let shift = self.failures.saturating_sub(1).min(10);
        let full = BACKOFF_FIRST.saturating_mul(1 << shift).min(BACKOFF_MAX);
        let wait = full / 2 + full.mul_f64((random() % 1000) as f64 / 2000.0);
        matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout))
    }

    /// The result of a command on `con`; `false` when told to stop during the backoff.
    fn settle(
        &mut self,
        con: Connection,
        result: Result<(), Failure>,
        stop: &Receiver<()>,
    ) -> bool {
        match result {
            Ok(()) => {
                self.worked(con);
                true
            }
            Err(e) => {
                drop(con);
                self.failed(&e);
                self.pause(stop)
            }
        }
    }
}

/// Whether the server has said to stop.
fn stopping(stop: &Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(TryRecvError::Empty))
}

struct Writer {
    con: Reconnecting,
    key: String,
    window: u64,
    /// This node's id, as its entries carry it.
    node: String,
    queue: Receiver<String>,
    /// Closed by the reader once it has seeded the history; `None` from then on.
    seeded: Option<Receiver<()>>,
}

impl Writer {
    fn run(mut self, stop: &Receiver<()>) {
        sched::run_as_batch("Redis writer");
        let mut unsent = Unsent::default();
        while !stopping(stop) {
            let Some(mut con) = self.con.take(stop) else {
                continue;
            };
            let result = if unsent.texts.is_empty() {
                match next_batch(&self.queue, stop, &mut unsent.texts) {
                    Next::Stop => {
                        self.con.con = Some(con);
                        break;
                    }
                    Next::Idle => ::redis::cmd("PING").exec(&mut con).map_err(Failure::from),
                    Next::Batch => {
                        unsent.number();
                        Ok(())
                    }
                }
            } else if let Some(seeded) = &self.seeded {
                // Not before the reader has seeded; see the module's notes.
                let ready = crossbeam_channel::select! {
                    recv(seeded) -> _ => true,
                    recv(stop) -> _ => false,
                };
                if ready {
                    self.seeded = None;
                }
                Ok(())
            } else {
                let added = add(&mut con, &self.key, self.window, &self.node, &unsent);
                if added.is_ok() {
                    unsent.texts.clear();
                }
                added.map_err(Failure::from)
            };
            if !self.con.settle(con, result, stop) {
                break;
            }
        }
        self.flush(&mut unsent);
        let unsent = unsent.texts.len() + self.queue.len();
        if unsent > 0 {
            warn!("{unsent} messages were not sent to Redis: the server is stopping");
        }
        debug!("redis writer stopped");
    }

    /// Stopping with a working connection: send what is waiting, without retrying, so
    /// that the other nodes still get the last messages of this node's clients.
    fn flush(&mut self, unsent: &mut Unsent) {
        let Some(mut con) = self.con.con.take() else {
            return;
        };
        loop {
            if unsent.texts.is_empty() {
                fill(&self.queue, &mut unsent.texts);
                if unsent.texts.is_empty() {
                    return;
                }
                unsent.number();
            }
            if add(&mut con, &self.key, self.window, &self.node, unsent).is_err() {
                return;
            }
            unsent.texts.clear();
        }
    }
}

/// The messages of the next entry, and its sequence number: the writer's entries are
/// numbered from 1. Kept as they are until Redis has them: a retry must be the same entry,
/// for readers to know it for a repeat.
#[derive(Default)]
struct Unsent {
    seq: u64,
    texts: Vec<String>,
}

impl Unsent {
    /// Give the texts just taken the next sequence number.
    fn number(&mut self) {
        self.seq += 1;
    }
}

enum Next {
    /// Told to stop, or every sender is gone.
    Stop,
    /// Nothing to send for a while.
    Idle,
    /// `texts` has messages.
    Batch,
}

/// Wait for the next message, then take what else is waiting, up to a batch.
fn next_batch(queue: &Receiver<String>, stop: &Receiver<()>, texts: &mut Vec<String>) -> Next {
    crossbeam_channel::select! {
        recv(queue) -> text => match text {
            Ok(text) => texts.push(text),
            Err(_) => return Next::Stop,
        },
        recv(stop) -> _ => return Next::Stop,
        default(IDLE_PING) => return Next::Idle,
    }
    fill(queue, texts);
    Next::Batch
}

/// Take the messages waiting, up to a batch: [`entry::MOST_MESSAGES`] messages, or until they reach
/// [`entry::ENTRY_BYTES`].
fn fill(queue: &Receiver<String>, texts: &mut Vec<String>) {
    let mut bytes: usize = texts.iter().map(String::len).sum();
    while texts.len() < entry::MOST_MESSAGES && bytes < entry::ENTRY_BYTES {
        let Ok(text) = queue.try_recv() else {
            return;
        };
        bytes += text.len();
        texts.push(text);
    }
}

/// Add the messages of `unsent` to the stream as one entry: one command, all or nothing.
fn add(
    con: &mut Connection,
    key: &str,
    window: u64,
    node: &str,
    unsent: &Unsent,
) -> Result<(), RedisError> {
    ::redis::cmd("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(window)
        .arg("*")
        .arg(entry::fields(node, &unsent.seq.to_string(), &unsent.texts))
        .exec(con)
}

struct Reader {
    con: Reconnecting,
    key: String,
    history: usize,
    events: Events<PeerOutlet>,
    /// Dropped at the first seed, which lets the writer start.
    seeded: Option<Sender<()>>,
    metrics: Arc<Metrics>,
    /// The ID of the last entry delivered; `None` until the first seed.
    last: Option<String>,
    dedupe: Dedupe,
    /// Where a batch gives its credit back once the dispatcher has taken it.
    credit: Sender<()>,
    /// The credits left: one is taken for each batch handed to the dispatcher.
    credits: Receiver<()>,
}

/// Whether the reader goes on.
enum Flow {
    Go,
    /// The server is stopping, or the dispatcher is gone.
    Stop,
}

impl Reader {
    fn run(mut self, stop: &Receiver<()>) {
        sched::run_as_batch("Redis reader");
        while !stopping(stop) {
            let Some(mut con) = self.con.take(stop) else {
                continue;
            };
            let result = match self.last.clone() {
                None => self.seed(&mut con, false, stop),
                Some(last) => self.read(&mut con, &last, stop),
            };
            let result = match result {
                Ok(Flow::Stop) => break,
                Ok(Flow::Go) => Ok(()),
                Err(e) => Err(e),
            };
            if !self.con.settle(con, result, stop) {
                break;
            }
        }
        debug!("redis reader stopped");
    }

    /// Take the history from the stream's newest entries and read on after them. With
    /// `lost`, Redis no longer has what this node delivered last: restart the clients.
    /// Without, this is the node's first read, and its entries are delivered as the
    /// broadcasts before all others: the history of every later joiner, and of any client
    /// that joined before it (when the ring was still empty).
    ///
    /// After a loss the repeat filter starts afresh: the sequences it remembers belong to a
    /// stream that is gone.
    fn seed(
        &mut self,
        con: &mut Connection,
        lost: bool,
        stop: &Receiver<()>,
    ) -> Result<Flow, Failure> {
        let newest_first = self.newest(con)?;
        if lost {
            self.dedupe = Dedupe::default();
        }
        self.last = Some("0-0".to_string());
        let mut texts = Vec::new();
        for item in newest_first.into_iter().rev() {
            let (id, admitted) = self.admit(item);
            self.last = Some(id);
            texts.extend(admitted);
        }
        let frames: Vec<Frame> = texts[texts.len().saturating_sub(self.history)..]
            .iter()
            .map(|text| message::text("", text))
            .collect();
        let flow = if lost {
            match self.events.send(Event::Restart(frames)) {
                Ok(()) => Flow::Go,
                Err(_) => Flow::Stop,
            }
        } else {
            self.deliver(frames, stop)
        };
        if matches!(flow, Flow::Go) {
            self.seeded = None;
            self.con.health.read.store(true, Ordering::Relaxed);
        }
        Ok(flow)
    }

    /// Wait for entries after `last` and deliver them, unless Redis has lost `last`.
    fn read(
        &mut self,
        con: &mut Connection,
        last: &str,
        stop: &Receiver<()>,
    ) -> Result<Flow, Failure> {
        // Before the first entry there is nothing to have lost.
        let check = last != "0-0";
        let mut pipe = ::redis::pipe();
        pipe.cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(last);
        // Behind the read, not before it: Redis runs it as soon as the read is answered,
        // and usually sends both replies in one write. Finding `last` then proves the read too,
        // since trimming removes the oldest entries first.
        if check {
            pipe.cmd("XRANGE").arg(&self.key).arg(last).arg(last);
        }
        let mut replies = pipe.query::<Vec<Value>>(con)?.into_iter();
        let read = replies.next().unwrap_or(Value::Nil);
        if check && matches!(replies.next(), Some(Value::Array(found)) if found.is_empty()) {
            error!(
                "Redis no longer has entry {last} of stream {:?}, the last this node \
                 delivered: Redis restarted empty, the stream was trimmed or deleted (XTRIM, \
                 DEL, FLUSHALL), or this node was away for longer than --redis-window \
                 entries. Messages may have been lost in between, so this node's clients \
                 are restarted (1012) and will see the room's history as Redis has it now",
                self.key
            );
            self.metrics.redis_resets.inc();
            return self.seed(con, true, stop);
        }
        let items = entry::read_reply(read)?;
        self.metrics.redis_entries_read.inc_by(items.len() as u64);
        if let Some(millis) = items.last().and_then(|item| item.as_ref().ok()?.millis()) {
            self.metrics.redis_lag(millis);
        }
        let texts = items.iter().flatten().map(|e| e.texts.len()).sum();
        let mut frames = Vec::with_capacity(texts);
        for item in items {
            let (id, admitted) = self.admit(item);
            self.last = Some(id);
            frames.extend(admitted.iter().map(|text| message::text("", text)));
        }
        Ok(self.deliver(frames, stop))
    }

    /// Hand `frames` to the dispatcher in batches of at most [`BATCH_MESSAGES`], each once
    /// it has taken enough of those before that a credit is free.
    fn deliver(&self, mut frames: Vec<Frame>, stop: &Receiver<()>) -> Flow {
        while !frames.is_empty() {
            let rest = frames.split_off(frames.len().min(BATCH_MESSAGES));
            // The credits never run dry for good: this reader holds a sender of them itself.
            crossbeam_channel::select! {
                recv(self.credits) -> _ => {}
                recv(stop) -> _ => return Flow::Stop,
            }
            let batch = Batch::new(frames, self.credit.clone());
            if self.events.send(Event::Broadcasts(batch)).is_err() {
                return Flow::Stop;
            }
            frames = rest;
        }
        Flow::Go
    }

    /// The stream's newest entries, newest first: enough to hold the history and
    /// [`entry::MOST_MESSAGES`] messages more, so that repeats of a retried entry and entries of
    /// other programs do not make this node's history shorter than the others'. Read a page
    /// at a time, so that what is read stays about that many messages, however many an
    /// entry holds.
    fn newest(&self, con: &mut Connection) -> Result<Vec<Item>, Failure> {
        let wanted = self.history + entry::MOST_MESSAGES;
        let (mut items, mut texts) = (Vec::new(), 0);
        let mut end = "+".to_string();
        loop {
            let reply: Value = ::redis::cmd("XREVRANGE")
                .arg(&self.key)
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(SEED_PAGE + 1)
                .query(con)?;
            let mut page = entry::entries(reply)?;
            let more = page.len() == SEED_PAGE + 1;
            // Each page after the first starts with the last entry of the one before.
            if end != "+" && page.first().map(entry::id) == Some(end.as_str()) {
                let _repeated = page.remove(0);
            }
            let Some(oldest) = page.last().map(|item| entry::id(item).to_string()) else {
                break;
            };
            texts += page.iter().flatten().map(|e| e.texts.len()).sum::<usize>();
            items.extend(page);
            // Entries of ours hold a message at least: as many entries as messages wanted
            // is enough, and bounds the read when the key holds entries of other programs.
            if !more || texts >= wanted || items.len() >= wanted {
                break;
            }
            end = oldest;
        }
        Ok(items)
    }

    /// A stream entry's ID, and its texts to deliver: none for a repeat or an entry that is
    /// not a chat message of ours.
    fn admit(&mut self, item: Item) -> (String, Vec<String>) {
        match item {
            Ok(entry) if !self.dedupe.is_new(entry.origin) => {
                self.metrics.redis_duplicates.inc();
                debug!(
                    "dropped stream entry {}: a repeat of a retried XADD",
                    entry.id
                );
                (entry.id, Vec::new())
            }
            Ok(mut entry) => {
                entry.texts.retain(|text| {
                    let fits = text.len() <= MAX_ENTRY;
                    if !fits {
                        warn!(
                            "skipped a message of stream entry {}: its text is over \
                             {MAX_ENTRY} bytes, longer than any node of ours writes",
                            entry.id
                        );
                    }
                    fits
                });
                (entry.id, entry.texts)
            }
            Err((id, Malformed(why))) => {
                warn!("skipped stream entry {id}: {why}");
                (id, Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::inbox;

    /// A reader that never connects: enough to hand batches to a dispatcher's inbox.
    fn reader(events: Events<PeerOutlet>) -> Reader {
        let (credit, credits) = credits();
        let metrics = Arc::new(Metrics::new());
        let client = client("redis://127.0.0.1:1").expect("a valid URL");
        Reader {
            con: Reconnecting::new(
                client,
                Link::Reader,
                REPLY_TIMEOUT,
                &Arc::new(Health::default()),
                &metrics,
            ),
            key: "k".to_string(),
            history: 16,
            events,
            seeded: None,
            metrics,
            last: None,
            dedupe: Dedupe::default(),
            credit,
            credits,
        }
    }

    fn frames(count: usize) -> Vec<Frame> {
        (0..count)
            .map(|n| message::text("10.0.0.1:1: ", &n.to_string()))
            .collect()
    }

    #[test]
    fn health_waits_for_both_links_then_for_the_first_read() {
        let health = Health::default();
        assert_eq!(health.trouble(), Some("the Redis link is down"));
        health.writer_up.store(true, Ordering::Relaxed);
        health.reader_up.store(true, Ordering::Relaxed);
        assert_eq!(
            health.trouble(),
            Some("the room's history is not read from Redis yet")
        );
        health.read.store(true, Ordering::Relaxed);
        assert_eq!(health.trouble(), None);
        health.reader_up.store(false, Ordering::Relaxed);
        assert_eq!(health.trouble(), Some("the Redis link is down"));
    }

    #[test]
    fn at_most_a_few_batches_wait_for_the_dispatcher_however_large() {
        let (events, inbox) = inbox::channel::<PeerOutlet>(64);
        let reader = reader(events);
        let (_running, never) = crossbeam_channel::bounded::<()>(0);
        for _ in 0..BATCHES {
            assert!(matches!(
                reader.deliver(frames(BATCH_MESSAGES), &never),
                Flow::Go
            ));
        }
        // No credit left: the reader would wait, and only a stop lets it go.
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        drop(stop);
        assert!(matches!(reader.deliver(frames(1), &stopped), Flow::Stop));
        assert_eq!(
            inbox.ready(usize::MAX).count(),
            BATCHES,
            "taken and dropped"
        );
        // The dispatcher dropped them: their credits are back.
        assert_eq!(reader.credits.len(), BATCHES);
        for _ in 0..BATCHES {
            assert!(matches!(reader.deliver(frames(1), &never), Flow::Go));
        }
        assert!(matches!(reader.deliver(Vec::new(), &stopped), Flow::Go));
    }

    #[test]
    fn a_large_read_goes_to_the_dispatcher_in_bounded_batches_in_order() {
        let (events, inbox) = inbox::channel::<PeerOutlet>(64);
        let reader = reader(events);
        let (_running, never) = crossbeam_channel::bounded::<()>(0);
        let read = frames(2 * BATCH_MESSAGES + 5);
        assert!(matches!(reader.deliver(read.clone(), &never), Flow::Go));
        let batches: Vec<Vec<Frame>> = inbox
            .ready(usize::MAX)
            .map(|event| match event {
                Event::Broadcasts(batch) => batch.frames.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [BATCH_MESSAGES, BATCH_MESSAGES, 5]);
        assert_eq!(batches.concat(), read);
    }
}
