//! The disk spool: append-only segment files of checksummed batch records, in the order the
//! batches were made. It is the backlog's copy on disk: every batch for a sink is written here
//! as it is made and the segment is deleted once the sink has acknowledged all of it.
//!
//! Written at once, deleted once acknowledged: in normal operation a segment lives a fraction
//! of a second and is deleted before the kernel writes it back (dirty pages are written after
//! 30 s by default), so a healthy link costs the disk next to nothing, while a crash of the
//! agent (even `kill -9`) loses none of what was written, since the page cache survives the
//! process. (A crash of the machine itself can lose what was not yet written back.)
//!
//! ```text
//! segment-00000000000000000042.spool:
//!   record: magic "SFR1" | len u32 | crc32 u32 | id u64 | session u64 | sequence u64
//!           | datagrams u32 | unix_ms u64 | frame (len bytes)        (little-endian)
//! ```
//!
//! A file `acknowledged` holds the id of the last record the sink acknowledged (8 bytes,
//! rewritten on each acknowledgement), so that a restart does not resend the acknowledged
//! part of a segment.
//!
//! The CRC covers everything after itself. On start, each segment is read through: a record
//! that runs past the end of the file is a torn tail (the agent died mid-write), cut off and
//! counted; a bad magic or checksum inside the file makes the segment corrupt, renamed to
//! `.corrupt` (kept for inspection, never read again) and counted. Neither stops the agent.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

const MAGIC: &[u8; 4] = b"SFR1";
const HEADER_LEN: usize = 48;
/// A segment is closed and a new one begun beyond this size: the unit of deletion.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// What a record says about its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) id: u64,
    pub(crate) session: u64,
    pub(crate) sequence: u64,
    pub(crate) datagrams: u32,
    pub(crate) unix_ms: u64,
}

/// Where a record's frame lies.
#[derive(Debug, Clone, Copy)]
struct Location {
    segment: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    number: u64,
    path: PathBuf,
    bytes: u64,
    last_id: u64,
    /// Creation time of its newest record.
    newest_unix_ms: u64,
    /// Datagrams in its records.
    datagrams: u64,
}

/// What loading found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// The records, oldest first.
    pub(crate) records: Vec<Meta>,
    /// Segments whose torn tail was cut.
    pub(crate) torn_tails: u64,
    /// Segments set aside as corrupt.
    pub(crate) corrupt_segments: u64,
}

/// The spool of one sink.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    locations: VecDeque<(u64, Location)>,
    current: Option<File>,
    bytes: u64,
    acknowledged: File,
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("segment-{number:020}.spool"))
}

impl Spool {
    /// Opens (creating) `dir` and reads what an earlier run left there.
    pub(crate) fn open(dir: &Path) -> std::io::Result<(Self, Loaded)> {
        std::fs::create_dir_all(dir)?;
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                // (`acknowledged` and `.corrupt` files are not segments.)
                let name = name.to_str()?;
                name.strip_prefix("segment-")?
                    .strip_suffix(".spool")?
                    .parse()
                    .ok()
            })
            .collect();
        numbers.sort_unstable();
        let mut acknowledged = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("acknowledged"))?;
        let mut mark = [0u8; 8];
        let acked = match acknowledged.read_exact(&mut mark) {
            Ok(()) => u64::from_le_bytes(mark),
            Err(_) => 0,
        };
        let mut spool = Self {
            dir: dir.to_owned(),
            segments: VecDeque::new(),
            locations: VecDeque::new(),
            current: None,
            bytes: 0,
            acknowledged,
        };
        let mut loaded = Loaded::default();
        for number in numbers {
            spool.load_segment(number, &mut loaded)?;
        }
        loaded.records.retain(|m| m.id > acked);
        while spool.locations.front().is_some_and(|(id, _)| *id <= acked) {
            spool.locations.pop_front();
        }
        Ok((spool, loaded))
    }

    fn load_segment(&mut self, number: u64, loaded: &mut Loaded) -> std::io::Result<()> {
        let path = segment_path(&self.dir, number);
        let data = std::fs::read(&path)?;
        let mut offset = 0usize;
        let mut records = Vec::new();
        let mut locations = Vec::new();
        let mut corrupt = false;
        while offset < data.len() {
            let rest = &data[offset..];
            if rest.len() < HEADER_LEN {
                loaded.torn_tails += 1;
                break;
            }
            let len = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
            if &rest[..4] != MAGIC {
                corrupt = true;
                break;
            }
            if rest.len() < HEADER_LEN + len {
                loaded.torn_tails += 1;
                break;
            }
            let crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
            if crc32fast::hash(&rest[12..HEADER_LEN + len]) != crc {
                corrupt = true;
                break;
            }
            let field = |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().expect("8"));
            let meta = Meta {
                id: field(12),
                session: field(20),
                sequence: field(28),
                datagrams: u32::from_le_bytes(rest[36..40].try_into().expect("4 bytes")),
                unix_ms: field(40),
            };
            records.push(meta);
            locations.push((
                meta.id,
                Location {
                    segment: number,
                    offset: (offset + HEADER_LEN) as u64,
                    len: len as u32,
                },
            ));
            offset += HEADER_LEN + len;
        }
        if corrupt {
            let aside = path.with_extension("corrupt");
            std::fs::rename(&path, &aside)?;
            tracing::error!(segment = %path.display(), set_aside_as = %aside.display(), "spool segment is corrupt (bad checksum or record header): set aside, its batches are not relayed");
            loaded.corrupt_segments += 1;
            return Ok(());
        }
        if offset < data.len() {
            tracing::warn!(segment = %path.display(), cut_bytes = data.len() - offset, "spool segment ends in a torn record (the agent stopped mid-write): cut off");
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(offset as u64)?;
        }
        let Some(last) = records.last() else {
            std::fs::remove_file(&path)?;
            return Ok(());
        };
        self.segments.push_back(Segment {
            number,
            path,
            bytes: offset as u64,
            last_id: last.id,
            newest_unix_ms: last.unix_ms,
            datagrams: records.iter().map(|m| u64::from(m.datagrams)).sum(),
        });
        self.bytes += offset as u64;
        self.locations.extend(locations);
        loaded.records.extend(records);
        Ok(())
    }

    /// Bytes on disk.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends a record. On error (a full disk, say) nothing of it stays in the spool.
    pub(crate) fn append(&mut self, meta: Meta, frame: &[u8]) -> std::io::Result<()> {
        let need_new = match self.segments.back() {
            None => true,
            Some(segment) => self.current.is_none() || segment.bytes >= SEGMENT_BYTES,
        };
        if need_new {
            let number = self.segments.back().map_or(0, |s| s.number + 1);
            let path = segment_path(&self.dir, number);
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)?;
            self.current = Some(file);
            self.segments.push_back(Segment {
                number,
                path,
                bytes: 0,
                last_id: meta.id,
                newest_unix_ms: meta.unix_ms,
                datagrams: 0,
            });
        }
        let segment = self.segments.back_mut().expect("a segment");
        let file = self.current.as_mut().expect("an open segment");
        let mut record = Vec::with_capacity(HEADER_LEN + frame.len());
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        record.extend_from_slice(&[0; 4]);
        record.extend_from_slice(&meta.id.to_le_bytes());
        record.extend_from_slice(&meta.session.to_le_bytes());
        record.extend_from_slice(&meta.sequence.to_le_bytes());
        record.extend_from_slice(&meta.datagrams.to_le_bytes());
        record.extend_from_slice(&meta.unix_ms.to_le_bytes());
        record.extend_from_slice(frame);
        let crc = crc32fast::hash(&record[12..]);
        record[8..12].copy_from_slice(&crc.to_le_bytes());
        if let Err(error) = file.write_all(&record) {
            // Cut what part of the record made it, so the segment stays readable; if even
            // that fails, start a new segment next time (loading will cut the torn tail).
            if file.set_len(segment.bytes).is_err() || file.seek(SeekFrom::End(0)).is_err() {
                self.current = None;
            }
            return Err(error);
        }
        self.locations.push_back((
            meta.id,
            Location {
                segment: segment.number,
                offset: segment.bytes + HEADER_LEN as u64,
                len: frame.len() as u32,
            },
        ));
        segment.bytes += record.len() as u64;
        segment.last_id = meta.id;
        segment.newest_unix_ms = meta.unix_ms;
        segment.datagrams += u64::from(meta.datagrams);
        self.bytes += record.len() as u64;
        Ok(())
    }

    /// Reads the frame of record `id` back.
    pub(crate) fn read(&self, id: u64) -> std::io::Result<Bytes> {
        let index = self
            .locations
            .binary_search_by_key(&id, |(id, _)| *id)
            .map_err(|_| std::io::Error::other(format!("record {id} is not in the spool")))?;
        let location = self.locations[index].1;
        let mut file = File::open(segment_path(&self.dir, location.segment))?;
        file.seek(SeekFrom::Start(location.offset))?;
        let mut frame = vec![0; location.len as usize];
        file.read_exact(&mut frame)?;
        Ok(frame.into())
    }

    /// Deletes the segments whose records all have ids up to `id`, and remembers `id`.
    pub(crate) fn release_through(&mut self, id: u64) {
        if let Err(error) = self
            .acknowledged
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.acknowledged.write_all(&id.to_le_bytes()))
        {
            tracing::warn!(%error, "cannot record the acknowledged position in the spool");
        }
        while let Some(segment) = self.segments.front() {
            let last = self.segments.len() == 1;
            if segment.last_id > id || (last && self.current.is_some()) {
                break;
            }
            self.drop_front();
        }
        while self.locations.front().is_some_and(|(rid, _)| *rid <= id) {
            self.locations.pop_front();
        }
        // The segment being written is deleted too once all of it is acknowledged and it is
        // large enough to be worth a new file.
        if let Some(segment) = self.segments.front()
            && self.segments.len() == 1
            && segment.last_id <= id
            && segment.bytes >= SEGMENT_BYTES / 8
        {
            self.drop_front();
            self.current = None;
        }
    }

    /// Drops the oldest segment, acknowledged or not. Returns (last id, datagrams) of what it
    /// held.
    pub(crate) fn drop_oldest(&mut self) -> Option<(u64, u64)> {
        let segment = self.segments.front()?;
        let dropped = (segment.last_id, segment.datagrams);
        if self.segments.len() == 1 {
            self.current = None;
        }
        self.drop_front();
        while self
            .locations
            .front()
            .is_some_and(|(rid, _)| *rid <= dropped.0)
        {
            self.locations.pop_front();
        }
        Some(dropped)
    }

    /// Creation time of the oldest segment's newest record.
    pub(crate) fn oldest_newest_unix_ms(&self) -> Option<u64> {
        self.segments.front().map(|s| s.newest_unix_ms)
    }

    fn drop_front(&mut self) {
        if let Some(segment) = self.segments.pop_front() {
            self.bytes -= segment.bytes;
            if let Err(error) = std::fs::remove_file(&segment.path) {
                tracing::warn!(segment = %segment.path.display(), %error, "cannot delete spool segment");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: u64) -> Meta {
        Meta {
            id,
            session: 9,
            sequence: id,
            datagrams: 2,
            unix_ms: 1_000 + id,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_read_back_byte_exact() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, loaded) = Spool::open(dir.path()).unwrap();
        assert!(loaded.records.is_empty());
        for id in 1..=5 {
            spool.append(meta(id), &[id as u8; 300]).unwrap();
        }
        assert_eq!(&spool.read(3).unwrap()[..], &[3u8; 300][..]);
        drop(spool);
        let (spool, loaded) = Spool::open(dir.path()).unwrap();
        assert_eq!(loaded.records, (1..=5).map(meta).collect::<Vec<_>>());
        assert_eq!((loaded.torn_tails, loaded.corrupt_segments), (0, 0));
        assert_eq!(&spool.read(5).unwrap()[..], &[5u8; 300][..]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        for id in 1..=3 {
            spool.append(meta(id), &[7; 100]).unwrap();
        }
        drop(spool);
        let path = segment_path(dir.path(), 0);
        let full = std::fs::metadata(&path).unwrap().len();
        // Every cut inside the last record leaves the first two.
        for cut in 1..(HEADER_LEN as u64 + 100) {
            let copy = tempfile::tempdir().unwrap();
            let data = std::fs::read(&path).unwrap();
            std::fs::write(segment_path(copy.path(), 0), &data[..(full - cut) as usize]).unwrap();
            let (_, loaded) = Spool::open(copy.path()).unwrap();
            assert_eq!(loaded.records.len(), 2, "cut {cut}");
            assert_eq!(loaded.torn_tails, 1, "cut {cut}");
            assert_eq!(
                std::fs::metadata(segment_path(copy.path(), 0))
                    .unwrap()
                    .len(),
                full - (HEADER_LEN as u64 + 100),
                "the torn record is cut off the file"
            );
        }
    }

    #[test]
    fn a_corrupt_segment_is_set_aside_and_later_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.append(meta(1), &[1; 100]).unwrap();
        drop(spool);
        // A second segment, as a later run would have made.
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.append(meta(2), &[2; 100]).unwrap();
        drop(spool);
        let first = segment_path(dir.path(), 0);
        let mut data = std::fs::read(&first).unwrap();
        data[HEADER_LEN + 10] ^= 0xFF;
        std::fs::write(&first, data).unwrap();
        let (spool, loaded) = Spool::open(dir.path()).unwrap();
        assert_eq!(loaded.corrupt_segments, 1);
        assert_eq!(loaded.records, vec![meta(2)]);
        assert!(first.with_extension("corrupt").exists());
        assert_eq!(&spool.read(2).unwrap()[..], &[2u8; 100][..]);
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_oldest_can_be_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        let frame = vec![0u8; 1024 * 1024];
        for id in 1..=20 {
            spool.append(meta(id), &frame).unwrap();
        }
        let segments = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "spool")
                })
                .count()
        };
        assert!(segments(dir.path()) >= 2);
        let before = spool.bytes();
        spool.release_through(8);
        assert!(spool.bytes() < before);
        assert!(spool.read(9).is_ok());
        let (last, datagrams) = spool.drop_oldest().unwrap();
        assert!(last >= 9);
        assert_eq!(datagrams % 2, 0);
        assert!(spool.read(last).is_err());
        spool.release_through(20);
        assert_eq!(spool.bytes(), 0);
        assert_eq!(segments(dir.path()), 0);
    }
}
