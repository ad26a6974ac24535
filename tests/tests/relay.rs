//! End-to-end: the real relay-certs, relay-sink and relay-agent binaries on loopback.
//!
//! Every test here runs twice, once per transport (`quic::…` and `grpc::…`): the agent is
//! started with `--transport quic` or `--transport grpc`, so neither run can pass on the
//! other's back.

use std::time::Duration;

use relay_tests::fixture::Relay;
use relay_tests::{
    Daemon, MIN_LEN, Pki, Transport, UdpCapture, WAIT, datagrams, field, path, send_all,
    send_paced, start_agent_over, start_sink, tag_of, wait_until,
};
use serde_json::Value;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Indices (tag, index) of sent datagrams that did not arrive.
fn missing(capture: &UdpCapture, sent: &[&Vec<Vec<u8>>]) -> Vec<(u8, usize)> {
    let received = capture.received();
    let mut out = Vec::new();
    for list in sent {
        for (i, d) in list.iter().enumerate() {
            if !received.contains(d) {
                out.push((tag_of(d).unwrap_or_default(), i));
            }
        }
    }
    out
}

fn delivers_20000_mixed_datagrams_byte_exact_in_order(t: Transport) {
    let relay = Relay::over(t).start();
    let (capture, listen) = (&relay.capture, relay.listen);

    let sent = datagrams(20_000, 0xA1, 1);
    assert_eq!(sent.iter().map(Vec::len).min(), Some(MIN_LEN));
    assert_eq!(sent.iter().map(Vec::len).max(), Some(65_507));
    let near_1400 = sent
        .iter()
        .filter(|d| (1_300..1_500).contains(&d.len()))
        .count();
    assert!(
        near_1400 > 17_000,
        "most datagrams near 1,400 bytes ({near_1400})"
    );

    send_paced(listen, &sent, 64, || capture.len());
    capture.assert_exactly(&sent);
}

fn two_agents_with_different_certificates_both_arrive(t: Transport) {
    let dir = tmp();
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let (sink, sink_addr) = start_sink(&pki, &pki.sink_cert("sink"), &[capture.addr()], None, &[]);
    let (_a, listen_a) = start_agent_over(
        t,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        sink_addr,
        "localhost",
        &[],
    );
    let (_b, listen_b) = start_agent_over(
        t,
        &pki.ca(),
        &pki.agent_cert("site-b"),
        sink_addr,
        "localhost",
        &[],
    );
    let sent_a = datagrams(3_000, 0xA1, 2);
    let sent_b = datagrams(3_000, 0xB2, 3);
    std::thread::scope(|s| {
        s.spawn(|| send_paced(listen_a, &sent_a, 32, || capture.count_tagged(0xA1)));
        s.spawn(|| send_paced(listen_b, &sent_b, 32, || capture.count_tagged(0xB2)));
    });
    let all = capture.wait_until(WAIT, |r| r.len() >= 6_000);
    assert!(
        all,
        "only {} of 6000 arrived; missing: {:?}",
        capture.len(),
        missing(&capture, &[&sent_a, &sent_b])
    );
    assert_eq!(capture.tagged(0xA1), sent_a, "site-a's datagrams, in order");
    assert_eq!(capture.tagged(0xB2), sent_b, "site-b's datagrams, in order");
    let names: Vec<String> = sink
        .events()
        .iter()
        .filter(|e| relay_tests::message(e) == "agent connected")
        .map(|e| field(e, "agent").to_owned())
        .collect();
    assert!(
        names.contains(&"site-a".into()) && names.contains(&"site-b".into()),
        "identities from certificates: {names:?}"
    );
}

fn refused_agents_relay_nothing_while_a_good_agent_keeps_going(t: Transport) {
    let dir = tmp();
    let pki = Pki::new(&dir.path().join("ours"));
    let other = Pki::new(&dir.path().join("theirs"));
    let capture = UdpCapture::bind();
    let sink_cert = pki.sink_cert("sink");
    let (sink, sink_addr) = start_sink(&pki, &sink_cert, &[capture.addr()], None, &[]);
    let (_good, good_listen) = start_agent_over(
        t,
        &pki.ca(),
        &pki.agent_cert("good"),
        sink_addr,
        "localhost",
        &[],
    );

    // An agent whose certificate another CA signed (it trusts our CA for the sink).
    let (foreign, foreign_listen) = start_agent_over(
        t,
        &pki.ca(),
        &other.agent_cert("intruder"),
        sink_addr,
        "localhost",
        &[],
    );
    // An agent presenting the sink's own certificate (serverAuth only).
    let (server_cert, server_cert_listen) =
        start_agent_over(t, &pki.ca(), &sink_cert, sink_addr, "localhost", &[]);

    let good = datagrams(2_000, 0x60, 4);
    let bad = datagrams(200, 0xEE, 5);
    std::thread::scope(|s| {
        s.spawn(|| send_paced(good_listen, &good, 32, || capture.count_tagged(0x60)));
        s.spawn(|| {
            for _ in 0..5 {
                send_all(foreign_listen, &bad);
                send_all(server_cert_listen, &bad);
                // Pacing: the refused agents get five bursts, 100 ms apart.
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    });
    // And a client with no certificate at all, speaking the real protocol.
    let no_cert = relay_tests::bare::relay_without_client_cert(t, sink_addr, &pki.ca(), &bad);
    assert!(
        no_cert.is_err(),
        "a client without a certificate was accepted"
    );

    assert!(capture.wait_until(
        WAIT,
        |r| r.iter().filter(|d| tag_of(d) == Some(0x60)).count() >= good.len()
    ));
    assert_eq!(
        capture.tagged(0x60),
        good,
        "the good agent's datagrams all arrive, in order"
    );

    // Each refusal is logged by the sink with its reason.
    let refusals = |needle: &str| {
        sink.events()
            .iter()
            .filter(|e| {
                relay_tests::message(e).contains("agent refused")
                    && field(e, "reason").contains(needle)
            })
            .count()
    };
    let refused_in = |events: &[Value], needle: &str| {
        events.iter().any(|e| {
            relay_tests::message(e).contains("agent refused") && field(e, "reason").contains(needle)
        })
    };
    sink.wait_events(WAIT, |events| {
        (refused_in(events, "UnknownIssuer") || refused_in(events, "BadSignature"))
            && refused_in(events, "no certificates")
            && refused_in(events, "extended key usage")
    });
    let reasons: Vec<String> = sink
        .events()
        .iter()
        .filter(|e| relay_tests::message(e).contains("agent refused"))
        .map(|e| field(e, "reason").to_owned())
        .collect();
    assert!(
        refusals("UnknownIssuer") + refusals("BadSignature") > 0,
        "foreign CA refused with reason; refusals: {reasons:?}"
    );
    assert!(
        refusals("no certificates") > 0,
        "missing certificate refused with reason; refusals: {reasons:?}"
    );
    assert!(
        refusals("extended key usage") > 0,
        "serverAuth-only certificate refused with reason; refusals: {reasons:?}"
    );
    // Intentional: time for a refused agent's datagram to show up, were one replayed.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        capture.count_tagged(0xEE),
        0,
        "nothing of a refused agent is replayed"
    );
    // The refused agents say why, too.
    let says_refused = |agent: &Daemon| {
        agent
            .events()
            .iter()
            .any(|e| field(e, "reason").contains("the sink refused this agent's certificate"))
    };
    assert!(says_refused(&foreign), "{:?}", foreign.lines());
    assert!(says_refused(&server_cert), "{:?}", server_cert.lines());
}

fn agent_refuses_a_sink_whose_certificate_has_another_name(t: Transport) {
    let dir = tmp();
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let (_sink, sink_addr) = start_sink(
        &pki,
        &pki.issue("sink", "sink.example.com", &[]),
        &[capture.addr()],
        None,
        &[],
    );
    let (agent, listen) = start_agent_over(
        t,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        sink_addr,
        "other.example.com",
        &[],
    );
    let event = agent.wait_for("cannot connect to sink");
    let reason = field(&event, "reason");
    assert!(
        reason.contains("not valid for the name \\\"other.example.com\\\"")
            || reason.contains("not valid for the name \"other.example.com\""),
        "{reason}"
    );
    send_all(listen, &datagrams(50, 0x11, 6));
    // Intentional: half a second for a datagram to arrive, were one relayed.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        capture.is_empty(),
        "nothing reaches a sink the agent does not trust"
    );
}

fn agent_reconnects_after_the_sink_restarts(t: Transport) {
    let mut relay = Relay::over(t).start();
    let (capture, listen) = (&relay.capture, relay.listen);
    let before = datagrams(1_000, 0x01, 7);
    send_paced(listen, &before, 32, || capture.count_tagged(0x01));
    assert!(capture.wait_until(WAIT, |r| r.len() >= before.len()));

    assert!(
        relay.sink.terminate().success(),
        "sink exits cleanly on SIGTERM"
    );
    let lost = relay.agent.wait_for("connection to sink lost");
    assert_eq!(
        lost["unacknowledged_batches"].as_u64(),
        Some(0),
        "everything sent was acknowledged: {lost}"
    );
    relay.restart_sink();
    relay.agent.wait_for_nth("connected to sink", 2, WAIT);
    let capture = &relay.capture;

    let after = datagrams(1_000, 0x02, 8);
    send_paced(listen, &after, 32, || capture.count_tagged(0x02));
    assert!(capture.wait_until(
        WAIT,
        |r| r.iter().filter(|d| tag_of(d) == Some(0x02)).count() >= after.len()
    ));
    assert_eq!(
        capture.tagged(0x02),
        after,
        "everything sent after the reconnect arrives, in order"
    );
    assert_eq!(capture.tagged(0x01), before);
}

fn fan_out_keeps_going_when_one_destination_is_closed(t: Transport) {
    let dir = tmp();
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let closed = relay_tests::free_udp_port();
    let (sink, sink_addr) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[closed, capture.addr()],
        None,
        &[],
    );
    let (_agent, listen) = start_agent_over(
        t,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        sink_addr,
        "localhost",
        &[],
    );
    let sent = datagrams(3_000, 0x33, 9);
    send_paced(listen, &sent, 32, || capture.len());
    assert!(
        capture.wait_until(WAIT, |r| r.len() >= sent.len()),
        "only {} arrived",
        capture.len()
    );
    assert_eq!(
        capture.received(),
        sent,
        "the open destination gets everything, in order"
    );
    let failure = sink.wait_for("replay to destination failed");
    assert_eq!(field(&failure, "destination"), closed.to_string());
}

fn one_agent_two_sinks_with_different_cas_survives_one_stopping(t: Transport) {
    let dir = tmp();
    let pki_1 = Pki::new(&dir.path().join("company"));
    let pki_2 = Pki::new(&dir.path().join("consultant"));
    let (capture_1, capture_2) = (UdpCapture::bind(), UdpCapture::bind());
    let (_sink_1, addr_1) = start_sink(
        &pki_1,
        &pki_1.sink_cert("sink1"),
        &[capture_1.addr()],
        None,
        &[],
    );
    let (mut sink_2, addr_2) = start_sink(
        &pki_2,
        &pki_2.sink_cert("sink2"),
        &[capture_2.addr()],
        None,
        &[],
    );
    let (cert_1, cert_2) = (
        pki_1.agent_cert("site-a"),
        pki_2.agent_cert("site-a-for-consultant"),
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:0\"]\nlog-format = \"json\"\nreconnect-max = \"1s\"\ntransport = \"{}\"\n\
             [[sink]]\naddr = \"{addr_1}\"\nserver-name = \"localhost\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [[sink]]\naddr = \"{addr_2}\"\nserver-name = \"localhost\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            t.name(),
            path(&pki_1.ca()),
            path(&cert_1.0),
            path(&cert_1.1),
            path(&pki_2.ca()),
            path(&cert_2.0),
            path(&cert_2.1),
        ),
    )
    .unwrap();
    let agent = Daemon::spawn("relay-agent", &["--config", &path(&config)]);
    let listen = relay_tests::agent_listen_addr(&agent);
    agent.wait_for_nth("connected to sink", 2, WAIT);

    let first = datagrams(1_000, 0x0A, 10);
    send_paced(listen, &first, 32, || capture_1.len().min(capture_2.len()));
    assert!(capture_1.wait_until(WAIT, |r| r.len() >= first.len()));
    assert!(capture_2.wait_until(WAIT, |r| r.len() >= first.len()));
    assert_eq!(capture_1.received(), first);
    assert_eq!(capture_2.received(), first);

    sink_2.kill();
    let second = datagrams(3_000, 0x0B, 11);
    send_paced(listen, &second, 32, || capture_1.count_tagged(0x0B));
    assert!(capture_1.wait_until(WAIT, |r| r.len() >= first.len() + second.len()));
    assert_eq!(
        capture_1.tagged(0x0B),
        second,
        "the live sink still gets everything"
    );
    assert_eq!(capture_2.count_tagged(0x0B), 0);
}

fn a_sink_restarted_after_a_crash_resets_old_connections_at_once(t: Transport) {
    // Idle timeout far beyond the test's patience: only a stateless reset can end the link.
    let mut relay = Relay::over(t).agent(&["--idle-timeout", "120s"]).start();
    relay.sink.kill();
    relay.restart_sink();
    let (capture, listen, agent) = (&relay.capture, relay.listen, &relay.agent);
    let started = std::time::Instant::now();
    // Traffic makes the agent send on its old connection; the new sink answers with a reset.
    let probe = datagrams(40, 0x77, 12);
    std::thread::scope(|s| {
        s.spawn(|| {
            for d in probe.chunks(1) {
                send_all(listen, d);
                // Pacing the probe: one datagram every 50 ms.
                std::thread::sleep(Duration::from_millis(50));
                if agent.count("connected to sink") >= 2 {
                    break;
                }
            }
        });
    });
    agent.wait_for_nth("connected to sink", 2, Duration::from_secs(10));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "reconnected only after {:?}",
        started.elapsed()
    );
    let after = datagrams(500, 0x78, 13);
    send_paced(listen, &after, 32, || capture.count_tagged(0x78));
    assert!(capture.wait_until(
        WAIT,
        |r| r.iter().filter(|d| tag_of(d) == Some(0x78)).count() >= after.len()
    ));
    assert_eq!(capture.tagged(0x78), after);
}

fn an_agent_whose_sink_never_answers_stops_promptly(t: Transport) {
    let dir = tmp();
    let pki = Pki::new(dir.path());
    // A sink that never answers: a UDP socket that reads nothing, and a TCP listener that
    // never accepts (the kernel completes the TCP handshake; TLS then waits forever).
    let silent_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let nowhere = silent_udp.local_addr().unwrap();
    let silent_tcp = std::net::TcpListener::bind(nowhere).unwrap();
    let (mut agent, _) = start_agent_over(
        t,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        nowhere,
        "localhost",
        &["--connect-timeout", "30s"],
    );
    // Stopped while connecting: once its first QUIC packet or TCP connection has arrived.
    let _connecting = match t {
        Transport::Quic => {
            silent_udp.set_read_timeout(Some(WAIT)).unwrap();
            let mut packet = [0u8; 2048];
            silent_udp
                .peek_from(&mut packet)
                .expect("the agent's first QUIC packet");
            None
        }
        Transport::Grpc => {
            silent_tcp.set_nonblocking(true).unwrap();
            Some(wait_until("the agent's TCP connection", WAIT, || {
                silent_tcp.accept().ok()
            }))
        }
    };
    let started = std::time::Instant::now();
    assert!(agent.terminate().success());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?} to stop",
        started.elapsed()
    );
    agent.wait_for("nothing left to send to this sink");
}

fn an_oversized_batch_is_refused_and_disturbs_nothing_else(t: Transport) {
    let dir = tmp();
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    // The smallest limit the sink allows: two of the largest datagrams.
    let limit = 2 * 65_507;
    let (mut sink, sink_addr) = start_sink(
        &pki,
        &pki.sink_cert("sink"),
        &[capture.addr()],
        None,
        &["--max-frame-bytes", &limit.to_string()],
    );
    let (_good, listen) = start_agent_over(
        t,
        &pki.ca(),
        &pki.agent_cert("good"),
        sink_addr,
        "localhost",
        &[],
    );
    let before = datagrams(500, 0x51, 31);
    send_paced(listen, &before, 32, || capture.count_tagged(0x51));

    // An authenticated client sends one batch over the limit.
    let oversized: Vec<Vec<u8>> = (0..3)
        .map(|_| {
            let mut d = datagrams(1, 0x5E, 33).remove(0);
            d.resize(60_000, 0x5E);
            d
        })
        .collect();
    let result = relay_tests::bare::relay_one_batch(
        t,
        sink_addr,
        &pki.ca(),
        Some(&pki.agent_cert("bloated")),
        &oversized,
    );
    assert!(result.is_err(), "an oversized batch was acknowledged");
    let violation = sink.wait_for("protocol violation");
    assert_eq!(field(&violation, "agent"), "bloated", "{violation}");
    assert_eq!(field(&violation, "transport"), t.name(), "{violation}");

    // The sink carries on, and the good agent's link was never disturbed.
    let after = datagrams(500, 0x52, 32);
    send_paced(listen, &after, 32, || capture.count_tagged(0x52));
    assert!(capture.wait_until(WAIT, |r| r.len() >= before.len() + after.len()));
    assert_eq!(capture.tagged(0x51), before);
    assert_eq!(capture.tagged(0x52), after);
    assert_eq!(
        capture.count_tagged(0x5E),
        0,
        "nothing of the oversized batch"
    );
    assert!(sink.terminate().success());
    let stopped = sink.wait_for("sink stopped");
    assert_eq!(stopped["protocol_errors"].as_u64(), Some(1), "{stopped}");
}

relay_tests::over_each_transport!(
    delivers_20000_mixed_datagrams_byte_exact_in_order,
    two_agents_with_different_certificates_both_arrive,
    refused_agents_relay_nothing_while_a_good_agent_keeps_going,
    agent_refuses_a_sink_whose_certificate_has_another_name,
    agent_reconnects_after_the_sink_restarts,
    fan_out_keeps_going_when_one_destination_is_closed,
    one_agent_two_sinks_with_different_cas_survives_one_stopping,
    a_sink_restarted_after_a_crash_resets_old_connections_at_once,
    an_agent_whose_sink_never_answers_stops_promptly,
    an_oversized_batch_is_refused_and_disturbs_nothing_else,
);
