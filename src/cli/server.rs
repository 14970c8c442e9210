//! The server's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use log::LevelFilter;

use crate::config::{MAX_QUEUE, RedisConfig, ServerConfig, TlsFiles};
use crate::message::LONGEST_MESSAGE;
use crate::server::Origin;

/// A WebSocket broadcast chat server: every text message a client sends goes to every
/// connected client, tagged with the sender's address ("127.0.0.1:53412: hi").
///
/// Browsers get a chat page at http://ADDR/ (turn it off with --no-web); WebSocket clients
/// connect to ws://ADDR. With --tls-cert and --tls-key, https:// and wss:// instead, and
/// SIGHUP reloads the certificate. Ctrl-C or SIGTERM closes every client with 1001 and
/// exits.
#[derive(Debug, Parser)]
#[command(
    name = "server",
    version,
    max_term_width = 100,
    allow_negative_numbers = true
)]
pub struct ServerArgs {
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8080",
        value_parser = bind_address,
        help = "Address to listen on: IP:PORT, IPv4 or IPv6 ([::1]:8080), or localhost:PORT; \
                port 0 picks a free port"
    )]
    bind: SocketAddr,

    /// Recent messages shown to each new client, 0 to 1000; 0 turns history off
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(0..=1000))]
    history: u16,

    /// Largest text message a client may send, 1 to 16777216; larger ones are closed with
    /// 1009
    #[arg(long, value_name = "BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=LONGEST_MESSAGE as i64))]
    max_message_size: u32,

    /// Messages that may wait for a client whose socket buffer is full, 1 to 65536; a client
    /// that falls further behind is closed with 1008
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=MAX_QUEUE as i64))]
    queue: u32,

    /// Seconds between pings to each client, 0 to 86400; a client silent for two intervals
    /// is dropped; 0 turns keepalive off
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(0..=86_400))]
    ping_interval: u32,

    /// Seconds a connection has to send its whole request and complete the handshake, 1 to
    /// 3600
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    handshake_timeout: u32,

    /// Seconds a client's pending output may make no progress before the client is cut, 1
    /// to 86400
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    write_timeout: u32,

    /// Clients allowed at once, 1 to 1000000; the next one gets HTTP 503
    #[arg(long, value_name = "N", default_value_t = 12000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_clients: u32,

    /// Backlog writer threads at once, for clients whose socket is full, 1 to 1000000; past
    /// that, such a client waits for one, at most --write-timeout
    #[arg(long, value_name = "N", default_value_t = 1500,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_writers: u32,

    /// MiB of encrypted backlog that all TLS clients behind may hold together, 1 to
    /// 1048576; past it, a TLS client that falls behind is closed with 1008
    #[arg(long, value_name = "MIB", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_tls_backlog: u32,

    /// Connections allowed in their handshake at once, 1 to 100000; when all are taken,
    /// the one waiting longest (over a second) is cut to make room
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_pending: u32,

    /// Connections allowed in their handshake at once from one address (an IPv6 /64), 1 to
    /// 100000; more are closed at once
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_pending_per_ip: u32,

    /// Connection threads kept waiting, after their client leaves, for the next clients to
    /// come, 0 to 2000000; 0 ends each thread with its connection [default: --max-clients
    /// plus --max-pending]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=2_000_000))]
    thread_cache: Option<u32>,

    /// Seconds a waiting connection thread waits for a new client before it ends, 1 to
    /// 86400
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    thread_idle: u32,

    /// Messages per second one client may send, 0 to 1000000; a client over it is read more
    /// slowly, never dropped; 0 turns flood control off
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    rate: u32,

    /// Messages one client may send at once before --rate applies, 1 to 1000000
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    burst: u32,

    /// Let pages from this web origin (scheme://host[:port]) open a WebSocket here besides
    /// the server's own page; repeatable; * allows any
    #[arg(long, value_name = "ORIGIN", value_parser = origin)]
    allow_origin: Vec<String>,

    /// Do not serve the chat page on plain HTTP GET / (/healthz and /metrics stay)
    #[arg(long)]
    no_web: bool,

    /// Run as one node of a fleet: the room is a Redis Stream shared by every node given
    /// the same URL and key (redis://HOST:PORT[/DB])
    #[arg(long, value_name = "URL", value_parser = redis_url)]
    redis: Option<String>,

    /// The Redis Stream that is the room
    #[arg(long, value_name = "NAME", default_value = "broadcast-chat",
          value_parser = redis_key, requires = "redis")]
    redis_key: String,

    /// Stream entries kept so that a node can resume after losing Redis (an entry holds
    /// what a node's clients sent at once), 100 to 10000000; a node away longer restarts
    /// its clients (1012)
    #[arg(long, value_name = "N", default_value_t = 10_000, requires = "redis",
          value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    redis_window: u64,

    /// Speak TLS only (wss://, https://) with this certificate chain (PEM; Let's Encrypt's
    /// fullchain.pem); SIGHUP reads it and the key again
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM; Let's Encrypt's privkey.pem)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// How much to log to stderr
    #[arg(long, value_name = "LEVEL", value_enum, ignore_case = true,
          default_value_t = Level::Info)]
    log_level: Level,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// `IP:PORT`, or `localhost:PORT` (taken as 127.0.0.1).
fn bind_address(value: &str) -> Result<SocketAddr, String> {
    const EXPECTED: &str =
        "expected IP:PORT, as in 127.0.0.1:8080 or [::1]:8080, or localhost:PORT";
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    match value.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| format!("{port:?} is not a port; {EXPECTED}")),
        _ => Err(EXPECTED.to_string()),
    }
}

fn redis_url(value: &str) -> Result<String, String> {
    crate::server::check_redis_url(value).map(|()| value.to_string())
}

fn redis_key(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 256 {
        return Err("expected a name of 1 to 256 bytes".to_string());
    }
    Ok(value.to_string())
}

fn origin(value: &str) -> Result<String, String> {
    match value {
        "*" | "null" => Ok(value.to_string()),
        _ => Origin::parse(value).map(|_| value.to_string()),
    }
}

impl ServerArgs {
    /// The server's configuration, as the options say.
    pub fn config(&self) -> ServerConfig {
        let secs = |s: u32| Duration::from_secs(u64::from(s));
        let mut config = ServerConfig::default()
            .bind(self.bind)
            .history(usize::from(self.history))
            .max_message_size(self.max_message_size as usize)
            .queue(self.queue as usize)
            .ping_interval((self.ping_interval > 0).then(|| secs(self.ping_interval)))
            .handshake_timeout(secs(self.handshake_timeout))
            .write_timeout(secs(self.write_timeout))
            .max_clients(self.max_clients as usize)
            .max_writers(self.max_writers as usize)
            .max_tls_backlog(self.max_tls_backlog as usize * 1024 * 1024)
            .max_pending(self.max_pending as usize)
            .max_pending_per_ip(self.max_pending_per_ip as usize)
            .thread_cache(self.thread_cache.map(|n| n as usize))
            .thread_idle(secs(self.thread_idle))
            .rate(self.rate)
            .burst(self.burst)
            .web(!self.no_web)
            .redis(self.redis.as_ref().map(|url| {
                RedisConfig::new(url)
                    .key(&self.redis_key)
                    .window(self.redis_window)
            }))
            .tls(
                self.tls_cert
                    .as_ref()
                    .zip(self.tls_key.as_ref())
                    .map(|(cert, key)| TlsFiles::new(cert, key)),
            );
        config.allow_origins.clone_from(&self.allow_origin);
        config
    }

    /// How much to log.
    pub fn log_level(&self) -> LevelFilter {
        match self.log_level {
            Level::Off => LevelFilter::Off,
            Level::Error => LevelFilter::Error,
            Level::Warn => LevelFilter::Warn,
            Level::Info => LevelFilter::Info,
            Level::Debug => LevelFilter::Debug,
            Level::Trace => LevelFilter::Trace,
        }
    }
}
