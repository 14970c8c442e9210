//! What /proc says about a process: CPU time, resident memory, threads.

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
