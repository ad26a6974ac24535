//! End-to-end: the sink's `[[forward]]` routes through the real binaries. Two relay agents
//! with certificates of two sites feed one sink whose destinations filter by site, by sFlow
//! agent address (IPv4 and IPv6, an exclusion), or not at all: each collector receives
//! exactly its share, byte for byte and in order per sFlow agent, and what no destination
//! takes is counted as unmatched. A destination's `not-after` stops its feed on time while
//! the others lose nothing, and a restart with it past warns and runs the rest. A filter
//! changed by SIGHUP while datagrams flow applies from the next batch, and the unchanged
//! destinations lose nothing. A bad entry is a configuration error (exit 64) naming it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use proto::sflow::{Header, parse_header};
use relay_tests::metrics::{Scrape, wait_until};
use relay_tests::{
    Daemon, Pki, Transport, UdpCapture, WAIT, bin, field, metrics_addr, over_each_transport, path,
    send_at_rate, send_paced, start_agent_over, start_sink,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// sFlow agents behind site-a: (agent address, sub-agents).
const SITE_A: [(&str, u32); 3] = [("10.1.0.1", 2), ("10.1.0.99", 1), ("2001:db8:10::1", 3)];
/// sFlow agents behind site-b.
const SITE_B: [(&str, u32); 3] = [("10.1.0.2", 1), ("192.0.2.7", 2), ("2001:db8:99::1", 2)];
/// The agents filter of the tests: a /24 less one address, and an IPv6 /48.
const AGENTS: &str = r#"["10.1.0.0/24", "!10.1.0.99", "2001:db8:10::/48"]"#;

/// `n` sFlow v5 datagrams from `streams`, round-robin over every (agent, sub-agent), each
/// numbered in its stream; after the header, `site` and the datagram's index in the list,
/// then filler, 100 to 1,400 bytes in all.
fn sflow(streams: &[(&str, u32)], site: u8, n: usize) -> Vec<Vec<u8>> {
    let keys: Vec<(IpAddr, u32)> = streams
        .iter()
        .flat_map(|&(agent, subs)| (0..subs).map(move |sub| (agent.parse().unwrap(), sub)))
        .collect();
    let mut sequence = vec![0u32; keys.len()];
    (0..n)
        .map(|i| {
            let k = i % keys.len();
            sequence[k] += 1;
            let mut d = Header {
                sub_agent: keys[k].1,
                sequence: sequence[k],
                uptime_ms: 1_000 + i as u32,
                ..Header::from_agent(keys[k].0)
            }
            .to_bytes();
            d.push(site);
            d.extend_from_slice(&(i as u32).to_be_bytes());
            let len = 100 + (i * 337) % 1_300;
            while d.len() < len {
                d.push((i + d.len()) as u8);
            }
            d
        })
        .collect()
}

/// The datagram's stream: (sFlow agent, sub-agent).
fn stream(d: &[u8]) -> (IpAddr, u32) {
    let header = parse_header(d).expect("sFlow");
    (header.agent, header.sub_agent)
}

/// Whether the agent filter [`AGENTS`] takes `agent`.
fn in_agents(agent: IpAddr) -> bool {
    let s = agent.to_string();
    (s.starts_with("10.1.0.") && s != "10.1.0.99") || s.starts_with("2001:db8:10:")
}

/// Datagrams per stream, in order.
fn by_stream(datagrams: &[Vec<u8>]) -> BTreeMap<(IpAddr, u32), Vec<Vec<u8>>> {
    let mut streams: BTreeMap<_, Vec<Vec<u8>>> = BTreeMap::new();
    for d in datagrams {
        streams.entry(stream(d)).or_default().push(d.clone());
    }
    streams
}

/// Asserts that `capture` receives exactly `want`: the same datagrams, byte for byte, in the
/// same order within each sFlow stream.
fn assert_share(what: &str, capture: &UdpCapture, want: &[Vec<u8>]) {
    let arrived = capture.wait_until(WAIT, |r| r.len() >= want.len());
    // Intentional: a datagram that should not come gets a moment to show up.
    std::thread::sleep(Duration::from_millis(300));
    let got = capture.received();
    assert!(arrived, "{what}: {} of {} arrived", got.len(), want.len());
    assert_eq!(got.len(), want.len(), "{what}: datagram count");
    let (got, want) = (by_stream(&got), by_stream(want));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: streams"
    );
    for (key, datagrams) in &want {
        assert!(
            got[key] == *datagrams,
            "{what}: stream {key:?} differs (bytes or order)"
        );
    }
}

/// The sink's config file: certificates and `[[forward]]` tables (each `(addr, extra)`).
fn sink_config(dir: &Path, pki: &Pki, forward: &[(SocketAddr, String)]) -> PathBuf {
    let file = dir.join("sink.toml");
    write_config(&file, pki, forward);
    file
}

/// Writes the sink's config file: `[[forward]]` tables (the certificates are given on the
/// command line; see [`start_sink_with`]).
fn write_config(file: &Path, pki: &Pki, forward: &[(SocketAddr, String)]) {
    let mut text = format!("ca = {:?}\n", path(&pki.ca()));
    for (addr, extra) in forward {
        text.push_str(&format!("\n[[forward]]\naddr = \"{addr}\"\n{extra}\n"));
    }
    // Written whole, then renamed: a reload never reads half a file.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, file).expect("rename config");
}

/// Starts the sink with `config` (its destinations), certificate `cert`, and metrics.
fn start_sink_with(
    pki: &Pki,
    cert: &(PathBuf, PathBuf),
    config: &Path,
    listen: Option<SocketAddr>,
) -> (Daemon, SocketAddr) {
    let config = path(config);
    let extra = ["--config", &config, "--metrics-listen", "127.0.0.1:0"];
    start_sink(pki, cert, &[], listen, &extra)
}

fn agent(pki: &Pki, site: &str, sink: SocketAddr, t: Transport) -> (Daemon, SocketAddr) {
    let cert = pki.agent_cert(site);
    let (agent, listen) = start_agent_over(t, &pki.ca(), &cert, sink, "localhost", &[]);
    agent.wait_for("connected to sink");
    (agent, listen)
}

/// RFC 3339 of `at`.
fn rfc3339(at: SystemTime) -> String {
    OffsetDateTime::from(at).format(&Rfc3339).unwrap()
}

fn filtered(scrape: &Scrape, destination: SocketAddr) -> f64 {
    let destination = destination.to_string();
    scrape.value_or_zero(
        "relay_sink_datagrams_filtered_total",
        &[("destination", &destination)],
    )
}

fn unmatched(scrape: &Scrape) -> f64 {
    scrape.value_or_zero(
        "relay_sink_datagrams_dropped_total",
        &[("destination", ""), ("reason", "unmatched")],
    )
}

// === shares ===

fn each_collector_receives_its_share(t: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (by_site, by_agent, all) = (UdpCapture::bind(), UdpCapture::bind(), UdpCapture::bind());
    let config = sink_config(
        dir.path(),
        &pki,
        &[
            (by_site.addr(), r#"sites = ["site-a"]"#.into()),
            (by_agent.addr(), format!("agents = {AGENTS}")),
            (all.addr(), String::new()),
        ],
    );
    let (sink, sink_addr) = start_sink_with(&pki, &pki.sink_cert("sink"), &config, None);
    let (_a, listen_a) = agent(&pki, "site-a", sink_addr, t);
    let (_b, listen_b) = agent(&pki, "site-b", sink_addr, t);
    let (a, b) = (sflow(&SITE_A, 1, 600), sflow(&SITE_B, 2, 600));
    send_paced(listen_a, &a, 32, || all.len());
    send_paced(listen_b, &b, 32, || all.len().saturating_sub(a.len()));

    let both = [a.clone(), b.clone()].concat();
    let agents: Vec<Vec<u8>> = (both.iter())
        .filter(|d| in_agents(stream(d).0))
        .cloned()
        .collect();
    assert_share("unfiltered", &all, &both);
    assert_share("sites = [site-a]", &by_site, &a);
    assert_share("agents", &by_agent, &agents);
    let scrape = Scrape::of(metrics_addr(&sink));
    assert_eq!(filtered(&scrape, by_site.addr()), b.len() as f64);
    assert_eq!(
        filtered(&scrape, by_agent.addr()),
        (both.len() - agents.len()) as f64
    );
    assert_eq!(filtered(&scrape, all.addr()), 0.0);
    assert_eq!(
        unmatched(&scrape),
        0.0,
        "the unfiltered destination takes all"
    );
}

fn what_no_destination_takes_is_counted_as_unmatched(t: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (by_site, by_agent) = (UdpCapture::bind(), UdpCapture::bind());
    let config = sink_config(
        dir.path(),
        &pki,
        &[
            (by_site.addr(), r#"sites = ["site-a"]"#.into()),
            (by_agent.addr(), format!("agents = {AGENTS}")),
        ],
    );
    let (sink, sink_addr) = start_sink_with(&pki, &pki.sink_cert("sink"), &config, None);
    let (_b, listen_b) = agent(&pki, "site-b", sink_addr, t);
    let b = sflow(&SITE_B, 2, 500);
    let taken: Vec<Vec<u8>> = (b.iter())
        .filter(|d| in_agents(stream(d).0))
        .cloned()
        .collect();
    // Unpaced by delivery: most of it is to arrive nowhere.
    send_at_rate(listen_b, &b, 2_000);
    assert_share("agents", &by_agent, &taken);
    assert!(
        by_site.is_empty(),
        "site-a's destination got site-b's datagrams"
    );
    let want = (b.len() - taken.len()) as f64;
    let scrape = wait_until(metrics_addr(&sink), WAIT, "the unmatched count", |s| {
        unmatched(s) >= want
    });
    assert_eq!(unmatched(&scrape), want);
    sink.wait_for("datagrams taken by no destination");
}

over_each_transport!(
    each_collector_receives_its_share,
    what_no_destination_takes_is_counted_as_unmatched
);

// === not-after ===

/// A datagram and when it arrived.
type Arrival = (SystemTime, Vec<u8>);

/// A collector that records when each datagram arrived.
struct TimedCapture {
    addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

impl TimedCapture {
    fn bind() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(16 << 20);
        let addr = socket.local_addr().unwrap();
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let store = arrivals.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = socket.recv(&mut buf) {
                store
                    .lock()
                    .unwrap()
                    .push((SystemTime::now(), buf[..n].to_vec()));
            }
        });
        Self { addr, arrivals }
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }
}

#[test]
fn at_not_after_a_feed_stops_the_others_lose_nothing_and_a_restart_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (ending, all) = (TimedCapture::bind(), UdpCapture::bind());
    // About three seconds after the sink starts and the agent connects.
    let end = SystemTime::now() + Duration::from_secs(4);
    let not_after = format!("not-after = \"{}\"", rfc3339(end));
    let config = sink_config(
        dir.path(),
        &pki,
        &[(ending.addr, not_after), (all.addr(), String::new())],
    );
    let cert = pki.sink_cert("sink");
    let (mut sink, sink_addr) = start_sink_with(&pki, &cert, &config, None);
    let (_a, listen) = agent(&pki, "site-a", sink_addr, Transport::Quic);
    // 1,000 a second for 5 s: across the not-after.
    let sent = sflow(&SITE_A, 1, 5_000);
    let sender = {
        let sent = sent.clone();
        std::thread::spawn(move || send_at_rate(listen, &sent, 1_000))
    };
    let stopped = sink.wait_for("replay to destination stopped");
    assert_eq!(field(&stopped, "destination"), ending.addr.to_string());
    sender.join().unwrap();
    assert_share("the other destination", &all, &sent);

    let arrivals = ending.arrivals();
    let last = arrivals
        .last()
        .expect("the ending destination got its feed")
        .0;
    let late = last.duration_since(end).unwrap_or_default();
    assert!(
        late <= Duration::from_secs(1),
        "fed {late:?} after its not-after"
    );
    let before = end.duration_since(last).unwrap_or_default();
    assert!(
        before <= Duration::from_secs(1),
        "the feed stopped {before:?} before its not-after"
    );
    let got: Vec<Vec<u8>> = arrivals.into_iter().map(|(_, d)| d).collect();
    assert_eq!(
        got,
        sent[..got.len()],
        "what it got is a prefix of the stream"
    );

    // Restarted with the entry past: a warning, and the rest runs.
    sink.terminate();
    let (sink, _) = start_sink_with(&pki, &cert, &config, Some(sink_addr));
    let warned = sink.wait_for("destination's not-after has passed");
    assert_eq!(field(&warned, "destination"), ending.addr.to_string());
    let more = sflow(&SITE_B, 3, 200);
    send_paced(listen, &more, 32, || all.len().saturating_sub(sent.len()));
    assert_share("after the restart", &all, &[sent, more].concat());
    assert_eq!(ending.arrivals().len(), got.len());
}

// === reload ===

#[test]
fn a_filter_changed_by_sighup_applies_from_the_next_batch_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (by_site, changed, all) = (UdpCapture::bind(), UdpCapture::bind(), UdpCapture::bind());
    let forward = |agents: &str| {
        [
            (by_site.addr(), r#"sites = ["site-a"]"#.to_owned()),
            (changed.addr(), format!("agents = {agents}")),
            (all.addr(), String::new()),
        ]
    };
    let (old, new) = (r#"["10.1.0.0/24"]"#, r#"["2001:db8:10::/48"]"#);
    let config = sink_config(dir.path(), &pki, &forward(old));
    let (sink, sink_addr) = start_sink_with(&pki, &pki.sink_cert("sink"), &config, None);
    let (_a, listen) = agent(&pki, "site-a", sink_addr, Transport::Quic);
    // 5,000 a second for 4 s; the filter changes after about 1.5 s.
    let sent = sflow(&SITE_A, 1, 20_000);
    let sender = {
        let sent = sent.clone();
        std::thread::spawn(move || send_at_rate(listen, &sent, 5_000))
    };
    let started = Instant::now();
    assert!(all.wait_until(WAIT, |r| r.len() >= 7_000));
    write_config(&config, &pki, &forward(new));
    sink.hangup();
    let reloaded = sink.wait_for("destination route reloaded");
    assert_eq!(field(&reloaded, "destination"), changed.addr().to_string());
    assert_eq!(field(&reloaded, "filter"), "agents=2001:db8:10::/48");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reloaded mid-stream"
    );
    sender.join().unwrap();

    assert_share("unchanged sites", &by_site, &sent);
    assert_share("unfiltered", &all, &sent);
    // The changed destination: the old share up to a batch boundary, the new one after it.
    let got: Vec<usize> = (changed.received().iter())
        .map(|d| {
            let i = index_of(d);
            assert_eq!(*d, sent[i], "replayed byte for byte");
            i
        })
        .collect();
    let v4 = |i: &usize| stream(&sent[*i]).0.to_string().starts_with("10.1.0.");
    let v6 = |i: &usize| stream(&sent[*i]).0.to_string().starts_with("2001:db8:10:");
    let last_old = got
        .iter()
        .rposition(v4)
        .expect("the old filter applied first");
    let first_new = got
        .iter()
        .position(v6)
        .expect("the new filter applies after");
    assert_eq!(first_new, last_old + 1, "old share, then new share");
    // Some batch boundary `cut` between the last old and the first new datagram: before it
    // the whole old share, from it the whole new share.
    let share = |cut: usize| -> Vec<usize> {
        (0..sent.len())
            .filter(|i| if *i < cut { v4(i) } else { v6(i) })
            .collect()
    };
    let cut = (got[last_old] + 1..=got[first_new]).find(|&cut| share(cut) == got);
    assert!(
        cut.is_some(),
        "no cut between #{} and #{} gives what the changed destination got",
        got[last_old],
        got[first_new]
    );
}

/// Where a datagram made by [`sflow`] is in its list.
fn index_of(d: &[u8]) -> usize {
    let header = match stream(d).0 {
        IpAddr::V4(_) => proto::sflow::HEADER_LEN_IPV4,
        IpAddr::V6(_) => proto::sflow::HEADER_LEN_IPV6,
    };
    u32::from_be_bytes(d[header + 1..header + 5].try_into().unwrap()) as usize
}

// === configuration errors ===

#[test]
fn a_bad_forward_entry_is_a_configuration_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (cert, key) = pki.sink_cert("sink");
    let run = |extra: &str| {
        let forward = [("127.0.0.1:9".parse().unwrap(), extra.into())];
        let config = sink_config(dir.path(), &pki, &forward);
        let out = Command::new(bin("relay-sink"))
            .args(["--config", &path(&config), "--cert", &path(&cert)])
            .args(["--key", &path(&key)])
            .output()
            .expect("run relay-sink");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (extra, says) in [
        (r#"agents = ["10.1.0.0/33"]"#, "\"10.1.0.0/33\""),
        (r#"agent = ["10.1.0.0/24"]"#, "unknown field `agent`"),
        (
            r#"not-after = "next friday""#,
            "\"next friday\" is not an RFC 3339 time",
        ),
        (
            r#"not-after = "2020-01-01T00:00:00Z""#,
            "not-after has passed",
        ),
    ] {
        let (code, stderr) = run(extra);
        assert_eq!(code, Some(64), "{extra}: {stderr}");
        assert!(
            stderr.contains("relay-sink: configuration error: ") && stderr.contains(says),
            "{extra}: {stderr}"
        );
    }
}
