//! Micro-benchmarks of the two codecs in `relay_proto::wire`: frames (a length-prefixed
//! `pb::Batch`, the QUIC path) and hex lines (the `--ssh-hex` path). No I/O, one thread.
//!
//! - `frame/{encode,decode}`: one batch at the agent's default size, 46 datagrams of 1,400
//!   bytes (about 64 KiB), encoded into a reused buffer, or split off a buffer and decoded
//!   back into a `pb::Batch`; throughput per byte of frame. `frame_per_datagram/*` runs the
//!   same with throughput per datagram.
//! - `hex/encode`: one 1,400-byte datagram into a reused line buffer, per payload byte.
//! - `hex/decode`: 1,000 such lines through one `LineDecoder`, per line.
//! - `history/{compress,expand}`: one-datagram batches (a quiet site's usual batch) through
//!   one `Compressor` against its history, and back through one `Expander`, per datagram;
//!   `history/expand_1000_streams` expands them across 1,000 streams, each against its own
//!   history, as a sink with 1,000 agents does.
//!
//! Run: `cargo bench -p relay-proto --bench codecs` (append `-- --quick` for a short run).
//! The numbers belong to the machine that ran them: name it next to any you quote.

use std::hint::black_box;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use relay_proto::compression::{Compressor, DEFAULT_LEVEL, Expander};
use relay_proto::wire::hex::{self, Line, LineDecoder};
use relay_proto::wire::{self, DEFAULT_MAX_FRAME_LEN, Datagram};
use relay_proto::{MAX_DATAGRAM_LEN, pb, sflow};

const DATAGRAM_LEN: usize = 1_400;
const DATAGRAMS_PER_BATCH: u32 = 46;
const HEX_LINES: usize = 1_000;

/// A deterministic sFlow-v5-shaped payload: a valid datagram header, then flow samples whose
/// record headers repeat and whose sampled packet bytes are xorshift noise. Neither codec
/// looks at content (protobuf copies a `bytes` field whole; the hex tables cost the same for
/// every byte value), so only the length affects their cost; the structure is for honesty.
fn sflow_like(len: usize, seq: u32) -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(seq);
    let mut out = Vec::with_capacity(len + 160);
    // Version 5, IPv4 agent 192.0.2.1, sub-agent 0, sequence, uptime (ms), 8 samples.
    for word in [5, 1, 0xc000_0201, 0, seq, seq.wrapping_mul(1_000), 8] {
        out.extend(u32::to_be_bytes(word));
    }
    while out.len() < len {
        // Flow sample: tag, length, sequence, source id, rate, pool, drops, in, out, records.
        for word in [1, 160, seq, 3, 1_024, seq.wrapping_mul(1_024), 0, 7, 9, 1] {
            out.extend(u32::to_be_bytes(word));
        }
        for _ in 0..15 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend(state.to_be_bytes());
        }
    }
    out.truncate(len);
    Bytes::from(out)
}

fn batch() -> pb::Batch {
    pb::Batch {
        session: 1,
        sequence: 1,
        datagrams: (0..DATAGRAMS_PER_BATCH)
            .map(|i| {
                Datagram {
                    payload: sflow_like(DATAGRAM_LEN, i),
                    source: SocketAddr::from(([192, 0, 2, 1], 6343)),
                    received_unix_nanos: 1_750_000_000_000_000_000 + u64::from(i) * 20_000,
                }
                .to_proto()
            })
            .collect(),
        timing: pb::Timing::Live.into(),
        ..Default::default()
    }
}

fn decode(mut buf: BytesMut) -> pb::Batch {
    let body = wire::decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
        .expect("frame within the limit")
        .expect("a whole frame");
    pb::Batch::decode(body).expect("a valid batch")
}

fn frame(c: &mut Criterion) {
    let batch = batch();
    let mut encoded = BytesMut::new();
    wire::encode_frame(&batch, &mut encoded);
    let encoded = encoded.freeze();
    assert_eq!(decode(BytesMut::from(&encoded[..])), batch);

    let per = [
        ("frame", Throughput::Bytes(encoded.len() as u64)),
        (
            "frame_per_datagram",
            Throughput::Elements(DATAGRAMS_PER_BATCH.into()),
        ),
    ];
    for (name, throughput) in per {
        let mut group = c.benchmark_group(name);
        group.throughput(throughput);
        let mut buf = BytesMut::with_capacity(encoded.len());
        group.bench_function("encode", |b| {
            b.iter(|| {
                buf.clear();
                wire::encode_frame(black_box(&batch), &mut buf);
                black_box(&buf);
            });
        });
        // The copy into a fresh buffer is setup, and the decoded batch is dropped, outside
        // the timing; `LargeInput` keeps few 64 KiB copies alive at once.
        group.bench_function("decode", |b| {
            b.iter_batched(
                || BytesMut::from(&encoded[..]),
                decode,
                BatchSize::LargeInput,
            );
        });
        group.finish();
    }
}

fn hex_lines(c: &mut Criterion) {
    let datagram = sflow_like(DATAGRAM_LEN, 1);
    assert!(sflow::parse_header(&datagram).is_ok());
    let mut group = c.benchmark_group("hex");

    group.throughput(Throughput::Bytes(DATAGRAM_LEN as u64));
    let mut line = Vec::with_capacity(2 * DATAGRAM_LEN + 1);
    group.bench_function("encode", |b| {
        b.iter(|| {
            line.clear();
            hex::encode_line(black_box(&datagram), &mut line);
            black_box(&line);
        });
    });

    let mut lines = Vec::with_capacity(HEX_LINES * (2 * DATAGRAM_LEN + 1));
    for i in 0..HEX_LINES as u32 {
        hex::encode_line(&sflow_like(DATAGRAM_LEN, i), &mut lines);
    }
    let mut decoder = LineDecoder::new(MAX_DATAGRAM_LEN);
    group.throughput(Throughput::Elements(HEX_LINES as u64));
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut rest = black_box(&lines[..]);
            let mut datagrams = 0;
            while !rest.is_empty() {
                let (used, line) = decoder.decode(rest);
                if let Some(Line::Datagram(d)) = line {
                    black_box(d);
                    datagrams += 1;
                }
                rest = &rest[used..];
            }
            assert_eq!(datagrams, HEX_LINES);
        });
    });
    group.finish();
}

/// One-datagram batches, compressed in order against the stream's history and expanded in
/// that order; each iteration is one stream of [`HISTORY_BATCHES`] batches from its start.
fn history(c: &mut Criterion) {
    const HISTORY_BATCHES: u32 = 256;
    let frames: Vec<Bytes> = (0..HISTORY_BATCHES)
        .map(|i| {
            let mut batch = batch();
            batch.sequence = u64::from(i) + 1;
            batch.datagrams.truncate(1);
            batch.datagrams[0].payload = sflow_like(DATAGRAM_LEN, i);
            let mut buf = BytesMut::new();
            wire::encode_frame(&batch, &mut buf);
            buf.freeze()
        })
        .collect();
    let mut compressor = Compressor::new(DEFAULT_LEVEL).expect("the default level");
    let packed: Vec<Bytes> = frames
        .iter()
        .map(|frame| compressor.compress_frame(frame, true).expect("compressed"))
        .collect();
    let mut group = c.benchmark_group("history");
    group.throughput(Throughput::Elements(HISTORY_BATCHES.into()));
    group.bench_function("compress", |b| {
        b.iter(|| {
            compressor.reset();
            for frame in &frames {
                black_box(compressor.compress_frame(frame, true).expect("compressed"));
            }
        });
    });
    group.bench_function("expand", |b| {
        b.iter(|| {
            let mut expander = Expander::new(DEFAULT_MAX_FRAME_LEN);
            for frame in &packed {
                let mut batch = decode(BytesMut::from(&frame[..]));
                expander.expand(&mut batch).expect("expanded");
                assert_eq!(batch.datagrams.len(), 1);
                black_box(batch);
            }
        });
    });
    // The sink's case: many streams at once, each batch against its own stream's history
    // (cold in the cache by the time its next batch comes).
    const STREAMS: usize = 1_000;
    let per_stream = 8;
    let mut expanders: Vec<Expander> = (0..STREAMS)
        .map(|_| Expander::new(DEFAULT_MAX_FRAME_LEN))
        .collect();
    let mut round = 0;
    group.throughput(Throughput::Elements((STREAMS * per_stream) as u64));
    group.bench_function("expand_1000_streams", |b| {
        b.iter(|| {
            if round + per_stream > packed.len() {
                round = 0;
                for expander in &mut expanders {
                    *expander = Expander::new(DEFAULT_MAX_FRAME_LEN);
                }
            }
            for frame in &packed[round..round + per_stream] {
                for expander in &mut expanders {
                    let mut batch = decode(BytesMut::from(&frame[..]));
                    expander.expand(&mut batch).expect("expanded");
                    black_box(batch);
                }
            }
            round += per_stream;
        });
    });
    group.finish();
}

criterion_group!(benches, frame, hex_lines, history);
criterion_main!(benches);
