//! One-to-one, reacting (`--only pair`): one sender and one receiver, at most W messages in
//! flight, measured as an event-driven generator does. A thread reads each connection and
//! reports every message the moment it arrives; the sender sends the next as soon as the
//! window opens. The fan-out scenario at N=1 instead reads its connections in turn, which
//! lets messages bunch up; this one checks that figure from another angle.

use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::Target;
use crate::fanout::{Fanout, percentile, read_measured};
use crate::procfs;
use crate::wire::{self, Conn};

const HISTOGRAM_US: usize = 1_000_000;
const STALL: Duration = Duration::from_secs(3);

pub fn run(target: &Target, window: usize, duration: Duration) -> io::Result<Fanout> {
    let mut conns = [
        Conn::open(target.addr, STALL, None)?,
        Conn::open(target.addr, STALL, None)?,
    ];
    // Past the history: both have seen a marker sent after they joined.
    let marker = format!("pair-{}", std::process::id());
    conns[0].send(1, marker.as_bytes())?;
    for conn in &mut conns {
        while wire::untag(conn.read_frame()?.payload) != marker.as_bytes() {}
    }
    let sender = Arc::clone(&conns[0].stream);
    let streams: Vec<_> = conns.iter().map(|c| Arc::clone(&c.stream)).collect();
    let (tx, arrivals) = crossbeam_channel::unbounded();
    let readers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let tx = tx.clone();
            thread::spawn(move || {
                while let Ok(seq) = read_measured(&mut conn) {
                    if tx.send((i, seq, Instant::now())).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);

    let epoch = Instant::now();
    let server_cpu = procfs::cpu_seconds(&target.pid);
    let switches = procfs::context_switches(&target.pid);
    let harness_cpu = procfs::cpu_seconds("self");
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut heard = [0u64; 2];
    let mut histogram = vec![0u64; HISTOGRAM_US];
    let (mut deliveries, mut lost) = (0u64, 0u64);
    let mut text = Vec::with_capacity(64);
    let mut stalled = false;
    while epoch.elapsed() < duration {
        let slowest = heard[0].min(heard[1]);
        while (sent_at.len() as u64) < slowest + window as u64 {
            text.clear();
            text.extend_from_slice(format!("m{:010} ", sent_at.len()).as_bytes());
            text.resize(64, b'x');
            sent_at.push(Instant::now());
            wire::send_frame(&sender, 1, &text)?;
        }
        let Ok((i, seq, at)) = arrivals.recv_timeout(STALL) else {
            stalled = true;
            break;
        };
        let sent = sent_at.get(seq as usize).copied().unwrap_or(at);
        let us = at.duration_since(sent).as_micros() as usize;
        histogram[us.min(HISTOGRAM_US - 1)] += 1;
        lost += seq.saturating_sub(heard[i]);
        heard[i] = heard[i].max(seq + 1);
        deliveries += 1;
    }
    let elapsed = epoch.elapsed().as_secs_f64();
    let server_cpu = procfs::cpu_seconds(&target.pid) - server_cpu;
    let (voluntary, involuntary) = procfs::context_switches(&target.pid);
    let harness_cpu = procfs::cpu_seconds("self") - harness_cpu;
    for stream in streams {
        let _ = stream.shutdown(Shutdown::Both);
    }
    for reader in readers {
        let _ = reader.join();
    }
    if stalled {
        // A closed or stalled connection is a failure, not a slow run.
        return Err(io::Error::other(format!(
            "no message for {STALL:?}: a connection closed or stalled"
        )));
    }
    let per_delivery = |amount: f64| amount / deliveries.max(1) as f64;
    Ok(Fanout {
        receivers: 1,
        window,
        messages: sent_at.len() as u64,
        deliveries,
        deliveries_per_s: deliveries as f64 / elapsed,
        p50_us: percentile(&histogram, deliveries, 0.50),
        p90_us: percentile(&histogram, deliveries, 0.90),
        p99_us: percentile(&histogram, deliveries, 0.99),
        max_us: histogram.iter().rposition(|&n| n > 0).unwrap_or(0) as f64,
        lost,
        disconnected: 0,
        server_us_per_delivery: per_delivery(server_cpu * 1e6),
        harness_us_per_delivery: per_delivery(harness_cpu * 1e6),
        voluntary_per_delivery: per_delivery(voluntary.saturating_sub(switches.0) as f64),
        involuntary_per_delivery: per_delivery(involuntary.saturating_sub(switches.1) as f64),
    })
}
