//! Scale: many concurrent clients (memory and threads per connection, connect rate, one
//! broadcast reaching all), and churn (connect, speak, hear, close, again).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::Target;
use crate::procfs;
use crate::wire::{self, Conn};

#[derive(Debug, Clone, Default)]
pub struct Connections {
    pub requested: usize,
    pub connected: usize,
    pub connects_per_s: f64,
    pub rss_kib_per_connection: f64,
    pub server_threads: u64,
    pub stacks: Option<procfs::StackResidency>,
    pub broadcast_ms: f64,
    pub reached: usize,
}

/// Open `count` clients with a few threads (never one per socket), then measure.
pub fn connections(target: &Target, count: usize, threads: usize) -> io::Result<Connections> {
    let rss_before = procfs::rss_kib(&target.pid);
    let started = Instant::now();
    let per_thread = count.div_ceil(threads);
    let groups: Vec<Vec<Conn>> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let n = per_thread.min(count.saturating_sub(t * per_thread));
                s.spawn(move || open_many(target, n))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("connector"))
            .collect()
    });
    let connect_s = started.elapsed().as_secs_f64();
    let connected: usize = groups.iter().map(Vec::len).sum();
    let rss_after = procfs::rss_kib(&target.pid);
    let server_threads = procfs::threads(&target.pid);
    let stacks = procfs::stack_residency(&target.pid);

    let (reached, last) = reach_all(groups)?;
    Ok(Connections {
        requested: count,
        connected,
        connects_per_s: connected as f64 / connect_s,
        rss_kib_per_connection: rss_after.saturating_sub(rss_before) as f64
            / connected.max(1) as f64,
        server_threads,
        stacks,
        broadcast_ms: last.as_secs_f64() * 1e3,
        reached,
    })
}

/// Send one broadcast from one of `groups` and read it on every connection, a thread per
/// group: how many it reached, and when the last one had it.
pub fn reach_all(mut groups: Vec<Vec<Conn>>) -> io::Result<(usize, Duration)> {
    let marker = format!("all-{}", std::process::id());
    let Some(sender) = groups.iter_mut().flatten().next() else {
        return Err(io::Error::other("no client could connect"));
    };
    let sent = Instant::now();
    sender.send(1, marker.as_bytes())?;
    let results: Vec<(usize, Duration, Vec<Conn>)> = thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|mut group| {
                let marker = marker.as_bytes();
                s.spawn(move || {
                    let mut reached = 0;
                    let mut last = Duration::ZERO;
                    // Newest first: servers write in join order, so by the time the newest
                    // has it most others do too, and the reading does not walk in lockstep
                    // behind the server's writes, paying a wake-up per socket.
                    for conn in group.iter_mut().rev() {
                        if skip_until(conn, marker).is_ok() {
                            reached += 1;
                            last = sent.elapsed();
                        }
                    }
                    // Closing is left until after the clock stops: each close costs the
                    // harness the server's side of the TCP teardown on loopback.
                    (reached, last, group)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader"))
            .collect()
    });
    let reached = results.iter().map(|r| r.0).sum();
    let last = results.iter().map(|r| r.1).max().unwrap_or_default();
    Ok((reached, last))
}

fn open_many(target: &Target, n: usize) -> Vec<Conn> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        match Conn::open(target.addr, Duration::from_secs(10), target.tls.as_ref()) {
            Ok(conn) => conns.push(conn),
            Err(e) => {
                eprintln!("connect failed after {} clients: {e}", conns.len());
                break;
            }
        }
    }
    conns
}

/// Read until the text `marker`; reads give up after the 10 s `Conn::open` set.
fn skip_until(conn: &mut Conn, marker: &[u8]) -> io::Result<()> {
    loop {
        let frame = conn.read_frame()?;
        if wire::untag(frame.payload) == marker {
            return Ok(());
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Churn {
    pub cycles: u64,
    pub cycles_per_s: f64,
    pub failures: u64,
}

/// For `duration`, `concurrency` loops each connect, send one message, wait for its
/// broadcast, and close with the close handshake.
pub fn churn(target: &Target, duration: Duration, concurrency: usize) -> Churn {
    let cycles = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let started = Instant::now();
    let stop = started + duration;
    thread::scope(|s| {
        for t in 0..concurrency {
            let (cycles, failures) = (&cycles, &failures);
            s.spawn(move || {
                let mut i = 0u64;
                while Instant::now() < stop {
                    i += 1;
                    match cycle(target, &format!("c{t}-{i}")) {
                        Ok(()) => cycles.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cycles = cycles.into_inner();
    Churn {
        cycles,
        cycles_per_s: cycles as f64 / elapsed,
        failures: failures.into_inner(),
    }
}

/// Connect, send `text`, wait for its broadcast, close with the close handshake.
pub fn cycle(target: &Target, text: &str) -> io::Result<()> {
    let mut conn = Conn::open(target.addr, Duration::from_secs(10), target.tls.as_ref())?;
    conn.send(1, text.as_bytes())?;
    skip_until(&mut conn, text.as_bytes())?;
    conn.close()
}
