//! End-to-end: batch compression. With the default (zstd), agent and sink agree on it when
//! they connect, over QUIC and over gRPC; realistic sFlow arrives byte for byte, and the
//! agent's frames are well under the payload it received. With `--compression none` the
//! frames are not smaller than the payload, and the stream is the same. Over QUIC, what the
//! link itself carries (`relay_agent_quic_udp_bytes_sent_total`: frames with QUIC and TLS
//! overhead) is counted and stays under 0.6 of the payload with compression on.

use relay_tests::fixture::{METRICS, Relay};
use relay_tests::metrics::{self, Scrape};
use relay_tests::sflow::SflowGen;
use relay_tests::{Transport, WAIT, field, send_paced};

const N: usize = 2_000;

/// What one relay run measured, per byte of sFlow payload received by the agent.
struct Measured {
    /// Batch frame bytes.
    frames: f64,
    /// UDP payload bytes of the QUIC connection (0 over gRPC).
    quic_udp: f64,
    /// What the agent said of the sink's compression.
    accepts: bool,
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
    }
}

#[test]
fn compressed_by_default_over_quic_and_grpc_and_byte_exact() {
    for transport in [Transport::Quic, Transport::Grpc] {
        let m = relay(transport, &[]);
        assert!(m.accepts, "{transport:?}: the sink accepts compression");
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
