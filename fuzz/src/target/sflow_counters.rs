//! Target `sflow_counters`: the counter sample decoder ([`counter_samples`]), which reads the
//! interface counters of sFlow agents out of the datagrams the sink holds.
//!
//! Input: one selector byte, then:
//! - bit 0 clear, **raw**: the rest is one datagram, as it is;
//! - bit 0 set, **samples**: the rest is the samples of a datagram whose valid header is built
//!   here (bit 1: an IPv6 agent), announcing `selector >> 2` samples (63: `u32::MAX`), so that
//!   mutations land in samples and records rather than in the header.
//!
//! Checks: the walk agrees, item by item and in where it stands after each one, with a model
//! written apart from it ([`model`]: it consumes sub-slices and decodes records from a table of
//! words, where the decoder keeps offsets and reads field by field); header errors are
//! [`parse_header`]'s; the walk allocates nothing at all; at most the last item is an error,
//! and the walk stays ended after it; it takes at most one step per 8 bytes; no known counter
//! is all ones; a decoded record written back reads (by the model) as itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proto::sflow::counters::{
    CounterSample, EthernetCounters, IfCounters, Malformed, counter_samples,
};
use proto::sflow::{HEADER_LEN_IPV4, HEADER_LEN_IPV6, Header, parse_header};

use super::assert_within;

/// One step of a walk: a sample or an error, and the walk's offset after it.
type Step = (Result<CounterSample, Malformed>, usize);

/// The target.
pub fn sflow_counters(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let datagram = if selector & 1 == 0 {
        rest.to_vec()
    } else {
        with_header(selector, rest)
    };
    let d = &datagram[..];
    let walk = match counter_samples(d) {
        Ok(walk) => walk,
        Err(e) => {
            assert_eq!(parse_header(d), Err(e));
            return;
        }
    };
    let header = parse_header(d).expect("the header the walk read");
    assert_eq!(*walk.header(), header);

    // One step per 8 bytes at most, plus an error: room enough that pushing never allocates.
    let most = d.len() / 8 + 1;
    let mut steps: Vec<Step> = Vec::with_capacity(most + 1);
    let ((), usage) = crate::alloc::measure(|| {
        let mut walk = walk;
        while let Some(item) = walk.next() {
            assert!(steps.len() < most, "more steps than 8-byte units");
            steps.push((item, walk.offset()));
        }
        let end = walk.offset();
        assert!(walk.next().is_none(), "the walk resumed after its end");
        assert_eq!(walk.offset(), end);
    });
    assert_within(usage, 0, 0, "sflow_counters");

    assert_eq!(
        steps,
        model(d, &header),
        "walk of {:02x?}",
        &d[..d.len().min(512)]
    );
    check_steps(d, &steps);
}

/// A valid header for the samples in `rest`.
fn with_header(selector: u8, rest: &[u8]) -> Vec<u8> {
    let agent = if selector & 2 == 0 {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9))
    };
    let samples = match selector >> 2 {
        63 => u32::MAX,
        n => u32::from(n),
    };
    let mut d = Header {
        agent,
        sub_agent: 1,
        sequence: 77,
        uptime_ms: 123_456,
        samples,
    }
    .to_bytes();
    d.extend_from_slice(rest);
    d
}

/// What holds of any walk, model or not.
fn check_steps(d: &[u8], steps: &[Step]) {
    if let Some((_, init)) = steps.split_last() {
        assert!(
            init.iter().all(|(s, _)| s.is_ok()),
            "an error before the end"
        );
    }
    let mut last = 0;
    for (step, offset) in steps {
        assert!(
            *offset >= last && *offset <= d.len(),
            "offset {offset} after {last}"
        );
        last = *offset;
        let Ok(sample) = step else { continue };
        if let Some(g) = sample.generic {
            let mut bytes = Vec::new();
            g.write(&mut bytes);
            assert_eq!(if_counters(&words(&bytes)), Some(g), "written back");
            let known = [g.in_octets, g.out_octets, g.if_speed];
            assert!(!known.contains(&Some(u64::MAX)), "{g:?}");
        }
        if let Some(e) = sample.ethernet {
            assert!(!e.to_array().contains(&Some(u32::MAX)), "{e:?}");
            let mut bytes = Vec::new();
            e.write(&mut bytes);
            assert_eq!(ethernet_counters(&words(&bytes)), Some(e), "written back");
        }
    }
}

/// The walk as the module docs of `proto::sflow::counters` describe it, on sub-slices.
fn model(d: &[u8], header: &Header) -> Vec<Step> {
    let header_len = match header.agent {
        IpAddr::V4(_) => HEADER_LEN_IPV4,
        IpAddr::V6(_) => HEADER_LEN_IPV6,
    };
    let mut rest = &d[header_len..];
    let mut steps = Vec::new();
    for _ in 0..header.samples {
        let before = d.len() - rest.len();
        let Some((format, body)) = xdr_opaque(&mut rest) else {
            steps.push((Err(Malformed::Truncated), before));
            break;
        };
        let expanded = match format {
            2 => false,
            4 => true,
            _ => continue,
        };
        match sample(body, expanded) {
            Some(s) => steps.push((Ok(s), d.len() - rest.len())),
            None => {
                steps.push((Err(Malformed::RecordOverrun), before));
                break;
            }
        }
    }
    steps
}

/// Takes `n` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: u64) -> Option<&'a [u8]> {
    let n = usize::try_from(n).ok().filter(|&n| n <= rest.len())?;
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

fn word(rest: &mut &[u8]) -> Option<u32> {
    let b = take(rest, 4)?;
    Some(u32::from(b[0]) << 24 | u32::from(b[1]) << 16 | u32::from(b[2]) << 8 | u32::from(b[3]))
}

/// Format, then length, then the data padded to 4; `rest` moves only when all of it is there.
fn xdr_opaque<'a>(rest: &mut &'a [u8]) -> Option<(u32, &'a [u8])> {
    let mut r = *rest;
    let format = word(&mut r)?;
    let len = u64::from(word(&mut r)?);
    let padded = take(&mut r, len.div_ceil(4) * 4)?;
    *rest = r;
    Some((format, &padded[..len as usize]))
}

fn sample(body: &[u8], expanded: bool) -> Option<CounterSample> {
    let mut r = body;
    let sequence = word(&mut r)?;
    let (source_id_type, source_id_index) = if expanded {
        let t = word(&mut r)?;
        (t, word(&mut r)?)
    } else {
        let id = word(&mut r)?;
        (id / (1 << 24), id % (1 << 24))
    };
    let count = word(&mut r)?;
    let mut s = CounterSample {
        sequence,
        expanded,
        source_id_type,
        source_id_index,
        generic: None,
        ethernet: None,
        short_records: 0,
    };
    for _ in 0..count {
        let (format, data) = xdr_opaque(&mut r)?;
        let w = words(data);
        if format == 1 && s.generic.is_none() {
            s.generic = if_counters(&w);
            s.short_records += u32::from(s.generic.is_none());
        } else if format == 2 && s.ethernet.is_none() {
            s.ethernet = ethernet_counters(&w);
            s.short_records += u32::from(s.ethernet.is_none());
        }
    }
    Some(s)
}

/// The whole big-endian words of `data`.
fn words(data: &[u8]) -> Vec<u32> {
    data.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn k32(v: u32) -> Option<u32> {
    match v {
        0xffff_ffff => None,
        v => Some(v),
    }
}

fn k64(hi: u32, lo: u32) -> Option<u64> {
    match (hi, lo) {
        (0xffff_ffff, 0xffff_ffff) => None,
        _ => Some(u64::from(hi) << 32 | u64::from(lo)),
    }
}

/// Generic interface counters from 22 words (the layout's 88 bytes).
fn if_counters(w: &[u32]) -> Option<IfCounters> {
    if w.len() < 22 {
        return None;
    }
    Some(IfCounters {
        if_index: w[0],
        if_type: w[1],
        if_speed: k64(w[2], w[3]),
        if_direction: w[4],
        if_status: w[5],
        in_octets: k64(w[6], w[7]),
        in_ucast_pkts: k32(w[8]),
        in_multicast_pkts: k32(w[9]),
        in_broadcast_pkts: k32(w[10]),
        in_discards: k32(w[11]),
        in_errors: k32(w[12]),
        in_unknown_protos: k32(w[13]),
        out_octets: k64(w[14], w[15]),
        out_ucast_pkts: k32(w[16]),
        out_multicast_pkts: k32(w[17]),
        out_broadcast_pkts: k32(w[18]),
        out_discards: k32(w[19]),
        out_errors: k32(w[20]),
        promiscuous_mode: w[21],
    })
}

/// Ethernet interface counters from 13 words (the layout's 52 bytes).
fn ethernet_counters(w: &[u32]) -> Option<EthernetCounters> {
    let w: &[u32; 13] = w.get(..13)?.try_into().ok()?;
    let [a, b, c, d, e, f, g, h, i, j, k, l, m] = w.map(k32);
    Some(EthernetCounters {
        alignment_errors: a,
        fcs_errors: b,
        single_collision_frames: c,
        multiple_collision_frames: d,
        sqe_test_errors: e,
        deferred_transmissions: f,
        late_collisions: g,
        excessive_collisions: h,
        internal_mac_transmit_errors: i,
        carrier_sense_errors: j,
        frame_too_longs: k,
        internal_mac_receive_errors: l,
        symbol_errors: m,
    })
}
