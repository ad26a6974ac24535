//! Target `sflow`: the sFlow v5 header parser ([`parse_header`]) and the per-stream sequence
//! tracker ([`SequenceTracker`]), which agent and sink run on every datagram they relay.
//!
//! Input: one selector byte (bit 0: the mode, bits 1–3: the tracker's stream cap), then:
//! - mode 0, **datagrams**: each a 2-byte big-endian length and that many bytes (the last one
//!   takes what is left), parsed and observed as they are;
//! - mode 1, **steps**: 4-byte records (stream, sequence step, uptime step) made into valid
//!   headers of up to eight streams (IPv4 and IPv6 agents), to drive the sequence accounting
//!   through gaps, reordering, duplicates, wraps and restarts.
//!
//! Checks: parsing never panics and agrees with a plain reading of the header layout, and a
//! parsed header written back gives the bytes it was read from; each observation keeps the
//! documented rules (one of next, late or reset; duplicates are late; a stream's first datagram
//! is new and counts nothing), agrees with a model of each stream (its front, the numbers seen
//! since its baseline with their uptimes, and whether a datagram behind the front fits
//! between them) and with the stream cap, and ids are dense and stable.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proto::sflow::{
    HEADER_LEN_IPV4, HEADER_LEN_IPV6, Header, LATE_UPTIME_MS, NotSflow, Observation,
    REORDER_WINDOW, RESTART_UPTIME_MS, SequenceTracker, Stream, StreamKey, parse_header,
};

use super::assert_within;

/// The target.
pub fn sflow(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let max_streams = usize::from((selector >> 1) & 0x07);
    let mut model = Model::new(max_streams);
    let ((), usage) = crate::alloc::measure(|| {
        if selector & 1 == 0 {
            let mut rest = rest;
            while !rest.is_empty() {
                let len = match rest.first_chunk::<2>() {
                    Some(prefix) => usize::from(u16::from_be_bytes(*prefix)),
                    None => rest.len(),
                };
                rest = rest.get(2..).unwrap_or_default();
                let (datagram, tail) = rest.split_at(len.min(rest.len()));
                rest = tail;
                model.observe(datagram);
            }
        } else {
            for record in rest.chunks_exact(4) {
                let datagram = model.step(record);
                model.observe(&datagram);
            }
        }
    });
    // Parsing allocates nothing; the tracker a little per new stream (at most 7), and the
    // datagrams built here and the model a little per record.
    assert_within(
        usage,
        64 * 1024 + 64 * rest.len(),
        256 * 1024 + 256 * rest.len(),
        "sflow",
    );
}

/// A plain reading of the header layout (module docs of `proto::sflow`).
fn expected(d: &[u8]) -> Result<Header, NotSflow> {
    let word = |i: usize| -> Option<u32> {
        let b = d.get(4 * i..4 * i + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    if word(0).ok_or(NotSflow::TooShort)? != 5 {
        return Err(NotSflow::Version);
    }
    let (agent, first) = match word(1).ok_or(NotSflow::TooShort)? {
        1 => {
            let a = d.get(8..12).ok_or(NotSflow::TooShort)?;
            (IpAddr::from(<[u8; 4]>::try_from(a).expect("4 bytes")), 3)
        }
        2 => {
            let a = d.get(8..24).ok_or(NotSflow::TooShort)?;
            (IpAddr::from(<[u8; 16]>::try_from(a).expect("16 bytes")), 6)
        }
        _ => return Err(NotSflow::AddressType),
    };
    let field = |i: usize| word(first + i).ok_or(NotSflow::TooShort);
    Ok(Header {
        agent,
        sub_agent: field(0)?,
        sequence: field(1)?,
        uptime_ms: field(2)?,
        samples: field(3)?,
    })
}

/// The header's bytes, as an agent writes them.
fn write(header: &Header) -> Vec<u8> {
    let mut d = 5u32.to_be_bytes().to_vec();
    match header.agent {
        IpAddr::V4(a) => {
            d.extend(1u32.to_be_bytes());
            d.extend(a.octets());
        }
        IpAddr::V6(a) => {
            d.extend(2u32.to_be_bytes());
            d.extend(a.octets());
        }
    }
    for field in [
        header.sub_agent,
        header.sequence,
        header.uptime_ms,
        header.samples,
    ] {
        d.extend(field.to_be_bytes());
    }
    d
}

/// One stream as the module docs describe it.
#[derive(Debug)]
struct Expected {
    front: u32,
    front_uptime: u32,
    /// Numbers within [`REORDER_WINDOW`] of the front arrived since the baseline, with the
    /// uptime each came with.
    seen: HashMap<u32, u32>,
}

impl Expected {
    fn baseline(sequence: u32, uptime: u32) -> Self {
        Self {
            front: sequence,
            front_uptime: uptime,
            seen: HashMap::from([(sequence, uptime)]),
        }
    }

    /// Whether a datagram behind the front can belong to the run since the baseline: not
    /// more than LATE_UPTIME_MS before the front, and either a copy of a datagram seen (its
    /// uptime) or stamped between the nearest numbers seen on either side of it.
    fn fits(&self, sequence: u32, uptime: u32) -> bool {
        let later_than = |a: u32, b: u32| (1..1 << 31).contains(&a.wrapping_sub(b));
        let trails = self.front_uptime.wrapping_sub(uptime);
        if trails > LATE_UPTIME_MS && trails <= 1 << 31 {
            return false;
        }
        if let Some(&seen) = self.seen.get(&sequence) {
            return seen == uptime;
        }
        let to_front = |n: u32| self.front.wrapping_sub(n);
        let d = to_front(sequence);
        let nearest_later = self
            .seen
            .iter()
            .filter(|(n, _)| to_front(**n) < d)
            .max_by_key(|(n, _)| to_front(**n));
        let nearest_earlier = self
            .seen
            .iter()
            .filter(|(n, _)| to_front(**n) > d)
            .min_by_key(|(n, _)| to_front(**n));
        nearest_later.is_none_or(|(_, &u)| !later_than(uptime, u))
            && nearest_earlier.is_none_or(|(_, &u)| !later_than(u, uptime))
    }
}

/// The tracker under test and a model of it.
#[derive(Debug)]
struct Model {
    tracker: SequenceTracker,
    max_streams: usize,
    ids: HashMap<StreamKey, usize>,
    streams: Vec<Expected>,
    /// Mode 1: each stream's last (sequence, uptime).
    positions: [(u32, u32); 8],
}

impl Model {
    fn new(max_streams: usize) -> Self {
        Self {
            tracker: SequenceTracker::new(max_streams),
            max_streams,
            ids: HashMap::new(),
            streams: Vec::new(),
            positions: [(1, 1_000_000); 8],
        }
    }

    /// Mode 1: a valid header from a 4-byte record.
    fn step(&mut self, record: &[u8]) -> Vec<u8> {
        let stream = usize::from(record[0] & 0x07);
        let (sequence, uptime) = &mut self.positions[stream];
        // Mostly small moves either way; bit 3 makes it a far jump, bit 4 a restart.
        let seq_step = i32::from(record[1] as i8);
        let up_step = i32::from(i16::from_be_bytes([record[2], record[3]]));
        if record[0] & 0x08 != 0 {
            *sequence = sequence.wrapping_add((seq_step as u32) << 24);
        } else {
            *sequence = sequence.wrapping_add_signed(seq_step);
        }
        if record[0] & 0x10 != 0 {
            *uptime = (up_step as u32) & 0x3fff;
        } else {
            *uptime = uptime.wrapping_add_signed(up_step);
        }
        let agent = if stream < 4 {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1 + (stream as u8 & 1)))
        } else {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, stream as u16))
        };
        let mut d = write(&Header {
            agent,
            sub_agent: (stream as u32) >> 1,
            sequence: *sequence,
            uptime_ms: *uptime,
            samples: u32::from(record[0] >> 5),
        });
        d.push(record[3]);
        d
    }

    fn observe(&mut self, datagram: &[u8]) {
        let parsed = parse_header(datagram);
        assert_eq!(parsed, expected(datagram), "header of {datagram:02x?}");
        let observation = self.tracker.observe(datagram);
        let header = match parsed {
            Ok(header) => header,
            Err(reason) => {
                assert_eq!(observation, untracked(Stream::NotSflow(reason)));
                return;
            }
        };
        let len = match header.agent {
            IpAddr::V4(_) => HEADER_LEN_IPV4,
            IpAddr::V6(_) => HEADER_LEN_IPV6,
        };
        assert_eq!(write(&header), datagram[..len], "header written back");
        self.check(&header, &observation);
    }

    fn check(&mut self, header: &Header, o: &Observation) {
        // The documented rules, whatever the stream.
        assert!(!(o.reset && (o.late || o.missing > 0)), "{o:?}");
        assert!(!(o.late && o.missing > 0), "{o:?}");
        assert!(!o.duplicate || o.late, "{o:?}");
        assert!(o.missing < 1 << 31, "{o:?}");
        assert!(self.tracker.len() <= self.max_streams);

        let key = header.key();
        let Some(&index) = self.ids.get(&key) else {
            if self.ids.len() >= self.max_streams {
                assert_eq!(*o, untracked(Stream::Other));
                return;
            }
            let Stream::Tracked(id) = o.stream else {
                panic!("a new stream under the cap is not tracked: {o:?}");
            };
            assert_eq!(id.index(), self.ids.len(), "ids are dense");
            assert_eq!(
                *o,
                Observation {
                    new_stream: true,
                    ..untracked(o.stream)
                }
            );
            assert_eq!(self.tracker.key(id), key);
            self.ids.insert(key, id.index());
            self.streams
                .push(Expected::baseline(header.sequence, header.uptime_ms));
            return;
        };
        let Stream::Tracked(id) = o.stream else {
            panic!("a tracked stream's datagram is not tracked: {o:?}");
        };
        assert_eq!(id.index(), index, "ids are stable");
        assert!(!o.new_stream);

        let stream = &mut self.streams[index];
        let (sequence, uptime) = (header.sequence, header.uptime_ms);
        let behind = stream.front.wrapping_sub(sequence);
        let ahead = sequence.wrapping_sub(stream.front);
        let uptime_behind = stream.front_uptime.wrapping_sub(uptime);
        let restart = (uptime_behind > RESTART_UPTIME_MS && uptime_behind <= 1 << 31)
            || (REORDER_WINDOW..=1 << 31).contains(&behind);
        if restart {
            assert!(o.reset, "a restart not reset: {o:?} {stream:?} {header:?}");
            *stream = Expected::baseline(sequence, uptime);
        } else if ahead != 0 && ahead < 1 << 31 {
            assert!(!o.reset && !o.late, "{o:?}");
            assert_eq!(o.missing, ahead - 1, "{stream:?} {header:?}");
            stream.front = sequence;
            stream.front_uptime = uptime;
            stream.seen.insert(sequence, uptime);
            // Only the window up to the front is remembered (numbers wrap).
            stream
                .seen
                .retain(|&n, _| sequence.wrapping_sub(n) < REORDER_WINDOW);
        } else if !stream.fits(sequence, uptime) {
            assert!(behind < REORDER_WINDOW);
            assert!(
                o.reset,
                "a datagram that does not fit not reset: {o:?} {stream:?} {header:?}"
            );
            *stream = Expected::baseline(sequence, uptime);
        } else {
            assert!(behind < REORDER_WINDOW);
            assert!(o.late && !o.reset, "{o:?} {stream:?} {header:?}");
            assert_eq!(
                o.duplicate,
                stream.seen.contains_key(&sequence),
                "{stream:?}"
            );
            stream.seen.entry(sequence).or_insert(uptime);
        }
    }
}

fn untracked(stream: Stream) -> Observation {
    Observation {
        stream,
        new_stream: false,
        missing: 0,
        late: false,
        duplicate: false,
        reset: false,
    }
}
