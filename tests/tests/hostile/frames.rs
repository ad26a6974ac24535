//! A valid agent that misbehaves loses its connection and nothing else: frames over the limit,
//! stalled frames (`--frame-timeout`), an idle agent (not cut off), frames that are not
//! protobuf, compression bombs, a datagram over `--max-datagram-bytes`, and a flood of tiny
//! batches over `--agent-max-pps`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::pb;
use relay_tests::metrics::{self, Scrape};
use relay_tests::procfs::Proc;
use relay_tests::{Transport, WAIT, bare};

use super::{Bench, assert_alive_and_bounded, quic_client, runtime};

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
/// stream takes them; the last sequence acknowledged (all of them: `n`), given up after `WAIT`.
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
    // Acknowledgements are cumulative (the sink may cover several batches with one): what
    // counts is the last sequence acknowledged.
    let mut reader = proto::wire::FrameReader::new(recv, 1024);
    let mut acked = 0;
    let counting = async {
        while acked < n {
            match reader.next::<pb::Ack>().await {
                Ok(Some(ack)) => {
                    assert_eq!(ack.session, 77, "the batches' session");
                    let sequence = u32::try_from(ack.sequence).expect("a sequence sent");
                    assert!(sequence > acked, "acknowledgements in order");
                    acked = sequence;
                }
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
    let base = Proc::of(pid).rss_kib();
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
    let base_data = Proc::of(pid).vm_data_kib();
    let (closed, (stalled_rss, stalled_data)) = rt.block_on(async {
        let waits: Vec<_> = (0..STALLS)
            .map(|_| {
                let mut bytes = header(limit);
                bytes.resize(4 + 64 * 1024, 0x0A);
                tokio::spawn(write_and_wait(endpoint.clone(), sink, bytes, WAIT))
            })
            .collect();
        // Intentional: the frames stall (while keep-alives flow) before memory is read.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let stalled = (Proc::of(pid).rss_kib(), Proc::of(pid).vm_data_kib());
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
    // Every tiny batch replayed or counted as dropped over --agent-max-pps.
    let rate_limited = [("agent", "flooder"), ("reason", "rate_limited")];
    let dropped_total = "relay_sink_agent_datagrams_dropped_total";
    let _ = metrics::poll(bench.metrics, WAIT, |s| {
        let limited = s.value_or_zero(dropped_total, &rate_limited) as u64;
        bench.capture.count_tagged(0x7A) as u64 + limited >= u64::from(TINY)
    });

    for stream in good {
        stream.finish(&bench.capture);
    }
    let exposition = Scrape::of(bench.metrics);
    let violations = |reason: &str| {
        exposition.value_or_zero("relay_sink_protocol_errors_total", &[("reason", reason)]) as u64
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
        exposition.value_or_zero(dropped_total, &[("agent", agent), ("reason", reason)]) as u64
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
