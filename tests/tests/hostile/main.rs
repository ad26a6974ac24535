//! End-to-end: hostile input against the real binaries (issue 9). The sink listens on the
//! public internet and the agent on a network any device can send UDP to; whatever arrives,
//! neither may crash, grow without bound, or let anyone in, and good agents keep relaying.
//!
//! Each test runs a real sink (and agents), attacks it from this process over 127.0.0.1 only,
//! and asserts four things: the process is still up and answers `/healthz`; its memory (RSS
//! from `/proc`) stayed within a bound; a good agent's stream, sent during the attack, arrived
//! whole and in order; and the attack was counted (a metric) and logged. Every attack is
//! bounded in count and time, and every wait has a deadline.

//!
//! One test binary, a module per subject: [`garbage`] (random bytes and the wrong protocol at
//! the sink's ports), [`frames`] (a valid agent that misbehaves: oversized, stalled and
//! malformed frames, compression bombs, floods of tiny batches), [`handshakes`] (a flood of
//! handshakes with bad certificates), [`agent_flood`] (random datagrams at the agent) and
//! [`limits`] (`--max-connections`). This file has what they share: watching a daemon, a
//! good agent's stream, and the [`Bench`] they attack.

mod agent_flood;
mod frames;
mod garbage;
mod handshakes;
mod limits;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use relay_tests::procfs::Proc;
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
    let rss = Proc::of(daemon.pid()).rss_kib();
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
                    // Pacing the sender at `per_second`.
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
        // Intentional: a duplicate, if any, gets time to show up before the count.
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
            // Intentional: the probe runs for 100 ms (about 20 datagrams) before it is checked.
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
