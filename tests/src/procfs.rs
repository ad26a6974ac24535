//! What Linux's `/proc` says about a process the test started: memory (`VmRSS`, `VmHWM`,
//! `VmData`), CPU time, threads and their wake-ups, open file descriptors, and the raw fields of
//! `/proc/PID/status` (user, groups, capabilities). The suites and the benchmark read
//! `/proc` only through [`Proc`].

use std::time::Duration;

/// Clock ticks per second of `/proc/PID/stat`'s CPU times (USER_HZ, 100 on every Linux the
/// tests run on).
const TICKS_PER_SECOND: f64 = 100.0;

/// One process, by id, as `/proc` shows it.
#[derive(Debug, Clone)]
pub struct Proc {
    /// The directory name under `/proc`: a pid, or `self`.
    dir: String,
}

impl Proc {
    /// Process `pid`.
    pub fn of(pid: u32) -> Self {
        Self {
            dir: pid.to_string(),
        }
    }

    /// This process.
    pub fn current() -> Self {
        Self { dir: "self".into() }
    }

    /// `/proc/PID/status`, or `None` when the process is gone.
    pub fn try_status(&self) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/status", self.dir)).ok()
    }

    /// `/proc/PID/status`.
    ///
    /// # Panics
    ///
    /// When the process is gone.
    pub fn status(&self) -> String {
        self.try_status()
            .unwrap_or_else(|| panic!("no /proc/{}/status: the process is gone", self.dir))
    }

    /// The whitespace-separated words of the status line `KEY:` (e.g. `Uid`, `CapEff`).
    ///
    /// # Panics
    ///
    /// When the process is gone or has no such line.
    pub fn status_field(&self, key: &str) -> Vec<String> {
        let status = self.status();
        field_of(&status, key)
            .unwrap_or_else(|| panic!("no {key} in /proc/{}/status:\n{status}", self.dir))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// A `KEY: N kB` status line, KiB; `None` when the process is gone or has no such line.
    pub fn try_status_kib(&self, key: &str) -> Option<u64> {
        self.try_status_number(key)
    }

    /// The number that starts the status line `KEY:`; `None` when the process is gone or has
    /// no such line.
    fn try_status_number(&self, key: &str) -> Option<u64> {
        let status = self.try_status()?;
        field_of(&status, key)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// A `KEY: N kB` status line, KiB.
    ///
    /// # Panics
    ///
    /// When the process is gone or has no such line.
    pub fn status_kib(&self, key: &str) -> u64 {
        self.try_status_kib(key)
            .unwrap_or_else(|| panic!("no {key} in /proc/{}/status", self.dir))
    }

    /// Resident memory now, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// Peak resident memory, KiB (`VmHWM`), since start or the last [`reset_peak`](Self::reset_peak).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    /// Private memory mapped, touched or not, KiB (`VmData`): unlike RSS it also shows a
    /// buffer reserved for bytes that never came.
    pub fn vm_data_kib(&self) -> u64 {
        self.status_kib("VmData")
    }

    /// Threads of the process (`Threads`).
    pub fn threads(&self) -> u64 {
        self.status_field("Threads")
            .first()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("Threads in /proc/{}/status", self.dir))
    }

    /// The ids of the process's threads (the entries of `/proc/PID/task`); none when it is
    /// gone.
    pub fn thread_ids(&self) -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.dir)) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|task| task.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// How many times the process's threads have gone to sleep and been woken since they
    /// started: their `voluntary_ctxt_switches`, summed (0 when it is gone).
    pub fn wakeups(&self) -> u64 {
        self.thread_ids()
            .into_iter()
            .filter_map(|tid| {
                let thread = Self {
                    dir: format!("{}/task/{tid}", self.dir),
                };
                thread.try_status_number("voluntary_ctxt_switches")
            })
            .sum()
    }

    /// Open file descriptors (entries of `/proc/PID/fd`).
    ///
    /// # Panics
    ///
    /// When the directory cannot be read (the process is gone, or belongs to another user).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.dir))
            .unwrap_or_else(|e| panic!("/proc/{}/fd: {e}", self.dir))
            .count()
    }

    /// User + system CPU seconds since the process started, all threads (`/proc/PID/stat`);
    /// `None` when the process is gone.
    pub fn try_cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.dir)).ok()?;
        // After the parenthesised command: state is field 3, utime 14 and stime 15 (1-based).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum::<Option<f64>>()?;
        Some(ticks / TICKS_PER_SECOND)
    }

    /// As [`try_cpu_seconds`](Self::try_cpu_seconds).
    ///
    /// # Panics
    ///
    /// When the process is gone.
    pub fn cpu_seconds(&self) -> f64 {
        self.try_cpu_seconds()
            .unwrap_or_else(|| panic!("no /proc/{}/stat: the process is gone", self.dir))
    }

    /// The share of a core the process uses over `window` (which this call sleeps through:
    /// measuring a rate takes that long).
    pub fn cpu_share(&self, window: Duration) -> f64 {
        let before = self.cpu_seconds();
        std::thread::sleep(window);
        (self.cpu_seconds() - before) / window.as_secs_f64()
    }

    /// Resets the peak RSS (`VmHWM`) to the current RSS (`5` into `/proc/PID/clear_refs`,
    /// Linux ≥ 4.0; needs the right to write there). Returns whether it worked.
    pub fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.dir), "5").is_ok()
    }
}

impl std::str::FromStr for Proc {
    type Err = String;

    /// A pid, or `self`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "self" {
            return Ok(Self::current());
        }
        s.parse::<u32>()
            .map(Self::of)
            .map_err(|_| format!("not a pid: {s:?}"))
    }
}

/// CPU seconds the whole machine spent in user, nice and system mode so far (all cores; the
/// first line of `/proc/stat`); 0 when it cannot be read.
pub fn machine_busy_seconds() -> f64 {
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

/// The text after `KEY:` on its status line.
fn field_of<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
}

/// Gives the calling thread the first claim on a core: the real-time policy SCHED_FIFO
/// (`chrt`), or else nice -10 (`renice`). So a collector thread stands for what it models, a
/// collector on a machine of its own, not one that competes for the test machine's two cores
/// with the agent, the sink, the proxy and the sender: it runs as soon as a datagram wakes it,
/// and it only ever waits in `recv`, so it takes a core from no one for longer than it
/// has datagrams to read. Needs root (as the tests run in CI); returns whether it took.
pub fn raise_current_thread_priority() -> bool {
    let Ok(task) = std::fs::read_link("/proc/thread-self") else {
        return false;
    };
    let Some(tid) = task.file_name().and_then(|tid| tid.to_str()) else {
        return false;
    };
    let run = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .arg(tid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    run("chrt", &["--fifo", "--pid", "10"]) || run("renice", &["-n", "-10", "-p"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_this_process_reads_back_as_alive_with_memory_threads_and_fds() {
        let me = Proc::current();
        assert!(me.rss_kib() > 0);
        assert!(me.peak_rss_kib() >= me.rss_kib() / 2);
        assert!(me.vm_data_kib() > 0);
        assert!(me.threads() >= 1);
        assert!(me.open_fds() >= 3, "stdin, stdout, stderr at least");
        assert!(me.try_cpu_seconds().is_some());
        assert_eq!(me.status_field("Uid").len(), 4);
        assert_eq!(me.try_status_kib("NoSuchKey"), None);
        assert!(Proc::of(u32::MAX).try_status().is_none());
        assert!("self".parse::<Proc>().unwrap().try_status().is_some());
        assert!("12x".parse::<Proc>().is_err());
        assert_eq!(
            field_of("VmRSS:\t  12 kB\nVmHWM: 3 kB", "VmHWM"),
            Some(" 3 kB")
        );
    }
}
