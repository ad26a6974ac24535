//! What /proc says about a process (CPU time, memory) and about the machine.

use std::net::UdpSocket;

use serde_json::{Value, json};

/// Clock ticks per second of /proc/PID/stat's CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// A process's CPU time and memory at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// User + system CPU seconds since the process started (all threads).
    pub(crate) cpu_seconds: f64,
    /// Resident set size now, bytes (VmRSS).
    pub(crate) rss: u64,
    /// Peak resident set size, bytes (VmHWM), since start or the last [`reset_peak`].
    pub(crate) peak_rss: u64,
}

/// The usage of process `pid` (`"self"` works too); zeros when it is gone.
pub(crate) fn usage(pid: &str) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        cpu_seconds: ticks / TICKS_PER_SECOND,
        rss: kib("VmRSS:") * 1024,
        peak_rss: kib("VmHWM:") * 1024,
    }
}

/// CPU seconds the whole machine spent in user and system mode so far (all cores; the first
/// line of /proc/stat).
pub(crate) fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: f64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks / TICKS_PER_SECOND
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (`5` into /proc/PID/clear_refs,
/// Linux ≥ 4.0; needs the right to write there). Returns whether it worked.
pub(crate) fn reset_peak(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The machine the figures were measured on.
pub(crate) fn machine(rcvbuf: usize) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).ok();
    let number = |p: &str| read(p).and_then(|s| s.parse::<u64>().ok());
    let cpu_model = read("/proc/cpuinfo").and_then(|info| {
        info.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    // What the kernel grants a plain SO_RCVBUF request (Linux reports twice the usable size).
    let granted = UdpSocket::bind("127.0.0.1:0").ok().and_then(|s| {
        let sock = socket2::SockRef::from(&s);
        sock.set_recv_buffer_size(rcvbuf).ok()?;
        Some(sock.recv_buffer_size().ok()? / 2)
    });
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": cpu_model,
        "kernel": read("/proc/sys/kernel/osrelease"),
        "rmem_max": number("/proc/sys/net/core/rmem_max"),
        "wmem_max": number("/proc/sys/net/core/wmem_max"),
        "rmem_default": number("/proc/sys/net/core/rmem_default"),
        "so_rcvbuf_requested": rcvbuf,
        "so_rcvbuf_granted": granted,
    })
}

/// Bytes as MiB with one decimal.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1 << 20))
}
