//! The default run: for each path, the zero-loss searches, peak memory at the zero-loss rate,
//! CPU per datagram at a fixed rate, and latency at a fixed rate.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use relay_tests::bin;
use relay_tests::metrics::Scrape;
use relay_tests::sflow::{SflowGen, stream_position};

use crate::BenchArgs;
use crate::load::{self, Key, OFFERED_MIN, Offered, Receiver};
use crate::paths::{self, PathKind, Running};
use crate::procs::{self, Usage};
use crate::report;

/// Nothing arriving for this long ends a trial's wait for stragglers.
const QUIET: Duration = Duration::from_millis(300);
/// A trial's wait for stragglers ends after this at the latest.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// Below this the search gives up: the path cannot carry even this without loss.
const MIN_RATE: u64 = 1_000;

/// One trial at a fixed rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trial {
    /// The rate asked of the generator.
    pub(crate) target: u64,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// The rate the generator really offered.
    pub(crate) achieved: f64,
}

impl Trial {
    /// Whether the generator offered (nearly) the target rate.
    pub(crate) fn offered(&self) -> bool {
        self.achieved >= OFFERED_MIN * self.target as f64
    }

    /// Offered, and every datagram arrived.
    pub(crate) fn passed(&self) -> bool {
        self.offered() && self.received >= self.sent
    }

    /// `Ok` when it passed; else the upper bound its failure sets on the zero-loss rate: the
    /// target or, when the generator could not offer that, what it did offer (it would not
    /// offer a higher target either).
    pub(crate) fn verdict(&self) -> Result<(), u64> {
        if self.passed() {
            Ok(())
        } else if self.offered() {
            Err(self.target)
        } else {
            Err(self.target.min(self.achieved as u64))
        }
    }

    /// The rate this trial shows the path carries without loss: what was really offered, at
    /// most the target.
    pub(crate) fn rate(&self) -> u64 {
        (self.achieved as u64).min(self.target)
    }
}

/// One search for the highest zero-loss rate.
#[derive(Debug, Clone)]
pub(crate) struct Search {
    /// The best passing trial's rate; 0 when none passed.
    pub(crate) rate: u64,
    pub(crate) trials: Vec<Trial>,
}

/// One process of a path.
#[derive(Debug, Clone)]
pub(crate) struct ProcessResult {
    pub(crate) name: &'static str,
    /// CPU µs per datagram sent in the CPU run.
    pub(crate) cpu_us: f64,
    /// Peak RSS over the whole run of the path (overload trials included).
    pub(crate) peak_rss: u64,
    /// Peak RSS during a trial at the zero-loss rate (when the peak could be reset).
    pub(crate) peak_rss_at_zero_loss: Option<u64>,
    /// Peak RSS during the CPU run (when the peak could be reset).
    pub(crate) peak_rss_at_cpu_rate: Option<u64>,
}

/// One-way latency at a fixed rate.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Latency {
    pub(crate) rate: u64,
    pub(crate) sent: u64,
    /// Datagrams that arrived (first copies).
    pub(crate) arrived: u64,
    /// Seconds.
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

/// What one path measured.
#[derive(Debug, Clone)]
pub(crate) struct PathResult {
    pub(crate) kind: PathKind,
    /// Median of the searches' rates.
    pub(crate) median: u64,
    pub(crate) searches: Vec<Search>,
    /// A trial at `median` after the searches (the one the peak RSS at zero loss comes from).
    pub(crate) confirm: Option<Trial>,
    /// The rate of the CPU run.
    pub(crate) cpu_rate: u64,
    pub(crate) cpu_offered: Offered,
    pub(crate) cpu_delivered: u64,
    pub(crate) processes: Vec<ProcessResult>,
    /// CPU µs per datagram of this process (generator and receiver) in the CPU run.
    pub(crate) load_cpu_us: f64,
    /// CPU seconds of the path's processes over the whole measurement.
    pub(crate) cpu_seconds: f64,
    /// What the link carried in the CPU run, on the paths over QUIC.
    pub(crate) wire: Option<Wire>,
    pub(crate) latency: Latency,
}

/// Bytes the agent received and the bytes its QUIC connection sent for them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wire {
    /// UDP payload bytes received (`relay_agent_bytes_received_total`).
    pub(crate) payload: f64,
    /// UDP payload bytes the QUIC connection sent (`relay_agent_quic_udp_bytes_sent_total`):
    /// frames, QUIC and TLS overhead, acknowledgements, retransmissions.
    pub(crate) udp: f64,
}

impl Wire {
    fn read(agent: std::net::SocketAddr) -> Option<Self> {
        let scrape = Scrape::try_of(agent).ok()?;
        Some(Self {
            payload: scrape.sum("relay_agent_bytes_received_total"),
            udp: scrape.sum("relay_agent_quic_udp_bytes_sent_total"),
        })
    }

    /// Wire bytes per payload byte.
    pub(crate) fn ratio(&self) -> f64 {
        self.udp / self.payload
    }
}

impl PathResult {
    /// CPU µs per datagram of all the path's processes.
    pub(crate) fn cpu_us(&self) -> f64 {
        self.processes.iter().map(|p| p.cpu_us).sum()
    }

    /// The largest peak RSS of the path's processes.
    pub(crate) fn peak_rss(&self) -> u64 {
        self.processes.iter().map(|p| p.peak_rss).max().unwrap_or(0)
    }
}

/// Runs every path of `args` and reports.
pub(crate) fn run(args: &BenchArgs, json: &Path) {
    let mut sflow = SflowGen::new(8, 2, 7).with_payload(args.payload.into());
    let pool: Vec<Vec<u8>> = (0..16_384).map(|_| sflow.datagram()).collect();
    let mean_len = pool.iter().map(Vec::len).sum::<usize>() / pool.len();
    eprintln!(
        "relay-perf: {} paths, {} searches each, trials of {:?}, datagrams of {mean_len} bytes on average, {:?} payloads",
        args.paths.len(),
        args.repeats,
        args.trial,
        args.payload
    );
    // Build (or find) the release binaries before timing anything.
    let _ = bin("relay-agent");
    let started = Instant::now();
    let load_start = report::loadavg();
    let busy_start = procs::machine_busy_seconds();
    let self_start = procs::usage("self").cpu_seconds;

    let mut results = Vec::new();
    for &kind in &args.paths {
        let path_started = Instant::now();
        let rx = Receiver::start();
        let extra = paths::Extra {
            agent: args.agent_arg.clone(),
            sink: args.sink_arg.clone(),
        };
        let path = paths::start(kind, rx.addr(), args.rcvbuf, &extra);
        let result = measure(kind, &path, &rx, &pool, &mut sflow, args);
        eprintln!(
            "  {:<10} done in {:.0} s (a trial at the median: {})",
            kind.name(),
            path_started.elapsed().as_secs_f64(),
            result.confirm.map_or("none", |t| if t.passed() {
                "no loss"
            } else if t.offered() {
                "loss"
            } else {
                "not offered by the generator"
            })
        );
        results.push(result);
    }
    let wall = started.elapsed();
    // What the machine did besides this run: its busy time less ours.
    let ours = procs::usage("self").cpu_seconds - self_start
        + results.iter().map(|r| r.cpu_seconds).sum::<f64>();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let others =
        (procs::machine_busy_seconds() - busy_start - ours).max(0.0) / (cores * wall.as_secs_f64());
    let info = report::RunInfo {
        mean_len,
        wall,
        load: [load_start, report::loadavg()],
        others,
    };
    report::print(args, &results, &info);
    crate::write_json(json, &report::json(args, &results, &info));
}

/// The measurements of one running path.
fn measure(
    kind: PathKind,
    path: &Running,
    rx: &Receiver,
    pool: &[Vec<u8>],
    sflow: &mut SflowGen,
    args: &BenchArgs,
) -> PathResult {
    let pids: Vec<String> = path.processes.iter().map(paths::Process::pid).collect();
    let usages = || pids.iter().map(|p| procs::usage(p)).collect::<Vec<Usage>>();
    let reset = || pids.iter().all(|p| procs::reset_peak(p));
    let first = usages();

    let mut searches: Vec<Search> = Vec::new();
    for run in 0..args.repeats {
        let hint = searches.last().map(|s| s.rate).filter(|&r| r > 0);
        let search = search(pool, path, rx, args, hint);
        eprintln!(
            "  {:<10} search {}: {} datagrams/s with zero loss ({} trials{}; kernel drops at the path's input so far: {})",
            kind.name(),
            run + 1,
            search.rate,
            search.trials.len(),
            match search.trials.iter().filter(|t| !t.offered()).count() {
                0 => String::new(),
                n => format!(", {n} not offered by the generator"),
            },
            runtime::udp::kernel_drops(path.input).map_or("?".into(), |d| d.to_string())
        );
        searches.push(search);
    }
    let median = median(searches.iter().map(|s| s.rate).collect());
    let mut peak: Vec<u64> = usages().iter().map(|u| u.peak_rss).collect();
    let mut raise_peak = |now: &[Usage]| {
        for (p, u) in peak.iter_mut().zip(now) {
            *p = (*p).max(u.peak_rss);
        }
    };

    // Peak memory at the zero-loss rate: a trial there, the peak reset just before.
    let mut at_zero_loss = None;
    let confirm = (median > 0).then(|| {
        let can_reset = reset();
        let t = trial(pool, path, rx, args, median);
        let now = usages();
        raise_peak(&now);
        if can_reset {
            at_zero_loss = Some(now.iter().map(|u| u.peak_rss).collect::<Vec<_>>());
        }
        t
    });

    // CPU per datagram at a fixed rate (lower for a path that cannot carry it).
    let cpu_rate = if median >= args.cpu_rate {
        args.cpu_rate
    } else {
        (median * 4 / 5 / 1_000 * 1_000).max(MIN_RATE)
    };
    let can_reset = reset();
    let before = usages();
    let load_before = procs::usage("self");
    let start_count = rx.count();
    let wire_before = path.agent_metrics.and_then(Wire::read);
    let cpu_offered = load::send_at(pool, path.input, cpu_rate, args.cpu_duration);
    let cpu_delivered =
        rx.settle(start_count + cpu_offered.sent, QUIET, SETTLE_LIMIT) - start_count;
    let after = usages();
    let wire = path
        .agent_metrics
        .and_then(Wire::read)
        .zip(wire_before)
        .map(|(a, b)| Wire {
            payload: a.payload - b.payload,
            udp: a.udp - b.udp,
        })
        .filter(|w| w.payload > 0.0);
    let load_cpu_us = (procs::usage("self").cpu_seconds - load_before.cpu_seconds) * 1e6
        / cpu_offered.sent.max(1) as f64;
    raise_peak(&after);
    let at_cpu_rate = can_reset.then(|| after.iter().map(|u| u.peak_rss).collect::<Vec<_>>());

    let latency = latency(sflow, path, rx, args.latency_rate, args.latency_duration);
    let last = usages();
    raise_peak(&last);
    let cpu_seconds = first
        .iter()
        .zip(&last)
        .map(|(f, l)| l.cpu_seconds - f.cpu_seconds)
        .sum();

    let processes = path
        .processes
        .iter()
        .enumerate()
        .map(|(i, p)| ProcessResult {
            name: p.name,
            cpu_us: (after[i].cpu_seconds - before[i].cpu_seconds) * 1e6
                / cpu_offered.sent.max(1) as f64,
            peak_rss: peak[i],
            peak_rss_at_zero_loss: at_zero_loss.as_ref().map(|v| v[i]),
            peak_rss_at_cpu_rate: at_cpu_rate.as_ref().map(|v| v[i]),
        })
        .collect();
    PathResult {
        kind,
        median,
        searches,
        confirm,
        cpu_rate,
        cpu_offered,
        cpu_delivered,
        processes,
        load_cpu_us,
        cpu_seconds,
        wire,
        latency,
    }
}

/// One trial: `rate` for `--trial`, then the wait for stragglers.
fn trial(pool: &[Vec<u8>], path: &Running, rx: &Receiver, args: &BenchArgs, rate: u64) -> Trial {
    let before = rx.count();
    let offered = load::send_at(pool, path.input, rate, args.trial);
    let received = rx.settle(before + offered.sent, QUIET, SETTLE_LIMIT) - before;
    let t = Trial {
        target: rate,
        sent: offered.sent,
        received,
        achieved: offered.rate(),
    };
    if args.verbose {
        let drops = |a| runtime::udp::kernel_drops(a).map_or("?".into(), |d: u64| d.to_string());
        eprintln!(
            "    trial {rate}/s: achieved {:.0}/s{}, sent {}, received {}: {}; kernel drops so far at input {}, at receiver {}",
            t.achieved,
            if t.offered() {
                ""
            } else {
                " (the generator could not offer the target)"
            },
            t.sent,
            t.received,
            if t.passed() { "pass" } else { "FAIL" },
            drops(path.input),
            drops(rx.addr())
        );
    }
    t
}

/// One search for the highest rate with zero loss on `path` (see [`search_rates`]).
fn search(
    pool: &[Vec<u8>],
    path: &Running,
    rx: &Receiver,
    args: &BenchArgs,
    hint: Option<u64>,
) -> Search {
    let mut trials = Vec::new();
    search_rates(args.start_rate, hint, args.max_rate, |rate| {
        let t = trial(pool, path, rx, args, rate);
        trials.push(t);
        t.verdict()
    });
    let rate = trials
        .iter()
        .filter(|t| t.passed())
        .map(Trial::rate)
        .max()
        .unwrap_or(0);
    Search { rate, trials }
}

/// The search over rates, given `run`, which tries one rate: `Ok` when it passed, else the
/// upper bound the failure sets (see [`Trial::verdict`]). Without a hint: doubling from
/// `start` up to the first failure, or halving down to the first pass if `start` fails; with
/// one (the previous search's result): from there, up by a quarter while it passes or down by
/// a quarter until it does. Then bisection to within 5 % (six trials at most). Returns the
/// highest rate that passed, 0 when none did.
fn search_rates(
    start: u64,
    hint: Option<u64>,
    max_rate: u64,
    mut run: impl FnMut(u64) -> Result<(), u64>,
) -> u64 {
    let max = max_rate.max(MIN_RATE);
    // Steps: ×2 and ÷2 from scratch, ±25 % around a previous result.
    let (up, down) = if hint.is_some() {
        ((5, 4), (3, 4))
    } else {
        ((2, 1), (1, 2))
    };
    let step = |r: u64, (num, den): (u64, u64)| r * num / den;
    let first = hint.unwrap_or(start).clamp(MIN_RATE, max);
    let mut lo = 0u64;
    let mut hi = None;
    match run(first) {
        Ok(()) => {
            lo = first;
            let mut rate = first;
            while rate < max {
                rate = step(rate, up).min(max);
                match run(rate) {
                    Ok(()) => lo = rate,
                    Err(bound) => {
                        hi = Some(bound);
                        break;
                    }
                }
            }
        }
        Err(bound) => {
            hi = Some(bound);
            let mut rate = step(bound, down);
            while rate >= MIN_RATE {
                match run(rate) {
                    Ok(()) => {
                        lo = rate;
                        break;
                    }
                    Err(bound) => {
                        hi = Some(bound);
                        rate = step(bound.min(rate), down);
                    }
                }
            }
        }
    }
    if let Some(mut hi) = hi.filter(|_| lo > 0) {
        for _ in 0..6 {
            if hi <= lo || hi - lo <= lo / 20 {
                break;
            }
            let mid = (lo + hi) / 2;
            match run(mid) {
                Ok(()) => lo = mid,
                Err(bound) => hi = bound,
            }
        }
    }
    lo
}

/// One-way latency at `rate` for `length`: fresh datagrams from `sflow` (each one unique),
/// each send instant against its arrival instant.
fn latency(
    sflow: &mut SflowGen,
    path: &Running,
    rx: &Receiver,
    rate: u64,
    length: Duration,
) -> Latency {
    let n = (rate as f64 * length.as_secs_f64()) as usize;
    let datagrams: Vec<Vec<u8>> = (0..n).map(|_| sflow.datagram()).collect();
    let keys: Vec<Key> = datagrams
        .iter()
        .map(|d| stream_position(d).expect("the generator makes sFlow v5"))
        .collect();
    let before = rx.count();
    rx.record();
    let sent_at = load::send_timed(&datagrams, path.input, rate);
    rx.settle(before + n as u64, Duration::from_millis(500), SETTLE_LIMIT);
    let mut arrived: HashMap<Key, Instant> = HashMap::with_capacity(n);
    for (key, at) in rx.take() {
        arrived.entry(key).or_insert(at);
    }
    let mut seconds: Vec<f64> = keys
        .iter()
        .zip(&sent_at)
        .filter_map(|(k, sent)| {
            arrived
                .get(k)
                .map(|at| at.saturating_duration_since(*sent).as_secs_f64())
        })
        .collect();
    seconds.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if seconds.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * seconds.len() as f64).ceil() as usize).clamp(1, seconds.len());
        seconds[rank - 1]
    };
    Latency {
        rate,
        sent: n as u64,
        arrived: seconds.len() as u64,
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: seconds.last().copied().unwrap_or(f64::NAN),
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated path that carries `capacity` without loss, fed by a generator that offers
    /// at most `generator`: the trials `search_rates` asks for.
    fn simulate(start: u64, hint: Option<u64>, capacity: u64, generator: u64) -> (u64, Vec<Trial>) {
        let mut trials = Vec::new();
        let lo = search_rates(start, hint, 640_000, |rate| {
            let achieved = rate.min(generator);
            let t = Trial {
                target: rate,
                sent: achieved,
                received: if achieved <= capacity {
                    achieved
                } else {
                    capacity
                },
                achieved: achieved as f64,
            };
            trials.push(t);
            t.verdict()
        });
        (lo, trials)
    }

    #[test]
    fn the_search_ends_within_5_percent_below_the_capacity() {
        for capacity in [7_000, 34_000, 150_000, 480_000] {
            let (rate, trials) = simulate(20_000, None, capacity, u64::MAX);
            assert!(
                rate <= capacity && rate as f64 >= 0.95 * capacity as f64,
                "capacity {capacity}: found {rate} in {} trials",
                trials.len()
            );
            assert!(trials.len() <= 14, "{} trials", trials.len());
        }
    }

    #[test]
    fn a_generator_that_cannot_offer_the_target_bounds_the_search_and_passes_nothing_above_it() {
        let (rate, trials) = simulate(20_000, None, 1_000_000, 300_000);
        assert!((285_000..=315_000).contains(&rate), "{rate}");
        assert!(
            trials
                .iter()
                .all(|t| !t.passed() || t.achieved >= 0.95 * t.target as f64),
            "a trial not offered passed"
        );
        // The failure at 320,000 (offered 300,000) bounds the bisection by 300,000, not 320,000.
        let failed = trials.iter().find(|t| !t.passed()).expect("a failure");
        assert_eq!((failed.target, failed.verdict()), (320_000, Err(300_000)));
        assert!(trials.len() <= 11, "{} trials", trials.len());
    }

    #[test]
    fn a_search_from_a_previous_result_takes_fewer_trials() {
        let (cold, cold_trials) = simulate(20_000, None, 150_000, u64::MAX);
        let (warm, warm_trials) = simulate(20_000, Some(cold), 150_000, u64::MAX);
        assert!(warm as f64 >= 0.95 * 150_000.0 && warm <= 150_000, "{warm}");
        assert!(warm_trials.len() < cold_trials.len());
        // And from a result that no longer holds.
        let (lower, _) = simulate(20_000, Some(cold), 90_000, u64::MAX);
        assert!(
            lower as f64 >= 0.95 * 90_000.0 && lower <= 90_000,
            "{lower}"
        );
    }

    #[test]
    fn a_path_that_loses_even_at_the_lowest_rate_gets_zero() {
        assert_eq!(simulate(20_000, None, 500, u64::MAX).0, 0);
    }
}
