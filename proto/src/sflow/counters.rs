//! sFlow v5 counter samples: the interface counters an agent polls and sends, read without
//! allocating.
//!
//! Owns walking a datagram's samples ([`counter_samples`]) and reading, from each counter
//! sample (standard, format 2, and expanded, format 4), the two records an interface exporter
//! needs: generic interface counters (enterprise 0, format 1, [`IfCounters`]) and Ethernet
//! interface counters (0:2, [`EthernetCounters`]). Flow samples (1 and 3), every other sample
//! and every other record are skipped by their declared length, unread. It deliberately keeps
//! no state between datagrams: accumulating 32-bit counters across wraps, spotting agent
//! restarts and dropping duplicated or reordered samples are the caller's job, with the
//! datagram header ([`CounterSamples::header`]) and each sample's sequence number
//! ([`CounterSample::sequence`]) that this module hands over unchanged.
//!
//! # Layout
//!
//! XDR, big-endian, after sflow.org `sflow_version_5.txt` (decoded the same way by sflowtool):
//!
//! ```text
//!  datagram header (see sflow.rs), then num_samples times:
//!    sample:  data_format u32 (enterprise << 12 | format), length u32, length bytes
//!  counter sample, format 2:        sequence u32, source_id u32 (type << 24 | index),
//!                                   num_records u32, then the records
//!  expanded counter sample, fmt 4:  sequence u32, source_id_type u32, source_id_index u32,
//!                                   num_records u32, then the records
//!    record:  data_format u32, length u32, length bytes
//!  generic interface record (0:1), 88 bytes: ifIndex, ifType, ifSpeed (u64), ifDirection,
//!    ifStatus, ifInOctets (u64), ifIn{Ucast,Multicast,Broadcast}Pkts, ifInDiscards,
//!    ifInErrors, ifInUnknownProtos, ifOutOctets (u64), ifOut{Ucast,Multicast,Broadcast}Pkts,
//!    ifOutDiscards, ifOutErrors, ifPromiscuousMode
//!  ethernet interface record (0:2), 52 bytes: dot3Stats AlignmentErrors, FCSErrors,
//!    SingleCollisionFrames, MultipleCollisionFrames, SQETestErrors, DeferredTransmissions,
//!    LateCollisions, ExcessiveCollisions, InternalMacTransmitErrors, CarrierSenseErrors,
//!    FrameTooLongs, InternalMacReceiveErrors, SymbolErrors
//! ```
//!
//! Samples and records are XDR `opaque<>`: a length that is not a multiple of 4 is followed by
//! padding up to the next multiple of 4 (as sflowtool skips them), so the next one starts
//! there.
//!
//! # Unknown values
//!
//! An agent that cannot count something sends all ones (`0xFFFF_FFFF`, or `u64::MAX` in a
//! 64-bit field). Every counter, and the interface speed, is therefore an `Option`: `None` is
//! that "unknown" value, so it can never be exported as a number by accident, and `Some(n)` is
//! never all ones.
//!
//! # Malformed datagrams
//!
//! - A sample whose header or padded length runs past the datagram, or a datagram ending
//!   before the `num_samples` its header announces, ends the walk with
//!   [`Malformed::Truncated`] (a datagram cut in transit, e.g. by a `recv(2048)`).
//! - A counter sample whose own fields, or one of whose records, run past the sample's length
//!   ends the walk with [`Malformed::RecordOverrun`]: the sample's framing is inconsistent, so
//!   nothing in it is trusted.
//! - A generic or Ethernet record longer than its layout is read for its fields and skipped
//!   by its declared length. One shorter than its layout is skipped unread and counted in
//!   [`CounterSample::short_records`]. A sample holding two records of one kind yields the
//!   first.
//! - Bytes after the last announced sample are ignored.
//!
//! Every step moves forward by at least 8 bytes, so a walk ends within `len / 8` steps.

use std::iter::FusedIterator;
use std::net::IpAddr;

use super::{HEADER_LEN_IPV4, HEADER_LEN_IPV6, Header, NotSflow, parse_header};

/// Sample format of a flow sample (enterprise 0), skipped.
pub const FORMAT_FLOW_SAMPLE: u32 = 1;

/// Sample format of a counter sample (enterprise 0).
pub const FORMAT_COUNTER_SAMPLE: u32 = 2;

/// Sample format of an expanded flow sample (enterprise 0), skipped.
pub const FORMAT_FLOW_SAMPLE_EXPANDED: u32 = 3;

/// Sample format of an expanded counter sample (enterprise 0): source id type and index in
/// words of their own.
pub const FORMAT_COUNTER_SAMPLE_EXPANDED: u32 = 4;

/// Record format of generic interface counters (enterprise 0).
pub const FORMAT_IF_COUNTERS: u32 = 1;

/// Record format of Ethernet interface counters (enterprise 0).
pub const FORMAT_ETHERNET_COUNTERS: u32 = 2;

/// Length of a generic interface counters record's fields.
pub const IF_COUNTERS_LEN: usize = 88;

/// Length of an Ethernet interface counters record's fields.
pub const ETHERNET_COUNTERS_LEN: usize = 52;

/// `ifStatus` bit: the interface is administratively up.
pub const STATUS_ADMIN_UP: u32 = 1;

/// `ifStatus` bit: the interface is operationally up.
pub const STATUS_OPER_UP: u32 = 2;

/// Why a walk over a datagram's samples ended early. Label values for a per-reason counter
/// come from [`Malformed::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Malformed {
    /// The datagram ends inside a sample, or before all the samples its header announces: it
    /// was cut.
    #[error("sflow samples run past the end of the datagram")]
    Truncated,
    /// A counter sample's fields or one of its records run past the sample's own length.
    #[error("sflow counter record runs past its sample")]
    RecordOverrun,
}

/// One counter sample: where its counters come from and the interface records it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSample {
    /// The sample's sequence number: +1 per counter sample of this source, restarting with
    /// the agent. A repeated or lower number marks a duplicate or reordered sample.
    pub sequence: u32,
    /// The sample was the expanded form (format 4) rather than the standard one (format 2).
    pub expanded: bool,
    /// Class of the data source: 0 = ifIndex, 1 = VLAN, 2 = physical entity, …
    pub source_id_type: u32,
    /// The data source's index (for class 0, the ifIndex). At most 24 bits in the standard
    /// form.
    pub source_id_index: u32,
    /// The first generic interface record (0:1) of the sample, if any.
    pub generic: Option<IfCounters>,
    /// The first Ethernet interface record (0:2) of the sample, if any.
    pub ethernet: Option<EthernetCounters>,
    /// Generic or Ethernet records shorter than their layout, skipped unread. Once a record of
    /// a kind has been read, later ones of that kind are skipped without a look.
    pub short_records: u32,
}

/// Generic interface counters (record 0:1, after RFC 2233). `None` is sFlow's "unknown"
/// (all ones); see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfCounters {
    /// `ifIndex`.
    pub if_index: u32,
    /// `ifType` (IANA ifType: 6 = ethernetCsmacd, …).
    pub if_type: u32,
    /// `ifSpeed`, bits per second.
    pub if_speed: Option<u64>,
    /// `ifDirection`: 0 = unknown, 1 = full-duplex, 2 = half-duplex, 3 = in, 4 = out.
    pub if_direction: u32,
    /// `ifStatus`: [`STATUS_ADMIN_UP`] and [`STATUS_OPER_UP`] bits.
    pub if_status: u32,
    /// `ifInOctets` (64-bit).
    pub in_octets: Option<u64>,
    /// `ifInUcastPkts`.
    pub in_ucast_pkts: Option<u32>,
    /// `ifInMulticastPkts`.
    pub in_multicast_pkts: Option<u32>,
    /// `ifInBroadcastPkts`.
    pub in_broadcast_pkts: Option<u32>,
    /// `ifInDiscards`.
    pub in_discards: Option<u32>,
    /// `ifInErrors`.
    pub in_errors: Option<u32>,
    /// `ifInUnknownProtos`.
    pub in_unknown_protos: Option<u32>,
    /// `ifOutOctets` (64-bit).
    pub out_octets: Option<u64>,
    /// `ifOutUcastPkts`.
    pub out_ucast_pkts: Option<u32>,
    /// `ifOutMulticastPkts`.
    pub out_multicast_pkts: Option<u32>,
    /// `ifOutBroadcastPkts`.
    pub out_broadcast_pkts: Option<u32>,
    /// `ifOutDiscards`.
    pub out_discards: Option<u32>,
    /// `ifOutErrors`.
    pub out_errors: Option<u32>,
    /// `ifPromiscuousMode`: 0 = false, 1 = true.
    pub promiscuous_mode: u32,
}

/// Ethernet interface counters (record 0:2, after RFC 2358's `dot3StatsTable`). `None` is
/// sFlow's "unknown" (all ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetCounters {
    /// `dot3StatsAlignmentErrors`.
    pub alignment_errors: Option<u32>,
    /// `dot3StatsFCSErrors`.
    pub fcs_errors: Option<u32>,
    /// `dot3StatsSingleCollisionFrames`.
    pub single_collision_frames: Option<u32>,
    /// `dot3StatsMultipleCollisionFrames`.
    pub multiple_collision_frames: Option<u32>,
    /// `dot3StatsSQETestErrors`.
    pub sqe_test_errors: Option<u32>,
    /// `dot3StatsDeferredTransmissions`.
    pub deferred_transmissions: Option<u32>,
    /// `dot3StatsLateCollisions`.
    pub late_collisions: Option<u32>,
    /// `dot3StatsExcessiveCollisions`.
    pub excessive_collisions: Option<u32>,
    /// `dot3StatsInternalMacTransmitErrors`.
    pub internal_mac_transmit_errors: Option<u32>,
    /// `dot3StatsCarrierSenseErrors`.
    pub carrier_sense_errors: Option<u32>,
    /// `dot3StatsFrameTooLongs`.
    pub frame_too_longs: Option<u32>,
    /// `dot3StatsInternalMacReceiveErrors`.
    pub internal_mac_receive_errors: Option<u32>,
    /// `dot3StatsSymbolErrors`.
    pub symbol_errors: Option<u32>,
}

/// The counter samples of one datagram, in order: an iterator of
/// `Result<CounterSample, Malformed>` that ends after the first error.
#[derive(Debug, Clone)]
pub struct CounterSamples<'a> {
    header: Header,
    datagram: &'a [u8],
    /// Start of the next sample.
    at: usize,
    /// Samples the header announces that have not been walked yet.
    left: u32,
    done: bool,
}

/// Reads a datagram's header and returns its counter samples, to be walked.
///
/// Walking allocates nothing and reads nothing outside `datagram`; see the
/// [module docs](self) for what ends a walk early.
///
/// # Errors
///
/// [`NotSflow`] when the header cannot be read ([`parse_header`]'s errors).
///
/// # Examples
///
/// ```
/// use relay_proto::sflow::counters::counter_samples;
/// # let datagram = relay_proto::sflow::Header::from_agent([192, 0, 2, 1].into()).to_bytes();
/// let samples = counter_samples(&datagram)?;
/// let uptime_ms = samples.header().uptime_ms;
/// for sample in samples {
///     let Ok(sample) = sample else { break }; // truncated: count it
///     if let Some(generic) = sample.generic {
///         let _ = (uptime_ms, sample.sequence, generic.if_index, generic.in_octets);
///     }
/// }
/// # Ok::<(), relay_proto::sflow::NotSflow>(())
/// ```
pub fn counter_samples(datagram: &[u8]) -> Result<CounterSamples<'_>, NotSflow> {
    let header = parse_header(datagram)?;
    let at = match header.agent {
        IpAddr::V4(_) => HEADER_LEN_IPV4,
        IpAddr::V6(_) => HEADER_LEN_IPV6,
    };
    Ok(CounterSamples {
        header,
        datagram,
        at,
        left: header.samples,
        done: false,
    })
}

/// The change of a 32-bit counter from `earlier` to `later`, across at most one wrap: what
/// an exporter adds to its 64-bit total. Only meaningful between two samples of the same
/// source with no agent restart between them (a restart is a reset, not a wrap), and when
/// fewer than 2³² events happened between them.
///
/// ```
/// use relay_proto::sflow::counters::delta32;
/// assert_eq!(delta32(10, 25), 15);
/// assert_eq!(delta32(u32::MAX - 4, 5), 10); // wrapped
/// ```
pub fn delta32(earlier: u32, later: u32) -> u32 {
    later.wrapping_sub(earlier)
}

// === impl Malformed ===

impl Malformed {
    /// Every reason, for registering one counter per label value up front.
    pub const ALL: [Self; 2] = [Self::Truncated, Self::RecordOverrun];

    /// A short label value: `truncated` or `record_overrun`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::RecordOverrun => "record_overrun",
        }
    }
}

// === impl CounterSamples ===

impl CounterSamples<'_> {
    /// The datagram's header: agent, sub-agent, datagram sequence number and uptime, for
    /// restart and duplicate detection.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// How far the walk has read: the end of the last sample walked whole, or, once a walk
    /// has failed, the start of the sample it failed in.
    pub fn offset(&self) -> usize {
        self.at
    }

    /// The next sample of any kind: its format, its bytes, and where the next one starts.
    fn next_sample(&self) -> Result<(u32, &[u8], usize), Malformed> {
        let rest = self.datagram.get(self.at..).unwrap_or_default();
        let (format, body, used) = opaque(rest).ok_or(Malformed::Truncated)?;
        Ok((format, body, self.at + used))
    }
}

impl Iterator for CounterSamples<'_> {
    type Item = Result<CounterSample, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done && self.left > 0 {
            let (format, body, next) = match self.next_sample() {
                Ok(sample) => sample,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let expanded = match format {
                FORMAT_COUNTER_SAMPLE => false,
                FORMAT_COUNTER_SAMPLE_EXPANDED => true,
                _ => {
                    self.left -= 1;
                    self.at = next;
                    continue;
                }
            };
            let Some(sample) = counter_sample(body, expanded) else {
                self.done = true;
                return Some(Err(Malformed::RecordOverrun));
            };
            self.left -= 1;
            self.at = next;
            return Some(Ok(sample));
        }
        self.done = true;
        None
    }
}

impl FusedIterator for CounterSamples<'_> {}

/// Reads a counter sample's fields and records; `None` when they run past `body`.
fn counter_sample(body: &[u8], expanded: bool) -> Option<CounterSample> {
    let mut r = Reader(body);
    let sequence = r.u32()?;
    let (source_id_type, source_id_index) = if expanded {
        (r.u32()?, r.u32()?)
    } else {
        let id = r.u32()?;
        (id >> 24, id & 0x00ff_ffff)
    };
    let records = r.u32()?;
    let mut sample = CounterSample {
        sequence,
        expanded,
        source_id_type,
        source_id_index,
        generic: None,
        ethernet: None,
        short_records: 0,
    };
    let mut rest = r.0;
    for _ in 0..records {
        let (format, data, used) = opaque(rest)?;
        rest = rest.get(used..)?;
        match format {
            FORMAT_IF_COUNTERS if sample.generic.is_none() => match IfCounters::read(data) {
                Some(c) => sample.generic = Some(c),
                None => sample.short_records = sample.short_records.saturating_add(1),
            },
            FORMAT_ETHERNET_COUNTERS if sample.ethernet.is_none() => {
                match EthernetCounters::read(data) {
                    Some(c) => sample.ethernet = Some(c),
                    None => sample.short_records = sample.short_records.saturating_add(1),
                }
            }
            _ => {}
        }
    }
    Some(sample)
}

/// An XDR `data_format` + `opaque<>` at the start of `bytes`: the format, the data, and the
/// bytes used including the padding to 4. `None` when any of it runs past `bytes`.
fn opaque(bytes: &[u8]) -> Option<(u32, &[u8], usize)> {
    let mut r = Reader(bytes);
    let format = r.u32()?;
    let len = usize::try_from(r.u32()?).ok()?;
    let padded = len.checked_next_multiple_of(4)?;
    if padded > r.0.len() {
        return None;
    }
    Some((format, r.0.get(..len)?, 8 + padded))
}

/// The "unknown" value (all ones) as `None`.
fn known32(raw: u32) -> Option<u32> {
    (raw != u32::MAX).then_some(raw)
}

/// The "unknown" value (all ones) as `None`.
fn known64(raw: u64) -> Option<u64> {
    (raw != u64::MAX).then_some(raw)
}

/// Big-endian words read off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (word, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*word))
    }

    fn u64(&mut self) -> Option<u64> {
        let (word, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*word))
    }

    fn counter32(&mut self) -> Option<Option<u32>> {
        self.u32().map(known32)
    }

    fn counter64(&mut self) -> Option<Option<u64>> {
        self.u64().map(known64)
    }
}

// === impl IfCounters ===

impl IfCounters {
    /// Reads the record's fields; `None` when `data` is shorter than [`IF_COUNTERS_LEN`].
    fn read(data: &[u8]) -> Option<Self> {
        let mut r = Reader(data.get(..IF_COUNTERS_LEN)?);
        Some(Self {
            if_index: r.u32()?,
            if_type: r.u32()?,
            if_speed: r.counter64()?,
            if_direction: r.u32()?,
            if_status: r.u32()?,
            in_octets: r.counter64()?,
            in_ucast_pkts: r.counter32()?,
            in_multicast_pkts: r.counter32()?,
            in_broadcast_pkts: r.counter32()?,
            in_discards: r.counter32()?,
            in_errors: r.counter32()?,
            in_unknown_protos: r.counter32()?,
            out_octets: r.counter64()?,
            out_ucast_pkts: r.counter32()?,
            out_multicast_pkts: r.counter32()?,
            out_broadcast_pkts: r.counter32()?,
            out_discards: r.counter32()?,
            out_errors: r.counter32()?,
            promiscuous_mode: r.u32()?,
        })
    }

    /// Whether `ifStatus` says administratively up.
    pub fn admin_up(&self) -> bool {
        self.if_status & STATUS_ADMIN_UP != 0
    }

    /// Whether `ifStatus` says operationally up.
    pub fn oper_up(&self) -> bool {
        self.if_status & STATUS_OPER_UP != 0
    }

    /// Appends the record's [`IF_COUNTERS_LEN`] bytes of fields (no format or length) to
    /// `out`, `None` as all ones: what the decoder reads back (tests, generators).
    pub fn write(&self, out: &mut Vec<u8>) {
        let w32 = |out: &mut Vec<u8>, v: Option<u32>| put32(out, v.unwrap_or(u32::MAX));
        let w64 = |out: &mut Vec<u8>, v: Option<u64>| {
            out.extend_from_slice(&v.unwrap_or(u64::MAX).to_be_bytes());
        };
        put32(out, self.if_index);
        put32(out, self.if_type);
        w64(out, self.if_speed);
        put32(out, self.if_direction);
        put32(out, self.if_status);
        w64(out, self.in_octets);
        for v in [
            self.in_ucast_pkts,
            self.in_multicast_pkts,
            self.in_broadcast_pkts,
            self.in_discards,
            self.in_errors,
            self.in_unknown_protos,
        ] {
            w32(out, v);
        }
        w64(out, self.out_octets);
        for v in [
            self.out_ucast_pkts,
            self.out_multicast_pkts,
            self.out_broadcast_pkts,
            self.out_discards,
            self.out_errors,
        ] {
            w32(out, v);
        }
        put32(out, self.promiscuous_mode);
    }
}

// === impl EthernetCounters ===

impl EthernetCounters {
    /// Reads the record's fields; `None` when `data` is shorter than
    /// [`ETHERNET_COUNTERS_LEN`].
    fn read(data: &[u8]) -> Option<Self> {
        let mut r = Reader(data.get(..ETHERNET_COUNTERS_LEN)?);
        Some(Self {
            alignment_errors: r.counter32()?,
            fcs_errors: r.counter32()?,
            single_collision_frames: r.counter32()?,
            multiple_collision_frames: r.counter32()?,
            sqe_test_errors: r.counter32()?,
            deferred_transmissions: r.counter32()?,
            late_collisions: r.counter32()?,
            excessive_collisions: r.counter32()?,
            internal_mac_transmit_errors: r.counter32()?,
            carrier_sense_errors: r.counter32()?,
            frame_too_longs: r.counter32()?,
            internal_mac_receive_errors: r.counter32()?,
            symbol_errors: r.counter32()?,
        })
    }

    /// The thirteen counters in wire order.
    pub fn to_array(&self) -> [Option<u32>; 13] {
        [
            self.alignment_errors,
            self.fcs_errors,
            self.single_collision_frames,
            self.multiple_collision_frames,
            self.sqe_test_errors,
            self.deferred_transmissions,
            self.late_collisions,
            self.excessive_collisions,
            self.internal_mac_transmit_errors,
            self.carrier_sense_errors,
            self.frame_too_longs,
            self.internal_mac_receive_errors,
            self.symbol_errors,
        ]
    }

    /// The counters from thirteen values in wire order ([`Self::to_array`] undone).
    pub fn from_array(values: [Option<u32>; 13]) -> Self {
        let [a, b, c, d, e, f, g, h, i, j, k, l, m] = values;
        Self {
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
        }
    }

    /// Appends the record's [`ETHERNET_COUNTERS_LEN`] bytes of fields (no format or length)
    /// to `out`, `None` as all ones: what the decoder reads back (tests, generators).
    pub fn write(&self, out: &mut Vec<u8>) {
        for v in self.to_array() {
            put32(out, v.unwrap_or(u32::MAX));
        }
    }
}

/// A datagram of `header` (its `samples` field set to the count) holding one standard
/// counter sample (format 2, source type 0) per `(sequence, generic, ethernet)`: the
/// interface's generic record, and its Ethernet record when given. What the decoder reads
/// back; for tests and generators.
pub fn counter_datagram(
    header: &Header,
    samples: &[(u32, &IfCounters, Option<&EthernetCounters>)],
) -> Vec<u8> {
    let mut header = *header;
    header.samples = u32::try_from(samples.len()).unwrap_or(u32::MAX);
    let mut out = header.to_bytes();
    for (sequence, generic, ethernet) in samples {
        let mut records = Vec::with_capacity(IF_COUNTERS_LEN + ETHERNET_COUNTERS_LEN + 16);
        put32(&mut records, FORMAT_IF_COUNTERS);
        put32(&mut records, IF_COUNTERS_LEN as u32);
        generic.write(&mut records);
        if let Some(ethernet) = ethernet {
            put32(&mut records, FORMAT_ETHERNET_COUNTERS);
            put32(&mut records, ETHERNET_COUNTERS_LEN as u32);
            ethernet.write(&mut records);
        }
        put32(&mut out, FORMAT_COUNTER_SAMPLE);
        put32(&mut out, 12 + records.len() as u32);
        put32(&mut out, *sequence);
        put32(&mut out, generic.if_index & 0x00FF_FFFF);
        put32(&mut out, 1 + u32::from(ethernet.is_some()));
        out.extend_from_slice(&records);
    }
    out
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests;
