//! Faults on the way, end to end with the real binaries: a sink killed and restarted, an
//! agent killed with a full spool, a lossy and reordering path, a full disk
//! under the spool, a collector whose port closes. Each sends a stream of sequence-numbered
//! sFlow datagrams (several agents and sub-agents) and checks, per sFlow stream, what a
//! collector would see: missing, duplicated, out of order.
//!
//! The path between agent and sink runs through the impairment proxy of `relay_tests::impair`
//! (QUIC over its UDP proxy, gRPC over its TCP proxy).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use relay_tests::fixture::Relay;
use relay_tests::impair::{Impairment, Proxy, TcpProxy, UdpProxy};
use relay_tests::sflow::{SflowGen, StreamReport};
use relay_tests::{
    Pki, Transport, UdpCapture, field, message, path, send_at_rate, start_agent_over, start_sink,
};

const STREAM: usize = 20_000;

fn stream(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut sflow = SflowGen::new(4, 2, seed);
    (0..n).map(|_| sflow.datagram()).collect()
}

/// Waits (up to `timeout`) until everything sent has arrived, then a little longer for
/// duplicates to show, and reports. Progress is watched by count, which is cheap: a report
/// copies everything received, and holding the capture up that long would make its socket
/// overflow, which is not the relay's doing.
fn settle(capture: &UdpCapture, sent: &[Vec<u8>], timeout: Duration) -> StreamReport {
    let deadline = Instant::now() + timeout;
    let mut target = sent.len();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        capture.wait_until(left, |r| r.len() >= target);
        // Intentional: half a second for duplicates to show up.
        std::thread::sleep(Duration::from_millis(500));
        let report = StreamReport::of(sent, &capture.received());
        if report.missing == 0 || Instant::now() >= deadline {
            return report;
        }
        // Duplicates made up the count: wait for as many more as are missing.
        target = capture.len() + report.missing;
    }
}

/// The impairment proxy for `transport`, in front of `sink`.
fn proxy(transport: Transport, sink: SocketAddr, impairment: Impairment) -> Proxy {
    match transport {
        Transport::Quic => UdpProxy::start(sink, impairment),
        Transport::Grpc => TcpProxy::start(sink, impairment),
    }
}

fn spool_segments(dir: &Path) -> usize {
    walk(dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "spool"))
        .count()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// 1. The sink is killed (`kill -9`) mid-stream and restarted 3 s later: nothing is missing;
///    what the sink had replayed but not acknowledged when it died comes again (the restarted
///    sink cannot know it), bounded by the batches in flight at the kill.
fn sink_killed_mid_stream_and_restarted(t: Transport) {
    let mut relay = Relay::over(t).agent(&["--idle-timeout", "120s"]).start();
    let listen = relay.listen;
    let sent = stream(STREAM, 1);
    std::thread::scope(|s| {
        s.spawn(|| send_at_rate(listen, &sent, 4_000));
        // Intentional: 1.5 s of traffic, then the sink is gone for 3 s.
        std::thread::sleep(Duration::from_millis(1_500));
        relay.sink.kill();
        std::thread::sleep(Duration::from_secs(3));
        relay.restart_sink();
    });
    let report = settle(&relay.capture, &sent, Duration::from_secs(30));
    let lost = relay.agent.wait_for("connection to sink lost");
    let in_flight = lost["unacknowledged_batches"].as_u64().unwrap_or(0) as usize;
    // A batch holds at most 64 KiB: under 50 of these datagrams.
    let bound = in_flight * 50;
    eprintln!(
        "{t:?}: {report:?}; in flight at the kill: {in_flight} batches (≤ {bound} datagrams)"
    );
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert!(
        report.duplicated <= bound,
        "{} duplicates, more than the {in_flight} batches in flight at the kill allow",
        report.duplicated
    );
    drop(relay);
}

/// 4. 5 % loss, 50 ms ± 20 ms delay, 5 % reordering on the path (QUIC); 50 ms delay on the
///    TCP path (gRPC: TCP itself repairs loss and order below the proxy).
fn impaired_path(t: Transport) {
    let impairment = match t {
        Transport::Quic => Impairment {
            loss: 0.05,
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(20),
            reorder: 0.05,
            ..Default::default()
        },
        Transport::Grpc => Impairment {
            delay: Duration::from_millis(50),
            ..Default::default()
        },
    };
    // Loss-based congestion control (CUBIC) shrinks to a trickle at 5 % loss; BBR, which
    // paces by measured bandwidth and round trip, is the setting for such paths (README).
    let relay = Relay::over(t)
        .agent(&["--congestion", "bbr"])
        .through(|sink| proxy(t, sink, impairment))
        .start();
    let sent = stream(STREAM, 4);
    send_at_rate(relay.listen, &sent, 2_000);
    let report = settle(&relay.capture, &sent, Duration::from_secs(60));
    let tally = relay.path.as_ref().expect("the proxy").tally();
    eprintln!("{t:?}: {report:?}; proxy: {tally:?}");
    assert_eq!(report, StreamReport::default(), "over an impaired path");
    if t == Transport::Quic {
        assert!(
            tally.dropped > 0 && tally.reordered > 0,
            "the path was impaired: {tally:?}"
        );
    }
}

/// 3. The agent is killed (`kill -9`) with a spool full of what the unreachable sink has not
///    had, and restarted: the spool drains. Loss is what had not reached the spool at the
///    kill: at most the datagrams of the last batch delay (5 ms), measured here.
#[test]
fn agent_killed_with_a_full_spool_restarts_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let (_sink, sink_addr) = start_sink(&pki, &pki.sink_cert("sink"), &[capture.addr()], None, &[]);
    let path_ = proxy(Transport::Quic, sink_addr, Impairment::default());
    path_.cut_for(Duration::from_secs(3600));
    let spool = dir.path().join("spool");
    let agent_cert = pki.agent_cert("site-a");
    let args = ["--spool-dir", &path(&spool)];
    let (mut agent, listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &agent_cert,
        path_.addr(),
        "localhost",
        &args,
    );
    let sent = stream(STREAM, 3);
    send_at_rate(listen, &sent, 10_000);
    // No pause: what the agent had not yet written to its spool is lost.
    agent.kill();
    assert!(spool_segments(&spool) > 0);
    let (restarted, _) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &agent_cert,
        path_.addr(),
        "localhost",
        &args,
    );
    let loaded = restarted.wait_for("spool holds batches from an earlier run");
    eprintln!("spool at restart: {loaded}");
    path_.heal();
    let report = settle(&capture, &sent, Duration::from_secs(60));
    eprintln!(
        "agent kill -9: {report:?} (datagrams lost: {})",
        report.missing
    );
    assert_eq!(report.duplicated, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    // 10,000 datagrams a second: 5 ms of batch delay is 50; a little more for the receive path.
    assert!(report.missing <= 100, "lost {} at the kill", report.missing);
}

/// SIGTERM with a spool while the sink is unreachable: the agent exits at once (what is
/// unacknowledged is already on disk); started again, it sends exactly that: nothing the sink
/// had acknowledged comes again, nothing unacknowledged is forgotten.
#[test]
fn sigterm_with_a_spool_keeps_the_unacknowledged_and_resends_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let (mut sink, sink_addr) =
        start_sink(&pki, &pki.sink_cert("sink"), &[capture.addr()], None, &[]);
    let path_ = proxy(Transport::Quic, sink_addr, Impairment::default());
    let spool = dir.path().join("spool");
    let agent_cert = pki.agent_cert("site-a");
    let args = ["--spool-dir", &path(&spool)];
    let (mut agent, listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &agent_cert,
        path_.addr(),
        "localhost",
        &args,
    );
    agent.wait_for("connected to sink");
    let sent = stream(6_000, 8);
    let (acknowledged, unacknowledged) = sent.split_at(2_000);
    send_at_rate(listen, acknowledged, 4_000);
    assert_eq!(
        settle(&capture, acknowledged, Duration::from_secs(20)).missing,
        0
    );
    // Intentional: time for the acknowledgements of what arrived to reach the agent (it runs
    // without a metrics endpoint, so its backlog cannot be watched).
    std::thread::sleep(Duration::from_millis(500));
    path_.cut_for(Duration::from_secs(3600));
    send_at_rate(listen, unacknowledged, 4_000);
    // Intentional: time for the agent to take the last datagrams off its socket.
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    assert!(agent.terminate().success());
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?} to stop",
        asked.elapsed()
    );
    agent.wait_for("in the spool");
    path_.heal();
    let (_again, _) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &agent_cert,
        path_.addr(),
        "localhost",
        &args,
    );
    let report = settle(&capture, &sent, Duration::from_secs(30));
    assert_eq!(report, StreamReport::default());
    assert!(sink.terminate().success());
    let stopped = sink.wait_for("sink stopped");
    assert_eq!(
        stopped["datagrams_duplicate"].as_u64(),
        Some(0),
        "nothing acknowledged was sent again: {stopped}"
    );
}

/// 5. The spool's filesystem is full (a 2 MiB tmpfs): the agent logs a clear error, counts
///    what it could not keep, and goes on relaying live data once the sink is back.
#[test]
fn a_full_disk_under_the_spool_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let Some(_mount) = Tmpfs::mount(&spool, "2m") else {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let pki = Pki::new(&dir.path().join("pki"));
    let capture = UdpCapture::bind();
    let (_sink, sink_addr) = start_sink(&pki, &pki.sink_cert("sink"), &[capture.addr()], None, &[]);
    let path_ = proxy(Transport::Quic, sink_addr, Impairment::default());
    path_.cut_for(Duration::from_secs(3600));
    let (mut agent, listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        path_.addr(),
        "localhost",
        // Uncompressed, so that the 7 MB below are 7 MB on disk (sFlow compresses to a fifth).
        &[
            "--spool-dir",
            &path(&spool),
            "--backlog-bytes",
            "1048576",
            "--compression",
            "none",
        ],
    );
    // About 7 MB while the sink is unreachable: far more than the disk holds.
    let during = stream(5_000, 5);
    send_at_rate(listen, &during, 5_000);
    let error = agent.wait_for("cannot write to the spool");
    assert!(
        field(&error, "error").contains("No space left on device"),
        "{error}"
    );
    path_.heal();
    agent.wait_for_nth("connected to sink", 1, Duration::from_secs(30));
    // Live data flows again.
    let live = stream(2_000, 6);
    let live: Vec<Vec<u8>> = live
        .into_iter()
        .map(|mut d| {
            // Another agent address, so live and spooled streams are told apart.
            d[11] = 99;
            d
        })
        .collect();
    send_at_rate(listen, &live, 2_000);
    let report = settle(&capture, &live, Duration::from_secs(30));
    assert_eq!(
        report.missing, 0,
        "live data after the disk filled: {report:?}"
    );
    assert!(agent.is_running(), "the agent kept running");
    assert!(agent.terminate().success());
    let summary = agent.wait_for("sink link summary");
    assert!(
        summary["spool_write_errors"].as_u64() > Some(0),
        "{summary}"
    );
    assert!(
        summary["dropped_backlog_full"].as_u64() > Some(0),
        "{summary}"
    );
}

/// 6. One collector's port is closed for 10 s, then opens again: the sink neither stalls nor
///    crashes, the other collector gets everything, the failures are counted, and the
///    reopened collector receives again.
#[test]
fn a_collector_closed_for_10_seconds_holds_up_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let steady = UdpCapture::bind();
    let closed_addr = relay_tests::free_udp_port();
    let (mut sink, sink_addr) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[closed_addr, steady.addr()],
        None,
        &[],
    );
    let (agent, listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        sink_addr,
        "localhost",
        &[],
    );
    agent.wait_for("connected to sink");
    let sent = stream(STREAM, 7);
    let reopened = std::thread::scope(|s| {
        s.spawn(|| send_at_rate(listen, &sent, 1_000));
        // Intentional: the collector stays closed for 10 s of traffic.
        std::thread::sleep(Duration::from_secs(10));
        UdpCapture::bind_plain(closed_addr)
    });
    let report = settle(&steady, &sent, Duration::from_secs(30));
    assert_eq!(report, StreamReport::default(), "the open collector");
    assert!(
        !reopened.is_empty(),
        "the reopened collector receives again"
    );
    let last = sent.last().unwrap();
    assert!(
        reopened.received().contains(last),
        "the reopened collector has the end of the stream"
    );
    assert!(sink.terminate().success());
    let stopped = sink.wait_for("sink stopped");
    assert!(stopped["replay_errors"].as_u64() > Some(0), "{stopped}");
    assert!(
        sink.events()
            .iter()
            .any(|e| message(e).contains("replay to destination failed")),
        "the failures are logged"
    );
}

/// A tmpfs mounted for a test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

relay_tests::over_each_transport!(sink_killed_mid_stream_and_restarted, impaired_path,);
