//! Fan-out: one sender, N receivers, a closed loop of at most W messages in flight counted
//! against the slowest receiver. Measures deliveries per second, latency from send to
//! receipt, losses, and the server's CPU time per delivery.
//!
//! One thread does it all: it sends while fewer than W messages are in flight, then reads
//! the oldest one from every receiver in turn. With no hand-offs between harness threads,
//! the harness spends its CPU on reading, which keeps it from saturating before the server.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::Target;
use crate::procfs;
use crate::wire::{self, Conn};

/// Latency histogram resolution: one bucket per microsecond up to this many.
const HISTOGRAM_US: usize = 1_000_000;
/// A receiver that sends nothing for this long has lost the rest.
const STALL: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Default)]
pub struct Fanout {
    pub receivers: usize,
    pub window: usize,
    pub messages: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub lost: u64,
    pub disconnected: u64,
    pub server_us_per_delivery: f64,
    pub harness_us_per_delivery: f64,
    /// The server's voluntary and involuntary context switches per delivery, over all its
    /// threads.
    pub voluntary_per_delivery: f64,
    pub involuntary_per_delivery: f64,
}

/// One receiving connection and where it is in the stream.
struct Receiver {
    conn: Conn,
    next: u64,
    alive: bool,
}

pub fn run(
    target: &Target,
    receivers: usize,
    window: usize,
    duration: Duration,
) -> io::Result<Fanout> {
    between(target.addr, target, receivers, window, duration)
}

/// As [`run`], with the sender connected to `sender` (another node of a fleet) and the
/// receivers to `target`.
pub fn between(
    sender: SocketAddr,
    target: &Target,
    receivers: usize,
    window: usize,
    duration: Duration,
) -> io::Result<Fanout> {
    let mut all = (0..=receivers)
        .map(|i| {
            let addr = if i == 0 { sender } else { target.addr };
            let conn = Conn::open(addr, Duration::from_secs(10), target.tls.as_ref())?;
            Ok(Receiver {
                conn,
                next: 0,
                alive: true,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    sync(&mut all)?;

    let epoch = Instant::now();
    let server_cpu = procfs::cpu_seconds(&target.pid);
    let switches = procfs::context_switches(&target.pid);
    let harness_cpu = procfs::cpu_seconds("self");
    let stop_at = epoch + duration;
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut histogram = vec![0u64; HISTOGRAM_US];
    let (mut deliveries, mut lost, mut disconnected) = (0u64, 0u64, 0u64);
    let mut last_receipt = epoch;
    let mut text = Vec::with_capacity(64);
    let mut round = 0u64;
    loop {
        let sending = Instant::now() < stop_at;
        while sending && (sent_at.len() as u64) < round + window as u64 {
            text.clear();
            text.extend_from_slice(format!("m{:010} ", sent_at.len()).as_bytes());
            text.resize(64, b'x');
            sent_at.push(Instant::now());
            all[0].conn.send(1, &text)?;
        }
        if round == sent_at.len() as u64 {
            break;
        }
        for r in all.iter_mut().filter(|r| r.alive && r.next <= round) {
            match read_measured(&mut r.conn) {
                Ok(seq) => {
                    let now = Instant::now();
                    let sent = sent_at.get(seq as usize).copied().unwrap_or(now);
                    let us = now.duration_since(sent).as_micros() as usize;
                    histogram[us.min(HISTOGRAM_US - 1)] += 1;
                    lost += seq.saturating_sub(r.next);
                    r.next = r.next.max(seq + 1);
                    deliveries += 1;
                    last_receipt = now;
                }
                Err(e) => {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        disconnected += 1;
                    }
                    r.alive = false;
                }
            }
        }
        round += 1;
    }
    let messages = sent_at.len() as u64;
    lost += all
        .iter()
        .map(|r| messages.saturating_sub(r.next))
        .sum::<u64>();
    let server_cpu = procfs::cpu_seconds(&target.pid) - server_cpu;
    let (voluntary, involuntary) = procfs::context_switches(&target.pid);
    let switches = (
        voluntary.saturating_sub(switches.0) as f64,
        involuntary.saturating_sub(switches.1) as f64,
    );
    let harness_cpu = procfs::cpu_seconds("self") - harness_cpu;
    let elapsed = last_receipt.duration_since(epoch).as_secs_f64();
    let per_delivery = |amount: f64| {
        if deliveries > 0 {
            amount / deliveries as f64
        } else {
            0.0
        }
    };
    Ok(Fanout {
        receivers,
        window,
        messages,
        deliveries,
        deliveries_per_s: if elapsed > 0.0 {
            deliveries as f64 / elapsed
        } else {
            0.0
        },
        p50_us: percentile(&histogram, deliveries, 0.50),
        p90_us: percentile(&histogram, deliveries, 0.90),
        p99_us: percentile(&histogram, deliveries, 0.99),
        max_us: histogram.iter().rposition(|&n| n > 0).unwrap_or(0) as f64,
        lost,
        disconnected,
        server_us_per_delivery: per_delivery(server_cpu * 1e6),
        harness_us_per_delivery: per_delivery(harness_cpu * 1e6),
        voluntary_per_delivery: per_delivery(switches.0),
        involuntary_per_delivery: per_delivery(switches.1),
    })
}

/// Get every receiver past its welcome and history: send a marker until each has seen it.
/// A server may subscribe a client only after its welcome; resending covers that gap, at a
/// pace gentle enough for a server with a short buffer.
fn sync(all: &mut [Receiver]) -> io::Result<()> {
    let marker = format!("sync-{}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(30);
    all[0].conn.send(1, marker.as_bytes())?;
    for i in 0..all.len() {
        all[i]
            .conn
            .stream
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        loop {
            match all[i].conn.read_frame() {
                Ok(frame) if wire::untag(frame.payload) == marker.as_bytes() => break,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "receivers did not get in sync within 30 s",
                ));
            }
            all[0].conn.send(1, marker.as_bytes())?;
        }
        all[i].conn.stream.set_read_timeout(Some(STALL))?;
    }
    Ok(())
}

/// Read until the next measured message (skipping any leftover sync) and return its number.
pub fn read_measured(conn: &mut Conn) -> io::Result<u64> {
    loop {
        let frame = conn.read_frame()?;
        if frame.opcode == 8 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed by the server",
            ));
        }
        let text = wire::untag(frame.payload);
        if text.first() == Some(&b'm') && text.len() >= 11 {
            let seq = std::str::from_utf8(&text[1..11])
                .ok()
                .and_then(|s| s.parse().ok());
            if let Some(seq) = seq {
                return Ok(seq);
            }
        }
    }
}

pub fn percentile(histogram: &[u64], count: u64, q: f64) -> f64 {
    let rank = ((count as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (us, n) in histogram.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return us as f64;
        }
    }
    0.0
}
