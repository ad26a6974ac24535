//! End-to-end: routing by sFlow agent at the relay agent, through the real binaries. An
//! agent with two `[[sink]]` entries, one filtered by `agents` (an included /24 less one
//! address, and an IPv6 /48): that sink's collector gets exactly the datagrams of the
//! included sFlow agents, byte for byte and in order, the other sink's collector gets all
//! (over QUIC and over gRPC); a sink's `not-after` ends its feed within a second, removes its
//! spool folder and leaves the other sink whole, and a restart skips the ended entry with a
//! warning; a filter changed by SIGHUP at 5,000 datagrams a second applies from one datagram
//! on, losing nothing.
//!
//! The sink side (`[[forward]]` entries filtered by site and agent) is `forward.rs`'s.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use proto::sflow::Header;
use relay_tests::metrics::Scrape;
use relay_tests::{
    Daemon, Pki, Transport, UdpCapture, WAIT, agent_listen_addr, metrics_addr, path, send_paced,
    start_sink,
};

/// sFlow agents: three inside the consultant's filter, three outside.
const AGENTS: [&str; 6] = [
    "10.1.0.1",
    "10.1.0.2",
    "10.1.0.99",
    "10.2.0.1",
    "2001:db8:10::7",
    "2001:db8:11::7",
];
/// The filter of the issue's example: an included /24 less one address, and an IPv6 /48.
const FILTER: &str = r#"agents = ["10.1.0.0/24", "!10.1.0.99", "2001:db8:10::/48"]"#;

/// Whether `agent` passes [`FILTER`].
fn in_filter(agent: IpAddr) -> bool {
    let text = agent.to_string();
    (text.starts_with("10.1.0.") && text != "10.1.0.99") || text.starts_with("2001:db8:10:")
}

/// `n` sFlow v5 datagrams, round robin over `agents` and three sub-agents each, every
/// (agent, sub-agent) stream numbered from 1; after the header, the datagram's index and
/// filler, so each is unique. With each, its agent.
fn mixed(n: usize, agents: &[&str]) -> Vec<(IpAddr, Vec<u8>)> {
    let mut next = std::collections::HashMap::new();
    (0..n)
        .map(|i| {
            let agent: IpAddr = agents[i % agents.len()].parse().unwrap();
            let sub_agent = (i / agents.len() % 3) as u32;
            let sequence = next.entry((agent, sub_agent)).or_insert(0u32);
            *sequence += 1;
            let mut header = Header::from_agent(agent);
            header.sub_agent = sub_agent;
            header.sequence = *sequence;
            let mut datagram = header.to_bytes();
            datagram.extend((i as u32).to_be_bytes());
            datagram.resize(datagram.len() + 100 + i * 37 % 1100, (i % 251) as u8);
            (agent, datagram)
        })
        .collect()
}

/// The datagrams of `sent` whose agent passes `keep`.
fn only(sent: &[(IpAddr, Vec<u8>)], keep: impl Fn(IpAddr) -> bool) -> Vec<Vec<u8>> {
    (sent.iter().filter(|(agent, _)| keep(*agent)))
        .map(|(_, d)| d.clone())
        .collect()
}

/// A sink replaying to a collector of its own.
struct Sink {
    daemon: Daemon,
    addr: SocketAddr,
    collector: UdpCapture,
}

fn sink(pki: &Pki, cert: &(PathBuf, PathBuf)) -> Sink {
    let collector = UdpCapture::bind();
    let (daemon, addr) = start_sink(
        pki,
        cert,
        &[collector.addr()],
        None,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    Sink {
        daemon,
        addr,
        collector,
    }
}

/// Writes the agent's config file: its certificates, `transport`, and one `[[sink]]` entry
/// per (sink, extra TOML lines of the entry).
fn write_config(
    file: &Path,
    pki: &Pki,
    transport: Transport,
    spool: Option<&Path>,
    sinks: &[(SocketAddr, &str)],
) {
    let (cert, key) = (pki.issue_once("site-a"), pki.key_of("site-a"));
    let mut text = format!(
        "listen = [\"127.0.0.1:0\"]\nca = {:?}\ncert = {:?}\nkey = {:?}\ntransport = \"{}\"\nreconnect-max = \"1s\"\n",
        path(&pki.ca()),
        path(&cert),
        path(&key),
        transport.name()
    );
    if let Some(spool) = spool {
        text += &format!("spool-dir = {:?}\n", path(spool));
    }
    for (addr, extra) in sinks {
        text += &format!("[[sink]]\naddr = \"{addr}\"\nserver-name = \"localhost\"\n{extra}\n");
    }
    std::fs::write(file, text).unwrap();
}

/// What the tests need of the PKI beyond the harness's: the agent certificate issued once,
/// so that a restarted agent presents the same one.
trait AgentCert {
    fn issue_once(&self, name: &str) -> PathBuf;
    fn key_of(&self, name: &str) -> PathBuf;
}

impl AgentCert for Pki {
    fn issue_once(&self, name: &str) -> PathBuf {
        let cert = self.ca().with_file_name(format!("{name}.pem"));
        if !cert.exists() {
            self.agent_cert(name);
        }
        cert
    }

    fn key_of(&self, name: &str) -> PathBuf {
        self.ca().with_file_name(format!("{name}.key"))
    }
}

/// Starts the agent on `config`, waits until it is connected to `sinks` sinks; the agent and
/// where it receives sFlow.
fn start_agent(config: &Path, sinks: usize) -> (Daemon, SocketAddr) {
    let agent = Daemon::spawn(
        "relay-agent",
        &[
            "--log-format",
            "json",
            "--config",
            &path(config),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let listen = agent_listen_addr(&agent);
    agent.wait_for_nth("connected to sink", sinks, WAIT);
    (agent, listen)
}

fn filtered_sink_gets_only_the_included_agents(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let cert = pki.sink_cert("sink");
    let (everything, consultant) = (sink(&pki, &cert), sink(&pki, &cert));
    let config = dir.path().join("agent.toml");
    write_config(
        &config,
        &pki,
        transport,
        None,
        &[(everything.addr, ""), (consultant.addr, FILTER)],
    );
    let (agent, listen) = start_agent(&config, 2);
    let sent = mixed(1_200, &AGENTS);
    let all: Vec<Vec<u8>> = sent.iter().map(|(_, d)| d.clone()).collect();
    send_paced(listen, &all, 200, || everything.collector.len());
    everything.collector.assert_exactly(&all);
    let included = only(&sent, in_filter);
    assert_eq!(included.len(), 600, "three of the six agents");
    consultant.collector.assert_exactly(&included);
    let scrape = Scrape::of(metrics_addr(&agent));
    let filtered = |sink: SocketAddr| {
        let sink = sink.to_string();
        scrape.value_or_zero(
            "relay_agent_datagrams_filtered_total",
            &[("sink", sink.as_str())],
        )
    };
    assert_eq!(filtered(consultant.addr), 600.0, "{scrape}");
    assert_eq!(filtered(everything.addr), 0.0);
    // Nothing of the other agents reached the consultant's sink at all.
    let received = Scrape::of(metrics_addr(&consultant.daemon));
    assert_eq!(received.sum("relay_sink_datagrams_received_total"), 600.0);
}

#[test]
fn a_filtered_sink_gets_only_the_included_sflow_agents_over_quic() {
    filtered_sink_gets_only_the_included_agents(Transport::Quic);
}

#[test]
fn a_filtered_sink_gets_only_the_included_sflow_agents_over_grpc() {
    filtered_sink_gets_only_the_included_agents(Transport::Grpc);
}

/// RFC 3339 for a Unix second.
fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Sends `datagrams` to `to` at `per_second` on a thread of its own, counting in `sent`.
fn send_counted(
    to: SocketAddr,
    datagrams: Vec<Vec<u8>>,
    per_second: u32,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let start = Instant::now();
        for (i, d) in datagrams.iter().enumerate() {
            let due = start + Duration::from_secs_f64(i as f64 / f64::from(per_second));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                // Pacing the sender at `per_second`.
                std::thread::sleep(wait);
            }
            socket.send_to(d, to).unwrap();
            sent.store(i + 1, Ordering::Release);
        }
    })
}

#[test]
fn not_after_ends_a_feed_within_a_second_and_a_restart_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let cert = pki.sink_cert("sink");
    let (everything, consultant) = (sink(&pki, &cert), sink(&pki, &cert));
    let spool = dir.path().join("spool");
    let config = dir.path().join("agent.toml");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    // Three to four seconds ahead, on a whole second.
    let end_unix = now.as_secs() as i64 + 4;
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(end_unix as u64);
    let entry = format!("{FILTER}\nnot-after = \"{}\"", rfc3339(end_unix));
    write_config(
        &config,
        &pki,
        Transport::Quic,
        Some(&spool),
        &[(everything.addr, ""), (consultant.addr, &entry)],
    );
    let (agent, listen) = start_agent(&config, 2);
    let consultant_spool = spool.join(consultant.addr.to_string().replace(':', "_"));
    assert!(consultant_spool.is_dir(), "{consultant_spool:?}");
    // 1,000 a second until two seconds past the end.
    let left = end.duration_since(SystemTime::now()).unwrap() + Duration::from_secs(2);
    let n = (left.as_secs_f64() * 1000.0) as usize;
    let sent = mixed(n, &AGENTS);
    let all: Vec<Vec<u8>> = sent.iter().map(|(_, d)| d.clone()).collect();
    let sender = send_counted(listen, all.clone(), 1000, Arc::default());
    // When the consultant's collector last grew, against the wall clock.
    let mut last_growth = (0, SystemTime::now());
    while !sender.is_finished() {
        let len = consultant.collector.len();
        if len != last_growth.0 {
            last_growth = (len, SystemTime::now());
        }
        // Sampling the collector's count every 20 ms.
        std::thread::sleep(Duration::from_millis(20));
    }
    sender.join().unwrap();
    everything.collector.assert_exactly(&all);
    let (received, at) = last_growth;
    assert!(received > 0, "the feed ran before its end");
    let late = at.duration_since(end).unwrap_or_default();
    assert!(
        late < Duration::from_secs(1),
        "the feed went on {late:?} past its end"
    );
    let ended = agent.wait_for("feed has ended");
    assert_eq!(
        relay_tests::field(&ended, "sink"),
        consultant.addr.to_string()
    );
    assert!(
        !consultant_spool.exists(),
        "the ended feed's spool folder is removed"
    );
    assert!(
        spool.read_dir().unwrap().count() == 1,
        "the other sink's spool stays"
    );
    // What arrived is what the filter passed, in order, up to the end.
    let included = only(&sent, in_filter);
    assert_eq!(consultant.collector.received(), included[..received]);
    let scrape = Scrape::of(metrics_addr(&agent));
    let consultant_label = consultant.addr.to_string();
    assert_eq!(
        scrape.value(
            "relay_agent_sink_not_after_seconds",
            &[("sink", consultant_label.as_str())]
        ),
        Some(end_unix as f64)
    );
    drop(agent);

    // Restarted with the entry past its end: a warning, and the other sink runs.
    let (agent, listen) = start_agent(&config, 1);
    let skipped = agent.wait_for("feed ended before start-up");
    assert_eq!(
        relay_tests::field(&skipped, "sink"),
        consultant.addr.to_string()
    );
    let more = mixed(300, &AGENTS);
    let more: Vec<Vec<u8>> = more.into_iter().map(|(_, d)| d).collect();
    let before = everything.collector.len();
    send_paced(listen, &more, 100, || everything.collector.len() - before);
    let expected: Vec<Vec<u8>> = all.iter().chain(&more).cloned().collect();
    everything.collector.assert_exactly(&expected);
    assert_eq!(
        consultant.collector.len(),
        received,
        "nothing more for the consultant"
    );
}

#[test]
fn a_filter_changed_by_sighup_at_5000_a_second_applies_from_one_datagram_on() {
    const RATE: u32 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let cert = pki.sink_cert("sink");
    let (steady, moved) = (sink(&pki, &cert), sink(&pki, &cert));
    let config = dir.path().join("agent.toml");
    let steady_filter = r#"agents = ["10.0.0.0/8"]"#;
    let write = |moved_filter: &str| {
        write_config(
            &config,
            &pki,
            Transport::Quic,
            None,
            &[(steady.addr, steady_filter), (moved.addr, moved_filter)],
        );
    };
    let (old, new) = (r#"agents = ["10.1.0.0/24"]"#, r#"agents = ["10.2.0.0/24"]"#);
    write(old);
    let (agent, listen) = start_agent(&config, 2);
    let sent = mixed(4 * RATE as usize, &AGENTS);
    let all: Vec<Vec<u8>> = sent.iter().map(|(_, d)| d.clone()).collect();
    let count = Arc::new(AtomicUsize::new(0));
    let sender = send_counted(listen, all, RATE, count.clone());
    // Intentional: the old filter runs for a second and a half of traffic first.
    std::thread::sleep(Duration::from_millis(1500));
    write(new);
    let sent_before_hup = count.load(Ordering::Acquire);
    agent.hangup();
    agent.wait_for("sink route reloaded");
    let sent_after_reload = count.load(Ordering::Acquire);
    sender.join().unwrap();
    // The unchanged route loses nothing.
    let ten: Vec<Vec<u8>> = only(&sent, |a| a.to_string().starts_with("10."));
    steady.collector.assert_exactly(&ten);
    assert_eq!(
        agent.count("sink route reloaded"),
        1,
        "only the moved sink's"
    );
    // The moved route: the old filter's datagrams up to one point in the stream, the new
    // filter's from the next on, none lost at the switch.
    let in_old = |a: IpAddr| a.to_string().starts_with("10.1.0.");
    let in_new = |a: IpAddr| a.to_string().starts_with("10.2.0.");
    // Complete: the old filter's share up to the switch, the new one's from there on.
    let expected = |(at, under_old): (usize, usize)| {
        under_old + sent[at..].iter().filter(|(a, _)| in_new(*a)).count()
    };
    let whole = moved.collector.wait_until(WAIT, |received| {
        switch_point(&sent, received, in_old, in_new)
            .is_ok_and(|switch| received.len() == expected(switch))
    });
    let received = moved.collector.received();
    let switch = switch_point(&sent, &received, in_old, in_new).unwrap_or_else(|e| panic!("{e}"));
    assert!(whole, "{} of {} arrived", received.len(), expected(switch));
    let at = switch.0;
    assert!(
        (sent_before_hup..=sent_after_reload + RATE as usize / 10).contains(&at),
        "switched at datagram {at}, SIGHUP at {sent_before_hup}, reload logged at {sent_after_reload}"
    );
}

/// Where in `sent` the moved sink's filter switched from `old` to `new` (disjoint filters):
/// `received` must be exactly the `old` datagrams of `sent[..at]`, then the `new` ones of
/// `sent[at..]` (a prefix of them, while they are still arriving). Returns `at`, the index of
/// the first datagram the new filter carried, and how many the old one carried; an error
/// says what does not fit.
fn switch_point(
    sent: &[(IpAddr, Vec<u8>)],
    received: &[Vec<u8>],
    old: impl Fn(IpAddr) -> bool,
    new: impl Fn(IpAddr) -> bool,
) -> Result<(usize, usize), String> {
    let index: std::collections::HashMap<&[u8], usize> = sent
        .iter()
        .enumerate()
        .map(|(i, (_, d))| (&d[..], i))
        .collect();
    let at = |r: &Vec<u8>| index.get(&r[..]).copied().ok_or("a datagram never sent");
    let first_new = (received
        .iter()
        .position(|r| at(r).is_ok_and(|i| new(sent[i].0))))
    .ok_or("nothing of the new filter arrived")?;
    let old_ones = sent.iter().filter(|(a, _)| old(*a)).map(|(_, d)| d);
    if !received[..first_new].iter().eq(old_ones.take(first_new)) {
        return Err("before the switch: not the old filter's datagrams, in order".into());
    }
    let last_old = match first_new {
        0 => 0,
        n => at(&received[n - 1])? + 1,
    };
    let switch = at(&received[first_new])?;
    // Between the last datagram carried under the old filter and the first under the new,
    // the switch came at one point: the old filter's datagrams after it (it no longer
    // carried them) and no new filter's datagram after that point (it would have).
    let between = &sent[last_old..switch];
    let first_old_between = between
        .iter()
        .position(|(a, _)| old(*a))
        .unwrap_or(between.len());
    if between[first_old_between..].iter().any(|(a, _)| new(*a)) {
        return Err(format!(
            "datagrams lost at the switch, between {last_old} and {switch}"
        ));
    }
    let new_ones = sent[switch..]
        .iter()
        .filter(|(a, _)| new(*a))
        .map(|(_, d)| d);
    if !received[first_new..]
        .iter()
        .zip(new_ones)
        .all(|(r, d)| r == d)
    {
        return Err("after the switch: not the new filter's datagrams, in order".into());
    }
    Ok((switch, first_new))
}

#[test]
fn a_malformed_route_is_a_configuration_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let config = dir.path().join("agent.toml");
    let sink: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (entry, names) in [
        (r#"agents = ["10.1.0.0/33"]"#, "\"10.1.0.0/33\""),
        (r#"agents = ["10.1.0.1/24"]"#, "10.1.0.0/24"),
        (r#"not-after = "2027-01-31 18:00""#, "RFC 3339"),
        (r#"sites = ["site-a"]"#, "unknown field `sites`"),
    ] {
        write_config(&config, &pki, Transport::Quic, None, &[(sink, entry)]);
        let out = Command::new(relay_tests::bin("relay-agent"))
            .args(["--config", &path(&config)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{entry}: {err}");
        assert!(
            err.contains("configuration error") && err.contains(names),
            "{entry}: {err}"
        );
    }
}

/// The README's "Sharing with a consultant", chained: the company's sink picks site-a's core
/// switches with a `[[forward]]` entry (given inline on the command line) and replays them on
/// the loopback to a relay-agent beside it, which streams them to the consultant's own sink;
/// the two sides exchanged only CA certificates. The consultant's collector gets exactly the
/// included agents' datagrams of site-a, and the company's own collector everything.
#[test]
fn a_consultant_gets_only_their_share_through_a_chained_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    let (ours, theirs) = (Pki::new(&ours), Pki::new(&theirs));
    // The consultant's sink: their certificate, our CA, our chained agent's name only.
    let allowed = dir.path().join("allowed-agents.txt");
    std::fs::write(&allowed, "acme-to-consultant\n").unwrap();
    let consultant = UdpCapture::bind();
    let (_their_sink, their_addr) = start_sink(
        &ours,
        &theirs.sink_cert("relay-consultant"),
        &[consultant.addr()],
        None,
        &["--allowed-agents", &path(&allowed)],
    );
    // The chained agent beside our sink.
    let chain_listen = relay_tests::free_udp_port();
    let (chain_cert, chain_key) = ours.agent_cert("acme-to-consultant");
    let chain = Daemon::spawn(
        "relay-agent",
        &[
            "--log-format",
            "json",
            "--listen",
            &chain_listen.to_string(),
            "--sink",
            &their_addr.to_string(),
            "--server-name",
            "localhost",
            "--ca",
            &path(&theirs.ca()),
            "--cert",
            &path(&chain_cert),
            "--key",
            &path(&chain_key),
        ],
    );
    chain.wait_for("connected to sink");
    // Our sink: everything to our collector, site-a's core switches to the chained agent.
    let everything = UdpCapture::bind();
    let share = format!(
        r#"{{ addr = "{chain_listen}", sites = ["site-a"], agents = ["10.1.0.0/24", "!10.1.0.99", "2001:db8:10::/48"] }}"#
    );
    let (_our_sink, our_addr) = start_sink(
        &ours,
        &ours.sink_cert("sink"),
        &[everything.addr()],
        None,
        &["--forward", &share],
    );
    let (site, listen) = relay_tests::start_agent(
        &ours.ca(),
        &ours.agent_cert("site-a"),
        our_addr,
        "localhost",
        &[],
    );
    site.wait_for("connected to sink");
    let sent = mixed(1_200, &AGENTS);
    let all: Vec<Vec<u8>> = sent.iter().map(|(_, d)| d.clone()).collect();
    send_paced(listen, &all, 200, || everything.len());
    everything.assert_exactly(&all);
    consultant.assert_exactly(&only(&sent, in_filter));
}
