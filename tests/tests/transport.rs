//! Transport choice end to end: an agent on `--transport auto` behind a firewall that drops
//! UDP (nftables in a network namespace of the test's own), with the real binaries.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use relay_tests::netns::Netns;
use relay_tests::{
    Daemon, Pki, UdpCapture, WAIT, agent_listen_addr, bin, datagrams, field, message, path,
    send_paced, start_sink,
};

/// The transports of the sink's "agent connected" events, in order.
fn connected_over(sink: &Daemon) -> Vec<String> {
    sink.events()
        .iter()
        .filter(|e| message(e) == "agent connected")
        .map(|e| field(e, "transport").to_owned())
        .collect()
}

#[test]
fn auto_carries_on_over_grpc_while_udp_is_blocked_and_returns_to_quic_without_loss_or_duplicates() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let sink_at = SocketAddr::new(netns.host_addr.into(), 0);
    let (sink, sink_addr) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[capture.addr()],
        Some(sink_at),
        &[],
    );
    // The site's firewall: no UDP out to the sink's port. TCP passes.
    netns.block_udp_out(sink_addr.port());

    let agent_cert = pki.agent_cert("site-behind-firewall");
    let mut cmd = netns.command(&bin("relay-agent"));
    cmd.args([
        "--log-format",
        "json",
        "--listen",
        &format!("{}:0", netns.ns_addr),
        "--sink",
        &sink_addr.to_string(),
        "--server-name",
        "localhost",
        "--ca",
        &path(&pki.ca()),
        "--cert",
        &path(&agent_cert.0),
        "--key",
        &path(&agent_cert.1),
        "--transport",
        "auto",
        "--quic-fallback-after",
        "1s",
        "--quic-retry-interval",
        "1s",
        "--reconnect-max",
        "1s",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut agent = Daemon::start("relay-agent", cmd);
    let listen = agent_listen_addr(&agent);

    // QUIC cannot get out: the agent says so and carries on over gRPC.
    let fallback = agent.wait_for("transport changed: QUIC unavailable");
    assert!(
        field(&fallback, "reason").contains("no QUIC handshake"),
        "{fallback}"
    );
    let connected = agent.wait_for("connected to sink");
    assert_eq!(field(&connected, "transport"), "grpc", "{connected}");
    let over_grpc = datagrams(2_000, 0x41, 21);
    send_paced(listen, &over_grpc, 32, || capture.count_tagged(0x41));
    assert!(capture.wait_until(WAIT, |r| r.len() >= over_grpc.len()));
    assert_eq!(
        capture.tagged(0x41),
        over_grpc,
        "everything arrives over gRPC, in order"
    );
    assert_eq!(connected_over(&sink), ["grpc"]);

    // The firewall opens while traffic flows: the agent moves back to QUIC mid-stream.
    let across = datagrams(20_000, 0x42, 22);
    let switched = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut sent = 0;
            let mut after_switch = 0;
            for chunk in across.chunks(50) {
                let base = sent;
                send_paced(listen, chunk, 32, || {
                    capture.count_tagged(0x42).saturating_sub(base)
                });
                sent += chunk.len();
                if switched.load(Ordering::Relaxed) {
                    after_switch += chunk.len();
                    if after_switch >= 2_000 {
                        break;
                    }
                }
                // Pacing the sender: a chunk every 10 ms.
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        });
        // Well into the stream before the firewall opens.
        assert!(
            capture.wait_until(WAIT, |r| r
                .iter()
                .filter(|d| relay_tests::tag_of(d) == Some(0x42))
                .count()
                >= 1_000),
            "the stream arrives over gRPC"
        );
        let opened = Instant::now();
        netns.unblock();
        let change = agent.wait_for("transport changed: gRPC to QUIC");
        switched.store(true, Ordering::Relaxed);
        assert_eq!(
            change["unacknowledged_batches"].as_u64(),
            Some(0),
            "everything sent over gRPC was acknowledged before the switch: {change}"
        );
        assert!(
            opened.elapsed() < Duration::from_secs(10),
            "moved back only after {:?}",
            opened.elapsed()
        );
        sender.join().expect("sender")
    });
    assert!(
        sent < across.len(),
        "the switch happened while datagrams were still being sent"
    );
    let across = &across[..sent];
    assert!(
        capture.wait_until(WAIT, |r| r
            .iter()
            .filter(|d| relay_tests::tag_of(d) == Some(0x42))
            .count()
            >= sent),
        "only {} of {sent} arrived",
        capture.count_tagged(0x42)
    );
    // Intentional: time for a duplicate to show up before the comparison.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        capture.tagged(0x42),
        across,
        "across the switch: nothing lost, nothing twice, in order"
    );
    // The sink may also see a QUIC handshake the agent had given up on (started while UDP
    // was still blocked, completed after): it carries nothing and idles out. What counts is
    // gRPC first, then QUIC only.
    let over = connected_over(&sink);
    assert_eq!(over.first().map(String::as_str), Some("grpc"), "{over:?}");
    assert!(
        over.len() >= 2 && over[1..].iter().all(|t| t == "quic"),
        "{over:?}"
    );
    let now = agent.wait_for_nth("connected to sink", 2, WAIT);
    assert_eq!(field(&now, "transport"), "quic", "{now}");

    assert!(agent.terminate().success());
    let summary = agent.wait_for("sink link summary");
    assert_eq!(summary["fallbacks_to_grpc"].as_u64(), Some(1), "{summary}");
    assert_eq!(summary["returns_to_quic"].as_u64(), Some(1), "{summary}");
    assert_eq!(
        summary["dropped_backlog_full"].as_u64(),
        Some(0),
        "{summary}"
    );
}
