//! A hundred thousand random datagrams at an agent that relays any UDP: each one relayed or
//! counted, at the agent and at the sink, with bounded memory on both.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use relay_tests::metrics::{self, Scrape};
use relay_tests::procfs::Proc;
use relay_tests::{Transport, WAIT, metrics_addr, start_agent_over};

use super::{Bench, assert_alive_and_bounded, random_datagram};

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
    let agent_proc = Proc::of(agent.pid());
    let base = agent_proc.rss_kib();
    let sink_base = Proc::of(bench.sink.pid()).rss_kib();
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
                // Pacing the sender at 10,000 a second.
                std::thread::sleep(wait);
            }
        }
        if i % 10_000 == 0 {
            peak = peak.max(agent_proc.rss_kib());
        }
    }
    eprintln!("{FLOOD} random datagrams sent in {:?}", started.elapsed());

    // Everything sent is received or dropped by the kernel (counted); everything received is
    // at the sink or counted as dropped; nothing of it is taken for sFlow.
    let at_sink_of = |s: &Scrape| {
        s.value_or_zero(
            "relay_sink_agent_datagrams_received_total",
            &[("agent", "site")],
        ) as u64
    };
    let mut sink_side = Scrape::parse("");
    let agent_side = metrics::poll(agent_metrics, WAIT, |a| {
        sink_side = Scrape::of(bench.metrics);
        let received = a.value_or_zero("relay_agent_datagrams_received_total", &[]) as u64;
        let dropped = a.sum("relay_agent_datagrams_dropped_total") as u64;
        at_sink_of(&sink_side) + dropped >= received
    })
    .unwrap_or_else(|last| last);
    let received = agent_side.value_or_zero("relay_agent_datagrams_received_total", &[]) as u64;
    let kernel = agent_side.sum("relay_agent_kernel_receive_drops_total") as u64;
    let dropped = agent_side.sum("relay_agent_datagrams_dropped_total") as u64;
    let not_sflow = agent_side.sum("relay_agent_not_sflow_datagrams_total") as u64;
    let at_sink = at_sink_of(&sink_side);
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
