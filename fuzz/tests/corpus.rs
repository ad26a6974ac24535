//! The seeds of the checked-in corpus (`fuzz/corpus/<target>/seed-*`): real frames, batches,
//! hex lines, sFlow datagrams, compressed batches and enrollment tokens, made here from
//! `relay_tests::sflow::SflowGen` and the codecs themselves, plus the malformed cases each
//! decoder must refuse.
//!
//! `seeds_are_up_to_date` fails when the files differ from what this file makes;
//! `RELAY_FUZZ_WRITE_SEEDS=1 cargo test -p relay-fuzz --test corpus` writes them again.
//! Other files in the corpus folders (inputs a libFuzzer run found, minimised, and regression
//! inputs) are left alone.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;

use bytes::{Bytes, BytesMut};
use certs::token::{Token, encode_text};
use prost::Message;
use proto::compression::{Compressor, DEFAULT_LEVEL};
use proto::pb;
use proto::sflow::counters::{EthernetCounters, IfCounters, counter_samples};
use proto::wire::{Datagram, encode_frame, hex::encode_line};
use relay_fuzz::{TARGETS, corpus_dir};
use relay_tests::sflow::SflowGen;

/// Selector bytes (see each target's docs): limit index in the low bits, read size above.
const DEFAULT_LIMIT: u8 = 0;
const LIMIT_64K: u8 = 2;
const LIMIT_256: u8 = 4;
const LIMIT_16: u8 = 5;

fn datagrams(n: usize, seed: u64, cut: usize) -> Vec<Vec<u8>> {
    let mut generator = SflowGen::new(2, 2, seed);
    (0..n)
        .map(|_| {
            let mut d = generator.datagram();
            d.truncate(cut);
            d
        })
        .collect()
}

fn batch(payloads: &[Vec<u8>], source: &str) -> pb::Batch {
    pb::Batch {
        session: 0x5eed_0001,
        sequence: 42,
        datagrams: payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Datagram {
                    payload: Bytes::copy_from_slice(p),
                    source: source.parse().expect("a socket address"),
                    received_unix_nanos: 1_764_000_000_000_000_000 + i as u64,
                }
                .to_proto()
            })
            .collect(),
        ..Default::default()
    }
}

fn compressed(b: &pb::Batch) -> pb::Batch {
    let mut plain = BytesMut::new();
    encode_frame(b, &mut plain);
    let frame = Compressor::new(DEFAULT_LEVEL)
        .unwrap()
        .compress_frame(&plain.freeze(), false)
        .unwrap();
    pb::Batch::decode(&frame[4..]).unwrap()
}

fn frame(msg: &impl Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_frame(msg, &mut buf);
    buf.to_vec()
}

fn with(selector: u8, rest: &[u8]) -> Vec<u8> {
    [&[selector][..], rest].concat()
}

/// An XDR sample or record declaring `len` bytes: format, length, `data`, zeros up to 4.
fn xdr(format: u32, len: usize, data: &[u8]) -> Vec<u8> {
    let mut out = [format, len as u32].map(u32::to_be_bytes).concat();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// A counter sample of `format` (2 or 4): its leading words, then its records.
fn counter_sample(format: u32, words: &[u32], records: &[Vec<u8>]) -> Vec<u8> {
    let mut body: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    body.extend((records.len() as u32).to_be_bytes());
    body.extend(records.concat());
    xdr(format, body.len(), &body)
}

fn if_counters(if_index: u32, octets: Option<u64>, count: Option<u32>) -> IfCounters {
    IfCounters {
        if_index,
        if_type: 6,
        if_speed: octets.map(|_| 1_000_000_000),
        if_direction: 1,
        if_status: 3,
        in_octets: octets,
        in_ucast_pkts: count,
        in_multicast_pkts: count,
        in_broadcast_pkts: count,
        in_discards: count,
        in_errors: count,
        in_unknown_protos: count,
        out_octets: octets,
        out_ucast_pkts: count,
        out_multicast_pkts: count,
        out_broadcast_pkts: count,
        out_discards: count,
        out_errors: count,
        promiscuous_mode: 0,
    }
}

/// A generic interface record (0:1) declaring `len` bytes (88 is the layout).
fn generic_record(c: &IfCounters, len: usize) -> Vec<u8> {
    let mut data = Vec::new();
    c.write(&mut data);
    data.resize(len, 0xa5);
    xdr(1, len, &data)
}

/// An Ethernet interface record (0:2) declaring `len` bytes (52 is the layout).
fn ethernet_record(value: Option<u32>, len: usize) -> Vec<u8> {
    let e = EthernetCounters::from_array([value; 13]);
    let mut data = Vec::new();
    e.write(&mut data);
    data.resize(len, 0x5a);
    xdr(2, len, &data)
}

fn zstd_of(plain: &[u8], with_size: bool) -> Vec<u8> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    encoder.include_contentsize(with_size).unwrap();
    if with_size {
        encoder
            .set_pledged_src_size(Some(plain.len() as u64))
            .unwrap();
    }
    std::io::Write::write_all(&mut encoder, plain).unwrap();
    encoder.finish().unwrap()
}

/// The selector of an `sflow_counters` input of `n` samples behind a built header.
fn samples(n: u8, v6: bool) -> u8 {
    1 | u8::from(v6) << 1 | n << 2
}

/// The seeds of `sflow_counters`: selector (bit 0: samples behind a built header, bit 1: IPv6
/// agent, bits 2-7: samples announced, 63 for `u32::MAX`), then a datagram or its samples.
fn sflow_counters_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let with_counters = datagrams(16, 11, usize::MAX)
        .into_iter()
        .find(|d| {
            counter_samples(d)
                .unwrap()
                .any(|s| s.unwrap().generic.is_some())
        })
        .expect("the generator sends a counter sample in 4 datagrams");
    out.push(("generator", with(0, &with_counters)));
    // Cut inside its flow samples, as by a recv(2048) of a larger datagram.
    out.push(("generator-cut", with(0, &with_counters[..700])));
    let generic = if_counters(7, Some(1 << 40), Some(u32::MAX - 1));
    out.push((
        "expanded-padded-ipv6",
        with(
            samples(2, true),
            &[
                counter_sample(
                    4,
                    &[11, 0, 7],
                    &[
                        generic_record(&generic, 91),
                        ethernet_record(Some(3), 60),
                        xdr(0x1005, 5, &[1, 2, 3, 4, 5]),
                    ],
                ),
                counter_sample(2, &[12, 8], &[generic_record(&generic, 88)]),
            ]
            .concat(),
        ),
    ));
    let flow = |format: u32| xdr(format, 44, &[0x11; 44]);
    out.push((
        "flows-then-counters",
        with(
            samples(4, false),
            &[
                flow(1),
                flow(3),
                xdr((4413 << 12) | 2, 16, &[0xff; 16]),
                counter_sample(
                    2,
                    &[1, 0x0000_0003],
                    &[ethernet_record(Some(0), 52), generic_record(&generic, 88)],
                ),
            ]
            .concat(),
        ),
    ));
    out.extend(sflow_counters_malformed_seeds());
    out
}

/// The malformed and edge cases among the `sflow_counters` seeds.
fn sflow_counters_malformed_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let generic = if_counters(7, Some(1 << 40), Some(u32::MAX - 1));
    out.push((
        "all-ones",
        with(
            samples(1, false),
            &counter_sample(
                2,
                &[u32::MAX, u32::MAX],
                &[
                    generic_record(&if_counters(u32::MAX, None, None), 88),
                    ethernet_record(None, 52),
                ],
            ),
        ),
    ));
    let mut overrun = counter_sample(2, &[2, 1], &[generic_record(&generic, 88)]);
    overrun[8 + 12 + 4..8 + 12 + 8].copy_from_slice(&200u32.to_be_bytes());
    out.push((
        "record-overrun",
        with(
            samples(3, false),
            &[
                counter_sample(2, &[1, 1], &[generic_record(&generic, 88)]),
                overrun,
                counter_sample(2, &[3, 1], &[]),
            ]
            .concat(),
        ),
    ));
    out.push((
        "short-records",
        with(
            samples(1, true),
            &counter_sample(
                4,
                &[5, 0, 9],
                &[
                    generic_record(&generic, 80),
                    ethernet_record(Some(1), 48),
                    ethernet_record(Some(2), 52),
                ],
            ),
        ),
    ));
    out.push((
        "announces-max-samples",
        with(
            samples(63, false),
            &counter_sample(2, &[1, 1], &[generic_record(&generic, 88)]),
        ),
    ));

    out
}

/// A token's fields, fixed so the seeds do not change from run to run.
fn seed_token(name: &str) -> Token {
    let start = time::OffsetDateTime::from_unix_timestamp(1_764_000_000).unwrap();
    Token {
        id: *b"\x5e\xed token id 0001",
        role: certs::Role::Agent,
        name: name.to_owned(),
        not_before: start,
        not_after: start + time::Duration::hours(1),
        root_fingerprint: [0xa4; 32],
    }
}

/// An ECDSA P-256 signature's shape (DER SEQUENCE of two 32-byte INTEGERs): parsing does not
/// check it, `verify` would refuse it.
fn seed_signature(len: usize) -> Vec<u8> {
    let mut out = vec![0x30, 0x44, 0x02, 0x20];
    out.extend([0x5a; 32]);
    out.extend([0x02, 0x20]);
    out.extend([0x3c; 32]);
    out.resize(len, 0x11);
    out
}

/// The seeds of `token`: a valid text (but for its signature), and one per refusal.
fn token_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let sig = seed_signature(70);
    let text = |payload: &[u8]| encode_text(payload, &sig).into_bytes();
    let payload = seed_token("site-b").payload();
    let with = |at: usize, bytes: &[u8]| {
        let mut p = payload.clone();
        p[at..at + bytes.len()].copy_from_slice(bytes);
        text(&p)
    };
    let valid = text(&payload);
    let mut no_name = payload[..67].to_vec();
    no_name[66] = 0;
    let mut out = vec![
        ("valid", valid.clone()),
        (
            "valid-64-byte-utf8-name",
            text(&seed_token(&"é".repeat(32)).payload()),
        ),
        ("wrong-prefix", [b"sfr2", &valid[4..]].concat()),
        ("truncated-in-payload", valid[..valid.len() / 2].to_vec()),
        ("truncated-by-one", valid[..valid.len() - 1].to_vec()),
        (
            "trailing-payload-byte",
            text(&[&payload[..], &[0]].concat()),
        ),
        ("trailing-text", [&valid[..], b".AAAA"].concat()),
        ("padded", {
            let dot = valid.iter().rposition(|&b| b == b'.').unwrap();
            [&valid[..dot], b"==", &valid[dot..]].concat()
        }),
        (
            "signature-73-bytes",
            encode_text(&payload, &seed_signature(73)).into_bytes(),
        ),
        ("signature-empty", encode_text(&payload, &[]).into_bytes()),
        ("role-2", with(17, &[2])),
        ("version-2", with(0, &[2])),
        (
            "ttl-over-7-days",
            with(26, &(1_764_000_000i64 + 7 * 86_400 + 1).to_be_bytes()),
        ),
        (
            "ends-before-start",
            with(26, &1_763_999_999i64.to_be_bytes()),
        ),
        ("time-out-of-range", with(18, &i64::MIN.to_be_bytes())),
        ("name-empty", text(&no_name)),
        (
            "name-too-long",
            text(&seed_token(&"a".repeat(65)).payload()),
        ),
        ("name-not-utf8", with(67, &[0xff])),
        ("name-with-slash", with(67, b"s/")),
        ("name-with-control", with(67, b"s\n")),
        (
            "not-utf8-text",
            [&valid[..10], &[0xff, 0xfe], &valid[12..]].concat(),
        ),
    ];
    let mut long = valid.clone();
    long.resize(1025, b'A');
    out.push(("over-1024-bytes", long));
    // The last payload digit with a bit the decoder must not drop.
    let mut noncanonical = valid.clone();
    let dot = 5 + noncanonical[5..].iter().position(|&b| b == b'.').unwrap();
    noncanonical[dot - 1] = if noncanonical[dot - 1] == b'B' {
        b'C'
    } else {
        b'B'
    };
    out.push(("noncanonical-base64", noncanonical));
    out
}

/// Every seed, by target and name.
fn seeds() -> BTreeMap<&'static str, Vec<(String, Vec<u8>)>> {
    let small = batch(&datagrams(4, 1, 96), "192.0.2.1:6343");
    let full = batch(&datagrams(3, 2, usize::MAX), "192.0.2.7:50000");
    let v6 = batch(&datagrams(2, 3, 60), "[2001:db8::7]:6343");
    let ack = pb::Ack {
        session: 0x5eed_0001,
        sequence: 42,
    };
    let mut odd_source = batch(&datagrams(1, 4, 40), "192.0.2.1:6343");
    odd_source.datagrams[0].source_ip = Bytes::from_static(&[1, 2, 3]);
    odd_source.datagrams[0].source_port = 70_000;
    let packed = compressed(&batch(&datagrams(12, 5, 200), "192.0.2.1:6343"));

    let mut out: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.entry(target)
            .or_default()
            .push((format!("seed-{name}"), bytes));
    };

    // frame: selector, then a stream of frames.
    let read = |n: u8| (n - 1) << 3;
    add("frame", "batch", with(DEFAULT_LIMIT, &frame(&small)));
    add(
        "frame",
        "full-batch-in-7-byte-reads",
        with(read(7), &frame(&full)),
    );
    add(
        "frame",
        "batch-ack-batch",
        with(read(32), &[frame(&v6), frame(&ack), frame(&small)].concat()),
    );
    add("frame", "compressed", with(DEFAULT_LIMIT, &frame(&packed)));
    add("frame", "empty-frames", with(read(1), &[0; 12]));
    let whole = frame(&small);
    add(
        "frame",
        "truncated",
        with(read(3), &whole[..whole.len() - 5]),
    );
    add(
        "frame",
        "over-the-limit",
        with(LIMIT_256 | read(2), &[frame(&ack), frame(&small)].concat()),
    );
    add(
        "frame",
        "announces-4-gib",
        with(DEFAULT_LIMIT, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
    );
    add(
        "frame",
        "not-protobuf",
        with(DEFAULT_LIMIT, &[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]),
    );

    // batch: selector, then a frame body.
    add(
        "batch",
        "small",
        with(DEFAULT_LIMIT, &small.encode_to_vec()),
    );
    add("batch", "full", with(DEFAULT_LIMIT, &full.encode_to_vec()));
    add(
        "batch",
        "ipv6-sources",
        with(DEFAULT_LIMIT, &v6.encode_to_vec()),
    );
    add(
        "batch",
        "bad-source",
        with(DEFAULT_LIMIT, &odd_source.encode_to_vec()),
    );
    add(
        "batch",
        "compressed",
        with(DEFAULT_LIMIT, &packed.encode_to_vec()),
    );
    add(
        "batch",
        "compressed-over-limit",
        with(LIMIT_256, &packed.encode_to_vec()),
    );
    add("batch", "ack", with(DEFAULT_LIMIT, &ack.encode_to_vec()));
    add("batch", "empty", with(DEFAULT_LIMIT, &[]));
    let mut both = packed.clone();
    both.datagrams = small.datagrams.clone();
    add(
        "batch",
        "compressed-and-plain",
        with(LIMIT_64K, &both.encode_to_vec()),
    );

    // hex_lines: selector (bits 0-2: largest datagram 65,507 / 1,400 / 255 / 64 / 16 / 3 / 1 / 0),
    // then lines.
    let lines = |payloads: &[Vec<u8>]| {
        let mut out = Vec::new();
        for p in payloads {
            encode_line(p, &mut out);
        }
        out
    };
    add(
        "hex_lines",
        "datagrams",
        with(0, &lines(&datagrams(4, 6, 48))),
    );
    add(
        "hex_lines",
        "full-datagram",
        with(1 | read(32), &lines(&datagrams(1, 7, 1400))),
    );
    add(
        "hex_lines",
        "case-crlf-spaces-blank",
        with(2 | read(5), b"  ABcd01 \r\n\r\n\n\tff\t\nEF"),
    );
    add(
        "hex_lines",
        "malformed",
        with(
            4 | read(3),
            b"0102\nabc\n01zz\nabababababababababababababababababab\n03\nab cd\n",
        ),
    );
    add("hex_lines", "no-last-newline", with(3, b"00ff\n0a0b0c"));
    add("hex_lines", "empty-datagrams", with(7, b"\n\n00\n"));
    add(
        "hex_lines",
        "long-line-small-limit",
        with(6 | read(2), &[b'a'; 600]),
    );
    add(
        "hex_lines",
        "mixed-in-1-byte-reads",
        with(5, b"010203\n\r\n0g\n  ab  \n"),
    );

    // sflow: selector (bit 0: mode, bits 1-3: stream cap), then datagrams or steps.
    let prefixed = |ds: &[Vec<u8>]| {
        let mut out = Vec::new();
        for d in ds {
            out.extend((d.len() as u16).to_be_bytes());
            out.extend(d);
        }
        out
    };
    let cap = |n: u8| n << 1;
    add(
        "sflow",
        "streams",
        with(cap(7), &prefixed(&datagrams(12, 8, 48))),
    );
    add(
        "sflow",
        "over-the-cap",
        with(cap(1), &prefixed(&datagrams(6, 9, 40))),
    );
    let mut ipv6 = vec![0, 0, 0, 5, 0, 0, 0, 2];
    ipv6.extend([0x20, 0x01, 0x0d, 0xb8].iter().chain(&[0; 11]).chain(&[1]));
    ipv6.extend([0, 0, 0, 3, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0, 0, 1]);
    add(
        "sflow",
        "ipv6-agent",
        with(cap(2), &prefixed(&[ipv6.clone()])),
    );
    let mut not_v5 = datagrams(1, 10, 40).remove(0);
    not_v5[3] = 4;
    let mut bad_type = datagrams(1, 10, 40).remove(0);
    bad_type[7] = 3;
    add(
        "sflow",
        "refused",
        with(
            cap(3),
            &prefixed(&[
                not_v5,
                bad_type,
                vec![0, 0, 0, 5, 0, 0],
                ipv6[..30].to_vec(),
            ]),
        ),
    );
    // Steps: [stream | far-jump 0x08 | restart 0x10 | samples << 5, sequence step (i8),
    // uptime step (i16)].
    let steps = |records: &[[u8; 4]]| records.concat();
    add(
        "sflow",
        "steps-in-order",
        with(
            1 | cap(7),
            &steps(&[[0, 1, 0, 10], [1, 1, 0, 10], [0, 1, 0, 10], [1, 1, 0, 10]]),
        ),
    );
    add(
        "sflow",
        "steps-gap-reorder-duplicate",
        with(
            1 | cap(7),
            &steps(&[
                [0, 1, 0, 10],
                [0, 3, 0, 10],
                [0, 0xff, 0xff, 0xf6],
                [0, 0, 0, 0],
                [0, 2, 0, 5],
            ]),
        ),
    );
    add(
        "sflow",
        "steps-restart-and-far-jumps",
        with(
            1 | cap(4),
            &steps(&[
                [4, 1, 0, 10],
                [4, 1, 0, 10],
                [0x14, 0x80, 0, 5],
                [0x0c, 0x7f, 0, 1],
                [0x0c, 0x7f, 0, 1],
                [0x0c, 0x7f, 0, 1],
            ]),
        ),
    );
    add(
        "sflow",
        "steps-eight-streams",
        with(
            1 | cap(3),
            &steps(&(0..16u8).map(|i| [i & 7, 1, 0, 20]).collect::<Vec<_>>()),
        ),
    );

    for (name, bytes) in sflow_counters_seeds() {
        add("sflow_counters", name, bytes);
    }

    // expand: selector (the limit), then the compressed bytes of a batch.
    let list = |b: &pb::Batch| {
        pb::Datagrams {
            datagrams: b.datagrams.clone(),
        }
        .encode_to_vec()
    };
    add(
        "expand",
        "batch",
        with(DEFAULT_LIMIT, &packed.zstd_datagrams),
    );
    add(
        "expand",
        "batch-over-limit",
        with(LIMIT_256, &packed.zstd_datagrams),
    );
    add(
        "expand",
        "ipv6-batch",
        with(LIMIT_64K, &zstd_of(&list(&v6), true)),
    );
    add(
        "expand",
        "no-datagrams",
        with(LIMIT_16, &zstd_of(&[], true)),
    );
    add(
        "expand",
        "unsized",
        with(DEFAULT_LIMIT, &zstd_of(&list(&small), false)),
    );
    // 16 MiB of zeros in a few hundred bytes: refused by its header.
    add(
        "expand",
        "bomb",
        with(DEFAULT_LIMIT, &zstd_of(&vec![0; 16 << 20], true)),
    );
    // A small frame, then a large one: the first header passes the check, the second frame
    // must not expand past it.
    add(
        "expand",
        "small-then-bomb",
        with(
            DEFAULT_LIMIT,
            &[
                zstd_of(&list(&small), true),
                zstd_of(&vec![0; 16 << 20], true),
            ]
            .concat(),
        ),
    );
    // A skippable frame (magic 0x184D2A50, 4 bytes of content), then a batch.
    let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    skippable.extend(zstd_of(&list(&small), true));
    add(
        "expand",
        "skippable-then-batch",
        with(DEFAULT_LIMIT, &skippable),
    );
    add(
        "expand",
        "not-datagrams",
        with(DEFAULT_LIMIT, &zstd_of(b"\xff\xff\xff\xff", true)),
    );
    let cut = &packed.zstd_datagrams[..packed.zstd_datagrams.len() / 2];
    add("expand", "truncated", with(DEFAULT_LIMIT, cut));

    for (name, bytes) in token_seeds() {
        add("token", name, bytes);
    }

    for (name, _) in TARGETS {
        assert!(out.contains_key(name), "no seeds for {name}");
    }
    out
}

#[test]
fn seeds_are_up_to_date() {
    let write = std::env::var_os("RELAY_FUZZ_WRITE_SEEDS").is_some();
    let mut stale = Vec::new();
    for (target, seeds) in seeds() {
        let dir = corpus_dir(target);
        if write {
            fs::create_dir_all(&dir).unwrap();
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seed-")
                {
                    fs::remove_file(path).unwrap();
                }
            }
        }
        for (name, bytes) in seeds {
            let path = dir.join(&name);
            if write {
                fs::write(&path, &bytes).unwrap();
            } else if fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "corpus seeds differ from tests/corpus.rs (RELAY_FUZZ_WRITE_SEEDS=1 cargo test -p \
         relay-fuzz --test corpus writes them): {stale:?}"
    );
}

#[test]
fn sflow_seeds_come_from_a_real_generator() {
    // The generator's datagrams are what the sFlow target's seeds hold: valid v5 headers.
    for d in datagrams(4, 8, 48) {
        let header = proto::sflow::parse_header(&d).unwrap();
        assert_eq!(
            header
                .agent
                .to_string()
                .parse::<Ipv4Addr>()
                .unwrap()
                .octets()[..3],
            [192, 0, 2]
        );
    }
}

#[test]
fn sflow_counters_seeds_reach_what_they_are_named_for() {
    use proto::sflow::Header;
    use proto::sflow::counters::Malformed;

    let seeds: BTreeMap<_, _> = sflow_counters_seeds().into_iter().collect();
    let walk = |name: &str| {
        let (&selector, rest) = seeds[name].split_first().unwrap();
        let mut d = Vec::new();
        if selector & 1 == 1 {
            let agent = if selector & 2 == 0 {
                "192.0.2.9".parse().unwrap()
            } else {
                "2001:db8::9".parse().unwrap()
            };
            let samples = if selector >> 2 == 63 {
                u32::MAX
            } else {
                u32::from(selector >> 2)
            };
            d = Header {
                samples,
                ..Header::from_agent(agent)
            }
            .to_bytes();
        }
        d.extend_from_slice(rest);
        counter_samples(&d).unwrap().collect::<Vec<_>>()
    };
    let ok = |items: &[Result<_, Malformed>]| items.iter().filter(|s| s.is_ok()).count();

    assert!(ok(&walk("generator")) >= 1);
    let cut = walk("generator-cut");
    assert_eq!(cut.last(), Some(&Err(Malformed::Truncated)));
    assert!(cut[0].unwrap().generic.is_some());
    let expanded = walk("expanded-padded-ipv6");
    assert_eq!(ok(&expanded), 2);
    assert!(expanded[0].unwrap().expanded && expanded[0].unwrap().ethernet.is_some());
    assert_eq!(ok(&walk("flows-then-counters")), 1);
    let ones = walk("all-ones")[0].unwrap();
    assert_eq!(ones.generic.unwrap().in_octets, None);
    let overrun = walk("record-overrun");
    assert_eq!(overrun.len(), 2);
    assert_eq!(overrun[1], Err(Malformed::RecordOverrun));
    assert_eq!(walk("short-records")[0].unwrap().short_records, 2);
    assert_eq!(walk("announces-max-samples")[1], Err(Malformed::Truncated));
}

#[test]
fn token_seeds_reach_what_they_are_named_for() {
    use certs::token::{TokenError, parse};

    for (name, bytes) in token_seeds() {
        let text = String::from_utf8_lossy(&bytes);
        let outcome = parse(&text);
        let reason = match &outcome {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        let expected = match name {
            "valid" | "valid-64-byte-utf8-name" => "",
            "wrong-prefix" => "does not start with",
            "truncated-in-payload" => "no signature part",
            "truncated-by-one" | "padded" | "trailing-text" | "noncanonical-base64" => "base64url",
            "not-utf8-text" => "not base64url",
            "trailing-payload-byte" => "announced as 6 bytes, and 7 follow",
            "signature-73-bytes" => "signature of 73 bytes",
            "signature-empty" => "signature of 0 bytes",
            "role-2" => "role 2",
            "version-2" => "version 2",
            "ttl-over-7-days" | "ends-before-start" => "not within 1 second to 7 days",
            "time-out-of-range" => "out of range",
            "name-empty" => "it is empty",
            "name-too-long" => "longer than 64 bytes",
            "name-not-utf8" => "not UTF-8",
            "name-with-slash" => "cannot be used as a file name",
            "name-with-control" => "control character",
            "over-1024-bytes" => "1025 bytes, over the limit of 1024",
            other => panic!("no expectation for seed {other}"),
        };
        if expected.is_empty() {
            assert!(outcome.is_ok(), "{name}: {reason}");
        } else {
            assert!(reason.contains(expected), "{name}: {reason:?}");
            assert!(!matches!(outcome, Err(TokenError::BadSignature)));
        }
    }
}
