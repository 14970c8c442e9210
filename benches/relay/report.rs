//! Results: a table on stdout, JSON lines under target/bench/, and the SVG chart in docs/.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::fanout::Fanout;
use crate::scale::{Churn, Connections};
use crate::soak::Soak;
use crate::storm::Storm;

pub struct Report {
    run: u64,
    label: String,
    quick: bool,
    lines: Vec<String>,
    /// Scenarios that failed: any makes the run fail.
    failures: usize,
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn results_path() -> PathBuf {
    target_dir().join("bench").join("results.jsonl")
}

impl Report {
    pub fn new(label: &str, quick: bool) -> Report {
        let run = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let label = label.replace(['"', ',', ':', '\\'], "_");
        Report {
            run,
            label,
            quick,
            lines: Vec::new(),
            failures: 0,
        }
    }

    fn record(&mut self, scenario: &str, fields: &[(&str, f64)]) {
        let mut line = format!(
            "{{\"run\":{},\"label\":\"{}\",\"quick\":{},\"scenario\":\"{scenario}\"",
            self.run, self.label, self.quick
        );
        for (key, value) in fields {
            let _ = write!(line, ",\"{key}\":{value:.3}");
        }
        line.push('}');
        self.lines.push(line);
    }

    pub fn fanout(&mut self, scenario: &str, r: &Fanout) {
        println!(
            "{scenario:<8} N={:<5} W={} {:>10.0} deliveries/s  latency µs p50 {:>6.0} p90 {:>6.0} \
             p99 {:>6.0} max {:>6.0}  lost {} disconnected {}  CPU µs/delivery server {:.2} harness {:.2}  \
             server switches/delivery {:.2} voluntary {:.2} involuntary  ({} messages)",
            r.receivers,
            r.window,
            r.deliveries_per_s,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.max_us,
            r.lost,
            r.disconnected,
            r.server_us_per_delivery,
            r.harness_us_per_delivery,
            r.voluntary_per_delivery,
            r.involuntary_per_delivery,
            r.messages
        );
        self.record(
            scenario,
            &[
                ("n", r.receivers as f64),
                ("w", r.window as f64),
                ("messages", r.messages as f64),
                ("deliveries", r.deliveries as f64),
                ("deliveries_per_s", r.deliveries_per_s),
                ("p50_us", r.p50_us),
                ("p90_us", r.p90_us),
                ("p99_us", r.p99_us),
                ("max_us", r.max_us),
                ("lost", r.lost as f64),
                ("disconnected", r.disconnected as f64),
                ("server_us_per_delivery", r.server_us_per_delivery),
                ("harness_us_per_delivery", r.harness_us_per_delivery),
                ("voluntary_per_delivery", r.voluntary_per_delivery),
                ("involuntary_per_delivery", r.involuntary_per_delivery),
            ],
        );
    }

    pub fn connections(&mut self, scenario: &str, r: &Connections) {
        println!(
            "{scenario} {} of {} connected  {:.0} connects/s  server {:.1} KiB RSS per connection, \
             {} threads  one broadcast reached {} in {:.1} ms",
            r.connected,
            r.requested,
            r.connects_per_s,
            r.rss_kib_per_connection,
            r.server_threads,
            r.reached,
            r.broadcast_ms
        );
        if let Some(s) = r.stacks {
            println!(
                "{scenario} same-size mappings (thread stacks, with a thread per client): {} of \
                 {} KiB, {} of them with {} KiB resident",
                s.count, s.size_kib, s.with_that, s.rss_kib
            );
        }
        let mut fields = vec![
            ("requested", r.requested as f64),
            ("connected", r.connected as f64),
            ("connects_per_s", r.connects_per_s),
            ("rss_kib_per_connection", r.rss_kib_per_connection),
            ("server_threads", r.server_threads as f64),
            ("reached", r.reached as f64),
            ("broadcast_ms", r.broadcast_ms),
        ];
        if let Some(s) = r.stacks {
            fields.extend([
                ("stacks", s.count as f64),
                ("stack_kib", s.size_kib as f64),
                ("stack_rss_kib", s.rss_kib as f64),
                ("stacks_with_that_rss", s.with_that as f64),
            ]);
        }
        self.record(scenario, &fields);
    }

    pub fn storm(&mut self, r: &Storm) {
        println!(
            "storm    {} clients, {} in flight: {:.0} connects/s; all dropped at once, {} back \
             in {:.2} s ({:.0}/s); {} failed; one broadcast then reached {}; server CPU µs per \
             connection {:.1}, per reconnection {:.1}",
            r.clients,
            crate::storm::IN_FLIGHT,
            r.connects_per_s,
            r.reconnected,
            r.reconnect_s,
            r.reconnects_per_s,
            r.failed,
            r.reached,
            r.server_us_per_connect,
            r.server_us_per_reconnect
        );
        self.record(
            "storm",
            &[
                ("clients", r.clients as f64),
                ("connects_per_s", r.connects_per_s),
                ("reconnected", r.reconnected as f64),
                ("reconnect_s", r.reconnect_s),
                ("reconnects_per_s", r.reconnects_per_s),
                ("failed", r.failed as f64),
                ("server_us_per_connect", r.server_us_per_connect),
                ("server_us_per_reconnect", r.server_us_per_reconnect),
                ("reached", r.reached as f64),
            ],
        );
    }

    pub fn churn(&mut self, r: &Churn) {
        println!(
            "churn    {:.0} cycles/s ({} cycles, {} failures)",
            r.cycles_per_s, r.cycles, r.failures
        );
        self.record(
            "churn",
            &[
                ("cycles", r.cycles as f64),
                ("cycles_per_s", r.cycles_per_s),
                ("failures", r.failures as f64),
            ],
        );
    }

    pub fn soak(&mut self, r: &Soak) {
        println!("soak     server resources over the run (RSS KiB, descriptors, threads):");
        for s in r.samples.iter().chain(std::iter::once(&r.end)) {
            println!(
                "         {:>7.0} s  {:>8} KiB  {:>6} fds  {:>6} threads",
                s.seconds, s.rss_kib, s.fds, s.threads
            );
        }
        let start = r.samples.first().copied().unwrap_or_default();
        println!(
            "         start {} KiB, {} fds, {} threads; end (load gone) {} KiB, {} fds, {} threads",
            start.rss_kib, start.fds, start.threads, r.end.rss_kib, r.end.fds, r.end.threads
        );
        println!(
            "         room: {} chat messages, {} deliveries, {} lost, {} receivers dropped",
            r.chat_messages, r.deliveries, r.lost, r.dropped_receivers
        );
        println!(
            "         churn {} cycles ({} failed); {} aborted handshakes; {} idle connections; \
             {} non-readers; flooder: {} frames over {} connections",
            r.churn_cycles,
            r.churn_failures,
            r.aborted,
            r.idle_opened,
            r.non_readers,
            r.flood_frames,
            r.flood_connections
        );
        let peak = |f: fn(&crate::soak::Sample) -> u64| r.samples.iter().map(f).max().unwrap_or(0);
        self.record(
            "soak",
            &[
                ("seconds", r.samples.last().map_or(0.0, |s| s.seconds)),
                ("rss_kib_start", start.rss_kib as f64),
                ("rss_kib_peak", peak(|s| s.rss_kib) as f64),
                ("rss_kib_end", r.end.rss_kib as f64),
                ("fds_start", start.fds as f64),
                ("fds_peak", peak(|s| s.fds) as f64),
                ("fds_end", r.end.fds as f64),
                ("threads_start", start.threads as f64),
                ("threads_peak", peak(|s| s.threads) as f64),
                ("threads_end", r.end.threads as f64),
                ("lost", r.lost as f64),
                ("dropped_receivers", r.dropped_receivers as f64),
                ("churn_cycles", r.churn_cycles as f64),
            ],
        );
    }

    pub fn failed(&mut self, scenario: &str, error: &io::Error) {
        println!("{scenario}: failed: {error}");
        self.failures += 1;
        self.record(&format!("{scenario} failed"), &[]);
    }

    /// Append the results to target/bench/results.jsonl.
    pub fn finish(self) {
        let path = results_path();
        let written = fs::create_dir_all(path.parent().expect("a parent")).and_then(|()| {
            let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
            self.lines
                .iter()
                .try_for_each(|line| writeln!(file, "{line}"))
        });
        match written {
            Ok(()) => println!("results appended to {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }
        // A scenario that failed fails the run, so that CI notices a harness that rots.
        if self.failures > 0 {
            eprintln!("relay: {} scenario(s) failed", self.failures);
            std::process::exit(1);
        }
    }
}

/// One parsed result line: string and number fields.
type Record = BTreeMap<String, String>;

fn parse(line: &str) -> Record {
    line.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .filter_map(|pair| pair.split_once(':'))
        .map(|(k, v)| {
            (
                k.trim_matches('"').to_string(),
                v.trim_matches('"').to_string(),
            )
        })
        .collect()
}

fn number(record: &Record, key: &str) -> f64 {
    record.get(key).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// Draw deliveries/s and server CPU µs per delivery against N, one bar per server, from
/// each server's latest full run.
pub fn chart() -> io::Result<PathBuf> {
    let text = fs::read_to_string(results_path())?;
    let records: Vec<Record> = text
        .lines()
        .map(parse)
        .filter(|r| r.get("quick").map(String::as_str) == Some("false"))
        .collect();
    // Each server's latest full fan-out run: one with every receiver count the chart shows.
    let fanout = |r: &&Record| r.get("scenario").map(String::as_str) == Some("fanout");
    let mut runs: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in records.iter().filter(fanout) {
        runs.entry((r["label"].clone(), r["run"].clone()))
            .or_default()
            .push(number(r, "n"));
    }
    let mut latest: BTreeMap<String, String> = BTreeMap::new();
    for ((label, run), sizes) in runs {
        if [1.0, 10.0, 100.0, 1000.0].iter().all(|n| sizes.contains(n)) {
            let newer = latest
                .get(&label)
                .is_none_or(|known| run.parse().unwrap_or(0.0) >= known.parse().unwrap_or(0.0));
            if newer {
                latest.insert(label, run);
            }
        }
    }
    let series: Vec<(String, Vec<&Record>)> = latest
        .iter()
        .map(|(label, run)| {
            let rows = records
                .iter()
                .filter(|r| &r["label"] == label && &r["run"] == run && r["scenario"] == "fanout")
                .collect();
            (label.clone(), rows)
        })
        .collect();
    let svg = render(&series);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join("bench.svg");
    fs::create_dir_all(path.parent().expect("a parent"))?;
    fs::write(&path, svg)?;
    Ok(path)
}

const COLORS: [&str; 4] = ["#1f5fa8", "#d9822b", "#3a9a4a", "#8e44ad"];

fn render(series: &[(String, Vec<&Record>)]) -> String {
    let sizes = [1.0, 10.0, 100.0, 1000.0];
    let (width, height) = (960.0, 400.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    );
    let panels = [
        (
            "deliveries per second (higher is better)",
            "deliveries_per_s",
            30.0,
        ),
        (
            "server CPU µs per delivery (lower is better)",
            "server_us_per_delivery",
            500.0,
        ),
    ];
    for (title, key, left) in panels {
        let value = |rows: &Vec<&Record>, n: f64| {
            rows.iter()
                .find(|r| number(r, "n") == n)
                .map(|r| number(r, key))
                .unwrap_or(0.0)
        };
        let max = series
            .iter()
            .flat_map(|(_, rows)| sizes.map(|n| value(rows, n)))
            .fold(0.0, f64::max)
            .max(1e-9);
        let (top, bottom, panel_width) = (50.0, 330.0, 430.0);
        let _ = writeln!(
            svg,
            "<text x=\"{left}\" y=\"30\" font-size=\"14\" font-weight=\"bold\">{title}</text>"
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"#444\"/>",
            left + panel_width
        );
        let group = panel_width / sizes.len() as f64;
        let bar = (group - 20.0) / series.len().max(1) as f64;
        for (g, &n) in sizes.iter().enumerate() {
            let x0 = left + g as f64 * group + 10.0;
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">N = {n}</text>",
                x0 + (group - 20.0) / 2.0,
                bottom + 18.0
            );
            for (s, (_, rows)) in series.iter().enumerate() {
                let v = value(rows, n);
                let h = (bottom - top) * v / max;
                let x = x0 + s as f64 * bar;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>",
                    bottom - h,
                    bar - 2.0,
                    COLORS[s % COLORS.len()]
                );
                let shown = if v >= 1000.0 {
                    format!("{:.0}k", v / 1000.0)
                } else {
                    format!("{v:.2}")
                };
                let _ = writeln!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{shown}</text>",
                    x + bar / 2.0 - 1.0,
                    bottom - h - 3.0
                );
            }
        }
    }
    for (s, (label, _)) in series.iter().enumerate() {
        let x = 30.0 + s as f64 * 220.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"368\" width=\"14\" height=\"14\" fill=\"{}\"/>",
            COLORS[s % COLORS.len()]
        );
        let _ = writeln!(svg, "<text x=\"{}\" y=\"380\">{label}</text>", x + 20.0);
    }
    svg.push_str("</svg>\n");
    svg
}
