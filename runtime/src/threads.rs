//! How many threads run the daemon's tasks.
//!
//! Both daemons default to **one** worker thread. relay-perf measured it (README,
//! "Benchmarks"): at 50,000 datagrams/s one worker costs the agent and the sink about a
//! quarter less CPU per datagram than tokio's default of one worker per core, and the sink's
//! peak RSS falls from about 60 to 16 MiB, at the same zero-loss rate. On a small machine
//! the work of one relay (receive, batch, compress, encrypt; or decrypt, expand, replay) is
//! a chain of short steps, and handing each step to another thread costs a wake-up (an
//! inter-processor interrupt in a VM) that is dearer than the step. More workers pay where
//! one sink serves many busy agents on a machine with cores to spare.

use serde::{Deserialize, Serialize};
use tokio::runtime::{Builder, Runtime};

/// Default worker threads.
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Thread options, the same on both binaries (flags and config keys).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ThreadOptions {
    /// Threads that run the relay's tasks; 0 means one per CPU core. One is cheapest per
    /// datagram; more help a sink with many busy agents. [default: 1]
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
}

impl ThreadOptions {
    /// Worker threads to start.
    pub fn workers(&self) -> usize {
        match self.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS) {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// Builds the runtime: `workers()` worker threads, timers and I/O enabled.
    pub fn runtime(&self) -> std::io::Result<Runtime> {
        Builder::new_multi_thread()
            .worker_threads(self.workers())
            .thread_name("relay-worker")
            .enable_all()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_one_per_core_and_default_is_one() {
        assert_eq!(ThreadOptions::default().workers(), 1);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let all = ThreadOptions {
            worker_threads: Some(0),
        };
        assert_eq!(all.workers(), cores);
        let three = ThreadOptions {
            worker_threads: Some(3),
        };
        assert_eq!(three.workers(), 3);
        let rt = three.runtime().expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
