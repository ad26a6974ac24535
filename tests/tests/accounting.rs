//! sFlow loss accounting, end to end: each binary counts, per sFlow stream, the sequence
//! numbers it never saw, so a loss shows where it happened. Gaps at the agent are loss before
//! the relay; gaps at the sink are that plus what was lost inside the relay.
//!
//! Two sFlow agents (192.0.2.1 and 192.0.2.2, sub-agent 0 each) send interleaved,
//! sequence-numbered sFlow v5 datagrams through agent → UDP impairment proxy → sink (QUIC) →
//! capture, in three parts:
//!
//! 1. Path up: sequence numbers 1–20 of each, some left out before the agent (A: 5, 6, 13;
//!    B: 9). Each stream's first datagram is its baseline, so both start at 1 and get through.
//! 2. Path cut: [`CUT_SEND`], one datagram per batch (each sent well after the batch delay),
//!    into an agent with no spool and `--backlog-bytes` for Q batches ([`QUEUE`]; batches
//!    uncompressed, so each is as long as the others): the agent drops the
//!    oldest `K − Q` batches (A: 21–25, B: 21 and 23; B 22 is left out before the agent) and
//!    keeps the rest. The cut outlasts the QUIC idle timeout (2 s), so the old connection dies
//!    with what was in its send buffer and nothing the agent dropped can reach the sink by a
//!    QUIC retransmission; then the path heals, the agent reconnects and sends what it kept.
//! 3. Path up: the streams go on (A: 30 left out) and close every gap.
//!
//! Then, per sFlow agent, from both binaries' `/metrics`: the agent's gaps are the numbers
//! left out; the sink's are those plus the agent's drops for that sFlow agent; datagram counts
//! are what each saw; nothing is late, duplicated or reset. Cross-checks: the agent's
//! `backlog_full` drop counter is `K − Q`, and the capture holds exactly the datagrams that
//! should have got through, byte for byte, in order.
//!
//! A second test restarts a short sFlow stream (20 datagrams, 2 s of uptime, then numbers
//! and uptime from the start again) and sends one datagram cut inside its samples: both
//! binaries count one reset and nothing late or duplicated, and one truncated datagram,
//! relayed as it is.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use relay_tests::fixture::{METRICS, Relay};
use relay_tests::impair::{Impairment, UdpProxy};
use relay_tests::metrics::{self, Scrape};
use relay_tests::{Transport, WAIT, send_paced};

const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// Part 2, sent while the path is cut, one datagram per batch. B 22 is left out.
const CUT_SEND: [(Ipv4Addr, u32); 12] = [
    (A, 21),
    (A, 22),
    (B, 21),
    (A, 23),
    (B, 23),
    (A, 24),
    (A, 25),
    (B, 24),
    (B, 25),
    (A, 26),
    (A, 27),
    (B, 26),
];

/// Of [`CUT_SEND`], the agent keeps the last `QUEUE` (`--backlog-bytes` holds that many
/// batches and half of one more).
const QUEUE: usize = 5;

/// What each binary must count for one sFlow agent.
struct Expected {
    agent: Ipv4Addr,
    /// Datagrams sent to the relay agent.
    sent: u64,
    /// Sequence numbers the test left out before the relay agent.
    left_out: u64,
    /// Datagrams the relay agent dropped (its backlog full while the path was cut).
    dropped: u64,
}

const EXPECTED: [Expected; 2] = [
    // 1–20 without 5, 6, 13 (17); 21–27 (7); 28–32 without 30 (4).
    Expected {
        agent: A,
        sent: 28,
        left_out: 4,
        dropped: 5,
    },
    // 1–20 without 9 (19); 21, 23–26 (5); 27–32 (6).
    Expected {
        agent: B,
        sent: 30,
        left_out: 2,
        dropped: 2,
    },
];

/// Both binaries: QUIC notices a dead path after 2 s.
const QUIC_TIMERS: &[&str] = &[
    "--metrics-listen",
    "127.0.0.1:0",
    "--idle-timeout",
    "2s",
    "--keep-alive",
    "500ms",
];

/// An sFlow v5 datagram (IPv4 agent, no sample records) followed by 300 bytes that depend on
/// the stream and sequence number, so the capture can tell every datagram apart byte for
/// byte. The uptime grows with the sequence number, as an agent's does.
/// `--backlog-bytes` that holds `batches` uncompressed batches of one `len`-byte datagram
/// each (and half of one more): what the agent counts per batch is its frame plus 128 bytes.
fn backlog_bytes_for(batches: usize, len: usize) -> usize {
    let batch = proto::pb::Batch {
        session: u64::MAX,
        // The batch numbers of this test stay under 128: one byte each, as here.
        sequence: 100,
        datagrams: vec![proto::pb::Datagram {
            payload: vec![0; len].into(),
            source_ip: vec![127, 0, 0, 1].into(),
            // An ephemeral port: three bytes, as here.
            source_port: 40_000,
            received_unix_nanos: 1,
        }],
        timing: proto::pb::Timing::Live.into(),
        ..Default::default()
    };
    let mut frame = bytes::BytesMut::new();
    proto::wire::encode_frame(&batch, &mut frame);
    let per_batch = frame.len() + 128;
    batches * per_batch + per_batch / 2
}

fn sflow(agent: Ipv4Addr, sub_agent: u32, sequence: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(28 + 300);
    for word in [
        5,
        1,
        u32::from(agent),
        sub_agent,
        sequence,
        60_000 + sequence * 100,
        0,
    ] {
        d.extend_from_slice(&word.to_be_bytes());
    }
    let mut x = u64::from(u32::from(agent)) << 32 | u64::from(sequence) | 1;
    while d.len() < 28 + 300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.extend_from_slice(&x.to_le_bytes());
    }
    d.truncate(28 + 300);
    d
}

/// Datagrams numbered `range` of both sFlow agents, interleaved A, B, except the numbers in
/// `without_a` and `without_b`.
fn interleaved(
    range: std::ops::RangeInclusive<u32>,
    without_a: &[u32],
    without_b: &[u32],
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for n in range {
        if !without_a.contains(&n) {
            out.push(sflow(A, 0, n));
        }
        if !without_b.contains(&n) {
            out.push(sflow(B, 0, n));
        }
    }
    out
}

/// Polls `addr`'s `/metrics` until `name{labels}` is `want`.
///
/// # Panics
///
/// After [`WAIT`], with the last exposition.
fn wait_metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) {
    metrics::wait_value(addr, WAIT, name, labels, want);
}

/// One sFlow series of one sFlow agent (sub-agent 0) in an exposition.
fn sflow_series(exposition: &Scrape, name: &str, agent: Ipv4Addr) -> f64 {
    let agent = agent.to_string();
    exposition
        .value(name, &[("sflow_agent", &agent), ("sub_agent", "0")])
        .unwrap_or_else(|| panic!("no {name} for {agent}:\n{exposition}"))
}

#[test]
fn agent_counts_gaps_before_it_and_sink_adds_what_the_relay_dropped() {
    // (Builds the binaries first, when this process has not yet.)
    relay_tests::bin("relay-agent");
    let started = Instant::now();
    let queue = backlog_bytes_for(QUEUE, sflow(A, 0, 1).len()).to_string();
    let agent_args = [
        QUIC_TIMERS,
        &[
            "--backlog-bytes",
            &queue,
            "--compression",
            "none",
            "--connect-timeout",
            "2s",
        ],
    ]
    .concat();
    let relay = Relay::over(Transport::Quic)
        .sink(QUIC_TIMERS)
        .agent(&agent_args)
        .through(|sink| UdpProxy::start(sink, Impairment::default()))
        .spawn();
    let (capture, listen, agent) = (&relay.capture, relay.listen, &relay.agent);
    let path_ = relay.path.as_ref().expect("the proxy");
    let (agent_metrics, sink_metrics) = (relay.agent_metrics(), relay.sink_metrics());
    let relay_sink = path_.addr().to_string();
    let sink_label = [("sink", relay_sink.as_str())];
    agent.wait_for("connected to sink");

    // 1. Path up. One datagram at a time, each once the one before has arrived: the backlog
    //    never comes near QUEUE batches.
    let first = interleaved(1..=20, &[5, 6, 13], &[9]);
    send_paced(listen, &first, 1, || capture.len());
    assert!(capture.wait_until(WAIT, |r| r.len() >= first.len()));
    // Everything acknowledged: nothing of part 1 stays in the backlog to be dropped.
    wait_metric(
        agent_metrics,
        "relay_agent_backlog_batches",
        &sink_label,
        0.0,
    );

    // 2. Path cut: one datagram per batch; the agent keeps the newest QUEUE batches.
    path_.cut_for(Duration::from_secs(3600));
    let cut: Vec<Vec<u8>> = CUT_SEND.iter().map(|&(a, n)| sflow(a, 0, n)).collect();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
    for d in &cut {
        socket.send_to(d, listen).expect("send datagram");
        // Intentional pacing, far beyond the 5 ms batch delay: this datagram is a batch of
        // its own.
        std::thread::sleep(Duration::from_millis(50));
    }
    let dropped = (CUT_SEND.len() - QUEUE) as f64;
    wait_metric(
        agent_metrics,
        "relay_agent_datagrams_dropped_total",
        &[("reason", "backlog_full"), ("sink", &relay_sink)],
        dropped,
    );
    wait_metric(
        agent_metrics,
        "relay_agent_backlog_batches",
        &sink_label,
        QUEUE as f64,
    );
    // The old connection must die before the path heals, or QUIC would retransmit the
    // dropped batches still in its send buffer.
    let lost = agent.wait_for("connection to sink lost");
    eprintln!("cut after {:?}: {lost}", started.elapsed());
    path_.heal();
    agent.wait_for_nth("connected to sink", 2, WAIT);
    let kept = &cut[CUT_SEND.len() - QUEUE..];
    let through_cut = first.len() + kept.len();
    assert!(
        capture.wait_until(WAIT, |r| r.len() >= through_cut),
        "only {} of {through_cut} arrived after the path healed",
        capture.len()
    );
    wait_metric(
        agent_metrics,
        "relay_agent_backlog_batches",
        &sink_label,
        0.0,
    );

    // 3. Path up again: the streams go on and close every gap.
    // (A 27 went in part 2; A 30 is left out.)
    let last = interleaved(27..=32, &[27, 30], &[]);
    send_paced(listen, &last, 1, || capture.len() - through_cut);
    let expected: Vec<Vec<u8>> = [first.as_slice(), kept, last.as_slice()].concat();
    capture.assert_exactly(&expected);

    // What each binary counted, per sFlow agent.
    let at_agent = Scrape::of(agent_metrics);
    let at_sink = Scrape::of(sink_metrics);
    assert_eq!(
        at_agent.value(
            "relay_agent_datagrams_dropped_total",
            &[("reason", "backlog_full"), ("sink", &relay_sink)],
        ),
        Some(dropped),
        "the agent dropped K - Q batches of one datagram"
    );
    let sent: u64 = EXPECTED.iter().map(|e| e.sent).sum();
    let relay_dropped: u64 = EXPECTED.iter().map(|e| e.dropped).sum();
    assert_eq!(sent, (first.len() + cut.len() + last.len()) as u64);
    assert_eq!(relay_dropped as f64, dropped);
    for e in &EXPECTED {
        let a = e.agent;
        let series = |text: &Scrape, prefix: &str, what: &str| {
            sflow_series(text, &format!("relay_{prefix}_sflow_{what}"), a)
        };
        eprintln!(
            "{a}: sent {}, left out {}, dropped in the relay {}; agent: {} datagrams, {} gaps; sink: {} datagrams, {} gaps",
            e.sent,
            e.left_out,
            e.dropped,
            series(&at_agent, "agent", "datagrams_total"),
            series(&at_agent, "agent", "sequence_gaps_total"),
            series(&at_sink, "sink", "datagrams_total"),
            series(&at_sink, "sink", "sequence_gaps_total"),
        );
        assert_eq!(
            series(&at_agent, "agent", "sequence_gaps_total"),
            e.left_out as f64,
            "{a}: the agent's gaps are what was left out before it"
        );
        assert_eq!(
            series(&at_sink, "sink", "sequence_gaps_total"),
            (e.left_out + e.dropped) as f64,
            "{a}: the sink's gaps are what was left out plus what the relay dropped"
        );
        assert_eq!(
            series(&at_agent, "agent", "datagrams_total"),
            e.sent as f64,
            "{a}: datagrams the agent received"
        );
        assert_eq!(
            series(&at_sink, "sink", "datagrams_total"),
            (e.sent - e.dropped) as f64,
            "{a}: datagrams the sink replayed"
        );
        let received = expected.iter().filter(|d| d[8..12] == a.octets()).count() as u64;
        assert_eq!(received, e.sent - e.dropped, "{a}: the plan adds up");
        for (prefix, text) in [("agent", &at_agent), ("sink", &at_sink)] {
            for what in [
                "late_datagrams_total",
                "duplicate_datagrams_total",
                "sequence_resets_total",
            ] {
                assert_eq!(series(text, prefix, what), 0.0, "{a}: {prefix} {what}");
            }
        }
    }
    let tally = path_.tally();
    assert!(tally.dropped > 0, "the path was cut: {tally:?}");
    eprintln!("took {:?}; proxy: {tally:?}", started.elapsed());
}

/// An sFlow v5 datagram of `agent` (sub-agent 0) with the given number and uptime, carrying
/// one 200-byte sample of an unknown format (skipped by its length), cut to `len` bytes.
fn sflow_at(agent: Ipv4Addr, sequence: u32, uptime_ms: u32, len: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(28 + 208);
    for word in [5, 1, u32::from(agent), 0, sequence, uptime_ms, 1, 77, 200] {
        d.extend_from_slice(&word.to_be_bytes());
    }
    d.extend((0..200).map(|i| (i as u8) ^ (sequence as u8)));
    d.truncate(len);
    d
}

#[test]
fn a_short_stream_that_starts_over_counts_one_reset_and_a_cut_datagram_counts_as_truncated() {
    const C: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
    let relay = Relay::over(Transport::Quic)
        .sink(&METRICS)
        .agent(&METRICS)
        .start();
    let (capture, listen) = (&relay.capture, relay.listen);
    // 20 datagrams 100 ms of uptime apart, the agent's first 3 s; then it restarts: numbers
    // from 1 again, uptime from near 0, all behind the old front by less than the reorder
    // window and less than 10 s of uptime.
    let old = (1..=20).map(|i| sflow_at(C, i, 1_000 + i * 100, usize::MAX));
    let new = (1..=20).map(|i| sflow_at(C, i, 20 + i * 100, usize::MAX));
    // Then one cut inside its sample, as a recv into a short buffer leaves it.
    let cut = sflow_at(C, 21, 2_120, 28 + 8 + 50);
    let sent: Vec<Vec<u8>> = old.chain(new).chain([cut]).collect();
    send_paced(listen, &sent, 1, || capture.len());
    capture.assert_exactly(&sent);

    let label = C.to_string();
    let c = [("sflow_agent", label.as_str()), ("sub_agent", "0")];
    for (prefix, addr) in [
        ("agent", relay.agent_metrics()),
        ("sink", relay.sink_metrics()),
    ] {
        let name = |what: &str| format!("relay_{prefix}_sflow_{what}");
        wait_metric(addr, &name("datagrams_total"), &c, sent.len() as f64);
        let scrape = Scrape::of(addr);
        for (what, want) in [
            ("sequence_resets_total", 1.0),
            ("late_datagrams_total", 0.0),
            ("duplicate_datagrams_total", 0.0),
            ("sequence_gaps_total", 0.0),
            ("truncated_datagrams_total", 1.0),
        ] {
            assert_eq!(
                scrape.value(&name(what), &c),
                Some(want),
                "{prefix} {what}:\n{scrape}"
            );
        }
    }
    for daemon in [&relay.agent, &relay.sink] {
        let warning = daemon.wait_for("sflow datagram truncated");
        assert_eq!(relay_tests::field(&warning, "sflow_agent"), label);
        assert_eq!(warning["len"].as_u64(), Some(28 + 8 + 50), "{warning}");
    }
}
