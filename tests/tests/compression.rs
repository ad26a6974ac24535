//! End-to-end: batch compression. With the default (zstd), agent and sink agree on it when
//! they connect, over QUIC and over gRPC; realistic sFlow arrives byte for byte, and the
//! agent's frames are well under the payload it received. With `--compression none` the
//! frames are not smaller than the payload, and the stream is the same. Over QUIC, what the
//! link itself carries (`relay_agent_quic_udp_bytes_sent_total`: frames with QUIC and TLS
//! overhead) is counted and stays under 0.6 of the payload with compression on.

use std::net::SocketAddr;

use relay_tests::sflow::SflowGen;
use relay_tests::{
    Pki, Transport, UdpCapture, WAIT, field, http, metrics_addr, send_paced, start_agent_over,
    start_sink,
};

const N: usize = 2_000;

/// A counter's value in a Prometheus text exposition.
fn counter(addr: SocketAddr, name: &str) -> f64 {
    let exposition = http::get(addr, "/metrics").expect("/metrics").body;
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{exposition}"))
}

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
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let capture = UdpCapture::bind();
    let (_sink, sink_addr) = start_sink(&pki, &pki.sink_cert("sink"), &[capture.addr()], None, &[]);
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (agent, listen) = start_agent_over(
        transport,
        &pki.ca(),
        &pki.agent_cert("site-a"),
        sink_addr,
        "localhost",
        &args,
    );
    let connected = agent.wait_for("connected to sink");
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

    let metrics = metrics_addr(&agent);
    let payload = counter(metrics, "relay_agent_bytes_received_total");
    let frames = counter(metrics, "relay_agent_frame_bytes_total");
    assert_eq!(
        payload,
        sent.iter().map(Vec::len).sum::<usize>() as f64,
        "payload bytes"
    );
    // Counted as of each acknowledgement: every batch has been acknowledged once the sink's
    // acknowledgements caught up; wait for that rather than for a fixed time.
    let quic_udp = if transport == Transport::Quic {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let exposition = http::get(metrics, "/metrics").expect("/metrics").body;
            let udp = http::metric_sum(&exposition, "relay_agent_quic_udp_bytes_sent_total");
            if udp >= frames || std::time::Instant::now() > deadline {
                break udp;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
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
