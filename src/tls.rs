//! TLS on a socket that two threads share: one reads, the other writes.
//!
//! A rustls connection is one state for both directions, so it sits under a mutex, held
//! only to decrypt what has arrived or to encrypt what is to be sent, never across a wait.
//! Reading waits for the socket without the lock, so a thread blocked reading never
//! holds up a writer. Writing encrypts into bytes the caller sends itself: the server's
//! dispatcher then writes them without blocking and leaves the rest to its backlog as for
//! plaintext, and the client writes them under its own write lock. Whoever encrypts must
//! also be the one who sends the result next, in that order, since TLS records are
//! numbered; both sides do so under their write lock.
//!
//! Records that rustls makes on its own while reading (an answer to a key update, an
//! alert) wait in its buffer and go out, in order, ahead of the next message sealed.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, recv};
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::{self, PemObject};
use socket2::SockRef;

use crate::config::later;
use crate::error::{Error, Result, time_left, timed_out};

/// One TLS connection's state, shared by the thread that reads and the one that writes.
#[derive(Debug)]
pub(crate) struct Tls {
    conn: Mutex<rustls::Connection>,
}

impl Tls {
    pub(crate) fn new(conn: impl Into<rustls::Connection>) -> Self {
        Self {
            conn: Mutex::new(conn.into()),
        }
    }

    /// Run the TLS handshake on `sock`, all of it before `deadline`, so that a client
    /// trickling its handshake is cut like one trickling its HTTP request.
    ///
    /// # Errors
    /// `TimedOut` at the deadline, `UnexpectedEof` if the peer left, `InvalidData` with a
    /// [`rustls::Error`] inside if the handshake failed (the alert is sent first).
    pub(crate) fn handshake(&self, mut sock: &TcpStream, deadline: Instant) -> io::Result<()> {
        let mut conn = self.conn.lock();
        loop {
            while conn.wants_write() {
                sock.set_write_timeout(Some(time_left(deadline)?))?;
                conn.write_tls(&mut sock).map_err(timed_out)?;
            }
            if !conn.is_handshaking() {
                return Ok(());
            }
            sock.set_read_timeout(Some(time_left(deadline)?))?;
            if conn.read_tls(&mut sock).map_err(timed_out)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer left during the TLS handshake",
                ));
            }
            if let Err(e) = conn.process_new_packets() {
                let _ = conn.write_tls(&mut sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// Read decrypted bytes into `buf`, waiting as a blocking read of `sock` would: for at
    /// most its read timeout in all, or forever without one. The timeout covers the whole
    /// call, not each wait, so a peer trickling a record byte by byte cannot stretch it.
    /// Returns 0 at the end of the stream, whether the peer said goodbye with
    /// `close_notify` or just hung up.
    ///
    /// # Errors
    /// `WouldBlock` when the read timeout passes, as for a socket; `InvalidData` when the
    /// peer sent something that is not valid TLS; any error of the socket.
    pub(crate) fn read(&self, sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        // Looked up only when the read has to wait: most reads find data and need no
        // system call for it.
        let mut deadline = None;
        loop {
            {
                let mut conn = self.conn.lock();
                match conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    result => return result,
                }
                match conn.read_tls(&mut NoWait(sock)) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {
                        conn.process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // An incomplete record waits in rustls's buffer for the rest. (When the peer
            // breaks TLS, the alert rustls makes goes out with the next records sealed.)
            if deadline.is_none() {
                deadline = Some(
                    sock.read_timeout()?
                        .map(|timeout| later(Instant::now(), timeout)),
                );
            }
            wait_readable(sock, deadline.flatten())?;
        }
    }

    /// Encrypt `bufs`, as one stream of bytes, into the records to send next.
    ///
    /// # Errors
    /// The connection can no longer send (it has sent its `close_notify`, or failed).
    /// `bufs` is used up: the slices are advanced past what is sealed.
    pub(crate) fn seal(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<Vec<u8>> {
        seal(&mut self.conn.lock(), bufs)
    }

    /// As [`seal`](Self::seal), then TLS's own goodbye (`close_notify`): the last thing
    /// this connection will send.
    ///
    /// # Errors
    /// As for `seal`.
    pub(crate) fn seal_last(&self, bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut conn = self.conn.lock();
        let mut records = seal(&mut conn, &mut [IoSlice::new(bytes)])?;
        conn.send_close_notify();
        while conn.wants_write() {
            conn.write_tls(&mut records)?;
        }
        Ok(records)
    }

    /// Encrypt `bytes` and write them to `sock`, blocking as its write timeout allows. The
    /// caller must keep other writers out until it returns, so records go out in order.
    ///
    /// # Errors
    /// As for `seal`, or the socket's error.
    pub(crate) fn write_all(&self, mut sock: &TcpStream, bytes: &[u8]) -> io::Result<()> {
        sock.write_all(&self.seal(&mut [IoSlice::new(bytes)])?)
    }
}

/// Encrypt `bufs`, as one stream of bytes, into the records to send next.
fn seal(conn: &mut rustls::Connection, bufs: &mut [IoSlice<'_>]) -> io::Result<Vec<u8>> {
    let mut records = Vec::new();
    let mut rest = bufs;
    while !rest.is_empty() {
        let taken = conn.writer().write_vectored(rest)?;
        conn.write_tls(&mut records)?;
        if taken == 0 && !rest.iter().all(|b| b.is_empty()) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, taken);
    }
    while conn.wants_write() {
        conn.write_tls(&mut records)?;
    }
    Ok(records)
}

/// Send what `sock` takes now, without waiting and without SIGPIPE: how many bytes it
/// took, 0 when its buffer is full.
///
/// # Errors
/// As for a socket, but for a full buffer.
pub(crate) fn send_now(sock: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    loop {
        match SockRef::from(sock).send_vectored_with_flags(slices, flags) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            result => return result,
        }
    }
}

/// A socket read that never waits, for rustls to pull from while the lock is held.
struct NoWait<'a>(&'a TcpStream);

impl Read for NoWait<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match recv(self.0.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Err(nix::errno::Errno::EINTR) => {}
                result => return result.map_err(io::Error::from),
            }
        }
    }
}

/// Wait until `sock` has something to read (or has ended), until `deadline` if any.
///
/// # Errors
/// `WouldBlock` once the deadline has passed, as a socket's read timeout says it.
fn wait_readable(sock: &TcpStream, deadline: Option<Instant>) -> io::Result<()> {
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => {
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                }
                _ => return Err(io::ErrorKind::WouldBlock.into()),
            },
        };
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A socket as the protocol above it sees it: its own bytes, or the bytes inside TLS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wire<'a> {
    pub(crate) sock: &'a TcpStream,
    pub(crate) tls: Option<&'a Tls>,
}

impl Wire<'_> {
    /// Read as from a blocking socket.
    ///
    /// # Errors
    /// As for [`Tls::read`], or the socket's.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls {
            Some(tls) => tls.read(self.sock, buf),
            None => (&*self.sock).read(buf),
        }
    }

    /// Read what has arrived, without waiting: `WouldBlock` when nothing has. Over TLS
    /// always `WouldBlock`: its reads go through [`Tls::read`].
    ///
    /// # Errors
    /// As for a socket.
    pub(crate) fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls {
            Some(_) => Err(io::ErrorKind::WouldBlock.into()),
            None => NoWait(self.sock).read(buf),
        }
    }

    /// Write what the socket takes now, without waiting: how much it took. Over TLS
    /// nothing: its writes are sealed first, by [`write_all`](Self::write_all).
    ///
    /// # Errors
    /// As for a socket, but for a full socket buffer, which is 0.
    pub(crate) fn write_now(&self, bytes: &[u8]) -> io::Result<usize> {
        if self.tls.is_some() {
            return Ok(0);
        }
        send_now(self.sock, &[IoSlice::new(bytes)])
    }

    /// Write all of `bytes`, blocking as the socket's write timeout allows. The caller
    /// must be the only writer meanwhile.
    ///
    /// # Errors
    /// As for [`Tls::write_all`], or the socket's.
    pub(crate) fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        match self.tls {
            Some(tls) => tls.write_all(self.sock, bytes),
            None => (&*self.sock).write_all(bytes),
        }
    }
}

/// The certificates in the PEM file at `path`, at least one; `what` names them for the
/// user (a certificate, a CA certificate).
///
/// # Errors
/// [`Error::Certificate`] naming the file and what is wrong with it.
pub(crate) fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let found = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .and_then(|certs| match certs.is_empty() {
            true => Err(pem::Error::NoItemsFound),
            false => Ok(certs),
        });
    found.map_err(|e| pem_error(path, &e, what))
}

/// What is wrong with a PEM file at `path` that should hold a `what`, in words a user can
/// act on.
pub(crate) fn pem_error(path: &Path, e: &pem::Error, what: &str) -> Error {
    let reason = match e {
        pem::Error::Io(e) => format!("cannot read it: {e}"),
        pem::Error::NoItemsFound => {
            format!("it holds no {what} (expected a PEM file with a \"-----BEGIN\" line)")
        }
        other => format!("it is not a valid PEM file: {other}"),
    };
    Error::Certificate {
        path: path.to_path_buf(),
        reason,
    }
}
