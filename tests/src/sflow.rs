//! Realistic sFlow v5 datagrams for tests and the benchmark: what hsflowd or a switch sends,
//! not random bytes (size and compressibility depend on content).
//!
//! Each datagram comes from one of several (agent address, sub-agent) streams with its own
//! sequence number, and carries flow samples (sampled Ethernet/IPv4/TCP-or-UDP headers of
//! plausible traffic, with the extended switch record) and interface counter samples, filled
//! up to about 1,400 bytes, the usual agent default. Layout per sFlow v5 (sflow.org
//! SFLOW-DATAGRAM5.txt): big-endian XDR.

use std::net::Ipv4Addr;

/// Bytes a datagram is filled up to (agents' usual default maximum).
pub const TARGET_LEN: usize = 1_400;

/// What the sampled packets carry after their Ethernet, IPv4 and TCP or UDP headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Payload {
    /// Text-like bytes, as in plain HTTP or DNS: compresses far better than real traffic
    /// (the generator's first profile, kept for comparison).
    #[default]
    Text,
    /// Random bytes, as the encrypted payloads (TLS, QUIC, SSH) that most sampled packets
    /// carry today: the headers compress, the payload does not, as in a real capture.
    Random,
}

/// A deterministic source of sFlow v5 datagrams.
#[derive(Debug)]
pub struct SflowGen {
    payload: Payload,
    rng: u64,
    streams: Vec<Stream>,
    next: usize,
    uptime_ms: u32,
}

#[derive(Debug)]
struct Stream {
    agent: Ipv4Addr,
    sub_agent: u32,
    sequence: u32,
    flow_sequence: u32,
    counter_sequence: u32,
    octets: u64,
    packets: u32,
}

impl SflowGen {
    /// `agents` agent addresses (192.0.2.1 …) with `sub_agents` sub-agents each.
    pub fn new(agents: u8, sub_agents: u32, seed: u64) -> Self {
        let mut streams = Vec::new();
        for a in 0..agents.max(1) {
            for s in 0..sub_agents.max(1) {
                streams.push(Stream {
                    agent: Ipv4Addr::new(192, 0, 2, 1 + a),
                    sub_agent: s,
                    sequence: 0,
                    flow_sequence: 0,
                    counter_sequence: 0,
                    octets: 1 << 30,
                    packets: 1 << 20,
                });
            }
        }
        Self {
            payload: Payload::Text,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            streams,
            next: 0,
            uptime_ms: 3_600_000,
        }
    }

    /// One agent at `agent` with `sub_agents` sub-agents: for benchmarks with more distinct
    /// agents than [`new`](Self::new) numbers.
    pub fn for_agent(agent: Ipv4Addr, sub_agents: u32, seed: u64) -> Self {
        let mut generator = Self::new(1, sub_agents, seed);
        for stream in &mut generator.streams {
            stream.agent = agent;
        }
        generator
    }

    /// The same streams, with sampled packets carrying `payload`.
    pub fn with_payload(mut self, payload: Payload) -> Self {
        self.payload = payload;
        self
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The next datagram, round-robin over the streams.
    pub fn datagram(&mut self) -> Vec<u8> {
        let i = self.next;
        self.next = (self.next + 1) % self.streams.len();
        self.uptime_ms = self.uptime_ms.wrapping_add(7);
        self.streams[i].sequence = self.streams[i].sequence.wrapping_add(1);
        let (agent, sub_agent, sequence) = {
            let s = &self.streams[i];
            (s.agent, s.sub_agent, s.sequence)
        };
        let mut samples: Vec<Vec<u8>> = Vec::new();
        let mut len = 28;
        // One counter sample in four datagrams, as counters are polled far less often.
        if sequence.is_multiple_of(4) {
            let c = self.counter_sample(i);
            len += c.len();
            samples.push(c);
        }
        loop {
            let f = self.flow_sample(i);
            if len + f.len() > TARGET_LEN {
                break;
            }
            len += f.len();
            samples.push(f);
        }
        let mut d = Vec::with_capacity(len);
        put(&mut d, 5);
        put(&mut d, 1);
        d.extend_from_slice(&agent.octets());
        put(&mut d, sub_agent);
        put(&mut d, sequence);
        put(&mut d, self.uptime_ms);
        put(&mut d, samples.len() as u32);
        for s in samples {
            d.extend_from_slice(&s);
        }
        d
    }

    fn flow_sample(&mut self, stream: usize) -> Vec<u8> {
        let r = self.rand();
        let s = &mut self.streams[stream];
        s.flow_sequence = s.flow_sequence.wrapping_add(1);
        let flow_sequence = s.flow_sequence;
        let if_index = 1 + (r % 48) as u32;
        let header = self.packet_header();
        let frame_len = header.len() as u32 + (self.rand() % 1400) as u32;
        let mut rec = Vec::new();
        put(&mut rec, 1); // header_protocol: ethernet
        put(&mut rec, frame_len);
        put(&mut rec, 4); // stripped (FCS)
        put(&mut rec, header.len() as u32);
        rec.extend_from_slice(&header);
        while rec.len() % 4 != 0 {
            rec.push(0);
        }
        let mut switch = Vec::new();
        for v in [10 + (r >> 8) as u32 % 4, 0, 10 + (r >> 8) as u32 % 4, 0] {
            put(&mut switch, v);
        }
        let mut body = Vec::new();
        put(&mut body, flow_sequence);
        put(&mut body, if_index); // source id: ifIndex
        put(&mut body, 1_000); // sampling rate
        put(&mut body, flow_sequence.wrapping_mul(1_000)); // sample pool
        put(&mut body, 0); // drops
        put(&mut body, if_index);
        put(&mut body, 1 + (r >> 16) as u32 % 48);
        put(&mut body, 2); // records
        record(&mut body, 1, &rec);
        record(&mut body, 1001, &switch);
        let mut sample = Vec::new();
        record(&mut sample, 1, &body);
        sample
    }

    /// A counter sample of one of the stream's 48 interfaces (ifIndex 1 to 48 for sub-agent
    /// 0, 49 to 96 for sub-agent 1, …: a data source belongs to one sub-agent), with the
    /// generic and the ethernet interface records. Its discards counter starts near 2³² and
    /// wraps within the first 150 samples of a stream; the last interface of each 48 is
    /// administratively up and operationally down.
    fn counter_sample(&mut self, stream: usize) -> Vec<u8> {
        let add = self.rand() % 10_000_000;
        let s = &mut self.streams[stream];
        s.counter_sequence = s.counter_sequence.wrapping_add(1);
        s.octets = s.octets.wrapping_add(add);
        s.packets = s.packets.wrapping_add((add / 900) as u32);
        let (seq, octets, packets) = (s.counter_sequence, s.octets, s.packets);
        let port = seq % 48;
        let if_index = 1 + s.sub_agent * 48 + port;
        let discards = (u32::MAX - 4_000).wrapping_add(seq.wrapping_mul(37));
        let mut c = Vec::new();
        put(&mut c, if_index);
        put(&mut c, 6); // ethernetCsmacd
        put64(&mut c, 10_000_000_000);
        put(&mut c, 1); // full duplex
        put(&mut c, if port == 47 { 1 } else { 3 }); // admin up; oper up but on the last
        put64(&mut c, octets);
        for v in [packets, 1_200 + seq, 300 + seq / 2, discards, seq / 9, 0] {
            put(&mut c, v);
        }
        put64(&mut c, octets / 3 * 2);
        for v in [packets / 3 * 2, 900, 200, seq / 4, 0] {
            put(&mut c, v);
        }
        put(&mut c, 0); // promiscuous mode: off
        // dot3Stats: alignment, FCS, single, multiple collision, SQE test, deferred, late,
        // excessive collisions, internal MAC transmit, carrier sense, frame too long,
        // internal MAC receive, symbol errors.
        let mut e = Vec::new();
        for v in [
            seq / 7,
            seq * 3,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            seq / 5,
            0,
            seq / 3,
        ] {
            put(&mut e, v);
        }
        let mut body = Vec::new();
        put(&mut body, seq);
        put(&mut body, if_index);
        put(&mut body, 2);
        record(&mut body, 1, &c);
        record(&mut body, 2, &e);
        let mut sample = Vec::new();
        record(&mut sample, 2, &body);
        sample
    }

    /// 128 bytes of an Ethernet/IPv4/TCP or UDP packet between a few hosts.
    fn packet_header(&mut self) -> Vec<u8> {
        let r = self.rand();
        let mut h = Vec::with_capacity(128);
        h.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, (r & 0x0f) as u8, 0x01]);
        h.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, ((r >> 4) & 0x0f) as u8, 0x02]);
        h.extend_from_slice(&[0x08, 0x00]);
        let tcp = !r.is_multiple_of(5);
        let total: u16 = 40 + (r >> 20) as u16 % 1400;
        h.extend_from_slice(&[0x45, 0x00]);
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&((r >> 32) as u16).to_be_bytes());
        h.extend_from_slice(&[0x40, 0x00, 64, if tcp { 6 } else { 17 }, 0x00, 0x00]);
        h.extend_from_slice(&[10, 0, (r >> 40) as u8 % 4, 1 + (r >> 44) as u8 % 200]);
        h.extend_from_slice(&[10, 1, (r >> 48) as u8 % 4, 1 + (r >> 52) as u8 % 200]);
        let ports: [u16; 6] = [443, 80, 53, 22, 8080, 6343];
        let dport = ports[(r >> 56) as usize % ports.len()];
        h.extend_from_slice(&(32_768 + (r >> 16) as u16 % 28_000).to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        if tcp {
            h.extend_from_slice(&((r >> 8) as u32).to_be_bytes());
            h.extend_from_slice(&((r >> 24) as u32).to_be_bytes());
            h.extend_from_slice(&[0x50, 0x18, 0x01, 0xf6, 0, 0, 0, 0]);
        } else {
            h.extend_from_slice(&(total - 20).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
        }
        match self.payload {
            Payload::Text => {
                const TEXT: &[u8] =
                    b"GET /api/v1/metrics HTTP/1.1\r\nHost: example.net\r\nAccept: */*\r\n";
                let mut i = (r % 17) as usize;
                while h.len() < 128 {
                    h.push(TEXT[i % TEXT.len()]);
                    i += 1;
                }
            }
            Payload::Random => {
                while h.len() < 128 {
                    let word = self.rand().to_le_bytes();
                    let take = (128 - h.len()).min(word.len());
                    h.extend_from_slice(&word[..take]);
                }
            }
        }
        h
    }
}

fn put(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn record(buf: &mut Vec<u8>, format: u32, data: &[u8]) {
    put(buf, format);
    put(buf, data.len() as u32);
    buf.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(d: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(d[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn datagrams_are_sflow_v5_near_1400_bytes_with_per_stream_sequences() {
        let mut g = SflowGen::new(2, 2, 1);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..400 {
            let d = g.datagram();
            assert!((1_100..=TARGET_LEN).contains(&d.len()), "{}", d.len());
            assert_eq!(u32_at(&d, 0), 5);
            assert_eq!(u32_at(&d, 4), 1);
            let key = (d[8..12].to_vec(), u32_at(&d, 12));
            let seq = u32_at(&d, 16);
            let last = seen.insert(key, seq).unwrap_or(0);
            assert_eq!(seq, last + 1, "sequence +1 per stream");
            // Walk the samples: the lengths must add up exactly.
            let mut at = 28;
            for _ in 0..u32_at(&d, 24) {
                let len = u32_at(&d, at + 4) as usize;
                at += 8 + len;
            }
            assert_eq!(at, d.len());
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn random_payloads_compress_as_real_traffic_does_and_text_far_better() {
        let ratio = |payload| {
            let mut g = SflowGen::new(2, 2, 1).with_payload(payload);
            let all: Vec<u8> = (0..500).flat_map(|_| g.datagram()).collect();
            zstd::bulk::compress(&all, 1).unwrap().len() as f64 / all.len() as f64
        };
        let (random, text) = (ratio(Payload::Random), ratio(Payload::Text));
        println!("one-shot zstd -1: random payloads {random:.3}, text payloads {text:.3}");
        // A real capture (pmacctd, hsflowd, sflowtool) gave 0.44 with one-shot zstd -1.
        assert!(
            (0.35..0.8).contains(&random),
            "random payloads: {random:.3}"
        );
        assert!(text < 0.3, "text payloads: {text:.3}");
    }

    #[test]
    fn sampled_payloads_are_the_bytes_after_each_sampled_packets_headers() {
        let mut g = SflowGen::new(2, 2, 1).with_payload(Payload::Random);
        for _ in 0..200 {
            let d = g.datagram();
            let payloads = sampled_payloads(&d);
            let flow_samples = {
                let mut at = 28;
                let mut n = 0;
                for _ in 0..u32_at(&d, 24) {
                    n += usize::from(u32_at(&d, at) == 1);
                    at += 8 + u32_at(&d, at + 4) as usize;
                }
                n
            };
            assert_eq!(payloads.len(), flow_samples);
            for &(start, end) in &payloads {
                // The 128-byte header's Ethernet (14), IPv4 (20) and TCP (20) or UDP (8).
                let len = end - start;
                assert!(len == 128 - 54 || len == 128 - 42, "{len}");
                // Its frame begins 14 + 20 + (20 or 8) bytes before, with the IPv4 ethertype.
                let frame = start - (128 - len);
                assert_eq!(d[frame + 12..frame + 14], [0x08, 0x00]);
            }
        }
        assert!(sampled_payloads(b"not sflow").is_empty());
        let d = g.datagram();
        assert!(
            sampled_payloads(&d[..d.len() - 200]).is_empty(),
            "truncated"
        );
    }
}

/// Who sent an sFlow v5 datagram and its place in that sender's stream: (agent address,
/// sub-agent, sequence number), read from the datagram header.
pub fn stream_position(datagram: &[u8]) -> Option<(Ipv4Addr, u32, u32)> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            datagram.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    if word(0)? != 5 || word(4)? != 1 {
        return None;
    }
    let agent = Ipv4Addr::from(word(8)?);
    Some((agent, word(12)?, word(16)?))
}

/// The payloads of the packets an sFlow v5 datagram samples: in each flow sample's
/// sampled-header record of an Ethernet frame, the bytes after its IPv4 and TCP or UDP
/// headers, as (start, end) offsets into `datagram`, in order. What cannot be walked
/// (another layout, a truncated record) has none.
///
/// With [`Payload::Random`] these are the generator's random bytes: what no compressor can
/// shrink, and what an sFlow-aware one could at best pass through while it models the rest.
pub fn sampled_payloads(datagram: &[u8]) -> Vec<(usize, usize)> {
    walk_sampled_payloads(datagram).unwrap_or_default()
}

/// [`sampled_payloads`]; `None` where the walk breaks off.
fn walk_sampled_payloads(datagram: &[u8]) -> Option<Vec<(usize, usize)>> {
    let word = |at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(datagram.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let header = proto::sflow::parse_header(datagram).ok()?;
    let mut at = match header.agent {
        std::net::IpAddr::V4(_) => proto::sflow::HEADER_LEN_IPV4,
        std::net::IpAddr::V6(_) => proto::sflow::HEADER_LEN_IPV6,
    };
    let mut found = Vec::new();
    for _ in 0..header.samples {
        let (format, len) = (word(at)?, word(at + 4)?);
        if format == 1 {
            // Flow sample: seven fields, the number of records, then the records.
            let mut rec = at + 8 + 32;
            for _ in 0..word(rec - 4)? {
                let (rec_format, rec_len) = (word(rec)?, word(rec + 4)?);
                let data = rec + 8;
                // A sampled header of an Ethernet frame: four fields, then the frame's bytes.
                if rec_format == 1 && word(data)? == 1 {
                    let frame = data + 16;
                    let frame_end = frame.checked_add(word(data + 12)?)?;
                    if let Some(payload) = ipv4_payload(datagram.get(frame..frame_end)?) {
                        found.push((frame + payload, frame_end));
                    }
                }
                rec = data.checked_add(rec_len)?;
            }
        }
        at = (at + 8).checked_add(len)?;
    }
    Some(found)
}

/// Where the payload begins in an Ethernet frame's first bytes carrying IPv4 and TCP or UDP.
fn ipv4_payload(frame: &[u8]) -> Option<usize> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = 14;
    let ihl = usize::from(frame.get(ip)? & 0x0f) * 4;
    let l4 = ip + ihl;
    let end = match frame.get(ip + 9)? {
        6 => l4 + usize::from(frame.get(l4 + 12)? >> 4) * 4,
        17 => l4 + 8,
        _ => return None,
    };
    (end <= frame.len()).then_some(end)
}

/// What a collector would see of the streams: per (agent, sub-agent), datagrams missing,
/// received more than once, and received after a later one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// Sent, never received.
    pub missing: usize,
    /// Received copies beyond the first.
    pub duplicated: usize,
    /// Received with a lower sequence number than one received before it (first copies).
    pub out_of_order: usize,
    /// Received, not sent (garbage or another test's traffic).
    pub unexpected: usize,
}

impl StreamReport {
    /// Compares what was `sent` with what was `received`, stream by stream.
    pub fn of(sent: &[Vec<u8>], received: &[Vec<u8>]) -> Self {
        let sent: Vec<_> = sent
            .iter()
            .map(|d| stream_position(d).expect("sent datagrams are sFlow"))
            .collect();
        let mut not_sflow = 0;
        let received: Vec<_> = received
            .iter()
            .filter_map(|d| {
                let position = stream_position(d);
                not_sflow += usize::from(position.is_none());
                position
            })
            .collect();
        let mut report = Self::of_positions(&sent, &received);
        report.unexpected += not_sflow;
        report
    }

    /// As [`of`](Self::of), from the datagrams' places in their streams (see
    /// [`crate::stream`]).
    pub fn of_positions(sent: &[(Ipv4Addr, u32, u32)], received: &[(Ipv4Addr, u32, u32)]) -> Self {
        use std::collections::{HashMap, HashSet};
        let expected: HashSet<(Ipv4Addr, u32, u32)> = sent.iter().copied().collect();
        let mut seen: HashSet<(Ipv4Addr, u32, u32)> = HashSet::new();
        let mut last: HashMap<(Ipv4Addr, u32), u32> = HashMap::new();
        let mut report = Self::default();
        for &key in received {
            if !expected.contains(&key) {
                report.unexpected += 1;
                continue;
            }
            if !seen.insert(key) {
                report.duplicated += 1;
                continue;
            }
            let stream = (key.0, key.1);
            if last.get(&stream).is_some_and(|&l| key.2 < l) {
                report.out_of_order += 1;
            }
            last.insert(stream, key.2.max(last.get(&stream).copied().unwrap_or(0)));
        }
        report.missing = expected.len() - seen.len();
        report
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn the_report_finds_missing_duplicated_and_reordered_datagrams() {
        let mut sflow = SflowGen::new(2, 1, 1);
        let sent: Vec<Vec<u8>> = (0..10).map(|_| sflow.datagram()).collect();
        assert_eq!(StreamReport::of(&sent, &sent), StreamReport::default());
        let mut received = sent.clone();
        received.remove(3);
        received.push(sent[0].clone());
        received.swap(4, 6);
        received.push(b"garbage".to_vec());
        let report = StreamReport::of(&sent, &received);
        assert_eq!(
            report,
            StreamReport {
                missing: 1,
                duplicated: 1,
                out_of_order: 1,
                unexpected: 1
            }
        );
    }
}
