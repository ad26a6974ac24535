//! `--sflow-interfaces N`: what `relay-sink --sflow-metrics` costs in memory for N
//! interfaces. One agent relays counter samples (generic and Ethernet records) of N
//! interfaces, 16 to an sFlow agent, to one relay-sink process with `--sflow-metrics`, twice
//! (the second round updates every interface, as the next poll would); the sink's resident
//! memory (VmRSS) is read after start-up, after the first round and after a scrape of
//! `/metrics/sflow`, and the exposition is checked to hold every interface.
//!
//! N interfaces export more series than the default `--sflow-metrics-max-series` holds from
//! about 7,000 interfaces on (14 series each), so this mode raises it to 20 series per
//! interface, and says so.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use proto::sflow::Header;
use proto::sflow::counters::{EthernetCounters, IfCounters, counter_datagram};
use relay_tests::procfs::Proc;
use relay_tests::{Pki, UdpCapture, http, metrics_addr, send_paced, start_agent, start_sink};
use serde_json::{Value, json};

/// Interfaces per sFlow agent (one datagram each round).
const PER_AGENT: u32 = 16;

/// The bound the issue sets for 10,000 interfaces, MiB.
pub(crate) const BUDGET_MIB_FOR_10K: f64 = 16.0;

/// Options of `--sflow-interfaces`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct InterfacesArgs {
    /// Measure the sink's memory for this many interfaces of `--sflow-metrics` instead of
    /// the paths (issue 18: 10,000 within 16 MiB).
    #[arg(long, value_name = "N")]
    pub(crate) sflow_interfaces: Option<u32>,
}

/// Counters of interface `if_index`, round `round`.
fn counters(if_index: u32, round: u64) -> (IfCounters, EthernetCounters) {
    let n = u64::from(if_index) * 1_000 + round * 1_000_000;
    let small = |k: u64| Some(((n + k) % 4_000_000_000) as u32);
    let generic = IfCounters {
        if_index,
        if_type: 6,
        if_speed: Some(10_000_000_000),
        if_direction: 1,
        if_status: 3,
        in_octets: Some(n * 1_500),
        in_ucast_pkts: small(1),
        in_multicast_pkts: small(2),
        in_broadcast_pkts: small(3),
        in_discards: small(4),
        in_errors: small(5),
        in_unknown_protos: small(6),
        out_octets: Some(n * 1_400),
        out_ucast_pkts: small(7),
        out_multicast_pkts: small(8),
        out_broadcast_pkts: small(9),
        out_discards: small(10),
        out_errors: small(11),
        promiscuous_mode: 0,
    };
    let ethernet = EthernetCounters::from_array([small(12); 13]);
    (generic, ethernet)
}

/// A round of datagrams: one per sFlow agent, with the counter samples of its interfaces.
fn round(interfaces: u32, round: u64) -> Vec<Vec<u8>> {
    (0..interfaces.div_ceil(PER_AGENT))
        .map(|a| {
            let agent = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (a + 1)));
            let mut header = Header::from_agent(agent);
            header.uptime_ms = 3_600_000 + round as u32 * 20_000;
            header.sequence = round as u32 + 1;
            let first = a * PER_AGENT;
            let samples: Vec<(IfCounters, EthernetCounters)> = (first
                ..(first + PER_AGENT).min(interfaces))
                .map(|i| counters(i + 1, round))
                .collect();
            let refs: Vec<(u32, &IfCounters, Option<&EthernetCounters>)> = samples
                .iter()
                .map(|(g, e)| (round as u32 + 1, g, Some(e)))
                .collect();
            counter_datagram(&header, &refs)
        })
        .collect()
}

/// Runs the measurement and prints it; the JSON for the results file.
pub(crate) fn run(interfaces: u32) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let receiver = UdpCapture::bind();
    let max_series = (interfaces as usize * 20).to_string();
    let (sink, sink_addr) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[receiver.addr()],
        None,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--sflow-metrics",
            "--sflow-metrics-max-series",
            &max_series,
        ],
    );
    let metrics = metrics_addr(&sink);
    let (agent, listen) = start_agent(
        &pki.ca(),
        &pki.agent_cert("site"),
        sink_addr,
        "localhost",
        &[],
    );
    agent.wait_for("connected to sink");
    let sink_proc = Proc::of(sink.pid());
    // A scrape first, so the baseline has served /metrics/sflow once too.
    let _ = http::get(metrics, "/metrics/sflow");
    std::thread::sleep(Duration::from_millis(500));
    let before = sink_proc.rss_kib();
    let mut sent = 0;
    for r in 0..2 {
        let datagrams = round(interfaces, r);
        send_paced(listen, &datagrams, 64, || receiver.len() - sent);
        sent += datagrams.len();
    }
    let fed = sink_proc.rss_kib();
    let exposition = http::get(metrics, "/metrics/sflow").expect("/metrics/sflow");
    let exported = exposition
        .body
        .lines()
        .filter(|l| l.starts_with("sflow_if_in_octets_total{"))
        .count();
    let series = exposition
        .body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    std::thread::sleep(Duration::from_millis(500));
    let scraped = sink_proc.rss_kib();
    let grown = scraped.max(fed).saturating_sub(before);
    let mib = grown as f64 / 1024.0;
    let per_interface = grown as f64 * 1024.0 / f64::from(interfaces);
    let budget = BUDGET_MIB_FOR_10K * f64::from(interfaces) / 10_000.0;
    println!(
        "relay-sink --sflow-metrics (--sflow-metrics-max-series {max_series}, raised for this \
         count): {interfaces} interfaces, {exported} exported, {series} series, exposition {} KiB",
        exposition.body.len() / 1024
    );
    println!(
        "resident memory: {before} KiB after start, {fed} KiB fed, {scraped} KiB after a scrape: \
         +{mib:.1} MiB, {per_interface:.0} bytes per interface (issue 18: ≤ {budget:.1} MiB)"
    );
    assert_eq!(exported, interfaces as usize, "every interface exported");
    json!({
        "interfaces": interfaces,
        "exported": exported,
        "series": series,
        "exposition_bytes": exposition.body.len(),
        "rss_kib": { "started": before, "fed": fed, "scraped": scraped },
        "grown_mib": mib,
        "bytes_per_interface": per_interface,
        "check": {
            "check": format!("sink memory for {interfaces} interfaces of --sflow-metrics ≤ {budget:.1} MiB (issue 18: 16 MiB for 10,000)"),
            "pass": mib <= budget,
            "measured": format!("+{mib:.1} MiB"),
        },
    })
}
