//! Independent truth for `/metrics/sflow`: every series the sink exports is checked against
//! Wireshark's own decoding (`tshark -T fields`, `sflow_245.ifinoct`, …) of the very
//! datagrams the sink replayed, with the counter semantics written here from that decoding
//! alone: a total starts at the counter's first known value and adds each later difference
//! modulo the counter's width; "unknown" (all ones) is no value; a family that sums several
//! counters (packets: unicast + multicast + broadcast) sums those the agent knows.
//!
//! Two producers, each through a real agent and sink with the defaults and `--sflow-metrics`:
//!
//! - the project's generator: 3 sFlow agents of 2 sub-agents, 288 interfaces with the
//!   generic and the ethernet records, each interface's 32-bit discards counter wrapping
//!   during the run, some interfaces operationally down;
//! - pmacctd's sfprobe plugin (Debian's pmacct), sampling traffic on the veth of a network
//!   namespace the test makes and sending the generic counters of that interface (root).
//!
//! Needs tshark and, for the second, root, `ip` and pmacctd (tests/run.sh installs them as
//! root). As root a missing tool fails the test; otherwise the test skips with the reason.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::sflow::counters::counter_samples;
use relay_tests::netns::{Netns, is_root};
use relay_tests::sflow::SflowGen;
use relay_tests::{Daemon, field, http, message, send_paced, tshark};

use crate::Relay;

/// The header fields read per datagram.
const AGENT: &str = "sflow_245.agent";
const SUB_AGENT: &str = "sflow_245.sub_agent_id";
const SEQUENCE: &str = "sflow_245.sequence_number";
const UPTIME: &str = "sflow_245.sysuptime";
/// Per generic interface record (one per counter sample): its ifIndex and gauges.
const IF_INDEX: &str = "sflow_245.ifindex";
const SPEED: &str = "sflow_245.ifspeed";
const ADMIN: &str = "sflow_245.ifadmin_status";
const OPER: &str = "sflow_245.ifoper_status";

/// The counters of the generic interface record (0:1): tshark's field, and whether the agent
/// counts it in 64 bits.
const GENERIC: [(&str, bool); 12] = [
    ("sflow_245.ifinoct", true),
    ("sflow_245.ifinpkt", false),
    ("sflow_245.ifinmcast", false),
    ("sflow_245.ifinbcast", false),
    ("sflow_245.ifindisc", false),
    ("sflow_245.ifinerr", false),
    ("sflow_245.ifoutoct", true),
    ("sflow_245.ifoutpkt", false),
    ("sflow_245.ifoutmcast", false),
    ("sflow_245.ifoutbcast", false),
    ("sflow_245.ifoutdisc", false),
    ("sflow_245.ifouterr", false),
];

/// The counters of the ethernet interface record (0:2) that are exported (all 32-bit).
const ETHERNET: [&str; 4] = [
    "sflow_245.dot3StatsFCSErrors",
    "sflow_245.dot3StatsAlignmentErrors",
    "sflow_245.dot3StatsSymbolErrors",
    "sflow_245.dot3StatsFrameTooLongs",
];

/// Each exported counter family and the tshark fields it adds up.
const FAMILIES: [(&str, &[&str]); 12] = [
    ("sflow_if_in_octets_total", &["sflow_245.ifinoct"]),
    ("sflow_if_out_octets_total", &["sflow_245.ifoutoct"]),
    (
        "sflow_if_in_packets_total",
        &[
            "sflow_245.ifinpkt",
            "sflow_245.ifinmcast",
            "sflow_245.ifinbcast",
        ],
    ),
    (
        "sflow_if_out_packets_total",
        &[
            "sflow_245.ifoutpkt",
            "sflow_245.ifoutmcast",
            "sflow_245.ifoutbcast",
        ],
    ),
    ("sflow_if_in_errors_total", &["sflow_245.ifinerr"]),
    ("sflow_if_out_errors_total", &["sflow_245.ifouterr"]),
    ("sflow_if_in_discards_total", &["sflow_245.ifindisc"]),
    ("sflow_if_out_discards_total", &["sflow_245.ifoutdisc"]),
    (
        "sflow_if_fcs_errors_total",
        &["sflow_245.dot3StatsFCSErrors"],
    ),
    (
        "sflow_if_alignment_errors_total",
        &["sflow_245.dot3StatsAlignmentErrors"],
    ),
    (
        "sflow_if_symbol_errors_total",
        &["sflow_245.dot3StatsSymbolErrors"],
    ),
    (
        "sflow_if_frame_too_long_total",
        &["sflow_245.dot3StatsFrameTooLongs"],
    ),
];

const TIMESTAMP: &str = "sflow_if_last_sample_timestamp_seconds";

/// One counter of an interface, as the model keeps it.
#[derive(Debug, Clone, Copy)]
struct Total {
    total: u64,
    last: u64,
}

/// An interface, as the model keeps it from tshark's values.
#[derive(Debug, Default)]
struct Interface {
    counters: HashMap<&'static str, Total>,
    speed: Option<u64>,
    admin_up: Option<bool>,
    oper_up: Option<bool>,
}

/// What the model found in the datagrams, besides the series.
#[derive(Debug, Default)]
struct Model {
    /// Series name with labels → value, every family but [`TIMESTAMP`].
    series: BTreeMap<String, String>,
    /// Interfaces, keyed as their labels.
    interfaces: usize,
    counter_samples: usize,
    /// Counter steps that went over 2³² (a wrap).
    wraps: usize,
    /// Samples with the ethernet record.
    ethernet_samples: usize,
}

fn number(field: &str, value: &str) -> u64 {
    value
        .parse()
        .unwrap_or_else(|e| panic!("{field}: `{value}` from tshark is not a number: {e}"))
}

fn boolean(field: &str, value: &str) -> bool {
    match value {
        "1" | "True" | "TRUE" | "true" => true,
        "0" | "False" | "FALSE" | "false" => false,
        _ => panic!("{field}: `{value}` from tshark is not a boolean"),
    }
}

/// The series the sink should export for `datagrams` (replayed in this order) of `site`,
/// from tshark's decoding of them alone.
fn model(datagrams: &[Vec<u8>], site: &str, dir: &Path) -> Model {
    let pcap = dir.join("replayed.pcap");
    tshark::write_pcap(&pcap, Ipv4Addr::new(127, 0, 0, 1), datagrams).expect("write pcap");
    let mut names = vec![
        AGENT, SUB_AGENT, SEQUENCE, UPTIME, IF_INDEX, SPEED, ADMIN, OPER,
    ];
    names.extend(GENERIC.iter().map(|(name, _)| *name));
    names.extend(ETHERNET);
    let rows = tshark::fields(&pcap, &names).expect("tshark decodes the capture");
    assert_eq!(rows.len(), datagrams.len(), "tshark read every packet");
    let column = |name: &str| names.iter().position(|n| *n == name).expect("a field read");
    let mut interfaces: BTreeMap<(IpAddr, u32), Interface> = BTreeMap::new();
    let mut streams: HashMap<(IpAddr, u32), (u32, u32)> = HashMap::new();
    let mut m = Model::default();
    for (i, row) in rows.iter().enumerate() {
        let one = |name: &str| -> &str {
            match row[column(name)].as_slice() {
                [value] => value,
                values => panic!("datagram {i}: {name} is {values:?}, not one value"),
            }
        };
        let agent: IpAddr = one(AGENT).parse().expect("an agent address");
        let stream = (agent, number(SUB_AGENT, one(SUB_AGENT)) as u32);
        let sequence = number(SEQUENCE, one(SEQUENCE)) as u32;
        let uptime = number(UPTIME, one(UPTIME)) as u32;
        // The model follows no restart, duplicate or reordering: the producers here have none,
        // and the relay must not make one.
        if let Some((last_sequence, last_uptime)) = streams.insert(stream, (sequence, uptime)) {
            assert!(
                sequence > last_sequence && uptime >= last_uptime,
                "datagram {i} of {stream:?}: sequence {sequence} after {last_sequence}, \
                 uptime {uptime} after {last_uptime}: replayed twice, out of order, or the \
                 producer restarted"
            );
        }
        let samples = row[column(IF_INDEX)].len();
        let per_sample = |name: &str| -> &[String] {
            let values = &row[column(name)];
            assert_eq!(
                values.len(),
                samples,
                "datagram {i}: {samples} generic records, {} values of {name}",
                values.len()
            );
            values
        };
        let ethernet = row[column(ETHERNET[0])].len();
        assert!(
            ethernet == 0 || ethernet == samples,
            "datagram {i}: {ethernet} ethernet records for {samples} generic ones: this test \
             pairs them by position"
        );
        for s in 0..samples {
            m.counter_samples += 1;
            let if_index = number(IF_INDEX, &per_sample(IF_INDEX)[s]) as u32;
            let interface = interfaces.entry((agent, if_index)).or_default();
            let speed = number(SPEED, &per_sample(SPEED)[s]);
            interface.speed = (speed != u64::MAX).then_some(speed);
            interface.admin_up = Some(boolean(ADMIN, &per_sample(ADMIN)[s]));
            interface.oper_up = Some(boolean(OPER, &per_sample(OPER)[s]));
            let mut values: Vec<(&'static str, bool, u64)> = GENERIC
                .iter()
                .map(|(name, wide)| (*name, *wide, number(name, &per_sample(name)[s])))
                .collect();
            if ethernet > 0 {
                m.ethernet_samples += 1;
                values.extend(
                    ETHERNET
                        .iter()
                        .map(|name| (*name, false, number(name, &per_sample(name)[s]))),
                );
            }
            for (name, wide, value) in values {
                let unknown = if wide { u64::MAX } else { u64::from(u32::MAX) };
                if value == unknown {
                    continue;
                }
                let counter = interface.counters.entry(name).or_insert(Total {
                    total: value,
                    last: value,
                });
                let step = if wide {
                    value.wrapping_sub(counter.last)
                } else {
                    u64::from((value as u32).wrapping_sub(counter.last as u32))
                };
                assert!(
                    step < 1 << 31,
                    "datagram {i}: {name} of {agent} ifIndex {if_index} went from {} to \
                     {value}: the producer restarted, which this model does not follow",
                    counter.last
                );
                if value < counter.last {
                    m.wraps += 1;
                }
                counter.total = counter.total.wrapping_add(step);
                counter.last = value;
            }
        }
    }
    m.interfaces = interfaces.len();
    for ((agent, if_index), interface) in &interfaces {
        let labels = format!("{{agent=\"{agent}\",ifindex=\"{if_index}\",site=\"{site}\"}}");
        for (family, fields) in FAMILIES {
            let known: Vec<u64> = fields
                .iter()
                .filter_map(|f| interface.counters.get(f).map(|c| c.total))
                .collect();
            if !known.is_empty() {
                let sum = known.iter().fold(0u64, |a, b| a.wrapping_add(*b));
                m.series
                    .insert(format!("{family}{labels}"), sum.to_string());
            }
        }
        let gauges = [
            ("sflow_if_speed_bps", interface.speed),
            ("sflow_if_admin_up", interface.admin_up.map(u64::from)),
            ("sflow_if_oper_up", interface.oper_up.map(u64::from)),
        ];
        for (family, value) in gauges {
            if let Some(value) = value {
                m.series
                    .insert(format!("{family}{labels}"), value.to_string());
            }
        }
    }
    m
}

/// The series of an exposition, series name with labels → value, and the timestamps of
/// [`TIMESTAMP`] apart.
fn exported(body: &str) -> (BTreeMap<String, String>, Vec<f64>) {
    let mut series = BTreeMap::new();
    let mut stamps = Vec::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("`series value`");
        if name.starts_with(TIMESTAMP) {
            stamps.push(value.parse().expect("a timestamp"));
        } else {
            series.insert(name.to_owned(), value.to_owned());
        }
    }
    (series, stamps)
}

/// What differs between the exported series and the model's, at most 20 lines of it.
fn differences(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in want {
        match got.get(name) {
            None => out.push(format!("missing: {name} {value}")),
            Some(v) if v != value => out.push(format!("{name}: exported {v}, tshark's {value}")),
            Some(_) => {}
        }
    }
    for (name, value) in got {
        if !want.contains_key(name) {
            out.push(format!("not in the datagrams: {name} {value}"));
        }
    }
    out.truncate(20);
    out
}

/// Checks `/metrics/sflow` at `metrics` against the model of `datagrams`, waiting up to 5 s
/// for the exporter to have taken the last of them; returns the model.
fn check(metrics: SocketAddr, datagrams: &[Vec<u8>], site: &str, dir: &Path, since: f64) -> Model {
    let want = model(datagrams, site, dir);
    assert!(want.counter_samples > 0, "no counter sample to check");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = http::get(metrics, "/metrics/sflow")
            .expect("/metrics/sflow")
            .body;
        let (got, stamps) = exported(&body);
        let diff = differences(&got, &want.series);
        if diff.is_empty() {
            let now = unix_now();
            assert_eq!(stamps.len(), want.interfaces, "a timestamp per interface");
            for stamp in stamps {
                assert!(
                    (since - 1.0..=now + 1.0).contains(&stamp),
                    "{TIMESTAMP} {stamp}: not between {since} and {now}"
                );
            }
            println!(
                "{site}: {} series of {} interfaces equal tshark's reading of {} datagrams \
                 ({} counter samples, {} with the ethernet record, {} 32-bit wraps)",
                want.series.len(),
                want.interfaces,
                datagrams.len(),
                want.counter_samples,
                want.ethernet_samples,
                want.wraps
            );
            return want;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics/sflow differs from tshark's reading of the {} datagrams replayed:\n{}",
            datagrams.len(),
            diff.join("\n")
        );
        // Polling the exporter until it has taken the last datagrams.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the test can run with `what`: where it cannot, the test skips, but as root (CI)
/// a missing tool is a failure.
fn runs<T>(what: Result<T, String>) -> Option<T> {
    match what {
        Ok(it) => Some(it),
        Err(why) if is_root() => panic!("{why}"),
        Err(why) => {
            println!("SKIPPED: {why}");
            None
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Datagrams of the generator: 6 streams, a counter sample in 4 datagrams, so 200 counter
/// samples a stream, 4 of each of its 48 interfaces, the discards counter wrapping near the
/// 108th.
const GENERATED: usize = 4_800;

#[test]
fn the_generators_counters_are_exported_as_tshark_reads_them() {
    if runs(tshark::available()).is_none() {
        return;
    }
    let relay = Relay::start("site-gen", &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut generator = SflowGen::new(3, 2, 18);
    let sent: Vec<Vec<u8>> = (0..GENERATED).map(|_| generator.datagram()).collect();
    let since = unix_now();
    send_paced(relay.listen, &sent, 64, || relay.collector.len());
    relay.collector.assert_exactly(&sent);
    let received = relay.collector.received();
    let m = check(relay.metrics, &received, "site-gen", dir.path(), since);
    assert_eq!(m.interfaces, 3 * 2 * 48);
    assert_eq!(m.counter_samples, GENERATED / 4);
    assert_eq!(m.ethernet_samples, m.counter_samples);
    assert!(
        m.wraps >= m.interfaces,
        "every interface's discards wrapped"
    );
    assert!(
        m.series
            .iter()
            .any(|(name, value)| name.starts_with("sflow_if_oper_up") && value == "0"),
        "an interface down is exported as 0"
    );
}

/// Where pmacctd is, or why it is not.
fn pmacctd() -> Result<PathBuf, String> {
    let candidates = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pmacctd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "pmacctd is not installed (Debian: apt-get install pmacct, which tests/run.sh does \
             as root)"
                .to_owned()
        })
}

/// The sFlow agent address pmacctd is told to report, and the ifIndex of its interface.
const PMACCTD_AGENT: &str = "198.51.100.7";
const PMACCTD_IF_INDEX: u32 = 5;
/// Counter samples to wait for: pmacctd sends one every 20 s, the first after about 7.
const PMACCTD_COUNTER_SAMPLES: usize = 2;

/// Counter samples in `datagrams`, as the project's decoder counts them (only to know when
/// enough have arrived; the check is tshark's).
fn counter_samples_in(datagrams: &[Vec<u8>]) -> usize {
    datagrams
        .iter()
        .map(|d| counter_samples(d).map_or(0, |samples| samples.filter(Result::is_ok).count()))
        .sum()
}

#[test]
fn pmacctds_counters_are_exported_as_tshark_reads_them() {
    if runs(tshark::available()).is_none() {
        return;
    }
    let Some(program) = runs(pmacctd()) else {
        return;
    };
    let Some(ns) = runs(Netns::create()) else {
        return;
    };
    // The agent receives on the host's end of the veth too, where pmacctd sends.
    let relay = Relay::start("site-pm", &["--listen", &format!("{}:0", ns.host_addr)]);
    let (agent, collector) = (&relay.agent, &relay.collector);
    let dir = tempfile::tempdir().unwrap();
    let host_listen = format!("{}:", ns.host_addr);
    assert!(
        agent.wait_events(Duration::from_secs(10), |events| events.iter().any(|e| {
            message(e) == "receiving sFlow" && field(e, "listen").starts_with(&host_listen)
        })),
        "the agent receives on {}",
        ns.host_addr
    );
    let receiver: SocketAddr = agent
        .events()
        .iter()
        .map(|e| field(e, "listen").to_owned())
        .find(|l| l.starts_with(&host_listen))
        .expect("the listen event")
        .parse()
        .expect("a socket address");

    let config = dir.path().join("pmacctd.conf");
    std::fs::write(
        &config,
        format!(
            "daemonize: false\n\
             pcap_interface: {interface}\n\
             plugins: sfprobe[relay]\n\
             sfprobe_receiver[relay]: {receiver}\n\
             sfprobe_agentip[relay]: {PMACCTD_AGENT}\n\
             sfprobe_ifindex[relay]: {PMACCTD_IF_INDEX}\n\
             sfprobe_ifspeed[relay]: 1000000000\n\
             sampling_rate[relay]: 1\n",
            interface = ns.ns_if
        ),
    )
    .unwrap();
    let mut command = ns.command(&program);
    command.arg("-f").arg(&config);
    let mut pmacctd = Daemon::start("pmacctd", command);

    // Traffic into the namespace for pmacctd to count: UDP to the discard port, 50 a second,
    // of varied sizes, until the counter samples are in (at most 60 s).
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let to = SocketAddr::from((ns.ns_addr, 9));
        let from = ns.host_addr;
        std::thread::spawn(move || {
            let socket = UdpSocket::bind((from, 0)).unwrap();
            let until = Instant::now() + Duration::from_secs(60);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let _ = socket.send_to(&vec![0x5a; 64 + n % 1_300], to);
                n += 1;
                // Pacing the traffic pmacctd samples.
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let since = unix_now();
    let arrived = collector.wait_until(Duration::from_secs(60), |r| {
        counter_samples_in(r) >= PMACCTD_COUNTER_SAMPLES
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    pmacctd.terminate();
    assert!(
        arrived,
        "{} counter samples of pmacctd within 60 s ({} datagrams replayed); pmacctd said:\n{}",
        counter_samples_in(&collector.received()),
        collector.len(),
        pmacctd.lines().join("\n")
    );
    // What pmacctd sent last is still on its way: until nothing more comes for a second.
    let mut seen = collector.len();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        if collector.len() == seen {
            break;
        }
        seen = collector.len();
    }
    let m = check(
        relay.metrics,
        &collector.received(),
        "site-pm",
        dir.path(),
        since,
    );
    assert_eq!(m.interfaces, 1, "pmacctd's one interface");
    let octets = format!(
        "sflow_if_in_octets_total{{agent=\"{PMACCTD_AGENT}\",ifindex=\"{PMACCTD_IF_INDEX}\",\
         site=\"site-pm\"}}"
    );
    let counted: u64 = m.series.get(&octets).map_or(0, |v| v.parse().unwrap());
    assert!(
        counted > 0,
        "pmacctd counted the traffic: {octets} is {counted}"
    );
}
