//! What /proc says about a process (CPU time, memory) and about the machine.

use std::net::UdpSocket;

use relay_tests::procfs::Proc;
pub(crate) use relay_tests::procfs::machine_busy_seconds;
use serde_json::{Value, json};

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
    let Ok(process) = pid.parse::<Proc>() else {
        return Usage::default();
    };
    Usage {
        cpu_seconds: process.try_cpu_seconds().unwrap_or(0.0),
        rss: process.try_status_kib("VmRSS").unwrap_or(0) * 1024,
        peak_rss: process.try_status_kib("VmHWM").unwrap_or(0) * 1024,
    }
}

/// Resets the process's peak RSS (VmHWM) to its current RSS ([`Proc::reset_peak`]). Returns
/// whether it worked.
pub(crate) fn reset_peak(pid: &str) -> bool {
    pid.parse::<Proc>().is_ok_and(|p| p.reset_peak())
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
