//! Configuration: plain data with documented defaults and chaining setters.
//!
//! The server binary turns its command line into a [`ServerConfig`]; tests and embedders
//! build one in code. Every limit the server enforces lives here, so that every resource a
//! client can make the server spend has a bound a user can see and change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The largest [`ServerConfig::queue`]: a slow client's queue is allocated whole, so this
/// bounds it to about 2.5 MiB.
pub const MAX_QUEUE: usize = 65_536;

/// How the server listens, what it keeps and what it tolerates.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`; port 0 picks a free port.
    pub bind: SocketAddr,
    /// How many recent messages a new client is shown. Default 16; 0 turns history off.
    pub history: usize,
    /// Largest text message a client may send, in bytes. Default 65536. Larger ones are
    /// refused with close code 1009.
    pub max_message_size: usize,
    /// How many messages may wait for one client once its socket buffer is full.
    /// Default 256, at most [`MAX_QUEUE`]. A client that falls further behind is closed
    /// with code 1008.
    ///
    /// The kernel's socket buffer (megabytes on loopback and LANs) absorbs ordinary bursts;
    /// this queue only holds what does not fit there. It exists only while a client is
    /// behind, is allocated whole when it starts (about 40 bytes a slot: a shared frame,
    /// never a copy of the message), and bounds the history a stalled client can pin to
    /// `queue` messages. Over TLS each waiting message is the client's own encrypted copy,
    /// so a stalled TLS client can hold up to `queue` times `max_message_size` (plus the
    /// one write the socket cut short).
    pub queue: usize,
    /// How often the server pings each client. Default 30 s. A client silent for two
    /// intervals is dropped. `None` turns keepalive off.
    pub ping_interval: Option<Duration>,
    /// Deadline for the whole HTTP request and WebSocket handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// How many clients may be connected at once. Default 12000. The next one is answered
    /// with HTTP 503. Each client costs one thread (about four memory mappings) and one
    /// file descriptor, so the default leaves room under `vm.max_map_count` (65530) and a
    /// 20000 open-file limit.
    pub max_clients: usize,
    /// How many backlog writer threads may run at once: a client whose socket is full gets
    /// one while its backlog lasts. Default 1500. Past it, such a client's backlog waits
    /// for one to be free, and the client is cut if that takes `write_timeout`: clients
    /// that stop reading could otherwise double the threads (each about four memory
    /// mappings against `vm.max_map_count`, which a thread per client already nears), and
    /// a failed mapping can abort the whole server.
    pub max_writers: usize,
    /// How many bytes of sealed TLS records all clients' backlogs may hold together.
    /// Default 512 MiB. Over TLS each client's backlog is its own encrypted copy of what it
    /// lacks (plaintext ones share the frames), so without it a few thousand TLS clients
    /// that stop reading could hold gigabytes. Past it, a TLS client that falls behind is
    /// closed with 1008, as one past `queue` is.
    pub max_tls_backlog: usize,
    /// How many connections may be in their handshake at once, apart from the clients.
    /// Default 1024. When all are taken, the one that has waited longest is cut to make
    /// room if it has waited over a second; otherwise the new connection is closed at once.
    pub max_pending: usize,
    /// How many of those may come from one address (an IPv6 /64). Default 128, so that one
    /// host cannot take the room of the others; loopback benchmarks with 64 handshakes in
    /// flight fit.
    pub max_pending_per_ip: usize,
    /// The most connection threads kept waiting in `accept()` after their clients leave,
    /// besides the one that always waits, to serve the next clients without starting a
    /// thread each. Default `None`: as many as there may be connections (`max_clients` plus
    /// `max_pending`), so that when every client reconnects at once (a network blip, a load
    /// balancer's failover) each finds a thread waiting. Threads never outnumber the
    /// connections the server allows (and the memory mappings and process ids those cost),
    /// however large the cache: it only keeps them for up to `thread_idle` after the clients
    /// have gone. Zero ends each thread with its connection.
    pub thread_cache: Option<usize>,
    /// How long a waiting connection thread waits for a new client before it ends (unless
    /// it is the last one waiting), so that an idle server gives its memory back. Default
    /// 30 s.
    pub thread_idle: Duration,
    /// Web origins (`scheme://host[:port]`) whose pages may open a WebSocket here besides
    /// the server's own; `*` allows any, `null` sandboxed frames and local files. Default
    /// none. Requests without an `Origin` header (command-line clients) are always accepted.
    pub allow_origins: Vec<String>,
    /// Messages (texts and pings) a client may send per second. Default 10; 0 turns flood
    /// control off. A client over its rate is read more slowly, never disconnected.
    pub rate: u32,
    /// Messages a client may send at once before its rate applies. Default 50.
    pub burst: u32,
    /// How long a client's pending output may make no progress before the client is cut
    /// (it cannot be sent a close frame: it is not reading). Default 30 s; zero turns the
    /// limit off.
    pub write_timeout: Duration,
    /// How long a closing client has to answer the server's close frame, and how long a
    /// client's own close may wait for the messages queued before it. Default 5 s.
    pub close_timeout: Duration,
    /// Serve the chat page on plain HTTP `GET /`. Default `true`.
    pub web: bool,
    /// Run as one node of a fleet whose room is a Redis Stream. Default `None`: one node,
    /// no Redis.
    pub redis: Option<RedisConfig>,
    /// Speak TLS only (`wss://`, `https://`) with this certificate and key. Default
    /// `None`: plaintext.
    pub tls: Option<TlsFiles>,
}

/// The server's certificate chain and private key, as PEM files. They are read at start
/// and again on each [`Server::reload_tls`](crate::Server::reload_tls).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// The certificate, followed by the intermediate certificates that lead to the CA
    /// (Let's Encrypt's `fullchain.pem`).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1; Let's Encrypt's `privkey.pem`).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The certificate chain at `cert`, its key at `key`.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
        }
    }
}

/// Where a fleet's room lives: one Redis Stream that every node writes to and reads from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// The stream's key. Default `broadcast-chat`; nodes with the same key share a room.
    pub key: String,
    /// Entries the stream keeps (approximately, `MAXLEN ~`). Default 10 000, at least 100.
    /// An entry holds the messages a node's writer found waiting at once, one when the room
    /// is quiet, up to 256 or 16 KiB of text and one message more. A node away for longer
    /// than this many entries cannot resume, and restarts its clients (1012).
    pub window: u64,
}

impl RedisConfig {
    /// The stream at `url` with the default key and window.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key: "broadcast-chat".to_string(),
            window: 10_000,
        }
    }

    /// Set [`Self::key`].
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// Set [`Self::window`].
    pub fn window(mut self, entries: u64) -> Self {
        self.window = entries;
        self
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            history: 16,
            max_message_size: 64 * 1024,
            queue: 256,
            ping_interval: Some(Duration::from_secs(30)),
            handshake_timeout: Duration::from_secs(10),
            max_clients: 12_000,
            max_writers: 1_500,
            max_tls_backlog: 512 * 1024 * 1024,
            max_pending: 1024,
            max_pending_per_ip: 128,
            thread_cache: None,
            thread_idle: Duration::from_secs(30),
            allow_origins: Vec::new(),
            rate: 10,
            burst: 50,
            write_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            web: true,
            redis: None,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Set [`Self::bind`].
    pub fn bind(mut self, bind: SocketAddr) -> Self {
        self.bind = bind;
        self
    }

    /// Set [`Self::history`].
    pub fn history(mut self, history: usize) -> Self {
        self.history = history;
        self
    }

    /// Set [`Self::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Set [`Self::queue`].
    pub fn queue(mut self, messages: usize) -> Self {
        self.queue = messages;
        self
    }

    /// Set [`Self::ping_interval`].
    pub fn ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Set [`Self::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Set [`Self::max_writers`].
    pub fn max_writers(mut self, writers: usize) -> Self {
        self.max_writers = writers;
        self
    }

    /// Set [`Self::max_tls_backlog`].
    pub fn max_tls_backlog(mut self, bytes: usize) -> Self {
        self.max_tls_backlog = bytes;
        self
    }

    /// Set [`Self::max_clients`].
    pub fn max_clients(mut self, clients: usize) -> Self {
        self.max_clients = clients;
        self
    }

    /// Set [`Self::max_pending`].
    pub fn max_pending(mut self, connections: usize) -> Self {
        self.max_pending = connections;
        self
    }

    /// Set [`Self::thread_cache`].
    pub fn thread_cache(mut self, threads: Option<usize>) -> Self {
        self.thread_cache = threads;
        self
    }

    /// Set [`Self::thread_idle`].
    pub fn thread_idle(mut self, idle: Duration) -> Self {
        self.thread_idle = idle;
        self
    }

    /// Set [`Self::max_pending_per_ip`].
    pub fn max_pending_per_ip(mut self, connections: usize) -> Self {
        self.max_pending_per_ip = connections;
        self
    }

    /// Add an origin to [`Self::allow_origins`].
    pub fn allow_origin(mut self, origin: impl Into<String>) -> Self {
        self.allow_origins.push(origin.into());
        self
    }

    /// Set [`Self::rate`].
    pub fn rate(mut self, per_second: u32) -> Self {
        self.rate = per_second;
        self
    }

    /// Set [`Self::burst`].
    pub fn burst(mut self, messages: u32) -> Self {
        self.burst = messages;
        self
    }

    /// Set [`Self::write_timeout`].
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// [`Self::write_timeout`] as a socket takes it: `None` for zero (no limit), and at
    /// least a microsecond, the finest a socket timeout is.
    pub(crate) fn socket_write_timeout(&self) -> Option<Duration> {
        Some(self.write_timeout)
            .filter(|t| !t.is_zero())
            .map(|t| t.max(Duration::from_micros(1)))
    }

    /// Set [`Self::close_timeout`].
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Set [`Self::web`].
    pub fn web(mut self, web: bool) -> Self {
        self.web = web;
        self
    }

    /// Set [`Self::redis`].
    pub fn redis(mut self, redis: Option<RedisConfig>) -> Self {
        self.redis = redis;
        self
    }

    /// Set [`Self::tls`].
    pub fn tls(mut self, tls: Option<TlsFiles>) -> Self {
        self.tls = tls;
        self
    }
}

/// How the command-line client connects, confirms and reconnects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The server's URL. Default `ws://127.0.0.1:8080`.
    pub url: String,
    /// How long to wait for the TCP connection and the handshake. Default 10 s.
    pub connect_timeout: Duration,
    /// How long to wait for the server's close after sending ours. Default 5 s.
    pub close_timeout: Duration,
    /// In a pipe, wait at the end of input until every line sent has come back from the
    /// server, so that success means it was broadcast. Default `true`. Turn it off for
    /// servers that do not echo a message to its sender.
    pub confirm: bool,
    /// How long to wait for those confirmations. Default 5 s.
    pub wait: Duration,
    /// At a terminal, reconnect by itself when the connection drops (1, 2, 4 … 30 s
    /// apart) and send what was typed meanwhile. Default `true`.
    pub reconnect: bool,
    /// Colour the senders' tags (and mark our own). Default `false`; the command line
    /// turns it on at a terminal unless `NO_COLOR` is set.
    pub color: bool,
    /// For `wss://`, trust only the CA certificates in this PEM file instead of the
    /// public roots: for a server whose certificate comes from a private CA. Default
    /// `None`.
    pub ca: Option<PathBuf>,
    /// For `wss://`, accept any certificate: for testing only, since anyone in the path
    /// can then read and change the chat. Default `false`.
    pub insecure: bool,
    /// After this long without a word from the server, ping it; after as long again with
    /// still nothing, the connection is lost. A send that makes no progress for this long
    /// while the server says nothing loses it too. Without it, a connection that died
    /// silently (a NAT that forgot it, a laptop that slept) would hang the client for
    /// good. Default 45 s, longer than our server's 30 s between pings, so that against it
    /// the client never needs to ping; zero turns the keepalive off.
    pub keepalive: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:8080".to_string(),
            connect_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            confirm: true,
            wait: Duration::from_secs(5),
            reconnect: true,
            color: false,
            ca: None,
            insecure: false,
            keepalive: Duration::from_secs(45),
        }
    }
}

impl ClientConfig {
    /// Set [`Self::url`].
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Set [`Self::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Set [`Self::close_timeout`].
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Set [`Self::keepalive`].
    pub fn keepalive(mut self, keepalive: Duration) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Set [`Self::confirm`].
    pub fn confirm(mut self, confirm: bool) -> Self {
        self.confirm = confirm;
        self
    }

    /// Set [`Self::wait`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Set [`Self::reconnect`].
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Set [`Self::color`].
    pub fn color(mut self, color: bool) -> Self {
        self.color = color;
        self
    }

    /// Set [`Self::ca`].
    pub fn ca(mut self, ca: Option<PathBuf>) -> Self {
        self.ca = ca;
        self
    }

    /// Set [`Self::insecure`].
    pub fn insecure(mut self, insecure: bool) -> Self {
        self.insecure = insecure;
        self
    }
}

/// `now + after`, or as far ahead as the clock goes: durations here may be anything (a
/// library user can pass `Duration::MAX`), and an interval of years means "never", not a
/// panic. Both sides use it for every deadline they take from a configuration.
pub(crate) fn later(now: Instant, after: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(after.min(CENTURY))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}
