//! End-to-end: sFlow interface counters straight to Prometheus from the sink
//! (`--sflow-metrics`). Counter samples of one interface go through a real agent and sink
//! while its 32-bit error counter wraps and its agent restarts; a real Prometheus scrapes
//! `/metrics/sflow`, and PromQL's `rate()` over the exported counters matches the rate of
//! the counter samples sent, within 1 %, with one counter reset (the restart) and none for
//! the wrap. The rate of what was sent is the device's count between the window's first and
//! last scrape (known exactly: the test made the samples), extrapolated to the window by
//! Prometheus's documented rule, so the comparison tests the exported values, not Prometheus's
//! sampling. `promtool check metrics` accepts the exposition.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::sflow::Header;
use proto::sflow::counters::{IfCounters, counter_datagram};
use relay_tests::http;
use relay_tests::prometheus::{self, Prometheus};

use crate::Relay;

/// The interface: sFlow agent, ifIndex.
const AGENT: &str = "10.9.0.1";
const IF_INDEX: u32 = 7;
/// Rates the device counts at: octets (1 Gbit/s) and errors a second.
const OCTETS_PER_SECOND: f64 = 125_000_000.0;
const ERRORS_PER_SECOND: f64 = 100.0;
/// The error counter starts this far below 2³², so it wraps after 10 s.
const ERRORS_BELOW_WRAP: f64 = 1_000.0;
/// Counter samples a second (more often than an agent polls, so that the exported counter's
/// steps are far below 1 % of a window).
const SAMPLES_PER_SECOND: f64 = 20.0;
/// The device stops counting (its interface goes down for the reboot) this long after the
/// start, restarts at [`RESTART_AT`] with its counters and uptime at 0, and the test ends
/// at [`END_AT`].
const DOWN_AT: f64 = 28.5;
const RESTART_AT: f64 = 30.0;
const END_AT: f64 = 66.0;
/// The `rate()` window, seconds: it holds the wrap (at 10 s) and the restart (at 30 s).
const WINDOW: f64 = 60.0;

/// The device's counters `t` seconds after the test's start.
fn counters(t: f64) -> IfCounters {
    let (octets, errors) = if t < RESTART_AT {
        let counting = t.min(DOWN_AT);
        let below = f64::from(u32::MAX) + 1.0 - ERRORS_BELOW_WRAP;
        (
            OCTETS_PER_SECOND * counting,
            below + ERRORS_PER_SECOND * counting,
        )
    } else {
        let up = t - RESTART_AT;
        (OCTETS_PER_SECOND * up, ERRORS_PER_SECOND * up)
    };
    IfCounters {
        if_index: IF_INDEX,
        if_type: 6,
        if_speed: Some(10_000_000_000),
        if_direction: 1,
        if_status: 3,
        in_octets: Some(octets as u64),
        in_ucast_pkts: Some(0),
        in_multicast_pkts: Some(0),
        in_broadcast_pkts: Some(0),
        in_discards: Some(0),
        // Modulo 2³², as the device's 32-bit counter.
        in_errors: Some((errors as u64 % (1 << 32)) as u32),
        in_unknown_protos: None,
        out_octets: Some(0),
        out_ucast_pkts: Some(0),
        out_multicast_pkts: None,
        out_broadcast_pkts: None,
        out_discards: Some(0),
        out_errors: Some(0),
        promiscuous_mode: 0,
    }
}

/// Seconds the device had counted `t` seconds after the start: its counters stood still
/// while it was down, and started again from 0 at the restart.
fn counted(t: f64) -> f64 {
    if t < RESTART_AT {
        t.min(DOWN_AT)
    } else {
        DOWN_AT + (t - RESTART_AT)
    }
}

/// The rate `rate()` gives at `at` for a counter that counts `per_second` while the device
/// counts, scraped at `scrapes` (Unix seconds, the window's samples): the device's count
/// between the first and the last scrape, extrapolated to the window as Prometheus does (by
/// up to 1.1 average scrape intervals at each end, else half of one).
fn expected_rate(per_second: f64, scrapes: &[f64], at: f64, unix_start: f64) -> f64 {
    let (first, last) = (scrapes[0], scrapes[scrapes.len() - 1]);
    let increase = per_second * (counted(last - unix_start) - counted(first - unix_start));
    let sampled = last - first;
    let average = sampled / (scrapes.len() - 1) as f64;
    let extend = |gap: f64| {
        if gap < 1.1 * average {
            gap
        } else {
            average / 2.0
        }
    };
    let to_start = extend(first - (at - WINDOW));
    let to_end = extend(at - last);
    increase * (sampled + to_start + to_end) / sampled / WINDOW
}

/// The timestamps of the samples of `window` (a range selector) at `at`.
fn scrape_times(prometheus: &Prometheus, window: &str, at: f64) -> Vec<f64> {
    let path = format!(
        "/api/v1/query?query={}&time={at:.3}",
        http::encode_component(window)
    );
    let body = http::get_json(prometheus.addr(), &path).expect("range query");
    let values = body["data"]["result"][0]["values"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"));
    let times: Vec<f64> = values.iter().filter_map(|v| v[0].as_f64()).collect();
    assert!(times.len() > 20, "{body}");
    times
}

/// Sends the interface's counter samples to `agent` from `start` until [`END_AT`], as one
/// datagram each: until [`RESTART_AT`] from an agent up for an hour, then from one just
/// restarted (uptime, datagram and sample sequence numbers and counters from 0).
fn run_device(agent: SocketAddr, start: Instant) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address: IpAddr = AGENT.parse().unwrap();
    let mut sequence = 0u32;
    let mut restarted = false;
    for n in 0.. {
        let t = f64::from(n) / SAMPLES_PER_SECOND;
        if t >= END_AT {
            break;
        }
        let due = start + Duration::from_secs_f64(t);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            // Pacing the device's samples.
            std::thread::sleep(wait);
        }
        if !restarted && t >= RESTART_AT {
            (restarted, sequence) = (true, 0);
        }
        sequence += 1;
        let up_ms = if restarted {
            (t - RESTART_AT) * 1000.0
        } else {
            3_600_000.0 + t * 1000.0
        };
        let mut header = Header::from_agent(address);
        header.uptime_ms = up_ms as u32;
        header.sequence = sequence;
        let datagram = counter_datagram(&header, &[(sequence, &counters(t), None)]);
        socket.send_to(&datagram, agent).unwrap();
    }
}

#[test]
fn prometheus_rates_over_the_exported_counters_match_across_a_wrap_and_a_restart() {
    if let Err(why) = prometheus::installed() {
        println!("SKIPPED: {why}");
        return;
    }
    let relay = Relay::start("site-a", &[]);
    let (metrics, listen, collector) = (relay.metrics, relay.listen, &relay.collector);
    let prometheus = Prometheus::start_paths(&[("sflow", metrics, "/metrics/sflow")])
        .expect("installed, checked above");
    let start = Instant::now();
    let unix_start = unix_now();
    let device = std::thread::spawn(move || run_device(listen, start));
    // Asked while the device still counts, just after a scrape, so that the window ends on
    // a sample.
    let asked_at = start + Duration::from_secs_f64(END_AT - 2.0);
    std::thread::sleep(asked_at.saturating_duration_since(Instant::now()));
    let series = format!("{{agent=\"{AGENT}\",ifindex=\"{IF_INDEX}\",site=\"site-a\"}}");
    let scraped = prometheus
        .query(&format!("timestamp(sflow_if_in_errors_total{series})"))
        .unwrap();
    let at = scraped.first().expect("scraped").value + 0.001;
    for (name, per_second) in [
        ("sflow_if_in_errors_total", ERRORS_PER_SECOND),
        ("sflow_if_in_octets_total", OCTETS_PER_SECOND),
    ] {
        let window = format!("{name}{series}[{WINDOW}s]");
        let resets = prometheus
            .query_at(&format!("resets({window})"), at)
            .unwrap();
        assert_eq!(
            resets.first().map(|s| s.value),
            Some(1.0),
            "{name}: the restart, and not the wrap"
        );
        let scrapes = scrape_times(&prometheus, &window, at);
        let rate = prometheus.query_at(&format!("rate({window})"), at).unwrap();
        let rate = rate.first().map_or(f64::NAN, |s| s.value);
        let sent = expected_rate(per_second, &scrapes, at, unix_start);
        let error = (rate - sent).abs() / sent;
        println!(
            "{name}: rate() {rate:.1}/s, the samples sent {sent:.1}/s: {:.3} % apart",
            100.0 * error
        );
        assert!(error < 0.01, "{name}: rate() {rate} against {sent} sent");
    }
    device.join().unwrap();

    let exposition = http::get(metrics, "/metrics/sflow").expect("/metrics/sflow");
    assert_eq!(exposition.status, 200);
    prometheus::promtool_check_metrics(&exposition.body)
        .unwrap_or_else(|e| panic!("{e}\n{}", exposition.body));
    assert!(
        exposition
            .body
            .contains(&format!("sflow_if_speed_bps{series} 10000000000")),
        "{}",
        exposition.body
    );
    assert!(!collector.is_empty(), "the datagrams were replayed too");
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
