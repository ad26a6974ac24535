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

/// The machine's cores split in two: one for the process measured, the rest for the load that
/// drives it, so that the measured process's CPU time is not inflated by being preempted by,
/// and sharing caches with, its own load generator (as it would not be on a machine of its
/// own).
#[derive(Debug)]
pub(crate) struct Cores {
    /// The measured process's core.
    pub(crate) measured_core: usize,
    /// The load's cores.
    pub(crate) load_cores: Vec<usize>,
}

impl Cores {
    /// The last core this process may run on for the measured process, the others for the
    /// load; `None` with fewer than two cores.
    pub(crate) fn split() -> Option<Self> {
        let mine = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
        let mut usable: Vec<usize> = (0..nix::sched::CpuSet::count())
            .filter(|&cpu| mine.is_set(cpu).unwrap_or(false))
            .collect();
        let measured_core = usable.pop()?;
        (!usable.is_empty()).then_some(Self {
            measured_core,
            load_cores: usable,
        })
    }

    /// Puts the calling thread on the load's cores: the threads and processes it starts
    /// afterwards inherit them.
    pub(crate) fn load_here(&self) -> nix::Result<()> {
        pin(0, &self.load_cores)
    }

    /// Puts every thread of process `pid` on the measured core (threads it starts afterwards
    /// inherit it).
    pub(crate) fn measure(&self, pid: u32) -> nix::Result<()> {
        Proc::of(pid)
            .thread_ids()
            .into_iter()
            .try_for_each(|tid| pin(tid, &[self.measured_core]))
    }
}

/// Lets thread `tid` (0: the calling thread) run on `cores` only.
fn pin(tid: u32, cores: &[usize]) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cores {
        set.set(cpu)?;
    }
    let tid = i32::try_from(tid).map_err(|_| nix::Error::EINVAL)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
}

/// How many times the threads of process `pid` have gone to sleep and been woken
/// ([`Proc::wakeups`]); 0 when it is gone.
pub(crate) fn wakeups(pid: &str) -> u64 {
    pid.parse::<Proc>().map_or(0, |p| p.wakeups())
}
