//! The enrollment port under the hostile-input treatment of the relay ports: random bytes
//! and plaintext HTTP on it, then 1,000 bad tokens in a burst. The sink stays up with bounded
//! memory, refuses and counts every one (rate-limited beyond the first few), and a good token
//! still enrolls afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use certs::enroll_tls::pinned_client_config;
use certs::token::fingerprint;
use proto::enroll_pb::EnrollRequest;
use rand::{Rng, RngCore, SeedableRng};
use relay_tests::enroll::Enrollment;
use relay_tests::procfs::Proc;
use relay_tests::{http, metrics};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::task::JoinSet;

/// Bad tokens sent in the burst.
const BAD_TOKENS: usize = 1_000;

/// Opens a TCP connection to the port, writes `payload`, and waits (at most 5 s) for the sink
/// to close it; whether it did.
fn closed_after(addr: std::net::SocketAddr, payload: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(payload);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            // A TLS alert or an HTTP/2 GOAWAY: read on until the close.
            Ok(_) => {}
        }
    }
}

/// A token that is not one: random bytes, random base64url after the prefix, or a real
/// prefix with a cut body.
fn bad_token(rng: &mut rand::rngs::StdRng, i: usize) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let len = rng.random_range(0..300);
    let body: String = (0..len)
        .map(|_| B64[rng.random_range(0..B64.len())] as char)
        .collect();
    match i % 3 {
        0 => body,
        1 => format!("sfr1.{body}.{}", &body[..len / 2]),
        _ => {
            let mut raw = vec![0u8; len];
            rng.fill_bytes(&mut raw);
            String::from_utf8_lossy(&raw).into_owned()
        }
    }
}

#[test]
fn the_enrollment_port_survives_garbage_and_a_burst_of_bad_tokens() {
    let mut e = Enrollment::start(&[]);
    let metrics_at = e.metrics();
    let base = Proc::of(e.sink.pid()).rss_kib();
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);

    // 100 connections of random bytes, 100 plaintext HTTP/1.1 requests: each closed.
    for _ in 0..100 {
        let mut junk = vec![0u8; rng.random_range(1..16_384)];
        rng.fill_bytes(&mut junk);
        assert!(closed_after(e.enroll_addr, &junk), "random bytes: closed");
    }
    for _ in 0..100 {
        let get = b"GET /sflow_relay.enroll.v1.Enrollment/Enroll HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(closed_after(e.enroll_addr, get), "plaintext HTTP: closed");
    }

    // 1,000 bad tokens, 16 calls at a time (the most the port takes on one connection), over
    // TLS to the right sink.
    let root = CertificateDer::from_pem_slice(&std::fs::read(e.pki.ca()).unwrap()).unwrap();
    let tls = pinned_client_config(fingerprint(&root)).unwrap();
    let csr = certs::request::make("site-b").unwrap().csr_pem;
    let csr = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let tokens: Vec<String> = (0..BAD_TOKENS).map(|i| bad_token(&mut rng, i)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let burst_started = std::time::Instant::now();
    let codes = rt.block_on(async {
        let client = agent::enroll::connect(&e.enroll_addr.to_string(), "localhost", tls)
            .await
            .expect("connect");
        let mut codes = Vec::new();
        for chunk in tokens.chunks(16) {
            let mut calls = JoinSet::new();
            for token in chunk {
                let mut client = client.clone();
                let request = EnrollRequest {
                    token: token.clone(),
                    csr_der: csr.clone().into(),
                };
                calls.spawn(async move { client.enroll(request).await.map(drop) });
            }
            while let Some(done) = calls.join_next().await {
                codes.push(done.unwrap().expect_err("a bad token is refused").code());
            }
        }
        codes
    });
    let limited = codes
        .iter()
        .filter(|c| **c == tonic::Code::ResourceExhausted)
        .count();
    let mut by_code = std::collections::BTreeMap::new();
    for code in &codes {
        *by_code.entry(format!("{code:?}")).or_insert(0) += 1;
    }
    println!("refused: {by_code:?}");
    assert_eq!(codes.len(), BAD_TOKENS);
    // The allowance: 30 at once, then one every 2 s of the burst.
    let allowed = 30 + (burst_started.elapsed().as_secs_f64() / 2.0).ceil() as usize;
    assert!(
        limited >= BAD_TOKENS - allowed,
        "{limited} of {BAD_TOKENS} rate-limited; at most {allowed} may pass"
    );
    let scrape = metrics::Scrape::of(metrics_at);
    let count = |outcome: &str| {
        scrape.value_or_zero(
            "relay_sink_enrollments_total",
            &[("call", "enroll"), ("outcome", outcome)],
        )
    };
    assert_eq!(count("rate_limited"), limited as f64);
    assert_eq!(
        count("rate_limited") + count("malformed_token") + count("bad_signature"),
        BAD_TOKENS as f64,
        "every one counted"
    );
    assert!(count("malformed_token") > 0.0);

    // Up, answering, memory bounded.
    assert!(e.sink.is_running(), "the sink died");
    assert!(http::get(metrics_at, "/healthz").unwrap().is_success());
    let rss = Proc::of(e.sink.pid()).rss_kib();
    assert!(
        rss <= base + 32 * 1024,
        "RSS grew from {base} KiB to {rss} KiB"
    );
    let logged = e.decisions("rate_limited").len();
    assert!(
        logged < BAD_TOKENS / 2,
        "refusals are logged rate-limited ({logged} lines)"
    );

    // A good token still enrolls, once the address's allowance has refilled (2 s a request).
    std::thread::sleep(Duration::from_millis(2_500));
    let token = e.token("site-b", "1h");
    let out = e.enroll(&token, &e.dir.path().join("good"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    e.wait_decision("issued");
    let _ = &mut e;
}
