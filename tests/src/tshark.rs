//! Wireshark's own reading of sFlow datagrams, as an independent truth: [`write_pcap`] puts
//! datagrams in a capture file, [`fields`] has `tshark -T fields` decode them.
//!
//! Needs `tshark` (Debian package tshark; `tests/run.sh` installs it as root). [`available`]
//! says why it cannot run, so a test can skip with that reason where it may.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

/// The pcap link type of a raw IPv4 or IPv6 packet, no link-layer header.
const LINKTYPE_RAW: u32 = 101;

/// The port the datagrams are addressed to in the capture: sFlow's, which tshark decodes as
/// sFlow without being told.
pub const SFLOW_PORT: u16 = 6343;

/// Whether `tshark` runs here; the reason when it does not.
pub fn available() -> Result<(), String> {
    match Command::new("tshark").arg("-v").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`tshark -v` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "tshark is not installed ({e}; Debian: apt-get install tshark, which tests/run.sh \
             does as root)"
        )),
    }
}

/// Writes `datagrams` to `path` as a pcap file: each one the payload of an IPv4/UDP packet
/// from `from` to 127.0.0.1:[`SFLOW_PORT`], one millisecond apart.
pub fn write_pcap(path: &Path, from: Ipv4Addr, datagrams: &[Vec<u8>]) -> io::Result<()> {
    let mut out = io::BufWriter::new(std::fs::File::create(path)?);
    // Global header: magic, version 2.4, time zone 0, accuracy 0, snapshot length, link type.
    out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
    out.write_all(&2u16.to_le_bytes())?;
    out.write_all(&4u16.to_le_bytes())?;
    out.write_all(&[0; 8])?;
    out.write_all(&65_535u32.to_le_bytes())?;
    out.write_all(&LINKTYPE_RAW.to_le_bytes())?;
    for (i, payload) in datagrams.iter().enumerate() {
        let packet = udp_packet(from, i as u16, payload)?;
        let (seconds, micros) = (i / 1_000, (i % 1_000) * 1_000);
        for word in [seconds, micros, packet.len(), packet.len()] {
            out.write_all(&(word as u32).to_le_bytes())?;
        }
        out.write_all(&packet)?;
    }
    out.flush()
}

/// An IPv4 header (with its checksum) and a UDP header (no checksum) around `payload`.
fn udp_packet(from: Ipv4Addr, id: u16, payload: &[u8]) -> io::Result<Vec<u8>> {
    let total = u16::try_from(20 + 8 + payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "datagram over 65,507 bytes"))?;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&Ipv4Addr::LOCALHOST.octets());
    let sum = p
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !((folded & 0xffff) + (folded >> 16)) as u16;
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p.extend_from_slice(&SFLOW_PORT.to_be_bytes());
    p.extend_from_slice(&SFLOW_PORT.to_be_bytes());
    p.extend_from_slice(&(total - 20).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    Ok(p)
}

/// `tshark -T fields` over the capture at `pcap`: per packet, per field of `names`, every
/// occurrence of that field in the packet, in order (a datagram with two counter samples
/// has two values of `sflow_245.ifindex`). Sampled packet headers inside flow samples are
/// not decoded (`sflow.enable_dissection:FALSE`), so a sampled sFlow packet does not add
/// fields of its own.
pub fn fields(pcap: &Path, names: &[&str]) -> Result<Vec<Vec<Vec<String>>>, String> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r"])
        .arg(pcap)
        .args(["-o", "sflow.enable_dissection:FALSE", "-T", "fields"])
        .args([
            "-E",
            "separator=/t",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=,",
        ]);
    for name in names {
        cmd.args(["-e", name]);
    }
    let out = cmd.output().map_err(|e| format!("run tshark: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tshark failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8(out.stdout).map_err(|e| format!("tshark output: {e}"))?;
    Ok(text
        .lines()
        .map(|line| {
            let mut columns: Vec<Vec<String>> = line
                .split('\t')
                .map(|column| {
                    column
                        .split(',')
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .collect();
            columns.resize(names.len(), Vec::new());
            columns
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_checksum_of_a_packet_sums_to_all_ones() {
        let p = udp_packet(Ipv4Addr::new(10, 0, 0, 1), 7, &[1, 2, 3]).unwrap();
        let sum: u32 = p[..20]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 8 + 3);
    }

    #[test]
    fn tshark_reads_the_header_of_a_written_datagram() {
        if let Err(why) = available() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("one.pcap");
        let mut d = Vec::new();
        for word in [5u32, 1, 0xc000_0207, 3, 42, 9_000, 0] {
            d.extend_from_slice(&word.to_be_bytes());
        }
        write_pcap(&file, Ipv4Addr::new(127, 0, 0, 2), &[d.clone(), d]).unwrap();
        let rows = fields(
            &file,
            &[
                "sflow_245.agent",
                "sflow_245.sub_agent_id",
                "sflow_245.sequence_number",
                "sflow_245.ifindex",
            ],
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][0], ["192.0.2.7"]);
        assert_eq!(rows[0][1], ["3"]);
        assert_eq!(rows[0][2], ["42"]);
        assert!(rows[0][3].is_empty());
    }
}
