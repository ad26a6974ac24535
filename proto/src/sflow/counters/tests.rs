//! Tests of the counter sample decoder, on datagrams built here word by word (XDR,
//! big-endian) and on one written out byte by byte.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

// === builder ===

fn put(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// A sample or record declaring `len` bytes: format, length, `data`, zeros up to 4.
fn opaque_with_len(format: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, format);
    put(&mut out, len);
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out
}

fn opaque(format: u32, data: &[u8]) -> Vec<u8> {
    opaque_with_len(format, data.len() as u32, data)
}

fn datagram(agent: IpAddr, sequence: u32, uptime_ms: u32, samples: &[Vec<u8>]) -> Vec<u8> {
    let mut d = Header {
        agent,
        sub_agent: 0,
        sequence,
        uptime_ms,
        samples: samples.len() as u32,
    }
    .to_bytes();
    for s in samples {
        d.extend_from_slice(s);
    }
    d
}

/// A standard counter sample (format 2) of ifIndex `if_index`.
fn counter_sample(sequence: u32, if_index: u32, records: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    put(&mut body, sequence);
    put(&mut body, if_index); // source id type 0 (ifIndex) in the top byte
    put(&mut body, records.len() as u32);
    for r in records {
        body.extend_from_slice(r);
    }
    opaque(FORMAT_COUNTER_SAMPLE, &body)
}

/// An expanded counter sample (format 4).
fn expanded_sample(sequence: u32, source: (u32, u32), records: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    for v in [sequence, source.0, source.1, records.len() as u32] {
        put(&mut body, v);
    }
    for r in records {
        body.extend_from_slice(r);
    }
    opaque(FORMAT_COUNTER_SAMPLE_EXPANDED, &body)
}

/// A flow sample (format 1) or expanded flow sample (3) with one sampled-header record.
fn flow_sample(expanded: bool) -> Vec<u8> {
    let mut body = Vec::new();
    let fields: &[u32] = if expanded {
        &[7, 0, 5, 1000, 70_000, 0, 0, 5, 0, 6]
    } else {
        &[7, 5, 1000, 70_000, 0, 5, 6]
    };
    for &v in fields {
        put(&mut body, v);
    }
    put(&mut body, 1);
    let mut header = Vec::new();
    for v in [1, 1514, 4, 14] {
        put(&mut header, v);
    }
    header.extend_from_slice(&[0xff; 14]);
    body.extend(opaque(1, &header));
    let format = if expanded {
        FORMAT_FLOW_SAMPLE_EXPANDED
    } else {
        FORMAT_FLOW_SAMPLE
    };
    opaque(format, &body)
}

fn generic_record(c: &IfCounters) -> Vec<u8> {
    let mut data = Vec::new();
    c.write(&mut data);
    assert_eq!(data.len(), IF_COUNTERS_LEN);
    opaque(FORMAT_IF_COUNTERS, &data)
}

fn ethernet_record(e: &EthernetCounters) -> Vec<u8> {
    let mut data = Vec::new();
    e.write(&mut data);
    assert_eq!(data.len(), ETHERNET_COUNTERS_LEN);
    opaque(FORMAT_ETHERNET_COUNTERS, &data)
}

/// Generic counters with a distinct value in every field.
fn generic(if_index: u32, in_octets: u64) -> IfCounters {
    IfCounters {
        if_index,
        if_type: 6,
        if_speed: Some(10_000_000_000),
        if_direction: 1,
        if_status: STATUS_ADMIN_UP | STATUS_OPER_UP,
        in_octets: Some(in_octets),
        in_ucast_pkts: Some(1001),
        in_multicast_pkts: Some(1002),
        in_broadcast_pkts: Some(1003),
        in_discards: Some(1004),
        in_errors: Some(1005),
        in_unknown_protos: Some(1006),
        out_octets: Some(in_octets / 2),
        out_ucast_pkts: Some(2001),
        out_multicast_pkts: Some(2002),
        out_broadcast_pkts: Some(2003),
        out_discards: Some(2004),
        out_errors: Some(2005),
        promiscuous_mode: 0,
    }
}

/// Ethernet counters `base`, `base + 1`, … in wire order.
fn ethernet(base: u32) -> EthernetCounters {
    let v = |i: u32| Some(base + i);
    EthernetCounters {
        alignment_errors: v(0),
        fcs_errors: v(1),
        single_collision_frames: v(2),
        multiple_collision_frames: v(3),
        sqe_test_errors: v(4),
        deferred_transmissions: v(5),
        late_collisions: v(6),
        excessive_collisions: v(7),
        internal_mac_transmit_errors: v(8),
        carrier_sense_errors: v(9),
        frame_too_longs: v(10),
        internal_mac_receive_errors: v(11),
        symbol_errors: v(12),
    }
}

fn walk_all(d: &[u8]) -> Vec<Result<CounterSample, Malformed>> {
    counter_samples(d).expect("an sflow header").collect()
}

/// The walk's samples, which must all be whole.
fn samples(d: &[u8]) -> Vec<CounterSample> {
    walk_all(d)
        .into_iter()
        .map(|s| s.expect("a whole sample"))
        .collect()
}

fn plain(sequence: u32, if_index: u32, generic: Option<IfCounters>) -> CounterSample {
    CounterSample {
        sequence,
        expanded: false,
        source_id_type: 0,
        source_id_index: if_index,
        generic,
        ethernet: None,
        short_records: 0,
    }
}

/// Deterministic xorshift64, as in `sflow.rs`'s tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

// === tests ===

#[test]
fn generic_and_ethernet_records_in_one_sample() {
    for agent in [A, V6] {
        let records = [
            ethernet_record(&ethernet(40)),
            generic_record(&generic(7, 1 << 40)),
        ];
        let d = datagram(agent, 12, 99_000, &[counter_sample(3, 7, &records)]);
        let mut walk = counter_samples(&d).unwrap();
        assert_eq!(walk.header().agent, agent);
        assert_eq!(
            (walk.header().sequence, walk.header().uptime_ms),
            (12, 99_000)
        );
        let sample = walk.next().unwrap().unwrap();
        assert_eq!(
            sample,
            CounterSample {
                ethernet: Some(ethernet(40)),
                ..plain(3, 7, Some(generic(7, 1 << 40)))
            }
        );
        let generic = sample.generic.unwrap();
        assert!(generic.admin_up() && generic.oper_up());
        assert_eq!(walk.next(), None);
        assert_eq!(walk.offset(), d.len());
        assert_eq!(walk.next(), None, "fused");
    }
}

#[test]
fn hand_written_datagram_decodes_to_hand_computed_values() {
    #[rustfmt::skip]
    let d: [u8; 144] = [
        0, 0, 0, 5,   0, 0, 0, 1,   10, 0, 0, 9,       // v5, IPv4 agent 10.0.0.9
        0, 0, 0, 0,   0, 0, 0x01, 0x00,                 // sub-agent 0, sequence 256
        0, 0, 0x27, 0x10,   0, 0, 0, 1,                 // uptime 10,000 ms, 1 sample
        0, 0, 0, 2,   0, 0, 0, 108,                     // counter sample, 108 bytes
        0, 0, 0, 42,   0x00, 0x00, 0x00, 0x03,          // sample sequence 42, ifIndex 3
        0, 0, 0, 1,                                     // 1 record
        0, 0, 0, 1,   0, 0, 0, 88,                      // generic interface, 88 bytes
        0, 0, 0, 3,   0, 0, 0, 6,                       // ifIndex 3, ifType 6
        0, 0, 0, 0, 0x3b, 0x9a, 0xca, 0x00,             // ifSpeed 1,000,000,000
        0, 0, 0, 1,   0, 0, 0, 1,                       // full duplex, admin up, oper down
        0, 0, 0, 1, 0, 0, 0, 2,                         // ifInOctets 2^32 + 2
        0xff, 0xff, 0xff, 0xfe,                         // ifInUcastPkts 2^32 - 2
        0xff, 0xff, 0xff, 0xff,                         // ifInMulticastPkts unknown
        0, 0, 1, 0,   0, 0, 0, 0,   0, 0, 0, 7,         // bcast 256, discards 0, errors 7
        0x80, 0, 0, 0,                                  // unknown protos 2^31
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // ifOutOctets unknown
        0, 0, 0, 10,  0, 0, 0, 11,  0, 0, 0, 12,        // out ucast, mcast, bcast
        0, 0, 0, 13,  0, 0, 0, 14,                      // out discards, errors
        0, 0, 0, 1,                                     // promiscuous
    ];
    let mut walk = counter_samples(&d).unwrap();
    let h = *walk.header();
    assert_eq!(h.agent, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)));
    assert_eq!((h.sequence, h.uptime_ms, h.samples), (256, 10_000, 1));
    let s = walk.next().unwrap().unwrap();
    assert_eq!(
        (s.sequence, s.source_id_type, s.source_id_index),
        (42, 0, 3)
    );
    assert!(s.ethernet.is_none() && !s.expanded && s.short_records == 0);
    let g = s.generic.unwrap();
    assert_eq!(
        (g.if_index, g.if_type, g.if_speed),
        (3, 6, Some(1_000_000_000))
    );
    assert_eq!(
        (g.if_direction, g.admin_up(), g.oper_up()),
        (1, true, false)
    );
    assert_eq!(g.in_octets, Some(4_294_967_298));
    assert_eq!(g.in_ucast_pkts, Some(4_294_967_294));
    assert_eq!(g.in_multicast_pkts, None);
    assert_eq!(g.in_broadcast_pkts, Some(256));
    assert_eq!((g.in_discards, g.in_errors), (Some(0), Some(7)));
    assert_eq!(g.in_unknown_protos, Some(2_147_483_648));
    assert_eq!(g.out_octets, None);
    assert_eq!(
        [g.out_ucast_pkts, g.out_multicast_pkts, g.out_broadcast_pkts],
        [Some(10), Some(11), Some(12)]
    );
    assert_eq!((g.out_discards, g.out_errors), (Some(13), Some(14)));
    assert_eq!(g.promiscuous_mode, 1);
    assert_eq!(walk.next(), None);

    // And written back, the record is the same bytes.
    let mut again = Vec::new();
    g.write(&mut again);
    assert_eq!(again, d[56..]);
}

#[test]
fn counter_near_wrap_is_read_raw_and_delta32_spans_the_wrap() {
    let mut before = generic(1, u64::from(u32::MAX) - 10);
    before.in_ucast_pkts = Some(u32::MAX - 1); // the largest value that is not "unknown"
    before.in_errors = Some(u32::MAX - 100);
    let mut after = before;
    after.in_ucast_pkts = Some(5);
    after.in_errors = Some(u32::MAX - 90);
    let first = datagram(
        A,
        1,
        1000,
        &[counter_sample(1, 1, &[generic_record(&before)])],
    );
    let second = datagram(
        A,
        2,
        2000,
        &[counter_sample(2, 1, &[generic_record(&after)])],
    );
    let a = samples(&first)[0].generic.unwrap();
    let b = samples(&second)[0].generic.unwrap();
    assert_eq!(a.in_ucast_pkts, Some(0xffff_fffe));
    assert_eq!(b.in_ucast_pkts, Some(5));
    assert_eq!(a.in_octets, Some(0xffff_fff5));
    // u32::MAX - 1 → 5 is 7 events: MAX - 1 → MAX → 0 → … → 5.
    assert_eq!(
        delta32(a.in_ucast_pkts.unwrap(), b.in_ucast_pkts.unwrap()),
        7
    );
    assert_eq!(delta32(a.in_errors.unwrap(), b.in_errors.unwrap()), 10);
    assert_eq!(delta32(7, 7), 0);
}

#[test]
fn all_ones_is_unknown_never_a_number() {
    let unknown = IfCounters {
        if_speed: None,
        in_octets: None,
        in_ucast_pkts: None,
        in_multicast_pkts: None,
        in_broadcast_pkts: None,
        in_discards: None,
        in_errors: None,
        in_unknown_protos: None,
        out_octets: None,
        out_ucast_pkts: None,
        out_multicast_pkts: None,
        out_broadcast_pkts: None,
        out_discards: None,
        out_errors: None,
        ..generic(9, 0)
    };
    let no_ethernet = EthernetCounters {
        alignment_errors: None,
        ..ethernet(0)
    };
    let all_ones = EthernetCounters::read(&[0xff; ETHERNET_COUNTERS_LEN]).unwrap();
    assert_eq!(all_ones, EthernetCounters::from_array([None; 13]));
    assert_eq!(
        EthernetCounters::from_array(ethernet(4).to_array()),
        ethernet(4)
    );
    let records = [generic_record(&unknown), ethernet_record(&no_ethernet)];
    let d = datagram(A, 1, 1, &[counter_sample(1, 9, &records)]);
    let bytes_of_record = &d[28 + 8 + 12 + 8..][..IF_COUNTERS_LEN];
    assert_eq!(
        bytes_of_record[8..16],
        [0xff; 8],
        "ifSpeed written as all ones"
    );
    let s = samples(&d)[0];
    assert_eq!(s.generic, Some(unknown));
    assert_eq!(s.ethernet, Some(no_ethernet));
    assert_eq!(s.ethernet.unwrap().fcs_errors, Some(1));

    // All ones in a 32-bit half of a 64-bit counter is a number; only all 64 bits are unknown.
    let half = generic(9, u64::from(u32::MAX));
    let d = datagram(A, 1, 1, &[counter_sample(1, 9, &[generic_record(&half)])]);
    assert_eq!(samples(&d)[0].generic.unwrap().in_octets, Some(0xffff_ffff));
}

#[test]
fn agent_restart_reports_both_uptimes_faithfully() {
    let before = datagram(
        A,
        9_000,
        3_600_000,
        &[counter_sample(
            500,
            4,
            &[generic_record(&generic(4, 1 << 35))],
        )],
    );
    let after = datagram(
        A,
        1,
        1_500,
        &[counter_sample(1, 4, &[generic_record(&generic(4, 1_000))])],
    );
    let mut results = Vec::new();
    for d in [&before, &after] {
        let walk = counter_samples(d).unwrap();
        let header = *walk.header();
        let s: Vec<_> = walk.map(Result::unwrap).collect();
        results.push((
            header.sequence,
            header.uptime_ms,
            s[0].sequence,
            s[0].generic,
        ));
    }
    assert_eq!(
        results[0],
        (9_000, 3_600_000, 500, Some(generic(4, 1 << 35)))
    );
    assert_eq!(results[1], (1, 1_500, 1, Some(generic(4, 1_000))));
}

#[test]
fn duplicated_and_reordered_samples_are_yielded_as_they_come() {
    // Sample sequence numbers 1, 2, 2 (resent), 4, 3 (late), each with its own counters.
    let seqs = [1u32, 2, 2, 4, 3];
    let octets = |seq: u32| u64::from(seq) * 1_000;
    let datagrams: Vec<_> = seqs
        .iter()
        .enumerate()
        .map(|(i, &seq)| {
            let r = generic_record(&generic(2, octets(seq)));
            datagram(
                A,
                i as u32 + 1,
                100 * (i as u32 + 1),
                &[counter_sample(seq, 2, &[r])],
            )
        })
        .collect();
    let got: Vec<_> = datagrams
        .iter()
        .map(|d| {
            let s = samples(d)[0];
            (s.sequence, s.generic.unwrap().in_octets.unwrap())
        })
        .collect();
    let want: Vec<_> = seqs.iter().map(|&s| (s, octets(s))).collect();
    assert_eq!(got, want);

    // The same sample twice in one datagram: both yielded.
    let one = counter_sample(8, 2, &[generic_record(&generic(2, 80))]);
    let d = datagram(A, 1, 1, &[one.clone(), one]);
    let s = samples(&d);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0], s[1]);
}

#[test]
fn expanded_sample_with_lengths_beyond_the_layout_finds_the_next_record() {
    // Generic record declaring 91 bytes (the layout plus 3, XDR-padded to 92); Ethernet
    // record declaring 60 (a multiple of 4, 8 beyond its layout); then an unknown record; then
    // a second sample that must still be found.
    let mut g = Vec::new();
    generic(77, 123_456).write(&mut g);
    g.extend_from_slice(&[0xaa, 0xbb, 0xcc]);
    let mut e = Vec::new();
    ethernet(500).write(&mut e);
    e.extend_from_slice(&[0xee; 8]);
    let records = [
        opaque_with_len(FORMAT_IF_COUNTERS, 91, &g),
        opaque_with_len(FORMAT_ETHERNET_COUNTERS, 60, &e),
        opaque(0x0000_1005, &[1, 2, 3, 4, 5]), // enterprise 1, format 5
    ];
    assert_eq!(records[0].len(), 8 + 92);
    let d = datagram(
        V6,
        5,
        5,
        &[
            expanded_sample(11, (0, 77), &records),
            counter_sample(12, 78, &[generic_record(&generic(78, 9))]),
        ],
    );
    let s = samples(&d);
    assert_eq!(
        s[0],
        CounterSample {
            sequence: 11,
            expanded: true,
            source_id_type: 0,
            source_id_index: 77,
            generic: Some(generic(77, 123_456)),
            ethernet: Some(ethernet(500)),
            short_records: 0,
        }
    );
    assert_eq!(s[1], plain(12, 78, Some(generic(78, 9))));
    assert_eq!(s.len(), 2);

    // Every declared length from the layout to the layout + 7 reads the same fields.
    for extra in 0..8u32 {
        let mut g = Vec::new();
        generic(5, 5).write(&mut g);
        g.resize(IF_COUNTERS_LEN + extra as usize, 0x55);
        let r = opaque_with_len(FORMAT_IF_COUNTERS, 88 + extra, &g);
        let after = ethernet_record(&ethernet(1));
        let d = datagram(A, 1, 1, &[expanded_sample(1, (0, 5), &[r, after])]);
        let s = samples(&d)[0];
        assert_eq!(s.generic, Some(generic(5, 5)), "extra {extra}");
        assert_eq!(s.ethernet, Some(ethernet(1)), "extra {extra}");
    }
}

#[test]
fn record_longer_than_its_sample_is_an_overrun() {
    let good = counter_sample(1, 1, &[generic_record(&generic(1, 1))]);
    // A generic record declaring 200 bytes inside a sample that holds 88 of them.
    let mut body = Vec::new();
    for v in [2, 1, 1] {
        put(&mut body, v);
    }
    let mut g = Vec::new();
    generic(1, 2).write(&mut g);
    body.extend(opaque_with_len(FORMAT_IF_COUNTERS, 200, &g));
    let overrun = opaque(FORMAT_COUNTER_SAMPLE, &body);
    let after = counter_sample(3, 1, &[generic_record(&generic(1, 3))]);
    let d = datagram(A, 1, 1, &[good.clone(), overrun, after.clone()]);
    let mut walk = counter_samples(&d).unwrap();
    assert_eq!(walk.next(), Some(Ok(plain(1, 1, Some(generic(1, 1))))));
    let start_of_overrun = walk.offset();
    assert_eq!(start_of_overrun, 28 + good.len());
    assert_eq!(walk.next(), Some(Err(Malformed::RecordOverrun)));
    assert_eq!(
        walk.offset(),
        start_of_overrun,
        "stays at the failed sample"
    );
    assert_eq!(walk.next(), None, "the walk ends there");

    // More records announced than the sample holds.
    let mut body = Vec::new();
    for v in [4, 1, 2] {
        put(&mut body, v);
    }
    body.extend(generic_record(&generic(1, 4)));
    let d = datagram(A, 1, 1, &[opaque(FORMAT_COUNTER_SAMPLE, &body)]);
    assert_eq!(walk_all(&d), [Err(Malformed::RecordOverrun)]);

    // A sample too short for its own fields.
    for len in [0, 4, 8, 11] {
        let d = datagram(A, 1, 1, &[opaque(FORMAT_COUNTER_SAMPLE, &[0; 16][..len])]);
        assert_eq!(walk_all(&d), [Err(Malformed::RecordOverrun)], "{len} bytes");
    }
    let d = datagram(A, 1, 1, &[opaque(FORMAT_COUNTER_SAMPLE_EXPANDED, &[0; 12])]);
    assert_eq!(walk_all(&d), [Err(Malformed::RecordOverrun)]);
}

#[test]
fn flow_samples_and_other_samples_are_skipped_by_length() {
    let counters = counter_sample(6, 3, &[generic_record(&generic(3, 33))]);
    let d = datagram(
        A,
        1,
        1,
        &[
            flow_sample(false),
            flow_sample(true),
            // Enterprise 4413's format 2 is not a counter sample.
            opaque((4413 << 12) | 2, &[0xff; 40]),
            opaque(FORMAT_FLOW_SAMPLE, &[]),
            counters,
            flow_sample(false),
        ],
    );
    let mut walk = counter_samples(&d).unwrap();
    assert_eq!(walk.next(), Some(Ok(plain(6, 3, Some(generic(3, 33))))));
    assert_eq!(walk.next(), None);
    assert_eq!(walk.offset(), d.len());
}

#[test]
fn record_shorter_than_its_layout_is_skipped_and_counted() {
    let mut g = Vec::new();
    generic(1, 1).write(&mut g);
    let records = [
        opaque(FORMAT_IF_COUNTERS, &g[..80]),
        opaque(FORMAT_ETHERNET_COUNTERS, &[0; 4]),
        ethernet_record(&ethernet(3)),
        generic_record(&generic(2, 2)),
    ];
    let d = datagram(A, 1, 1, &[counter_sample(1, 1, &records)]);
    let s = samples(&d)[0];
    assert_eq!(s.short_records, 2);
    assert_eq!(s.generic, Some(generic(2, 2)));
    assert_eq!(s.ethernet, Some(ethernet(3)));

    // A repeated record: the first one counts.
    let records = [
        generic_record(&generic(1, 1)),
        generic_record(&generic(2, 2)),
    ];
    let d = datagram(A, 1, 1, &[counter_sample(1, 1, &records)]);
    assert_eq!(samples(&d)[0].generic, Some(generic(1, 1)));
}

#[test]
fn standard_source_id_splits_into_type_and_index() {
    let d = datagram(A, 1, 1, &[counter_sample(1, 0x0300_0011, &[])]);
    let s = samples(&d)[0];
    assert_eq!((s.source_id_type, s.source_id_index), (3, 17));
    assert_eq!((s.generic, s.ethernet), (None, None));
}

#[test]
fn truncation_is_told_from_a_clean_end() {
    let d = datagram(
        A,
        1,
        1,
        &[
            flow_sample(false),
            counter_sample(1, 1, &[generic_record(&generic(1, 1))]),
            counter_sample(2, 2, &[ethernet_record(&ethernet(2))]),
        ],
    );
    let whole = samples(&d);
    assert_eq!(whole.len(), 2);
    for cut in 0..d.len() {
        let Ok(walk) = counter_samples(&d[..cut]) else {
            assert!(cut < HEADER_LEN_IPV4);
            continue;
        };
        let got: Vec<_> = walk.collect();
        let (last, before) = got.split_last().expect("at least the error");
        assert_eq!(*last, Err(Malformed::Truncated), "cut at {cut}");
        for (i, s) in before.iter().enumerate() {
            assert_eq!(s.as_ref(), Ok(&whole[i]), "cut at {cut}");
        }
    }

    // Fewer samples than announced, cut at a sample boundary.
    let mut fewer = d.clone();
    fewer[27] = 4;
    let got = walk_all(&fewer);
    assert_eq!(got.len(), 3);
    assert_eq!(got[2], Err(Malformed::Truncated));

    // More bytes than the announced samples: ignored, a clean end.
    let mut more = d.clone();
    more[27] = 2;
    more.extend_from_slice(&[0xff; 9]);
    let mut two = counter_samples(&more).unwrap();
    assert_eq!(two.next(), Some(Ok(whole[0])));
    assert_eq!(two.next(), None);
    assert!(two.offset() < d.len());

    // No samples at all.
    assert_eq!(walk_all(&datagram(A, 1, 1, &[])), []);
}

#[test]
fn sample_length_not_a_multiple_of_four_is_padded() {
    // A flow sample of 5 declared bytes takes 8 on the wire; the counter sample follows.
    let d = datagram(
        A,
        1,
        1,
        &[
            opaque(FORMAT_FLOW_SAMPLE, &[1, 2, 3, 4, 5]),
            counter_sample(1, 1, &[]),
        ],
    );
    assert_eq!(samples(&d), [plain(1, 1, None)]);
    // Without its padding, the last sample is cut.
    let mut d = datagram(A, 1, 1, &[opaque(FORMAT_FLOW_SAMPLE, &[1, 2, 3, 4, 5])]);
    d.truncate(d.len() - 3);
    assert_eq!(walk_all(&d), [Err(Malformed::Truncated)]);
}

#[test]
fn a_sample_announcing_4_gib_is_truncated_not_read() {
    let mut d = datagram(A, 1, 1, &[counter_sample(1, 1, &[])]);
    d[32..36].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(walk_all(&d), [Err(Malformed::Truncated)]);
    let mut d = datagram(
        A,
        1,
        1,
        &[counter_sample(1, 1, &[generic_record(&generic(1, 1))])],
    );
    let at = 28 + 8 + 12 + 4; // the record's length
    d[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(walk_all(&d), [Err(Malformed::RecordOverrun)]);
}

#[test]
fn headers_that_are_not_sflow_are_refused() {
    assert_eq!(counter_samples(&[]).err(), Some(NotSflow::TooShort));
    let mut d = datagram(A, 1, 1, &[]);
    d[3] = 4;
    assert_eq!(counter_samples(&d).err(), Some(NotSflow::Version));
    let d = datagram(V6, 1, 1, &[]);
    assert_eq!(
        counter_samples(&d[..HEADER_LEN_IPV6 - 1]).err(),
        Some(NotSflow::TooShort)
    );
}

#[test]
fn written_records_read_back() {
    let mut g = generic(3, u64::MAX - 1);
    g.if_speed = None;
    g.in_errors = None;
    let mut bytes = Vec::new();
    g.write(&mut bytes);
    assert_eq!(IfCounters::read(&bytes), Some(g));
    assert_eq!(IfCounters::read(&bytes[..IF_COUNTERS_LEN - 1]), None);
    let e = EthernetCounters {
        symbol_errors: None,
        ..ethernet(u32::MAX - 20)
    };
    let mut bytes = Vec::new();
    e.write(&mut bytes);
    assert_eq!(EthernetCounters::read(&bytes), Some(e));
    assert_eq!(EthernetCounters::read(&bytes[..51]), None);
}

#[test]
fn reasons_have_distinct_labels() {
    let labels: Vec<_> = Malformed::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels, ["truncated", "record_overrun"]);
}

#[test]
fn random_mutations_never_panic_and_always_end() {
    let base = datagram(
        A,
        1,
        1,
        &[
            flow_sample(true),
            expanded_sample(
                1,
                (0, 1),
                &[
                    generic_record(&generic(1, 1)),
                    ethernet_record(&ethernet(1)),
                ],
            ),
            counter_sample(2, 2, &[generic_record(&generic(2, 2))]),
        ],
    );
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..50_000 {
        let mut d = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            let r = rng.next();
            if d.len() <= HEADER_LEN_IPV4 {
                break;
            }
            let at = HEADER_LEN_IPV4 + (r as usize >> 8) % (d.len() - HEADER_LEN_IPV4);
            match r % 4 {
                0 => d[at] ^= 1 << (r >> 5 & 7),
                1 => d[at] = r as u8,
                2 => d.truncate(at),
                _ => {
                    let word =
                        [0, 1, 2, 4, 87, 88, 89, 0x7fff_ffff, u32::MAX][(r >> 40) as usize % 9];
                    let at = at & !3;
                    if at + 4 <= d.len() {
                        d[at..at + 4].copy_from_slice(&u32::to_be_bytes(word));
                    }
                }
            }
        }
        let walk = counter_samples(&d).unwrap();
        let items: Vec<_> = walk.collect();
        assert!(items.len() <= (d.len() - HEADER_LEN_IPV4) / 8 + 1);
        assert!(
            items.iter().rev().skip(1).all(Result::is_ok),
            "only the last is an error"
        );
    }
}

#[test]
fn a_built_counter_datagram_reads_back() {
    let mut header = Header::from_agent(A);
    header.uptime_ms = 77;
    let (g, e) = (generic(3, 1_000), ethernet(40));
    let g2 = generic(4, 2_000);
    let d = counter_datagram(&header, &[(9, &g, Some(&e)), (10, &g2, None)]);
    let walk = counter_samples(&d).unwrap();
    assert_eq!(walk.header().uptime_ms, 77);
    assert_eq!(walk.header().samples, 2);
    let got: Vec<CounterSample> = walk.map(Result::unwrap).collect();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].sequence, got[0].source_id_index), (9, 3));
    assert_eq!(got[0].generic, Some(g));
    assert_eq!(got[0].ethernet, Some(e));
    assert_eq!(
        (got[1].sequence, got[1].generic, got[1].ethernet),
        (10, Some(g2), None)
    );
}
