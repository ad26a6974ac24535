//! `--max-connections`: connections beyond it are refused before their handshake, counted and
//! logged, and a slot freed is a slot taken.

use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use relay_tests::metrics::{self, Scrape};
use relay_tests::procfs::Proc;
use relay_tests::{Transport, WAIT, bare};

use super::{Bench, assert_alive_and_bounded, quic_client, runtime};

// === --max-connections ===

#[test]
fn connections_beyond_max_connections_are_refused_before_their_handshake() {
    // Two slots for the good agents, one more.
    let mut bench = Bench::new(&["--max-connections", "3"]);
    let sink = bench.sink_addr;
    let ca = bench.pki.ca();
    let cert = bench.rogue("crowd");
    let base = Proc::of(bench.sink.pid()).rss_kib();
    let good = bench.good_streams(500);
    let rt = runtime();
    let (held, refused_quic, refused_tls) = rt.block_on(async {
        let endpoint = quic_client(&ca, Some(&cert), proto::ALPN_ZSTD);
        let held = endpoint
            .connect(sink, "localhost")
            .expect("connect")
            .await
            .expect("the third slot");
        let mut refused_quic = 0;
        for _ in 0..5 {
            let attempt = endpoint.connect(sink, "localhost").expect("connect");
            if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
                assert!(error.to_string().contains("refused"), "{error}");
                refused_quic += 1;
            }
        }
        let tls = bare::client_tls(&ca, Some(&cert), proto::GRPC_ALPN).expect("TLS");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let mut refused_tls = 0;
        for _ in 0..5 {
            let tcp = tokio::net::TcpStream::connect(sink).await.expect("TCP");
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let attempt = connector.connect(name, tcp);
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
                refused_tls += 1;
            }
        }
        (held, refused_quic, refused_tls)
    });
    assert_eq!(
        (refused_quic, refused_tls),
        (5, 5),
        "all refused beyond the limit"
    );
    let exposition = Scrape::of(bench.metrics);
    assert_eq!(
        exposition.value_or_zero(
            "relay_sink_connections_refused_total",
            &[("reason", "max_connections")]
        ),
        10.0,
        "{exposition}"
    );
    let line = bench
        .sink
        .wait_for("connection refused: --max-connections reached");
    assert_eq!(line["security_event"], "connection_limit", "{line}");

    // A slot freed is a slot taken.
    held.close(0u32.into(), b"");
    drop(held);
    metrics::wait_value(
        bench.metrics,
        WAIT,
        "relay_sink_agent_connections",
        &[("agent", "crowd")],
        0.0,
    );
    bare::send_batch(
        Transport::Grpc,
        sink,
        &ca,
        Some(&cert),
        pb::Batch {
            session: 3,
            sequence: 1,
            ..Default::default()
        },
    )
    .expect("accepted once a slot is free");

    for stream in good {
        stream.finish(&bench.capture);
    }
    let rss = assert_alive_and_bounded(&mut bench.sink, bench.metrics, base, 16);
    eprintln!("sink RSS {base} KiB before, {rss} KiB after");
}
