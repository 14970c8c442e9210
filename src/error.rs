//! The one error type of the library, with messages a user can act on.
//!
//! Errors on a single client's connection never reach this type: they end that connection
//! with the right close code and a log line. What is left is what stops a whole server or a
//! whole client run: the address cannot be bound, the server cannot be reached, a thread
//! cannot be started.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What went wrong, in words a user can act on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The server could not listen on its address. Pick another `--bind` or stop whatever
    /// holds the port.
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// Why the operating system refused.
        source: io::Error,
    },
    /// A thread could not be started; the system is out of threads or memory mappings.
    /// Lower the number of clients or raise the limits.
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why the operating system refused.
        source: io::Error,
    },
    /// A thread of the server panicked. This is a bug; the message names the thread.
    Panicked {
        /// Which thread.
        what: &'static str,
    },
    /// The URL given to the client cannot be used. Fix it and try again.
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The client could not reach the server. Check that it is running and the URL.
    Connect {
        /// The URL as given.
        url: String,
        /// Why the connection failed.
        source: io::Error,
    },
    /// The server answered, but did not accept the WebSocket handshake.
    Handshake {
        /// The URL as given.
        url: String,
        /// What the server said or did instead.
        reason: String,
    },
    /// The `--redis` URL cannot be used. Fix it and start again.
    Redis {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate or key file (`--tls-cert`, `--tls-key`, `--ca`) cannot be used. Fix
    /// the file or the path and try again.
    Certificate {
        /// The file as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An established connection failed; it is safe to drop it.
    Io(io::Error),
    /// The WebSocket protocol failed on an established connection.
    WebSocket(tungstenite::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, source } => {
                write!(f, "cannot listen on {addr}: {source}")?;
                match source.kind() {
                    io::ErrorKind::AddrInUse => {
                        f.write_str(" — is another server running? Choose another --bind")
                    }
                    io::ErrorKind::PermissionDenied => {
                        f.write_str(" — ports below 1024 need privileges; use a higher port")
                    }
                    io::ErrorKind::AddrNotAvailable => {
                        f.write_str(" — that address is not on this machine")
                    }
                    _ => Ok(()),
                }
            }
            Error::Spawn { what, source } => write!(
                f,
                "cannot start the {what} thread: {source} — the system is out of threads \
                 or memory mappings; lower --max-clients"
            ),
            Error::Panicked { what } => write!(f, "the {what} thread panicked (this is a bug)"),
            Error::Url { url, reason } => write!(f, "cannot use URL {url}: {reason}"),
            Error::Redis { url, reason } => write!(
                f,
                "cannot use Redis URL {url}: {reason}; expected redis://HOST:PORT[/DB]"
            ),
            Error::Connect { url, source } => {
                write!(f, "cannot connect to {url}: ")?;
                match source.kind() {
                    io::ErrorKind::ConnectionRefused => {
                        f.write_str("connection refused — is the server running?")
                    }
                    _ if is_timeout(source) => {
                        f.write_str("timed out — is the address right and reachable?")
                    }
                    _ => write!(f, "{source}"),
                }
            }
            Error::Handshake { url, reason } => write!(f, "cannot connect to {url}: {reason}"),
            Error::Certificate { path, reason } => {
                write!(f, "cannot use {}: {reason}", path.display())
            }
            Error::Io(e) => write!(f, "connection failed: {e}"),
            Error::WebSocket(e) => write!(f, "WebSocket error: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } | Error::Spawn { source, .. } => Some(source),
            Error::Connect { source, .. } | Error::Io(source) => Some(source),
            Error::WebSocket(e) => Some(e),
            Error::Panicked { .. }
            | Error::Url { .. }
            | Error::Redis { .. }
            | Error::Certificate { .. }
            | Error::Handshake { .. } => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(e) => Error::Io(e),
            e => Error::WebSocket(e),
        }
    }
}

/// Whether `e` only says that the peer went away, which is how connections normally end.
pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

/// Whether `e` is a socket timeout running out: the kernel says `WouldBlock` (`EAGAIN`)
/// for a blocking socket's timeout, and some paths `TimedOut`.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The time left until `deadline`, for a socket timeout; `TimedOut` once it has passed.
pub(crate) fn time_left(deadline: std::time::Instant) -> io::Result<std::time::Duration> {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

/// Socket timeouts surface as `WouldBlock` on Unix; call them what they are.
pub(crate) fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::ErrorKind::TimedOut.into()
    } else {
        e
    }
}
