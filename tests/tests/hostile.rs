//! End-to-end: hostile input against the real binaries (issue 9). The sink listens on the
//! public internet and the agent on a network any device can send UDP to; whatever arrives,
//! neither may crash, grow without bound, or let anyone in, and good agents keep relaying.
//!
//! Each test runs a real sink (and agents), attacks it from this process over 127.0.0.1 only,
//! and asserts four things: the process is still up and answers `/healthz`; its memory (RSS
//! from `/proc`) stayed within a bound; a good agent's stream, sent during the attack, arrived
//! whole and in order; and the attack was counted (a metric) and logged. Every attack is
//! bounded in count and time, and every wait has a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::pb;
use rand::{Rng, RngCore, SeedableRng};
use relay_tests::{
    Daemon, Pki, Transport, UdpCapture, WAIT, bare, http, metrics_addr, start_agent_over,
    start_sink,
};

// === Watching a daemon ===

/// The `i`-th datagram of a garbage stream: random bytes, one in a hundred of any size up to
/// the largest UDP payload, the rest under 1,500 bytes (empty ones included).
fn random_datagram(rng: &mut rand::rngs::StdRng, i: u64) -> Vec<u8> {
    let len = if i.is_multiple_of(100) {
        rng.random_range(0..=proto::MAX_DATAGRAM_LEN)
    } else {
        rng.random_range(0..1500)
    };
    let mut d = vec![0u8; len];
    rng.fill_bytes(&mut d);
    d
}

/// A `KEY: N kB` line of `/proc/PID/status`, KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// Resident memory of process `pid`, KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// Private memory process `pid` has mapped, touched or not, KiB (`VmData`): unlike RSS it
/// also shows a buffer reserved for a frame whose bytes never came.
fn vm_data_kib(pid: u32) -> u64 {
    status_kib(pid, "VmData")
}

/// CPU time process `pid` has used, seconds (user + system, from `/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ, 100 on every Linux the tests run on.
    ticks as f64 / 100.0
}

/// The share of a core process `pid` uses over `window`.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(window);
    (cpu_seconds(pid) - before) / window.as_secs_f64()
}

fn scrape(metrics: SocketAddr) -> String {
    http::get(metrics, "/metrics").expect("scrape").body
}

/// The value of one series, `name{labels}` exactly as exposed; 0 when absent.
fn series(exposition: &str, name_and_labels: &str) -> u64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Asserts the daemon is up and answers `/healthz`, and its RSS is at most `base + slack`
/// MiB; returns the RSS in KiB.
fn assert_alive_and_bounded(
    daemon: &mut Daemon,
    metrics: SocketAddr,
    base: u64,
    slack_mib: u64,
) -> u64 {
    assert!(daemon.is_running(), "the process died");
    let health = http::get(metrics, "/healthz").expect("healthz answers");
    assert!(health.is_success(), "healthz: {}", health.status);
    let rss = rss_kib(daemon.pid());
    assert!(
        rss <= base + slack_mib * 1024,
        "RSS grew from {base} KiB to {rss} KiB, more than {slack_mib} MiB"
    );
    rss
}

// === A good agent's stream ===

/// Datagrams sent to an agent on a thread of their own at `per_second`, until stopped: sFlow
/// headers tagged `tag` ([`relay_tests::tagged_datagram`]), then filler up to 200..1400 bytes.
struct GoodStream {
    tag: u8,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Vec<u8>>>,
}

impl GoodStream {
    fn start(to: SocketAddr, tag: u8, per_second: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(tag));
            let mut sent = Vec::new();
            let start = Instant::now();
            while !stopped.load(Ordering::Relaxed) {
                let i = sent.len();
                let due = start + Duration::from_secs_f64(i as f64 / f64::from(per_second));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let mut d =
                    relay_tests::tagged_datagram(tag, i as u32, rng.random_range(200..1400));
                rng.fill_bytes(&mut d[relay_tests::MIN_LEN + 4..]);
                socket.send_to(&d, to).expect("send");
                sent.push(d);
            }
            sent
        });
        Self { tag, stop, thread }
    }

    /// Stops sending and asserts that every datagram sent arrived at `capture`, once each, in
    /// order, byte for byte. Returns how many.
    fn finish(self, capture: &UdpCapture) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.thread.join().expect("good stream");
        let tag = self.tag;
        assert!(
            capture.wait_until(WAIT, |r| r
                .iter()
                .filter(|d| relay_tests::tag_of(d) == Some(tag))
                .count()
                >= sent.len()),
            "good stream 0x{tag:02x}: only {} of {} arrived",
            capture.count_tagged(tag),
            sent.len()
        );
        std::thread::sleep(Duration::from_millis(200));
        let got = capture.tagged(tag);
        assert_eq!(got.len(), sent.len(), "good stream 0x{tag:02x}: duplicates");
        assert!(
            got == sent,
            "good stream 0x{tag:02x}: datagrams differ or out of order"
        );
        sent.len()
    }
}

/// A sink with a metrics endpoint plus one good agent on each transport, all replaying to one
/// capture.
struct Bench {
    dir: tempfile::TempDir,
    pki: Pki,
    capture: UdpCapture,
    sink: Daemon,
    sink_addr: SocketAddr,
    metrics: SocketAddr,
    agents: Vec<(Daemon, SocketAddr)>,
}

impl Bench {
    fn new(sink_extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new(dir.path());
        let capture = UdpCapture::bind();
        let extra = [&["--metrics-listen", "127.0.0.1:0"], sink_extra].concat();
        let (sink, sink_addr) = start_sink(
            &pki,
            &pki.sink_cert("sink"),
            &[capture.addr()],
            None,
            &extra,
        );
        let metrics = metrics_addr(&sink);
        let agents = [Transport::Quic, Transport::Grpc]
            .into_iter()
            .map(|t| {
                start_agent_over(
                    t,
                    &pki.ca(),
                    &pki.agent_cert(&format!("good-{}", t.name())),
                    sink_addr,
                    "localhost",
                    &[],
                )
            })
            .collect();
        let bench = Self {
            dir,
            pki,
            capture,
            sink,
            sink_addr,
            metrics,
            agents,
        };
        // Both good agents connected and relaying before the attack starts.
        for (i, (_, listen)) in bench.agents.iter().enumerate() {
            let tag = 0xA0 + i as u8;
            let probe = GoodStream::start(*listen, tag, 200);
            std::thread::sleep(Duration::from_millis(100));
            probe.finish(&bench.capture);
        }
        bench
    }

    /// Good streams through both agents, at `per_second` each.
    fn good_streams(&self, per_second: u32) -> Vec<GoodStream> {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, (_, listen))| GoodStream::start(*listen, 0xB0 + i as u8, per_second))
            .collect()
    }

    fn rogue(&self, name: &str) -> (PathBuf, PathBuf) {
        self.pki.agent_cert(name)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn quic_client(ca: &Path, client: Option<&(PathBuf, PathBuf)>, alpn: &[u8]) -> quinn::Endpoint {
    let tls = bare::client_tls(ca, client, alpn).expect("client TLS");
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Keep-alives flow: the connection is never idle, whatever the stream does.
    transport.keep_alive_interval(Some(Duration::from_millis(300)));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    endpoint.set_default_client_config(config);
    endpoint
}

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
    let base = rss_kib(bench.sink.pid());
    let good = bench.good_streams(500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);

    // UDP: 20,000 datagrams of random bytes and sizes, then every truncation of a real
    // QUIC Initial packet, each 10 times.
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for i in 0..20_000 {
        let d = random_datagram(&mut rng, i);
        let _ = udp.send_to(&d, sink);
        if i % 500 == 0 {
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
    let deadline = Instant::now() + WAIT;
    let mut exposition = scrape(bench.metrics);
    while http::metric_sum(&exposition, "relay_sink_handshakes_refused_total") < expected as f64
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        exposition = scrape(bench.metrics);
    }
    let other = series(
        &exposition,
        "relay_sink_handshakes_refused_total{reason=\"other\"}",
    );
    let refused = http::metric_sum(&exposition, "relay_sink_handshakes_refused_total") as u64;
    eprintln!("refused handshakes: {refused} ({other} other)");
    assert_eq!(refused, expected, "{exposition}");
    assert_eq!(
        series(
            &exposition,
            "relay_sink_connections_accepted_total{transport=\"quic\"}"
        ),
        1,
        "only the good QUIC agent got in"
    );
    assert_eq!(
        series(
            &exposition,
            "relay_sink_connections_accepted_total{transport=\"grpc\"}"
        ),
        1,
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

// === 2. A valid agent that misbehaves ===

/// Connects as `client`, opens a stream, writes `bytes` and waits up to `wait` for the sink to
/// close the connection: its close reason, or `None` when it stayed open.
async fn write_and_wait(
    endpoint: quinn::Endpoint,
    sink: SocketAddr,
    bytes: Vec<u8>,
    wait: Duration,
) -> Option<String> {
    let connection = endpoint
        .connect(sink, "localhost")
        .expect("connect")
        .await
        .expect("a valid agent's handshake");
    let (mut send, _recv) = connection.open_bi().await.expect("stream");
    // The sink may close before all is written.
    let _ = send.write_all(&bytes).await;
    match tokio::time::timeout(wait, connection.closed()).await {
        Ok(error) => Some(error.to_string()),
        Err(_) => {
            connection.close(0u32.into(), b"");
            None
        }
    }
}

fn header(len: u32) -> Vec<u8> {
    len.to_be_bytes().to_vec()
}

/// A batch whose compressed datagrams expand to `plain` zero bytes; `sized` says whether the
/// zstd frame states that size (a frame made by a stream encoder does not).
fn bomb(plain: usize, sized: bool) -> pb::Batch {
    let zeros = vec![0u8; plain];
    let packed = if sized {
        zstd::bulk::compress(&zeros, 1).expect("compress")
    } else {
        zstd::stream::encode_all(&zeros[..], 1).expect("compress")
    };
    pb::Batch {
        session: 1,
        sequence: 1,
        datagrams: Vec::new(),
        zstd_datagrams: packed.into(),
        ..Default::default()
    }
}

/// Sends `n` batches of one small datagram each (tagged 0x7A) as fast as the
/// stream takes them, and counts the acknowledgements; gives up after `WAIT`.
async fn tiny_batches(endpoint: &quinn::Endpoint, sink: SocketAddr, n: u32) -> u32 {
    let connection = endpoint
        .connect(sink, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, recv) = connection.open_bi().await.expect("stream");
    let writer = tokio::spawn(async move {
        let mut frames = BytesMut::new();
        for i in 0..n {
            let payload = relay_tests::tagged_datagram(0x7A, i, relay_tests::MIN_LEN + 4);
            let batch = pb::Batch {
                session: 77,
                sequence: u64::from(i) + 1,
                datagrams: vec![pb::Datagram {
                    payload: payload.into(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            proto::wire::encode_frame(&batch, &mut frames);
            if frames.len() > 16 * 1024 || i + 1 == n {
                send.write_all(&frames).await.expect("write");
                frames.clear();
            }
        }
        send
    });
    let mut reader = proto::wire::FrameReader::new(recv, 1024);
    let mut acked = 0;
    let counting = async {
        while acked < n {
            match reader.next::<pb::Ack>().await {
                Ok(Some(_)) => acked += 1,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(WAIT, counting).await;
    let _ = writer.await;
    connection.close(0u32.into(), b"");
    acked
}

#[test]
fn a_valid_agent_that_misbehaves_loses_its_connection_and_nothing_else() {
    let mut bench = Bench::new(&[
        "--frame-timeout",
        "1s",
        "--agent-max-pps",
        "2000",
        "--max-datagram-bytes",
        "2000",
    ]);
    let sink = bench.sink_addr;
    let ca = bench.pki.ca();
    let pid = bench.sink.pid();
    let base = rss_kib(pid);
    let good = bench.good_streams(500);
    let rogue = bench.rogue("rogue");
    let limit = proto::wire::DEFAULT_MAX_FRAME_LEN as u32;
    let rt = runtime();
    let endpoint = rt.block_on(async { quic_client(&ca, Some(&rogue), proto::ALPN_ZSTD) });

    // A frame over the limit, and one claiming 4 GiB: refused at the header.
    for len in [limit + 1, u32::MAX] {
        let closed = rt.block_on(write_and_wait(endpoint.clone(), sink, header(len), WAIT));
        let reason = closed.expect("the sink closed the connection");
        assert!(reason.contains("exceeds the limit"), "{reason}");
    }

    // 20 frames claiming the largest length allowed, then stalling while keep-alives flow:
    // each holds little memory meanwhile, and is cut off after --frame-timeout.
    const STALLS: usize = 20;
    let started = Instant::now();
    let base_data = vm_data_kib(pid);
    let (closed, (stalled_rss, stalled_data)) = rt.block_on(async {
        let waits: Vec<_> = (0..STALLS)
            .map(|_| {
                let mut bytes = header(limit);
                bytes.resize(4 + 64 * 1024, 0x0A);
                tokio::spawn(write_and_wait(endpoint.clone(), sink, bytes, WAIT))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let stalled = (rss_kib(pid), vm_data_kib(pid));
        let mut closed = Vec::new();
        for wait in waits {
            closed.push(wait.await.expect("task"));
        }
        (closed, stalled)
    });
    let took = started.elapsed();
    eprintln!(
        "{STALLS} stalled 4 MiB frames: sink RSS {base} KiB before, {stalled_rss} KiB while stalled (VmData {base_data} KiB, {stalled_data} KiB); all cut off in {took:?}"
    );
    for reason in &closed {
        let reason = reason.as_deref().expect("a stalled frame was left open");
        assert!(reason.contains("frame-timeout"), "{reason}");
    }
    assert!(
        took >= Duration::from_secs(1),
        "cut off before --frame-timeout"
    );
    assert!(
        stalled_rss < base + 24 * 1024,
        "{STALLS} frames announcing 4 MiB grew the sink from {base} to {stalled_rss} KiB"
    );
    // What they announced (80 MiB) was not even reserved.
    assert!(
        stalled_data < base_data + 40 * 1024,
        "{STALLS} frames announcing 4 MiB grew the sink's mappings from {base_data} to {stalled_data} KiB"
    );

    // An agent idle between frames, with keep-alives, is not cut off.
    let idle = rt.block_on(async {
        let mut frame = BytesMut::new();
        proto::wire::encode_frame(
            &pb::Batch {
                session: 5,
                sequence: 1,
                ..Default::default()
            },
            &mut frame,
        );
        write_and_wait(
            endpoint.clone(),
            sink,
            frame.to_vec(),
            Duration::from_secs(3),
        )
        .await
    });
    assert_eq!(idle, None, "an idle agent was cut off");

    // Not protobuf.
    let mut junk = header(16);
    junk.extend_from_slice(&[0xFF; 16]);
    let closed = rt.block_on(write_and_wait(endpoint.clone(), sink, junk, WAIT));
    assert!(closed.expect("closed").contains("malformed"));

    // Compression bombs, on both transports: 256 MiB of zeros stated in the zstd header, and
    // 8 MiB without its size.
    for t in [Transport::Quic, Transport::Grpc] {
        for (plain, sized) in [(256 << 20, true), (8 << 20, false)] {
            let refused = bare::send_batch(t, sink, &ca, Some(&rogue), bomb(plain, sized));
            assert!(
                refused.is_err(),
                "a bomb was acknowledged over {}",
                t.name()
            );
        }
    }

    // A datagram over --max-datagram-bytes is dropped from its batch; the rest is replayed.
    let sizes = [100, 3000, 200];
    let batch = pb::Batch {
        session: 9,
        sequence: 1,
        datagrams: sizes
            .iter()
            .map(|&n| pb::Datagram {
                payload: relay_tests::tagged_datagram(0x7B, 0, n).into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let big = bench.rogue("big-datagram");
    bare::send_batch(Transport::Quic, sink, &ca, Some(&big), batch).expect("acknowledged");

    // 10,000 tiny batches as fast as the stream goes, from one identity limited to 2,000
    // datagrams a second: all acknowledged, the excess dropped and counted.
    const TINY: u32 = 10_000;
    let flooder = bench.rogue("flooder");
    let started = Instant::now();
    let acked = rt.block_on(async {
        let endpoint = quic_client(&ca, Some(&flooder), proto::ALPN_ZSTD);
        tiny_batches(&endpoint, sink, TINY).await
    });
    eprintln!(
        "{TINY} tiny batches sent and {acked} acknowledged in {:?}",
        started.elapsed()
    );
    assert_eq!(acked, TINY, "every tiny batch acknowledged");
    std::thread::sleep(Duration::from_millis(500));

    for stream in good {
        stream.finish(&bench.capture);
    }
    let exposition = scrape(bench.metrics);
    let violations = |reason: &str| {
        series(
            &exposition,
            &format!("relay_sink_protocol_errors_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(violations("frame_too_large"), 2, "{exposition}");
    assert_eq!(violations("frame_timeout"), STALLS as u64, "{exposition}");
    assert_eq!(violations("malformed"), 1, "{exposition}");
    assert_eq!(violations("decompressed_too_large"), 2, "{exposition}");
    assert_eq!(violations("compression"), 2, "{exposition}");
    let total = 2 + STALLS + 1 + 2 + 2;
    assert_eq!(
        bench
            .sink
            .count("protocol violation: the agent's stream is ended"),
        total,
        "each violation logged"
    );
    let dropped = |agent: &str, reason: &str| {
        series(
            &exposition,
            &format!(
                "relay_sink_agent_datagrams_dropped_total{{agent=\"{agent}\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(dropped("big-datagram", "too_large"), 1, "{exposition}");
    assert_eq!(
        bench.capture.count_tagged(0x7B),
        2,
        "the datagrams within the limit"
    );
    let limited = dropped("flooder", "rate_limited");
    let replayed = bench.capture.count_tagged(0x7A) as u64;
    eprintln!("flooder: {replayed} replayed, {limited} dropped over --agent-max-pps");
    assert!(limited > 0, "the flood was not limited");
    assert_eq!(replayed + limited, u64::from(TINY), "replayed or counted");
    assert!(
        bench
            .sink
            .count("datagrams from this agent over a limit: dropped")
            >= 1,
        "the drops logged"
    );
    let rss = assert_alive_and_bounded(&mut bench.sink, bench.metrics, base, 64);
    eprintln!("sink RSS {base} KiB before, {rss} KiB after");
}

// === 4. A flood of handshakes with bad certificates ===

/// `n` handshakes over `transport` presenting `client`, `parallel` at a time, each waiting
/// for the sink's verdict.
async fn handshake_flood(
    transport: Transport,
    sink: SocketAddr,
    ca: &Path,
    client: &(PathBuf, PathBuf),
    n: usize,
    parallel: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut attempts = tokio::task::JoinSet::new();
    let endpoint = quic_client(ca, Some(client), proto::ALPN_ZSTD);
    let tls = Arc::new(bare::client_tls(ca, Some(client), proto::GRPC_ALPN).expect("TLS"));
    for _ in 0..n {
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let endpoint = endpoint.clone();
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        attempts.spawn(async move {
            let attempt = async {
                match transport {
                    Transport::Quic => {
                        if let Ok(connection) =
                            endpoint.connect(sink, "localhost").expect("connect").await
                        {
                            connection.closed().await;
                        }
                    }
                    Transport::Grpc => {
                        let Ok(tcp) = tokio::net::TcpStream::connect(sink).await else {
                            return;
                        };
                        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                        if let Ok(mut tls) = connector.connect(name, tcp).await {
                            let mut byte = [0u8; 1];
                            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut byte).await;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
            drop(permit);
        });
    }
    while attempts.join_next().await.is_some() {}
}

#[test]
fn a_thousand_bad_handshakes_in_seconds_leave_no_trace_and_lose_nothing() {
    const FLOOD: usize = 1_000;
    let mut bench = Bench::new(&[]);
    let other = Pki::new(&bench.dir.path().join("theirs"));
    let intruder = other.agent_cert("intruder");
    let pid = bench.sink.pid();
    let good = bench.good_streams(500);
    std::thread::sleep(Duration::from_secs(1));
    let base_rss = rss_kib(pid);
    let base_cpu = cpu_share(pid, Duration::from_secs(2));

    let rt = runtime();
    let ca = bench.pki.ca();
    // FLOOD handshakes with the intruder's certificate, half over each transport, 32 at a time.
    let flood = || {
        rt.block_on(async {
            let quic = handshake_flood(
                Transport::Quic,
                bench.sink_addr,
                &ca,
                &intruder,
                FLOOD / 2,
                32,
            );
            let grpc = handshake_flood(
                Transport::Grpc,
                bench.sink_addr,
                &ca,
                &intruder,
                FLOOD / 2,
                32,
            );
            tokio::join!(quic, grpc);
        });
    };
    let started = Instant::now();
    flood();
    let took = started.elapsed();
    let peak_rss = rss_kib(pid);
    // Settled: what the handshakes held is given back.
    std::thread::sleep(Duration::from_secs(3));
    let after_cpu = cpu_share(pid, Duration::from_secs(2));
    let after_rss = rss_kib(pid);
    // A second flood: what the allocator kept from the first is reused, not added to.
    flood();
    std::thread::sleep(Duration::from_secs(1));
    let second_rss = rss_kib(pid);
    eprintln!(
        "{FLOOD} bad handshakes in {took:?}; sink RSS {base_rss} KiB before, {peak_rss} KiB at the end of the flood, {after_rss} KiB 3 s later, {second_rss} KiB after a second flood; CPU {:.1} % before, {:.1} % after",
        base_cpu * 100.0,
        after_cpu * 100.0
    );
    assert!(
        second_rss <= after_rss + 4 * 1024,
        "a second flood grew the sink from {after_rss} to {second_rss} KiB: a leak"
    );
    assert!(took < Duration::from_secs(15), "the flood took {took:?}");

    let exposition = scrape(bench.metrics);
    assert_eq!(
        series(
            &exposition,
            "relay_sink_handshakes_refused_total{reason=\"unknown_issuer\"}"
        ),
        2 * FLOOD as u64,
        "{exposition}"
    );
    let lines: Vec<_> = bench
        .sink
        .events()
        .into_iter()
        .filter(|e| e["security_event"] == "tls_handshake_refused" && e["kind"] == "unknown_issuer")
        .collect();
    // Two floods: at most ten lines a second during each, plus the first of each.
    let bound = 2 * ((10.0 * (took.as_secs_f64().ceil() + 1.0)) as usize + 1);
    assert!(
        !lines.is_empty() && lines.len() <= bound,
        "{} refusal lines for {FLOOD} refusals in {took:?}",
        lines.len()
    );
    assert!(
        lines
            .iter()
            .all(|l| l["presented_subject"] == "CN=intruder"),
        "{lines:?}"
    );

    for stream in good {
        stream.finish(&bench.capture);
    }
    assert_alive_and_bounded(&mut bench.sink, bench.metrics, base_rss, 16);
    assert!(
        after_cpu <= base_cpu + 0.05,
        "CPU {:.1} % after the flood, {:.1} % before",
        after_cpu * 100.0,
        base_cpu * 100.0
    );
}

// === 5. Random datagrams at the agent ===

#[test]
fn a_hundred_thousand_random_datagrams_at_the_agent_are_relayed_or_counted() {
    const FLOOD: u64 = 100_000;
    let mut bench = Bench::new(&["--replay-max-pps", "0"]);
    let (mut agent, listen) = start_agent_over(
        Transport::Quic,
        &bench.pki.ca(),
        &bench.pki.agent_cert("site"),
        bench.sink_addr,
        "localhost",
        // Relaying arbitrary bytes end to end is the point here (what the agent and the sink
        // do with them), so this agent relays any UDP, as for sites that carry other traffic
        // through it. The default, dropping what is not sFlow, is garbage.rs's test.
        &["--metrics-listen", "127.0.0.1:0", "--accept", "any"],
    );
    let agent_metrics = metrics_addr(&agent);
    let base = rss_kib(agent.pid());
    let sink_base = rss_kib(bench.sink.pid());
    let good = bench.good_streams(500);

    // Random bytes of random sizes (1 in 100 up to the largest, the rest under 1,500, empty
    // ones included); 10,000 a second.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let started = Instant::now();
    let mut peak = base;
    for i in 0..FLOOD {
        let d = random_datagram(&mut rng, i);
        let _ = socket.send_to(&d, listen);
        if i % 100 == 99 {
            let due = started + Duration::from_micros(100 * (i + 1));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if i % 10_000 == 0 {
            peak = peak.max(rss_kib(agent.pid()));
        }
    }
    eprintln!("{FLOOD} random datagrams sent in {:?}", started.elapsed());

    // Everything sent is received or dropped by the kernel (counted); everything received is
    // at the sink or counted as dropped; nothing of it is taken for sFlow.
    let deadline = Instant::now() + WAIT;
    let (agent_side, sink_side) = loop {
        let a = scrape(agent_metrics);
        let s = scrape(bench.metrics);
        let received = series(&a, "relay_agent_datagrams_received_total");
        let dropped = http::metric_sum(&a, "relay_agent_datagrams_dropped_total") as u64;
        let at_sink = series(
            &s,
            "relay_sink_agent_datagrams_received_total{agent=\"site\"}",
        );
        if at_sink + dropped >= received || Instant::now() > deadline {
            break (a, s);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let received = series(&agent_side, "relay_agent_datagrams_received_total");
    let kernel = http::metric_sum(&agent_side, "relay_agent_kernel_receive_drops_total") as u64;
    let dropped = http::metric_sum(&agent_side, "relay_agent_datagrams_dropped_total") as u64;
    let not_sflow = http::metric_sum(&agent_side, "relay_agent_not_sflow_datagrams_total") as u64;
    let at_sink = series(
        &sink_side,
        "relay_sink_agent_datagrams_received_total{agent=\"site\"}",
    );
    eprintln!(
        "agent: {received} received, {kernel} dropped by the kernel, {dropped} dropped by the agent, {not_sflow} not sFlow; sink: {at_sink} from it"
    );
    assert_eq!(received + kernel, FLOOD, "sent = received + kernel drops");
    assert_eq!(
        at_sink + dropped,
        received,
        "received = at the sink + counted drops"
    );
    assert_eq!(not_sflow, received, "none taken for sFlow");

    // The sink replayed them all: they are at the capture, or its kernel dropped them.
    let relayed_flood = |r: &[Vec<u8>]| {
        r.iter()
            .filter(|d| relay_tests::tag_of(d).is_none())
            .count() as u64
    };
    bench.capture.wait_until(WAIT, |r| {
        relayed_flood(r) + bench.capture.kernel_drops() >= at_sink
    });
    let captured = relayed_flood(&bench.capture.received());
    eprintln!(
        "capture: {captured} of the flood, {} kernel drops",
        bench.capture.kernel_drops()
    );
    assert_eq!(captured + bench.capture.kernel_drops(), at_sink);

    for stream in good {
        stream.finish(&bench.capture);
    }
    let rss = assert_alive_and_bounded(&mut agent, agent_metrics, base, 64);
    eprintln!("agent RSS {base} KiB before, {peak} KiB at most during the flood, {rss} KiB after");
    let sink_rss = assert_alive_and_bounded(&mut bench.sink, bench.metrics, sink_base, 64);
    eprintln!("sink RSS {sink_base} KiB before, {sink_rss} KiB after");
}

// === --max-connections ===

#[test]
fn connections_beyond_max_connections_are_refused_before_their_handshake() {
    // Two slots for the good agents, one more.
    let mut bench = Bench::new(&["--max-connections", "3"]);
    let sink = bench.sink_addr;
    let ca = bench.pki.ca();
    let cert = bench.rogue("crowd");
    let base = rss_kib(bench.sink.pid());
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
    let exposition = scrape(bench.metrics);
    assert_eq!(
        series(
            &exposition,
            "relay_sink_connections_refused_total{reason=\"max_connections\"}"
        ),
        10,
        "{exposition}"
    );
    let line = bench
        .sink
        .wait_for("connection refused: --max-connections reached");
    assert_eq!(line["security_event"], "connection_limit", "{line}");

    // A slot freed is a slot taken.
    held.close(0u32.into(), b"");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
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
