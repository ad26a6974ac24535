//! End-to-end: batch compression. With the default (zstd), agent and sink agree on it when
//! they connect, over QUIC and over gRPC, each batch compressed against the connection's
//! history; realistic sFlow arrives byte for byte, and the agent's frames are well under the
//! payload it received. With `--compression none` the frames are not smaller than the
//! payload, and the stream is the same. Over QUIC, what the link itself carries
//! (`relay_agent_quic_udp_bytes_sent_total`: frames with QUIC and TLS overhead) is counted and
//! stays under 0.6 of the payload with compression on. A sink of an earlier release (one that
//! reads batches compressed each on its own, or only plain ones) gets what it reads, byte for
//! byte. (A reconnect mid-stream starts the history afresh: every fault test, which cuts links
//! and kills sinks with the defaults, relays through it.)

use std::time::Duration;

use relay_tests::bare::OlderSink;
use relay_tests::fixture::{METRICS, Relay};
use relay_tests::metrics::{self, Scrape};
use relay_tests::sflow::{Payload, SflowGen};
use relay_tests::{Pki, Transport, WAIT, field, send_paced, start_agent_over};

const N: usize = 2_000;

/// What one relay run measured, per byte of sFlow payload received by the agent.
struct Measured {
    /// Batch frame bytes.
    frames: f64,
    /// UDP payload bytes of the QUIC connection (0 over gRPC).
    quic_udp: f64,
    /// What the agent said of the sink's compression.
    accepts: bool,
    /// The compression the agent said it uses with the sink.
    compression: String,
}

/// Relays N realistic datagrams over `transport` with the agent's `extra` flags.
fn relay(transport: Transport, extra: &[&str]) -> Measured {
    let relay = Relay::over(transport).agent(&METRICS).agent(extra).spawn();
    let (capture, listen) = (&relay.capture, relay.listen);
    let connected = relay.agent.wait_for("connected to sink");
    let accepts = connected["sink_accepts_compression"]
        .as_bool()
        .unwrap_or_else(|| panic!("no sink_accepts_compression: {connected}"));
    assert_eq!(field(&connected, "transport"), transport.name());
    let compression = field(&connected, "compression").to_owned();

    let mut generator = SflowGen::new(4, 2, 5);
    let sent: Vec<Vec<u8>> = (0..N).map(|_| generator.datagram()).collect();
    send_paced(listen, &sent, 64, || capture.len());
    assert!(
        capture.wait_until(WAIT, |r| r.len() >= N),
        "{} of {N}",
        capture.len()
    );
    capture.assert_exactly(&sent);

    let metrics = relay.agent_metrics();
    let counters = Scrape::of(metrics);
    let counter = |name: &str| {
        counters
            .value(name, &[])
            .unwrap_or_else(|| panic!("{name} not in:\n{counters}"))
    };
    let payload = counter("relay_agent_bytes_received_total");
    let frames = counter("relay_agent_frame_bytes_total");
    assert_eq!(
        payload,
        sent.iter().map(Vec::len).sum::<usize>() as f64,
        "payload bytes"
    );
    // Counted as of each acknowledgement: every batch has been acknowledged once the sink's
    // acknowledgements caught up; wait for that rather than for a fixed time.
    let quic_udp = if transport == Transport::Quic {
        let udp_sent = "relay_agent_quic_udp_bytes_sent_total";
        metrics::poll(metrics, WAIT, |s| s.sum(udp_sent) >= frames)
            .unwrap_or_else(|last| last)
            .sum(udp_sent)
    } else {
        0.0
    };
    Measured {
        frames: frames / payload,
        quic_udp: quic_udp / payload,
        accepts,
        compression,
    }
}

#[test]
fn compressed_by_default_over_quic_and_grpc_and_byte_exact() {
    for transport in [Transport::Quic, Transport::Grpc] {
        let m = relay(transport, &[]);
        assert!(m.accepts, "{transport:?}: the sink accepts compression");
        assert_eq!(m.compression, "zstd-history", "{transport:?}");
        assert!(
            m.frames < 0.6,
            "{transport:?}: frames are {:.3} of the payload",
            m.frames
        );
        if transport == Transport::Quic {
            // The link carries the frames and QUIC's own bytes on top: more than the frames,
            // still well under the payload.
            assert!(
                m.quic_udp > m.frames && m.quic_udp < 0.6,
                "QUIC link bytes {:.3}, frames {:.3} of the payload",
                m.quic_udp,
                m.frames
            );
        } else {
            assert_eq!(m.quic_udp, 0.0);
        }
    }
}

#[test]
fn compression_off_sends_plain_batches() {
    let m = relay(Transport::Quic, &["--compression", "none"]);
    assert!(m.accepts, "the sink still offers it");
    assert!(
        m.frames >= 1.0,
        "plain frames are {:.3} of the payload",
        m.frames
    );
    assert!(
        m.quic_udp > m.frames,
        "QUIC link bytes {:.3}, frames {:.3} of the payload",
        m.quic_udp,
        m.frames
    );
}

#[test]
fn a_bad_compression_level_is_a_clear_error() {
    let out = std::process::Command::new(relay_tests::bin("relay-agent"))
        .args([
            "--sink",
            "127.0.0.1:4433",
            "--ca",
            "ca.pem",
            "--cert",
            "a.pem",
            "--key",
            "a.key",
            "--compression-level",
            "99",
        ])
        .output()
        .expect("run relay-agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--compression-level 99"), "{stderr}");
}

/// `N` datagrams of sFlow with random payloads, sent through a real agent (defaults, over
/// QUIC) to `sink`; what it received, expanded as that sink would.
fn through_older_sink(alpns: &[&[u8]]) -> (OlderSink, Vec<Vec<u8>>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let sink = OlderSink::start(&pki.ca(), &pki.sink_cert("sink"), alpns);
    let (agent, listen) = start_agent_over(
        Transport::Quic,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        sink.addr,
        "localhost",
        &[],
    );
    let connected = agent.wait_for("connected to sink");
    let mut generator = SflowGen::new(2, 2, 9).with_payload(Payload::Random);
    let sent: Vec<Vec<u8>> = (0..500).map(|_| generator.datagram()).collect();
    send_paced(listen, &sent, 4, || sink.datagrams().len());
    let deadline = std::time::Instant::now() + WAIT;
    while sink.datagrams().len() < sent.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        sink.refused.lock().unwrap().as_slice(),
        &[] as &[String],
        "batches an older sink cannot read"
    );
    assert!(sink.datagrams() == sent, "byte for byte, in order");
    (sink, sent, field(&connected, "compression").to_owned())
}

#[test]
fn a_sink_without_history_gets_batches_compressed_each_on_its_own() {
    let (sink, _, compression) = through_older_sink(&[proto::ALPN_ZSTD, proto::ALPN]);
    assert_eq!(compression, "zstd");
    let batches = sink.received.lock().unwrap().clone();
    assert!(batches.len() > 10, "{} batches", batches.len());
    for batch in &batches {
        assert!(
            !batch.zstd_datagrams.is_empty() && batch.datagrams.is_empty(),
            "batch {} not compressed",
            batch.sequence
        );
        assert_eq!(batch.zstd_prefix, None);
    }
}

#[test]
fn a_sink_older_than_compression_gets_plain_batches() {
    let (sink, _, compression) = through_older_sink(&[proto::ALPN]);
    assert_eq!(compression, "none");
    let batches = sink.received.lock().unwrap().clone();
    assert!(
        batches
            .iter()
            .all(|b| b.zstd_datagrams.is_empty() && !b.datagrams.is_empty()),
        "all plain"
    );
}
