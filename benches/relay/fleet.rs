//! The fleet scenario (`--redis URL`): what the Redis backplane costs.
//!
//! On the Redis the user names (the harness never starts or stops one), it starts three
//! release servers of its own: a lone node, and nodes A and B sharing a stream key unique
//! to this run (deleted at the end), B only once the fan-out runs are done. It measures,
//! side by side:
//! - fan-out at N=100 through the lone node and through A, with 8 messages in flight (as
//!   everywhere else) and with 64, where the extra hops through Redis are not what limits a
//!   closed loop; each in [`ROUNDS`] rounds of a lone run and a Redis run (each first in
//!   turn), and the ratio of their sums, since two runs of three seconds on this shared
//!   machine can differ by a tenth or more;
//! - latency (W=1) from a sender on the lone node to receivers there, and from a sender on
//!   A to receivers on B;
//! - Redis's own CPU time over the run (`INFO cpu`) and the stream's memory (`MEMORY USAGE`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::report::Report;
use crate::{Target, fanout, start_own};

const RECEIVERS: usize = 100;
const ROUNDS: usize = 2;
const LATENCY_RECEIVERS: usize = 10;

pub fn run(url: &str, pinned: bool, duration: Duration, out: &mut Report) {
    let mut redis = match redis::Client::open(url).and_then(|c| c.get_connection()) {
        Ok(con) => con,
        Err(e) => {
            eprintln!("relay: cannot reach Redis at {url}: {e}");
            std::process::exit(1);
        }
    };
    let key = format!("broadcast-chat-bench-{}", std::process::id());
    let fleet = ["--rate", "0", "--redis", url, "--redis-key", &key];
    let (lone, lone_process) = start_own(pinned, &["--rate", "0"], "lone node");
    let (a, a_process) = start_own(pinned, &fleet, "node A");
    healthy_or_exit(&a);
    println!(
        "fleet on {url}, stream {key}: lone node pid {}, node A pid {}; \
         server options --rate 0 (flood control off)",
        lone.pid, a.pid
    );
    let cpu_before = redis_cpu(&mut redis);
    for window in [8, 64] {
        compare(&lone, &a, window, duration, out);
    }
    // Only now: the fan-out is through one node, and on this machine node B would share
    // node A's core, its reader parsing every entry too.
    let (b, b_process) = start_own(pinned, &fleet, "node B");
    healthy_or_exit(&b);
    println!("node B pid {}", b.pid);
    let runs: [(&str, SocketAddr, &Target, usize, usize); 2] = [
        ("lone-lat", lone.addr, &lone, LATENCY_RECEIVERS, 1),
        ("a-to-b", a.addr, &b, LATENCY_RECEIVERS, 1),
    ];
    for (name, sender, target, receivers, window) in runs {
        match fanout::between(sender, target, receivers, window, duration) {
            Ok(result) => out.fanout(name, &result),
            Err(e) => out.failed(name, &e),
        }
    }
    let cpu = redis_cpu(&mut redis) - cpu_before;
    // Stopped before the stream is deleted, which they would rightly report as data loss.
    drop((lone_process, a_process, b_process));
    let memory: redis::RedisResult<Option<u64>> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&key)
        .query(&mut redis);
    let length: redis::RedisResult<u64> = redis::cmd("XLEN").arg(&key).query(&mut redis);
    println!(
        "redis    CPU {cpu:.2} s over the fan-out and latency runs and node B's start; \
         stream {key}: {} entries, {} bytes",
        length.map_or_else(|e| e.to_string(), |n| n.to_string()),
        memory.map_or_else(|e| e.to_string(), |m| m.unwrap_or(0).to_string()),
    );
    if let Err(e) = redis::cmd("DEL").arg(&key).exec(&mut redis) {
        eprintln!("relay: could not delete the stream {key}: {e}");
    }
}

/// Fan-out through the lone node and through node A with `window` messages in flight, in
/// [`ROUNDS`] rounds of a run on each, and the ratio of their sums and of each round.
fn compare(lone: &Target, a: &Target, window: usize, duration: Duration, out: &mut Report) {
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let mut rate = |name, node| match fanout::run(node, RECEIVERS, window, duration) {
            Ok(result) => {
                out.fanout(name, &result);
                Some(result.deliveries_per_s)
            }
            Err(e) => {
                out.failed(name, &e);
                None
            }
        };
        // The lone node first in even rounds, the Redis one in odd rounds: a machine that
        // speeds up or slows down over the run favours neither.
        let pair = if round % 2 == 0 {
            rate("lone", lone).zip(rate("redis", a))
        } else {
            let redis = rate("redis", a);
            rate("lone", lone).zip(redis)
        };
        rounds.push(pair);
    }
    let label = format!("ratio    N={RECEIVERS}   W={window:<3} through Redis / lone:");
    let Some(rounds) = rounds.into_iter().collect::<Option<Vec<(f64, f64)>>>() else {
        println!("{label} none, a run failed");
        return;
    };
    let (lone_sum, redis_sum) = rounds
        .iter()
        .fold((0.0, 0.0), |(l, r), (lone, redis)| (l + lone, r + redis));
    let each: Vec<String> = rounds
        .iter()
        .map(|(lone, redis)| format!("{:.2}×", redis / lone))
        .collect();
    println!(
        "{label} {:.2}× over {ROUNDS} rounds (each: {})",
        redis_sum / lone_sum,
        each.join(", ")
    );
}

/// Redis's CPU seconds so far, user and system, from `INFO cpu`.
fn redis_cpu(redis: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query(redis)
        .unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

fn healthy_or_exit(node: &Target) {
    if let Err(e) = healthy(node.addr) {
        eprintln!("relay: {} never became healthy: {e}", node.label);
        std::process::exit(1);
    }
}

/// Wait until the node's `/healthz` says 200: it has reached Redis.
fn healthy(addr: SocketAddr) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        if answer.starts_with("HTTP/1.1 200") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other(answer));
        }
        thread::sleep(Duration::from_millis(50));
    }
}
