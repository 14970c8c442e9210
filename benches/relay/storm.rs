//! Connection storms (`--only storm`): how fast clients get in when many come at once.
//!
//! One thread keeps 64 handshakes in flight (non-blocking sockets and `poll`, as an
//! event-driven load generator does, so that the harness is not what limits the rate) and
//! opens `clients` connections, each through the WebSocket handshake and the welcome, and
//! keeps them open: new connections per second. Then every one of them is dropped at once,
//! as when a network blips or a node behind a load balancer goes away; once the server has
//! seen them go (its CPU time stops growing), all reconnect at once, 64 in flight again:
//! the time until the last is back in. One broadcast then reaches them all.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Socket, Type};

use crate::Target;
use crate::procfs;
use crate::scale::reach_all;
use crate::wire::{self, Conn};

/// Handshakes in flight: what the independent load generator uses.
pub const IN_FLIGHT: usize = 64;
/// How long one handshake may take before it counts as failed.
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct Storm {
    pub clients: usize,
    pub connects_per_s: f64,
    pub reconnected: usize,
    pub reconnect_s: f64,
    pub reconnects_per_s: f64,
    pub failed: usize,
    pub reached: usize,
    /// The server's CPU time per connection, in the first storm and in the second (which
    /// also pays for every client dropped).
    pub server_us_per_connect: f64,
    pub server_us_per_reconnect: f64,
}

/// One storm: `clients` connecting at once, once the server has settled.
struct Wave {
    open: Vec<Conn>,
    failed: usize,
    seconds: f64,
    /// The server's CPU seconds meanwhile.
    cpu: f64,
}

fn wave(target: &Target, clients: usize) -> io::Result<Wave> {
    // Clients that left before (of earlier scenarios, or of the first wave) may still be
    // leaving.
    settle(&target.pid);
    let cpu = procfs::cpu_seconds(&target.pid);
    let started = Instant::now();
    let (open, failed) = open_all(target.addr, clients)?;
    Ok(Wave {
        open,
        failed,
        seconds: started.elapsed().as_secs_f64(),
        cpu: procfs::cpu_seconds(&target.pid) - cpu,
    })
}

pub fn run(target: &Target, clients: usize) -> io::Result<Storm> {
    let first = wave(target, clients)?;
    if first.open.is_empty() {
        return Err(io::Error::other("no client could connect"));
    }
    let connected = first.open.len();
    drop(first.open);
    let Wave {
        open: again,
        failed: failed_again,
        seconds: reconnect_s,
        cpu: reconnect_cpu,
    } = wave(target, clients)?;
    let reconnected = again.len();
    let groups: Vec<Vec<Conn>> = chunks(again, IN_FLIGHT);
    let (reached, _) = reach_all(groups)?;
    Ok(Storm {
        clients: connected,
        connects_per_s: connected as f64 / first.seconds,
        reconnected,
        reconnect_s,
        reconnects_per_s: reconnected as f64 / reconnect_s,
        failed: first.failed + failed_again,
        reached,
        server_us_per_connect: first.cpu * 1e6 / connected as f64,
        server_us_per_reconnect: reconnect_cpu * 1e6 / reconnected.max(1) as f64,
    })
}

/// Wait until the server's CPU time stops growing (under 5 ms in 100 ms): it has dealt
/// with the clients that left. At most 10 s.
fn settle(pid: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = procfs::cpu_seconds(pid);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = procfs::cpu_seconds(pid);
        if now - before < 0.005 {
            return;
        }
        before = now;
    }
}

/// Open `clients` connections, [`IN_FLIGHT`] at a time, on this thread. Returns those
/// that got in, and how many did not.
fn open_all(addr: SocketAddr, clients: usize) -> io::Result<(Vec<Conn>, usize)> {
    let request = wire::request(addr);
    let mut open = Vec::with_capacity(clients);
    let mut under_way: Vec<Attempt> = Vec::with_capacity(IN_FLIGHT);
    let (mut started, mut failed) = (0, 0);
    let mut first_error = None;
    while started < clients || !under_way.is_empty() {
        while under_way.len() < IN_FLIGHT && started < clients {
            started += 1;
            match Attempt::start(addr, started) {
                Ok(attempt) => under_way.push(attempt),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("cannot connect: {e}"));
                }
            }
        }
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = under_way
                .iter()
                .map(|a| PollFd::new(a.sock.as_fd(), a.waiting_for()))
                .collect();
            poll(&mut fds, PollTimeout::from(100u16))?;
            fds.iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        for i in (0..under_way.len()).rev() {
            let outcome = if ready[i] {
                under_way[i].step(request.as_bytes())
            } else if under_way[i].since.elapsed() > PATIENCE {
                Err(io::ErrorKind::TimedOut.into())
            } else {
                continue;
            };
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    let attempt = under_way.swap_remove(i);
                    attempt.sock.set_nonblocking(false)?;
                    match Conn::adopt(attempt.sock, &attempt.received, PATIENCE) {
                        Ok(conn) => open.push(conn),
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| format!("handshake failed: {e}"));
                        }
                    }
                }
                Err(e) => {
                    under_way.swap_remove(i);
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("handshake failed: {e}"));
                }
            }
        }
    }
    if let Some(error) = first_error {
        eprintln!("storm: {failed} of {clients} did not get in; the first: {error}");
    }
    Ok((open, failed))
}

/// One connection on its way in.
struct Attempt {
    sock: TcpStream,
    since: Instant,
    sent: bool,
    received: Vec<u8>,
}

impl Attempt {
    /// Start connecting, as the `n`th client: on loopback, from one of 250 addresses in
    /// turn (127.0.0.2 to 127.0.0.251), so that two storms of 10 000 and the sockets
    /// earlier scenarios left in TIME_WAIT do not run out of ephemeral ports, which would
    /// slow every `connect` down.
    fn start(addr: SocketAddr, n: usize) -> io::Result<Attempt> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if addr.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) {
            let host = u8::try_from(2 + n % 250).expect("at most 251");
            let from = SocketAddr::from(([127, 0, 0, host], 0));
            socket.bind(&from.into())?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(Attempt {
            sock: socket.into(),
            since: Instant::now(),
            sent: false,
            received: Vec::with_capacity(256),
        })
    }

    fn waiting_for(&self) -> PollFlags {
        if self.sent {
            PollFlags::POLLIN
        } else {
            PollFlags::POLLOUT
        }
    }

    /// Go on once the socket is ready: send the request once connected, then read.
    /// Returns whether the response's head and the welcome have arrived.
    fn step(&mut self, request: &[u8]) -> io::Result<bool> {
        if !self.sent {
            if let Some(e) = self.sock.take_error()? {
                return Err(e);
            }
            // A request this small always fits an empty socket buffer.
            (&self.sock).write_all(request)?;
            self.sent = true;
            return Ok(false);
        }
        let mut chunk = [0u8; 1024];
        match (&self.sock).read(&mut chunk) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.received.extend_from_slice(&chunk[..n]);
                Ok(welcomed(&self.received))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Whether `received` holds a whole response head and the first frame after it.
fn welcomed(received: &[u8]) -> bool {
    let Some(head) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let frame = &received[head + 4..];
    frame.len() >= 2 && frame.len() >= 2 + usize::from(frame[1] & 0x7f)
}

/// `all` in `n` groups of about the same size.
fn chunks(all: Vec<Conn>, n: usize) -> Vec<Vec<Conn>> {
    let size = all.len().div_ceil(n).max(1);
    let mut groups: Vec<Vec<Conn>> = Vec::new();
    for conn in all {
        match groups.last_mut() {
            Some(group) if group.len() < size => group.push(conn),
            _ => groups.push(vec![conn]),
        }
    }
    groups
}
