//! `--wire-ratio`: what the relay puts on the wire for what it carries. One agent relays
//! `--wire-count` datagrams at `--wire-rate` (500 a second by default, a site's usual load)
//! over QUIC to one relay-sink process, once per generator profile (sampled packets with
//! random payloads, as encrypted traffic is; and with text payloads, the generator's first
//! profile) and per agent setting (the defaults, with zstd; and `--compression none`). The
//! ratio is the agent's `relay_agent_quic_udp_bytes_sent_total` (QUIC packets: frames, QUIC
//! and TLS overhead, acknowledgements) over `relay_agent_bytes_received_total` (the sFlow
//! bytes), and how much of that the batch frames are (`relay_agent_frame_bytes_total`: what
//! compression leaves, before QUIC and TLS). Beside it, what one-shot `zstd -1` makes of the same datagrams as one stream: the
//! bar issue 20 sets (at most 0.9 × that on random payloads, at most 0.45 on text). For random
//! payloads also what the best compressors could do with the whole run at once: one-shot
//! `zstd -19`, and what sFlow-aware compression with zstd could do (the sampled payloads passed
//! through, `zstd -19` over the rest).

use std::time::Duration;

use relay_tests::metrics::Scrape;
use relay_tests::sflow::{Payload, SflowGen, sampled_payloads};
use relay_tests::{Pki, UdpCapture, metrics_addr, send_at_rate, start_agent, start_sink};
use serde_json::{Value, json};

/// Options of `--wire-ratio`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WireArgs {
    /// Measure the bytes on the wire for the sFlow carried, instead of the paths (issue 20).
    #[arg(long)]
    pub(crate) wire_ratio: bool,
    /// With --wire-ratio: datagrams a second.
    #[arg(long, default_value_t = 500)]
    pub(crate) wire_rate: u32,
    /// With --wire-ratio: datagrams per run.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) wire_count: usize,
}

/// One run: the bytes on the wire and in the batch frames, for the sFlow bytes.
struct Measured {
    wire: f64,
    frames: f64,
    sflow: f64,
}

/// Sends `datagrams` at `rate` through a fresh agent (with `agent_args`) and sink, and reads
/// the agent's counters once every datagram has arrived.
fn relay(datagrams: &[Vec<u8>], rate: u32, agent_args: &[&str]) -> Measured {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let receiver = UdpCapture::bind();
    let (_sink, sink_addr) =
        start_sink(&pki, &pki.sink_cert("sink"), &[receiver.addr()], None, &[]);
    let args = [
        &["--metrics-listen", "127.0.0.1:0", "--transport", "quic"],
        agent_args,
    ]
    .concat();
    let (agent, listen) = start_agent(
        &pki.ca(),
        &pki.agent_cert("site"),
        sink_addr,
        "localhost",
        &args,
    );
    agent.wait_for("connected to sink");
    let metrics = metrics_addr(&agent);
    send_at_rate(listen, datagrams, rate);
    assert!(
        receiver.wait_until(Duration::from_secs(30), |r| r.len() >= datagrams.len()),
        "only {} of {} arrived",
        receiver.len(),
        datagrams.len()
    );
    // The last acknowledgements and their packets.
    std::thread::sleep(Duration::from_millis(500));
    let scrape = Scrape::of(metrics);
    Measured {
        wire: scrape.sum("relay_agent_quic_udp_bytes_sent_total"),
        frames: scrape.sum("relay_agent_frame_bytes_total"),
        sflow: scrape.sum("relay_agent_bytes_received_total"),
    }
}

/// One-shot zstd at `level` over `bytes`: compressed over plain bytes.
fn zstd_one_shot(bytes: &[u8], level: i32) -> f64 {
    let packed = zstd::bulk::compress(bytes, level).expect("zstd");
    packed.len() as f64 / bytes.len() as f64
}

/// What the best compressors could make of random-payload datagrams, for the figures beside
/// the relay's: `zstd -19` over them all as one stream; and what compression that knew the
/// sFlow format could do with zstd: the sampled packets' payloads (random bytes,
/// [`sampled_payloads`]) passed through as they are, for free, and `zstd -19` over everything
/// else. Both see the whole run at once, which a relay batching within milliseconds cannot,
/// and carry no transport overhead. `all` is `datagrams` as one stream.
fn best_case(datagrams: &[Vec<u8>], all: &[u8]) -> (f64, f64) {
    let (mut payloads, mut rest) = (0, Vec::with_capacity(all.len()));
    for d in datagrams {
        let mut at = 0;
        for (start, end) in sampled_payloads(d) {
            rest.extend_from_slice(&d[at..start]);
            payloads += end - start;
            at = end;
        }
        rest.extend_from_slice(&d[at..]);
    }
    let rest = zstd::bulk::compress(&rest, 19).expect("zstd").len();
    (
        zstd_one_shot(all, 19),
        (payloads + rest) as f64 / all.len() as f64,
    )
}

/// Runs the measurement and prints it; the JSON for the results file.
pub(crate) fn run(args: &WireArgs) -> Value {
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for (profile, payload) in [
        ("random payloads", Payload::Random),
        ("text payloads", Payload::Text),
    ] {
        let mut generator = SflowGen::new(8, 2, 7).with_payload(payload);
        let datagrams: Vec<Vec<u8>> = (0..args.wire_count).map(|_| generator.datagram()).collect();
        let all = datagrams.concat();
        let one_shot = zstd_one_shot(&all, 1);
        let zstd = relay(&datagrams, args.wire_rate, &[]);
        let plain = relay(&datagrams, args.wire_rate, &["--compression", "none"]);
        let (with, without) = (zstd.wire / zstd.sflow, plain.wire / plain.sflow);
        let frames = zstd.frames / zstd.sflow;
        println!(
            "{profile}: wire / sFlow bytes at {}/s over QUIC: {with:.3} with the defaults (zstd; \
             {frames:.3} in the batch frames, the rest QUIC and TLS), {without:.3} with \
             --compression none; one-shot zstd -1 over the same datagrams: {one_shot:.3} \
             ({:.2} × that)",
            args.wire_rate,
            with / one_shot
        );
        let best = (payload == Payload::Random).then(|| best_case(&datagrams, &all));
        if let Some((level_19, aware)) = best {
            println!(
                "{profile}: one-shot zstd -19 over the same datagrams: {level_19:.3}; the \
                 sampled payloads passed through for free and one-shot zstd -19 over all the \
                 rest (sFlow-aware, no transport overhead): {aware:.3}; issue 20's bar: {:.3}",
                0.9 * one_shot
            );
        }
        let (check, pass) = match payload {
            Payload::Random => (
                format!("{profile}: wire ratio ≤ 0.9 × one-shot zstd -1 (issue 20)"),
                with <= 0.9 * one_shot,
            ),
            Payload::Text => (
                format!("{profile}: wire ratio ≤ 0.45 (issue 20)"),
                with <= 0.45,
            ),
        };
        checks.push(json!({ "check": check, "pass": pass, "measured": format!("{with:.3}") }));
        rows.push(json!({
            "profile": profile,
            "rate": args.wire_rate,
            "datagrams": args.wire_count,
            "wire_ratio_zstd": with,
            "wire_ratio_plain": without,
            "frame_ratio_zstd": frames,
            "zstd_one_shot_level_1": one_shot,
            "zstd_one_shot_level_19": best.map(|b| b.0),
            "payloads_passed_rest_zstd_19": best.map(|b| b.1),
            "sflow_bytes": zstd.sflow,
        }));
    }
    for c in &checks {
        println!(
            "{} {}: {}",
            if c["pass"].as_bool() == Some(true) {
                "PASS"
            } else {
                "FAIL"
            },
            c["check"].as_str().unwrap_or_default(),
            c["measured"].as_str().unwrap_or_default()
        );
    }
    json!({ "wire_ratio": rows, "checks": checks })
}
