//! Garbage at both of the sink's ports, and the wrong protocol: random datagrams and truncated QUIC
//! Initials at the QUIC port, random bytes and plaintext HTTP at the gRPC port, TLS with the
//! wrong ALPN on both.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use relay_tests::procfs::Proc;
use relay_tests::{WAIT, bare, metrics};

use super::{Bench, assert_alive_and_bounded, quic_client, random_datagram, runtime};

// === 1. Garbage at both ports, and the wrong protocol ===

/// An Initial packet a real QUIC client sends, caught on a socket of ours.
fn a_real_initial(ca: &Path) -> Vec<u8> {
    let catcher = UdpSocket::bind("127.0.0.1:0").expect("bind");
    catcher
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let to = catcher.local_addr().unwrap();
    let ca = ca.to_path_buf();
    std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async {
            let endpoint = quic_client(&ca, None, proto::ALPN);
            let connecting = endpoint.connect(to, "localhost").expect("connect");
            let _ = tokio::time::timeout(Duration::from_secs(2), connecting).await;
        });
    });
    let mut buf = vec![0u8; 65_536];
    let n = catcher.recv(&mut buf).expect("an Initial packet");
    buf.truncate(n);
    buf
}

#[test]
fn garbage_at_both_ports_and_the_wrong_protocol_leave_the_sink_serving() {
    let mut bench = Bench::new(&[]);
    let sink = bench.sink_addr;
    let base = Proc::of(bench.sink.pid()).rss_kib();
    let good = bench.good_streams(500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);

    // UDP: 20,000 datagrams of random bytes and sizes, then every truncation of a real
    // QUIC Initial packet, each 10 times.
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for i in 0..20_000 {
        let d = random_datagram(&mut rng, i);
        let _ = udp.send_to(&d, sink);
        if i % 500 == 0 {
            // Pacing the sender: bursts of 500 that the sink's socket buffer can hold.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let initial = a_real_initial(&bench.pki.ca());
    let mut truncated = 0;
    for cut in (1..initial.len()).step_by(3) {
        for _ in 0..10 {
            let _ = udp.send_to(&initial[..cut], sink);
            truncated += 1;
        }
        // Pacing the sender.
        std::thread::sleep(Duration::from_micros(200));
    }
    eprintln!(
        "sent 20000 random datagrams and {truncated} truncated Initials ({} bytes whole)",
        initial.len()
    );

    // TCP: 100 connections of random bytes, 100 plaintext HTTP/1.1 requests.
    const TCP_EACH: usize = 100;
    let tcp = |payload: Vec<u8>| {
        let mut s = TcpStream::connect(sink).expect("connect TCP");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&payload);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    };
    for _ in 0..TCP_EACH {
        let mut junk = vec![0u8; rng.random_range(1..4096)];
        rng.fill_bytes(&mut junk);
        tcp(junk);
    }
    let mut http_answers = Vec::new();
    for _ in 0..TCP_EACH {
        http_answers.push(tcp(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec(),
        ));
    }
    assert!(
        http_answers.iter().all(|a| !a.starts_with(b"HTTP/")),
        "the gRPC port answered plaintext HTTP"
    );

    // TLS with a valid agent certificate but the wrong ALPN, on both transports. (After a
    // pause: refusals of one kind are logged at most ten a second, whatever the transport.)
    std::thread::sleep(Duration::from_millis(200));
    const WRONG_ALPN: usize = 20;
    let cert = bench.rogue("wrong-alpn");
    let rt = runtime();
    let (quic_results, tcp_results) = rt.block_on(async {
        let endpoint = quic_client(&bench.pki.ca(), Some(&cert), b"sflow-relay/9");
        let mut quic = Vec::new();
        for _ in 0..WRONG_ALPN {
            let connecting = endpoint.connect(sink, "localhost").expect("connect");
            quic.push(
                tokio::time::timeout(Duration::from_secs(5), connecting)
                    .await
                    .map(|r| r.map(|_| ())),
            );
        }
        let tls = bare::client_tls(&bench.pki.ca(), Some(&cert), b"http/1.1").expect("TLS");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let mut over_tcp = Vec::new();
        for _ in 0..WRONG_ALPN {
            let tcp = tokio::net::TcpStream::connect(sink).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let attempt = async {
                let mut tls = connector.connect(name, tcp).await?;
                let mut byte = [0u8; 1];
                tokio::io::AsyncReadExt::read(&mut tls, &mut byte).await
            };
            over_tcp.push(tokio::time::timeout(Duration::from_secs(5), attempt).await);
        }
        (quic, over_tcp)
    });
    assert!(
        quic_results.iter().all(|r| !matches!(r, Ok(Ok(())))),
        "a QUIC connection with the wrong ALPN was accepted"
    );
    assert!(
        tcp_results
            .iter()
            .all(|r| !matches!(r, Ok(Ok(n)) if *n > 0)),
        "a TLS connection with the wrong ALPN got data"
    );

    // Counted: every TCP connection and every wrong ALPN is a refused handshake.
    let expected = (2 * TCP_EACH + 2 * WRONG_ALPN) as u64;
    let refused_total = "relay_sink_handshakes_refused_total";
    let exposition = metrics::poll(bench.metrics, WAIT, |s| {
        s.sum(refused_total) >= expected as f64
    })
    .unwrap_or_else(|last| last);
    let other = exposition.value_or_zero(refused_total, &[("reason", "other")]) as u64;
    let refused = exposition.sum(refused_total) as u64;
    eprintln!("refused handshakes: {refused} ({other} other)");
    assert_eq!(refused, expected, "{exposition}");
    assert_eq!(
        exposition.value_or_zero(
            "relay_sink_connections_accepted_total",
            &[("transport", "quic")]
        ),
        1.0,
        "only the good QUIC agent got in"
    );
    assert_eq!(
        exposition.value_or_zero(
            "relay_sink_connections_accepted_total",
            &[("transport", "grpc")]
        ),
        1.0,
        "only the good gRPC agent got in"
    );
    // Logged, rate-limited.
    let lines: Vec<_> = bench
        .sink
        .events()
        .into_iter()
        .filter(|e| e["security_event"] == "tls_handshake_refused")
        .collect();
    assert!(!lines.is_empty(), "no refusal logged");
    let reported: u64 = lines
        .iter()
        .map(|l| 1 + l["earlier_refusals_not_logged"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        reported <= refused,
        "{reported} reported, {refused} counted"
    );
    let alpn = lines
        .iter()
        .find(|l| l["transport"] == "quic")
        .expect("wrong ALPN on QUIC logged");
    eprintln!("wrong ALPN over QUIC logged as: {alpn}");
    assert!(
        lines.iter().any(|l| l["transport"] == "grpc"),
        "garbage on TCP logged"
    );

    for stream in good {
        stream.finish(&bench.capture);
    }
    let rss = assert_alive_and_bounded(&mut bench.sink, bench.metrics, base, 32);
    eprintln!(
        "sink RSS {base} KiB before, {rss} KiB after; {} log lines for {refused} refusals",
        lines.len()
    );
}
