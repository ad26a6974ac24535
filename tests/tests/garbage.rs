//! End-to-end: what is not sFlow stays out (issue 15). An agent with its defaults relays
//! sFlow v5 only; with `--allow-sources`, only from the sources listed. Everything else is
//! dropped at the agent, counted by reason in `relay_agent_not_sflow_datagrams_total`, and
//! logged at most once per 10 s, while a real sFlow stream beside it arrives whole, byte for
//! byte and in order.
//!
//! Each test floods an agent on 127.0.0.1 with 25,000 unwanted datagrams a second (1 to 9,000
//! bytes) for 10 s beside a real stream of 1,000 a second, then reads the agent's `/metrics`:
//! every unwanted datagram the agent received is counted under a drop reason, and the kernel
//! dropped none on the way (so the count is the number sent). The two tests take turns: each
//! alone is about 110 MB/s of loopback traffic.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use relay_tests::fixture::{METRICS, Relay};
use relay_tests::metrics::{self, Scrape};
use relay_tests::sflow::SflowGen;
use relay_tests::{MIN_LEN, WAIT, send_at_rate, tagged_datagram};

/// How long each flood lasts.
const SECONDS: u64 = 10;
/// Unwanted datagrams a second.
const FLOOD_RATE: u64 = 25_000;
/// Real sFlow datagrams a second (the sink paces replay at 5,000 a second by default).
const REAL_RATE: u32 = 1_000;
/// The largest unwanted datagram (a jumbo frame's worth).
const FLOOD_MAX_LEN: usize = 9_000;

/// One flood at a time: two at once would measure the machine (2 cores), not the agent.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// An agent with its defaults and a metrics endpoint, in front of a sink replaying to a
/// capture.
struct Site {
    relay: Relay,
    metrics: SocketAddr,
}

impl Site {
    fn new(agent_extra: &[&str]) -> Self {
        let relay = Relay::with_defaults()
            .agent_name("site")
            .agent(&METRICS)
            .agent(agent_extra)
            .start();
        let metrics = relay.agent_metrics();
        Self { relay, metrics }
    }

    fn scrape(&self) -> Scrape {
        Scrape::of(self.metrics)
    }

    /// Sends `real` at [`REAL_RATE`] from 127.0.0.1 while `flood` makes [`FLOOD_RATE`]
    /// datagrams a second for [`SECONDS`] (given its index and a buffer to fill), sent from
    /// `flood_from`. Returns how many flood datagrams were sent.
    fn run(
        &self,
        real: &[Vec<u8>],
        flood_from: SocketAddr,
        mut flood: impl FnMut(u64, &mut Vec<u8>),
    ) -> u64 {
        let socket = UdpSocket::bind(flood_from).expect("bind the flood's sender");
        let total = FLOOD_RATE * SECONDS;
        std::thread::scope(|s| {
            s.spawn(|| send_at_rate(self.relay.listen, real, REAL_RATE));
            let started = Instant::now();
            let mut buf = Vec::with_capacity(FLOOD_MAX_LEN);
            for i in 0..total {
                flood(i, &mut buf);
                socket.send_to(&buf, self.relay.listen).expect("send flood");
                // In bursts of 10 (0.4 ms apart), not 100: a burst of large datagrams must
                // fit the agent's socket buffer while its receive thread pauses (1 ms).
                if i % 10 == 9 {
                    let due = started + Duration::from_micros(1_000_000 * (i + 1) / FLOOD_RATE);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        // Pacing the flood at FLOOD_RATE.
                        std::thread::sleep(wait);
                    }
                }
            }
            let took = started.elapsed();
            eprintln!("{total} flood datagrams sent in {took:?}");
            assert!(
                took < Duration::from_secs(SECONDS + 3),
                "the flood fell behind its rate: {took:?}"
            );
        });
        total
    }

    /// Waits until the agent has received (or the kernel dropped) `sent` datagrams; returns
    /// the exposition then.
    fn settled(&self, sent: u64) -> Scrape {
        metrics::poll(self.metrics, WAIT, |s| {
            let received = s.sum("relay_agent_datagrams_received_total");
            let kernel = s.sum("relay_agent_kernel_receive_drops_total");
            received + kernel >= sent as f64
        })
        .unwrap_or_else(|last| last)
    }

    /// Asserts what both floods must show: every unwanted datagram counted under `reasons`
    /// and none under another reason, no kernel drop, the real stream all relayed, and the
    /// drops logged at most once per 10 s.
    fn assert_dropped_and_counted(&self, real: &[Vec<u8>], flooded: u64, reasons: &[&str]) {
        let sent = real.len() as u64 + flooded;
        let exposition = self.settled(sent);
        let value = |name: &str| exposition.sum(name) as u64;
        let received = value("relay_agent_datagrams_received_total");
        let kernel = value("relay_agent_kernel_receive_drops_total");
        let refused = value("relay_agent_not_sflow_datagrams_total");
        let by_reason: Vec<(String, u64)> = exposition
            .series("relay_agent_not_sflow_datagrams_total")
            .filter_map(|s| Some((s.label("reason")?.to_owned(), s.value as u64)))
            .collect();
        eprintln!(
            "agent: {received} received, {kernel} dropped by the kernel, {refused} refused {by_reason:?}"
        );
        assert_eq!(
            kernel, 0,
            "the kernel dropped nothing on the way to the agent"
        );
        assert_eq!(received, sent, "the agent received all that was sent");
        assert_eq!(refused, flooded, "each unwanted datagram counted once");
        for (reason, n) in &by_reason {
            assert!(
                reasons.contains(&reason.as_str()) || *n == 0,
                "{n} counted as {reason}, expected only {reasons:?}"
            );
        }
        for reason in ["too_short", "version", "address_type", "source_not_allowed"] {
            assert!(
                by_reason.iter().any(|(r, _)| r == reason),
                "{reason} is exported: {by_reason:?}"
            );
        }
        assert_eq!(
            value("relay_agent_sflow_datagrams_total"),
            real.len() as u64,
            "the real stream, and only it, was taken for sFlow"
        );
        assert_eq!(value("relay_agent_sflow_sequence_gaps_total"), 0);
        assert_eq!(
            value("relay_agent_datagrams_dropped_total"),
            0,
            "no queue drops"
        );

        // None of the flood relayed: exactly the real stream arrives, byte for byte, in order.
        self.relay.capture.assert_exactly(real);

        // Logged, but at most one line per 10 s (plus the first), saying how many were not.
        let lines: Vec<_> = self
            .relay
            .agent
            .events()
            .into_iter()
            .filter(|e| relay_tests::message(e).contains("datagram dropped"))
            .collect();
        eprintln!("{} drop lines: {lines:?}", lines.len());
        assert!(
            !lines.is_empty() && lines.len() as u64 <= SECONDS / 10 + 2,
            "{} drop lines for {flooded} drops",
            lines.len()
        );
        assert!(
            lines
                .iter()
                .all(|l| l["level"] == "WARN" && l.get("earlier_drops_not_logged").is_some()),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .all(|l| reasons.contains(&relay_tests::field(l, "reason"))),
            "{lines:?}"
        );
    }
}

/// The real stream: [`SECONDS`] of sFlow at [`REAL_RATE`] from hsflowd-like agents.
fn real_stream(seed: u64) -> Vec<Vec<u8>> {
    let mut sflow = SflowGen::new(2, 2, seed);
    (0..u64::from(REAL_RATE) * SECONDS)
        .map(|_| sflow.datagram())
        .collect()
}

/// Random bytes to cut unwanted datagrams from (cheaper than drawing each one anew).
fn random_pool(seed: u64) -> Vec<u8> {
    let mut pool = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut pool);
    pool
}

#[test]
fn random_datagrams_beside_real_sflow_are_dropped_and_counted_by_reason() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::new(&[]);
    let real = real_stream(15);
    let pool = random_pool(16);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let flooded = site.run(&real, "127.0.0.1:0".parse().unwrap(), |i, buf| {
        // Random bytes of 1 to 9,000 bytes, never by chance an sFlow v5 header; one in 50
        // starts with the version word, to be refused for what follows it.
        loop {
            let len = rng.random_range(1..=FLOOD_MAX_LEN);
            let at = rng.random_range(0..=pool.len() - len);
            buf.clear();
            buf.extend_from_slice(&pool[at..at + len]);
            if i % 50 == 0 && len >= 8 {
                buf[..4].copy_from_slice(&5u32.to_be_bytes());
            }
            if proto::sflow::parse_header(buf).is_err() {
                break;
            }
        }
    });
    site.assert_dropped_and_counted(&real, flooded, &["too_short", "version", "address_type"]);
    let exposition = site.scrape();
    let reason = |r: &str| {
        exposition.value_or_zero("relay_agent_not_sflow_datagrams_total", &[("reason", r)]) as u64
    };
    assert!(reason("version") > flooded / 2, "mostly a wrong version");
    assert!(
        reason("address_type") > 0,
        "version 5, a wrong address type"
    );
    assert!(reason("too_short") > 0, "datagrams under 4 bytes");
    assert_eq!(reason("source_not_allowed"), 0);
}

#[test]
fn sflow_from_a_source_outside_allow_sources_is_dropped_and_counted() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::new(&["--allow-sources", "127.0.0.1/32", "--allow-sources", "::1"]);
    let real = real_stream(25);
    let pool = random_pool(26);
    let mut rng = rand::rngs::StdRng::seed_from_u64(27);
    // Valid-looking sFlow (a header, then random bytes), 28 to 9,000 bytes, from 127.0.0.2.
    let flooded = site.run(&real, "127.0.0.2:0".parse().unwrap(), |i, buf| {
        let len = rng.random_range(MIN_LEN..=FLOOD_MAX_LEN);
        let at = rng.random_range(0..=pool.len() - len);
        buf.clear();
        buf.extend_from_slice(&pool[at..at + len]);
        let header = tagged_datagram(0x0E, i as u32, MIN_LEN);
        buf[..MIN_LEN].copy_from_slice(&header);
    });
    site.assert_dropped_and_counted(&real, flooded, &["source_not_allowed"]);
    let exposition = site.scrape();
    assert_eq!(
        exposition.value_or_zero(
            "relay_agent_not_sflow_datagrams_total",
            &[("reason", "source_not_allowed")]
        ) as u64,
        flooded
    );
}
