//! Soak: ordinary traffic and abuse together for a long time, watching the server's memory,
//! descriptors and threads. They must come back to where they started.
//!
//! For the whole run, at once:
//! - a room: receivers and chatters (each chatter sends five numbered messages a second,
//!   under the default flood limit), every receiver checking that no chatter's message is
//!   missing;
//! - churn: two loops of connect, send, hear, close;
//! - aborted handshakes: a request, then a reset or a close before the answer;
//! - idle and trickling connections from another address (127.0.0.2), more than it may
//!   hold, replaced as the server cuts them;
//! - non-readers: clients that join and never read, but ping every second so that keepalive
//!   takes them for alive, replaced every 40 s;
//! - a flooder that sends as fast as TCP lets it and never reads.
//!
//! A few threads drive it all; none is spent per socket.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::wire::{self, Conn};
use crate::{Target, procfs, scale};

const RECEIVERS: usize = 100;
const CHATTERS: usize = 10;
/// How often each chatter speaks: five messages a second, half the default rate.
const CHAT_EVERY: Duration = Duration::from_millis(200);
const IDLE: usize = 200;
const NON_READERS: usize = 5;
const NON_READER_LIFE: Duration = Duration::from_secs(40);
const TIMEOUT: Duration = Duration::from_secs(10);
/// Between churn cycles: a few hundred connections a second is churn enough, and leaves
/// the room's single reading thread able to keep up.
const CHURN_PAUSE: Duration = Duration::from_millis(5);

/// The server's resources at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub seconds: f64,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

#[derive(Debug, Default)]
pub struct Soak {
    pub samples: Vec<Sample>,
    /// After the load stopped and the server let go of it.
    pub end: Sample,
    pub chat_messages: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub dropped_receivers: u64,
    pub churn_cycles: u64,
    pub churn_failures: u64,
    pub aborted: u64,
    pub idle_opened: u64,
    pub non_readers: u64,
    pub flood_frames: u64,
    pub flood_connections: u64,
}

#[derive(Default)]
struct Counters {
    chat_messages: AtomicU64,
    deliveries: AtomicU64,
    lost: AtomicU64,
    dropped_receivers: AtomicU64,
    churn_cycles: AtomicU64,
    churn_failures: AtomicU64,
    aborted: AtomicU64,
    idle_opened: AtomicU64,
    non_readers: AtomicU64,
    flood_frames: AtomicU64,
    flood_connections: AtomicU64,
}

/// The server's resources now; fails when /proc cannot tell, so that "back where it
/// started" can never hold because nothing was measured.
fn sample(target: &Target, started: Instant) -> io::Result<Sample> {
    let fds = procfs::fds(&target.pid).ok_or_else(|| {
        io::Error::other(format!(
            "cannot read /proc/{}/fd; the soak needs the server's --pid",
            target.pid
        ))
    })?;
    Ok(Sample {
        seconds: started.elapsed().as_secs_f64(),
        rss_kib: procfs::rss_kib(&target.pid),
        fds,
        threads: procfs::threads(&target.pid),
    })
}

pub fn run(target: &Target, duration: Duration) -> io::Result<Soak> {
    let started = Instant::now();
    let mut samples = vec![sample(target, started)?];
    let stop = AtomicBool::new(false);
    let counters = Counters::default();
    let every = (duration / 10).max(Duration::from_secs(1));
    thread::scope(|s| -> io::Result<()> {
        let room = Room::open(target.addr)?;
        let chatters: Vec<_> = room.conns[..CHATTERS]
            .iter()
            .map(|c| std::sync::Arc::clone(&c.stream))
            .collect();
        let (stop, counters) = (&stop, &counters);
        s.spawn(move || room.read(counters));
        s.spawn(move || chat(&chatters, stop, counters));
        for t in 0..2 {
            s.spawn(move || churn(target, t, stop, counters));
        }
        s.spawn(move || abuse(target.addr, stop, counters));
        s.spawn(move || flood(target.addr, stop, counters));
        let mut next = started + every;
        while started.elapsed() < duration {
            thread::sleep(next.saturating_duration_since(Instant::now()).min(duration));
            samples.push(sample(target, started)?);
            next += every;
        }
        stop.store(true, Ordering::Release);
        Ok(())
    })?;
    // Everything the harness opened is closed; give the server a moment to let go.
    let baseline = samples[0];
    let deadline = Instant::now() + TIMEOUT;
    let mut end = sample(target, started)?;
    while (end.fds, end.threads) != (baseline.fds, baseline.threads) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        end = sample(target, started)?;
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(Soak {
        samples,
        end,
        chat_messages: get(&counters.chat_messages),
        deliveries: get(&counters.deliveries),
        lost: get(&counters.lost),
        dropped_receivers: get(&counters.dropped_receivers),
        churn_cycles: get(&counters.churn_cycles),
        churn_failures: get(&counters.churn_failures),
        aborted: get(&counters.aborted),
        idle_opened: get(&counters.idle_opened),
        non_readers: get(&counters.non_readers),
        flood_frames: get(&counters.flood_frames),
        flood_connections: get(&counters.flood_connections),
    })
}

/// Chatters first, then receivers; all of them read everything.
struct Room {
    conns: Vec<Conn>,
}

impl Room {
    fn open(addr: SocketAddr) -> io::Result<Room> {
        let conns = (0..CHATTERS + RECEIVERS)
            .map(|_| Conn::open(addr, TIMEOUT, None))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Room { conns })
    }

    /// Read every connection in turn, one round of chat at a time (every connection gets
    /// the same stream), until the closing marker; count deliveries and gaps.
    fn read(mut self, counters: &Counters) {
        let mut next = vec![[0u64; CHATTERS]; self.conns.len()];
        let mut done = vec![false; self.conns.len()];
        while done.iter().any(|d| !d) {
            for (i, conn) in self.conns.iter_mut().enumerate() {
                while !done[i] {
                    let Ok(frame) = conn.read_frame() else {
                        done[i] = true;
                        counters.dropped_receivers.fetch_add(1, Ordering::Relaxed);
                        break;
                    };
                    let text = String::from_utf8_lossy(wire::untag(frame.payload)).into_owned();
                    let Some((chatter, seq)) = parse_chat(&text) else {
                        continue;
                    };
                    counters.deliveries.fetch_add(1, Ordering::Relaxed);
                    if seq == u64::MAX {
                        done[i] = true;
                        break;
                    }
                    let expected = &mut next[i][chatter];
                    counters
                        .lost
                        .fetch_add(seq.saturating_sub(*expected), Ordering::Relaxed);
                    *expected = seq + 1;
                    if chatter == 0 {
                        break;
                    }
                }
            }
        }
        for conn in self.conns {
            let _ = conn.close();
        }
    }
}

/// "s3-17" is chatter 3's 17th message; "s0-end" ends the stream.
fn parse_chat(text: &str) -> Option<(usize, u64)> {
    let (chatter, seq) = text.strip_prefix('s')?.split_once('-')?;
    let seq = if seq == "end" {
        u64::MAX
    } else {
        seq.parse().ok()?
    };
    Some((chatter.parse().ok()?, seq))
}

fn chat(chatters: &[std::sync::Arc<TcpStream>], stop: &AtomicBool, counters: &Counters) {
    let mut seq = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Acquire) {
        for (c, stream) in chatters.iter().enumerate() {
            if wire::send_frame(stream, 1, format!("s{c}-{seq}").as_bytes()).is_ok() {
                counters.chat_messages.fetch_add(1, Ordering::Relaxed);
            }
        }
        seq += 1;
        next += CHAT_EVERY;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let _ = wire::send_frame(&chatters[0], 1, b"s0-end");
}

fn churn(target: &Target, t: usize, stop: &AtomicBool, counters: &Counters) {
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        i += 1;
        let counter = match scale::cycle(target, &format!("c{t}-{i}")) {
            Ok(()) => &counters.churn_cycles,
            Err(_) => &counters.churn_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        thread::sleep(CHURN_PAUSE);
    }
}

const REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Aborted handshakes, idle and trickling connections, and non-readers, a little of each
/// every 20 ms.
fn abuse(addr: SocketAddr, stop: &AtomicBool, counters: &Counters) {
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut non_readers: Vec<(TcpStream, Instant)> = Vec::new();
    let mut tick = 0u64;
    while !stop.load(Ordering::Acquire) {
        tick += 1;
        aborted_handshake(addr, tick);
        counters.aborted.fetch_add(1, Ordering::Relaxed);
        idle.retain(|s| !is_closed(s));
        for _ in 0..5 {
            if idle.len() >= IDLE {
                break;
            }
            if let Ok(mut stream) = connect_from("127.0.0.2", addr) {
                if tick.is_multiple_of(2) {
                    let _ = stream.write_all(&REQUEST[..20]);
                }
                idle.push(stream);
                counters.idle_opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        non_readers.retain(|(_, since)| since.elapsed() < NON_READER_LIFE);
        if tick.is_multiple_of(50) {
            for (stream, _) in &non_readers {
                let _ = (&*stream).write_all(&wire::frame(9, b""));
            }
        }
        if non_readers.len() < NON_READERS
            && let Ok(stream) = non_reader(addr)
        {
            non_readers.push((stream, Instant::now()));
            counters.non_readers.fetch_add(1, Ordering::Relaxed);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn aborted_handshake(addr: SocketAddr, tick: u64) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.write_all(REQUEST);
    if tick.is_multiple_of(2) {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
}

/// A client with a small receive buffer that asks to join and never reads a byte.
fn non_reader(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_recv_buffer_size(4096)?;
    socket.connect_timeout(&addr.into(), TIMEOUT)?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(REQUEST)?;
    Ok(stream)
}

fn connect_from(source: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: SocketAddr = format!("{source}:0").parse().map_err(io::Error::other)?;
    socket.bind(&from.into())?;
    socket.connect_timeout(&addr.into(), TIMEOUT)?;
    Ok(socket.into())
}

/// Whether the server has closed `stream` (it never sends these anything else).
fn is_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 64];
    let closed = match (&*stream).read(&mut byte) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// Send as fast as TCP allows and never read; start over when the server cuts it.
fn flood(addr: SocketAddr, stop: &AtomicBool, counters: &Counters) {
    while !stop.load(Ordering::Acquire) {
        let Ok(conn) = Conn::open(addr, TIMEOUT, None) else {
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        counters.flood_connections.fetch_add(1, Ordering::Relaxed);
        // A held-back sender's window can stay shut for long (the server frees a few bytes
        // at a time), so writes time out now and then to look at the stop flag, and carry
        // on from where they stopped, within the frame.
        let _ = conn
            .stream
            .set_write_timeout(Some(Duration::from_millis(200)));
        let frame = wire::frame(1, b"flood");
        let mut rest: &[u8] = &frame;
        while !stop.load(Ordering::Acquire) {
            match (&*conn.stream).write(rest) {
                Ok(0) => break,
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
            if rest.is_empty() {
                counters.flood_frames.fetch_add(1, Ordering::Relaxed);
                rest = &frame;
            }
        }
    }
}
