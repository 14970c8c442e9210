//! What /proc says about a process: CPU time, resident memory, threads.

use std::collections::HashMap;
use std::fs;
use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second, the unit of utime and stime.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User plus system CPU seconds used so far by `pid` ("self" for this process), threads
/// that have ended included.
pub fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / clock_ticks()
}

fn status_field(pid: &str, name: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Of the groups of at least 100 anonymous read-write mappings of one size, the one with
/// the most resident memory (a thread-per-client server's stacks; their signal stacks,
/// never touched, come next): how many, their size, and the resident KiB most of them
/// have, with how many have that. `None` without such a group (an event-driven server).
/// A stack that touches one page more costs every idle client 4 KiB: this is where a
/// deeper call under the blocking read shows first.
pub fn stack_residency(pid: &str) -> Option<StackResidency> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut by_size: HashMap<u64, HashMap<u64, u64>> = HashMap::new();
    let mut current: Option<u64> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let anonymous_rw = fields.next() == Some("rw-p") && fields.nth(3).is_none();
            current = anonymous_rw.then_some((end - start) / 1024);
        } else if first == "Rss:"
            && let Some(size) = current.take()
        {
            let rss = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_size.entry(size).or_default().entry(rss).or_default() += 1;
        }
    }
    let (size, rss) = by_size
        .into_iter()
        .filter(|(_, rss)| rss.values().sum::<u64>() >= 100)
        .max_by_key(|(_, rss)| rss.iter().map(|(kib, n)| kib * n).sum::<u64>())?;
    let count = rss.values().sum();
    let (most_rss, most) = rss.into_iter().max_by_key(|&(_, n)| n)?;
    Some(StackResidency {
        count,
        size_kib: size,
        rss_kib: most_rss,
        with_that: most,
    })
}

/// See [`stack_residency`].
#[derive(Debug, Clone, Copy)]
pub struct StackResidency {
    pub count: u64,
    pub size_kib: u64,
    pub rss_kib: u64,
    pub with_that: u64,
}

/// Resident memory in KiB.
pub fn rss_kib(pid: &str) -> u64 {
    status_field(pid, "VmRSS:")
}

pub fn threads(pid: &str) -> u64 {
    status_field(pid, "Threads:")
}

/// Open file descriptors, or `None` when /proc cannot tell (no such process, or not ours).
pub fn fds(pid: &str) -> Option<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Voluntary and involuntary context switches so far, summed over the threads `pid` has
/// now (threads that have ended are not counted).
pub fn context_switches(pid: &str) -> (u64, u64) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    tasks.filter_map(Result::ok).fold((0, 0), |(v, i), task| {
        let tid = format!("{pid}/task/{}", task.file_name().to_string_lossy());
        (
            v + status_field(&tid, "voluntary_ctxt_switches:"),
            i + status_field(&tid, "nonvoluntary_ctxt_switches:"),
        )
    })
}
