//! What the server counts for its operator, served on `GET /metrics` in the Prometheus
//! (OpenMetrics) text format.
//!
//! One registry holds every metric. The counters are atomics that the threads doing the
//! work bump directly (the dispatcher once per write, not per delivery); the gauges that
//! mirror state kept elsewhere (clients connected) are read when the page is rendered.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why the server stopped serving a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The client closed the connection.
    Client,
    /// The connection dropped without a close.
    Dropped,
    /// The client broke the protocol (bad frame, binary, invalid UTF-8, too big).
    Protocol,
    /// It fell `--queue` messages behind (slow consumer).
    Slow,
    /// It answered no pings (keepalive timeout).
    Silent,
    /// Its output made no progress for `--write-timeout`.
    Stalled,
    /// The server shut down.
    Shutdown,
    /// Redis lost the room's history; the client was asked to reconnect (1012).
    RedisReset,
}

/// Why a connection was refused before it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No room for another handshake (`--max-pending`, `--max-pending-per-ip`, threads).
    Busy,
    /// Its handshake was cut to make room for newer ones.
    Evicted,
    /// It did not finish its handshake in time.
    Timeout,
    /// A page from another web origin (HTTP 403).
    Origin,
    /// The chat was full or shutting down (HTTP 503).
    Full,
    /// Not a valid WebSocket request (another 4xx).
    BadRequest,
    /// TLS went wrong: a failed TLS handshake, plain HTTP on a TLS port, or TLS on a
    /// plaintext port.
    Tls,
}

/// Which of a node's two Redis connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    /// The connection that adds this node's messages to the stream.
    Writer,
    /// The connection that reads the stream.
    Reader,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::Client => "client",
            Closed::Dropped => "dropped",
            Closed::Protocol => "protocol_error",
            Closed::Slow => "slow_consumer",
            Closed::Silent => "timeout",
            Closed::Stalled => "write_timeout",
            Closed::Shutdown => "shutdown",
            Closed::RedisReset => "redis_reset",
        }
    }
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::Busy => "busy",
            Refused::Evicted => "evicted",
            Refused::Timeout => "timeout",
            Refused::Origin => "origin",
            Refused::Full => "full",
            Refused::BadRequest => "bad_request",
            Refused::Tls => "tls",
        }
    }
}

impl Link {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Link::Writer => "writer",
            Link::Reader => "reader",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabel {
    link: &'static str,
}

/// Every metric the server keeps.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    clients: Gauge,
    pub(crate) received: Counter,
    pub(crate) broadcast: Counter,
    pub(crate) deliveries: Counter,
    pub(crate) bytes_written: Counter,
    closed: Family<ReasonLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    redis_up: Family<LinkLabel, Gauge>,
    redis_reconnects: Family<LinkLabel, Counter>,
    pub(crate) redis_entries_read: Counter,
    pub(crate) redis_duplicates: Counter,
    pub(crate) redis_resets: Counter,
    redis_lag: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("broadcast_chat"),
            clients: Gauge::default(),
            received: Counter::default(),
            broadcast: Counter::default(),
            deliveries: Counter::default(),
            bytes_written: Counter::default(),
            closed: Family::default(),
            refused: Family::default(),
            redis_up: Family::default(),
            redis_reconnects: Family::default(),
            redis_entries_read: Counter::default(),
            redis_duplicates: Counter::default(),
            redis_resets: Counter::default(),
            redis_lag: Gauge::default(),
        };
        metrics.register();
        metrics
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register("clients", "Clients connected now", self.clients.clone());
        r.register(
            "messages_received",
            "Text messages received from this node's clients",
            self.received.clone(),
        );
        r.register(
            "messages_broadcast",
            "Messages broadcast to this node's clients (from Redis when in a fleet)",
            self.broadcast.clone(),
        );
        r.register(
            "deliveries",
            "Broadcast messages written or queued to clients",
            self.deliveries.clone(),
        );
        r.register(
            "bytes_written",
            "Bytes of broadcast messages written or queued to clients",
            self.bytes_written.clone(),
        );
        r.register(
            "clients_closed",
            "Clients that left, by reason",
            self.closed.clone(),
        );
        r.register(
            "handshakes_refused",
            "Connections refused before joining, by reason",
            self.refused.clone(),
        );
        r.register(
            "redis_link_up",
            "1 while the Redis connection works, 0 while it is down",
            self.redis_up.clone(),
        );
        r.register(
            "redis_reconnects",
            "Redis connections made again after one failed",
            self.redis_reconnects.clone(),
        );
        r.register(
            "redis_entries_read",
            "Stream entries read from Redis",
            self.redis_entries_read.clone(),
        );
        r.register(
            "redis_duplicates_dropped",
            "Stream entries dropped as repeats of a retried XADD",
            self.redis_duplicates.clone(),
        );
        r.register(
            "redis_resets",
            "Times Redis had lost entries this node still needed, so its clients were restarted",
            self.redis_resets.clone(),
        );
        r.register(
            "redis_lag_seconds",
            "Age of the newest stream entry when this node read it (Redis's clock against the node's)",
            self.redis_lag.clone(),
        );
    }

    pub(crate) fn closed(&self, reason: Closed) {
        self.closed
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    pub(crate) fn refused(&self, reason: Refused) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    pub(crate) fn redis_up(&self, link: Link, up: bool) {
        self.redis_up
            .get_or_create(&LinkLabel { link: link.label() })
            .set(i64::from(up));
    }

    pub(crate) fn redis_reconnected(&self, link: Link) {
        self.redis_reconnects
            .get_or_create(&LinkLabel { link: link.label() })
            .inc();
    }

    /// Record the lag of a stream entry made at `millis` since the epoch (its ID's time).
    pub(crate) fn redis_lag(&self, millis: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let lag = now.saturating_sub(Duration::from_millis(millis));
        self.redis_lag.set(lag.as_secs_f64());
    }

    /// The page for `GET /metrics`, with `clients` connected now.
    pub(crate) fn render(&self, clients: usize) -> String {
        self.clients.set(i64::try_from(clients).unwrap_or(i64::MAX));
        let mut page = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut page, &self.registry);
        page
    }
}
