//! `cargo bench --bench relay`: our own load harness. Std threads and blocking sockets, like
//! the product; no criterion, no async runtime.
//!
//! By default it starts the release server pinned to CPU 0 with logging at warn and flood
//! control off (`--rate 0`: throughput runs measure the relay, not the limit), pins
//! itself to CPU 1, and runs every scenario but the soak. `-- --only soak --seconds S`
//! runs the soak alone, against a server with its default options.
//! `-- --url ws://HOST:PORT --pid PID --label NAME` measures any other server speaking the
//! protocol instead; `-- --quick` is the short run CI uses; `-- --chart` redraws
//! `docs/bench.svg` from the results collected so far.

mod fanout;
mod fleet;
mod pair;
mod procfs;
mod report;
mod scale;
mod soak;
mod storm;
mod tls;
mod wire;

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Load harness for broadcast-chat and servers speaking its protocol")]
struct Args {
    /// Measure the server at this URL instead of starting ours
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Process id of the server at --url, for its CPU time and memory
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Name for this server in the table and the results
    #[arg(long, value_name = "NAME")]
    label: Option<String>,
    /// A short run, to check that the harness works (CI runs this)
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios: fanout, pair, latency, connections, storm, churn, soak
    /// (the soak runs only when named)
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    only: Vec<String>,
    /// Receiver counts for the fan-out scenario [default: 1,10,100,1000; quick: 1,10,100]
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    receivers: Vec<usize>,
    /// Seconds each fan-out run lasts [default: 3; quick: 0.3], or the soak [default: 60]
    #[arg(long, value_name = "SECS")]
    seconds: Option<f64>,
    /// Concurrent clients in the connections and storm scenarios [default: 10000; quick:
    /// 500]
    #[arg(long, value_name = "N")]
    connections: Option<usize>,
    /// Redraw docs/bench.svg from target/bench/results.jsonl and exit
    #[arg(long)]
    chart: bool,
    /// Run the fleet scenario alone on the Redis at this URL (redis://HOST:PORT): a lone
    /// node against a node with Redis, and latency from a sender on one node to receivers
    /// on another. The harness starts the nodes and uses a stream key of its own, deleted
    /// afterwards; it never starts or stops Redis
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Run the TLS scenario alone: a plaintext server of our own and a TLS one (with a
    /// certificate made for the run), fan-out at each N and --connections idle clients
    /// [default: 10000; quick: 500] on each, side by side
    #[arg(long)]
    tls: bool,
    /// Passed by `cargo bench`; ignored
    #[arg(long, hide = true)]
    bench: bool,
}

/// The server under test.
pub struct Target {
    pub addr: SocketAddr,
    /// Its process id as /proc names it.
    pub pid: String,
    pub label: String,
    /// Speak TLS to it, trusting this.
    pub tls: Option<wire::Tls>,
}

/// Our release server, started for the run and stopped when dropped.
/// A server the harness started, and the file its log goes to.
struct OwnServer {
    child: Child,
    label: String,
    log: PathBuf,
}

/// The most warnings and errors repeated from a server's log when it is stopped.
const LOG_LINES_SHOWN: usize = 20;

impl Drop for OwnServer {
    /// Stop the server, then show what it warned about, which would otherwise stay unseen
    /// in its log file.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let troubles: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("[WARN]") || l.contains("[ERROR]"))
            .collect();
        if !troubles.is_empty() {
            eprintln!(
                "{}: {} warnings or errors in {}, the first {} of them:",
                self.label,
                troubles.len(),
                self.log.display(),
                troubles.len().min(LOG_LINES_SHOWN)
            );
            for line in troubles.iter().take(LOG_LINES_SHOWN) {
                eprintln!("  {line}");
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    if args.chart {
        match report::chart() {
            Ok(path) => println!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("relay: cannot draw the chart: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let soak_only = args.only == ["soak"];
    if !soak_only && args.only.iter().any(|o| o == "soak") {
        eprintln!("relay: run the soak alone (--only soak): it uses the server's default options");
        std::process::exit(2);
    }
    let pinned = pin_self();
    let seconds = args.seconds.unwrap_or(if args.quick { 0.3 } else { 3.0 });
    if let Some(url) = &args.redis {
        let mut out = report::Report::new("broadcast-chat", args.quick);
        fleet::run(url, pinned, Duration::from_secs_f64(seconds), &mut out);
        out.finish();
        return;
    }
    let sizes = match (&args.receivers[..], args.quick) {
        ([], true) => vec![1, 10, 100],
        ([], false) => vec![1, 10, 100, 1000],
        (list, _) => list.to_vec(),
    };
    let clients = args
        .connections
        .unwrap_or(if args.quick { 500 } else { 10_000 });
    if args.tls {
        let mut out = report::Report::new("broadcast-chat", args.quick);
        let run_for = Duration::from_secs_f64(seconds);
        tls::run(pinned, &sizes, run_for, clients, &mut out);
        out.finish();
        return;
    }
    let (target, _own) = match &args.url {
        Some(url) => (external(url, &args), None),
        None => {
            let options: &[&str] = if soak_only { &[] } else { &["--rate", "0"] };
            let (target, child) = start_own(pinned, options, "broadcast-chat");
            (target, Some(child))
        }
    };
    println!(
        "target: {} at ws://{} (pid {}), harness pinned: {pinned}",
        target.label, target.addr, target.pid
    );
    if args.url.is_none() {
        println!(
            "{}",
            if soak_only {
                "server options: the defaults (flood control on: --rate 10 --burst 50)"
            } else {
                "server options: --rate 0 (flood control off for throughput runs)"
            }
        );
    }
    let mut out = report::Report::new(&target.label, args.quick);
    let wants = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let run_for = Duration::from_secs_f64(seconds);
    if wants("fanout") {
        for &n in &sizes {
            match fanout::run(&target, n, 8, run_for) {
                Ok(result) => out.fanout("fanout", &result),
                Err(e) => out.failed(&format!("fanout N={n}"), &e),
            }
        }
    }
    if wants("pair") {
        match pair::run(&target, 8, run_for) {
            Ok(result) => out.fanout("pair", &result),
            Err(e) => out.failed("pair", &e),
        }
    }
    if wants("latency") {
        let n = if args.quick { 10 } else { 100 };
        match fanout::run(&target, n, 1, run_for) {
            Ok(result) => out.fanout("latency", &result),
            Err(e) => out.failed("latency", &e),
        }
    }
    if wants("connections") {
        match scale::connections(&target, clients, 4) {
            Ok(result) => out.connections("connections", &result),
            Err(e) => out.failed("connections", &e),
        }
    }
    if wants("storm") {
        match storm::run(&target, clients) {
            Ok(result) => out.storm(&result),
            Err(e) => out.failed("storm", &e),
        }
    }
    if wants("churn") {
        let seconds = if args.quick { 0.5 } else { 3.0 };
        out.churn(&scale::churn(&target, Duration::from_secs_f64(seconds), 8));
    }
    if args.only.iter().any(|o| o == "soak") {
        let seconds = args.seconds.unwrap_or(60.0);
        match soak::run(&target, Duration::from_secs_f64(seconds)) {
            Ok(result) => out.soak(&result),
            Err(e) => out.failed("soak", &e),
        }
    }
    out.finish();
}

/// Pin this process to CPU 1 when the machine has a second CPU for the server.
fn pin_self() -> bool {
    if thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return false;
    }
    let pid = std::process::id().to_string();
    Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &pid])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn external(url: &str, args: &Args) -> Target {
    let hostport = url.trim_start_matches("ws://").trim_end_matches('/');
    let addr = hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve {url}; expected ws://HOST:PORT"));
    Target {
        addr,
        pid: args.pid.map_or_else(|| "0".to_string(), |p| p.to_string()),
        label: args.label.clone().unwrap_or_else(|| url.to_string()),
        tls: None,
    }
}

/// Start the release server on a free port with `options`, pinned to CPU 0 when we are
/// pinned to CPU 1. It logs at its default level, as users run it, to
/// `target/bench/LABEL.log` rather than to the terminal, which is not what is measured.
fn start_own(pinned: bool, options: &[&str], label: &str) -> (Target, OwnServer) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = env!("CARGO_BIN_EXE_server");
    let bind = addr.to_string();
    let mut server_args = vec!["--bind", bind.as_str()];
    server_args.extend(options);
    let mut command = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", server]).args(&server_args);
        c
    } else {
        let mut c = Command::new(server);
        c.args(&server_args);
        c
    };
    let log = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench")
        .join(format!("{}.log", label.replace(' ', "-")));
    let stderr = fs::create_dir_all(log.parent().expect("a parent"))
        .and_then(|()| File::create(&log))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let child = command
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the server");
    let pid = child.id().to_string();
    println!("{label}: logging to {}", log.display());
    let own = OwnServer {
        child,
        label: label.to_string(),
        log: log.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the server did not start listening; see {}",
            log.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    (
        Target {
            addr,
            pid,
            label: label.to_string(),
            tls: None,
        },
        own,
    )
}
