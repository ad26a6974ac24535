//! A sink's backlog: every batch made for the sink and not yet acknowledged by it, oldest
//! first, in memory and (with `--spool-dir`) on disk.
//!
//! The batcher's intake task appends; the sink's link reads from any point (after a reconnect
//! it starts again at the oldest unacknowledged batch) and releases what the sink
//! acknowledged. Bounds:
//!
//! - memory: at most `memory_bytes` of frames (plus [`ENTRY_OVERHEAD`] of bookkeeping per
//!   batch, so many small batches are bounded as well as a few large ones) are held in
//!   memory. Beyond that, the oldest frames already on disk are let go from memory (read back
//!   when needed); without a spool, the oldest batches are dropped.
//! - disk: at most `spool_max_bytes`, and nothing older than `spool_max_age`; beyond that the
//!   oldest segment is dropped.
//!
//! Every drop is counted (`dropped_backlog_full`, in datagrams) and logged, rate-limited.
//! A spool write that fails (a full disk) is counted and logged; the batch is kept in memory
//! only, so live data keeps flowing.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use runtime::ratelimit::RateLimit;
use tokio::sync::Notify;

use crate::batch::Frame;
use crate::metrics::{DropReason, SinkMetrics};
use crate::spool::{Meta, Spool};

/// Memory counted per batch held, besides its frame: the entry, the frame's allocation and
/// the queue's slot, rounded up.
pub(crate) const ENTRY_OVERHEAD: usize = 128;

/// A batch as the link sees it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) id: u64,
    pub(crate) session: u64,
    pub(crate) sequence: u64,
    pub(crate) datagrams: u64,
    /// Length prefix and protobuf body.
    pub(crate) bytes: Bytes,
    /// When the batch was appended, Unix milliseconds.
    pub(crate) unix_ms: u64,
    /// Read back from the spool (let go from memory, or left by an earlier run).
    pub(crate) from_disk: bool,
}

#[derive(Debug)]
struct Entry {
    meta: Meta,
    /// `None` once let go from memory (it is on disk).
    bytes: Option<Bytes>,
    on_disk: bool,
}

impl Entry {
    /// What it counts against the memory limit.
    fn memory(&self) -> usize {
        self.bytes.as_ref().map_or(0, |b| b.len() + ENTRY_OVERHEAD)
    }
}

/// Limits of a backlog.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) memory_bytes: usize,
    pub(crate) spool_max_bytes: u64,
    pub(crate) spool_max_age: Duration,
}

#[derive(Debug)]
struct Inner {
    entries: VecDeque<Entry>,
    /// Entries before this index hold no bytes in memory.
    first_in_memory: usize,
    /// What the entries from `first_in_memory` on hold in memory, with [`ENTRY_OVERHEAD`].
    memory_bytes: usize,
    next_id: u64,
    spool: Option<Spool>,
    closed: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Backlog {
    inner: Mutex<Inner>,
    grew: Notify,
    limits: Limits,
    metrics: Arc<SinkMetrics>,
    name: String,
    drops: RateLimit,
    write_errors: RateLimit,
    /// Datagrams appended since the backlog was opened (the live rate's clock; read on every
    /// send, so kept outside the lock).
    appended_datagrams: AtomicU64,
    /// Whether the link has a connection to send on: while it has none, what is appended
    /// waits, and is compressed on the way in (see `links::intake`).
    sending: AtomicBool,
}

/// Now, Unix milliseconds (the clock of [`Record::unix_ms`]).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Backlog {
    /// A backlog for the sink `name`, with its spool in `spool_dir` (loading what an earlier
    /// run left there), or in memory only.
    pub(crate) fn open(
        name: &str,
        spool_dir: Option<&Path>,
        limits: Limits,
        metrics: Arc<SinkMetrics>,
    ) -> std::io::Result<Self> {
        let mut entries = VecDeque::new();
        let mut next_id = 1;
        let spool = match spool_dir {
            None => None,
            Some(dir) => {
                let (spool, loaded) = Spool::open(dir)?;
                metrics.spool_torn_tails.inc_by(loaded.torn_tails);
                metrics
                    .spool_corrupt_segments
                    .inc_by(loaded.corrupt_segments);
                if !loaded.records.is_empty() {
                    tracing::info!(
                        sink = name,
                        spool = %dir.display(),
                        batches = loaded.records.len(),
                        datagrams = loaded.records.iter().map(|m| u64::from(m.datagrams)).sum::<u64>(),
                        bytes = spool.bytes(),
                        "spool holds batches from an earlier run: they go first"
                    );
                }
                for meta in loaded.records {
                    next_id = meta.id + 1;
                    entries.push_back(Entry {
                        meta,
                        bytes: None,
                        on_disk: true,
                    });
                }
                Some(spool)
            }
        };
        let first_in_memory = entries.len();
        let backlog = Self {
            inner: Mutex::new(Inner {
                entries,
                first_in_memory,
                memory_bytes: 0,
                next_id,
                spool,
                closed: false,
            }),
            grew: Notify::new(),
            appended_datagrams: AtomicU64::new(0),
            sending: AtomicBool::new(false),
            limits,
            metrics,
            name: name.to_owned(),
            drops: RateLimit::new(Duration::from_secs(10)),
            write_errors: RateLimit::new(Duration::from_secs(10)),
        };
        {
            // What an earlier run left may already be too old or too much.
            let mut inner = backlog.lock();
            backlog.enforce_limits(&mut inner);
            backlog.update_gauges(&inner);
        }
        Ok(backlog)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a batch (writing it to the spool first, when there is one), then enforces the
    /// limits.
    pub(crate) fn append(&self, frame: Frame) {
        let mut inner = self.lock();
        if inner.closed {
            // Closed: the agent is shutting down, or the sink's feed has ended (discarded).
            return;
        }
        let meta = Meta {
            id: inner.next_id,
            session: frame.session,
            sequence: frame.sequence,
            datagrams: frame.datagrams as u32,
            unix_ms: now_ms(),
        };
        inner.next_id += 1;
        self.appended_datagrams
            .fetch_add(frame.datagrams, Ordering::Relaxed);
        inner.memory_bytes += frame.bytes.len() + ENTRY_OVERHEAD;
        let on_disk = match &mut inner.spool {
            None => false,
            Some(spool) => match spool.append(meta, &frame.bytes) {
                Ok(()) => true,
                Err(error) => {
                    self.metrics.spool_write_errors.inc();
                    if let Some(more) = self.write_errors.check() {
                        tracing::error!(
                            sink = %self.name,
                            %error,
                            earlier_errors_not_logged = more,
                            "cannot write to the spool: batch kept in memory only (lost if the agent stops before the sink has it)"
                        );
                    }
                    false
                }
            },
        };
        inner.entries.push_back(Entry {
            meta,
            bytes: Some(frame.bytes),
            on_disk,
        });
        self.enforce_limits(&mut inner);
        self.update_gauges(&inner);
        drop(inner);
        self.grew.notify_waiters();
    }

    fn enforce_limits(&self, inner: &mut Inner) {
        // Memory: let go of the oldest frames that are on disk; drop those that are not. The
        // newest batch always stays.
        while inner.memory_bytes > self.limits.memory_bytes
            && inner.entries.len() - inner.first_in_memory > 1
        {
            let index = inner.first_in_memory;
            let held = inner.entries[index].bytes.as_ref().map_or(0, Bytes::len);
            inner.memory_bytes -= held + ENTRY_OVERHEAD;
            if inner.entries[index].on_disk {
                inner.entries[index].bytes = None;
                inner.first_in_memory += 1;
            } else {
                let entry = inner.entries.remove(index).expect("an entry");
                self.dropped(u64::from(entry.meta.datagrams), DropReason::BacklogFull);
            }
        }
        // Disk: size and age, a segment at a time.
        let oldest_allowed = now_ms().saturating_sub(self.limits.spool_max_age.as_millis() as u64);
        while let Some(spool) = &mut inner.spool {
            let too_big = spool.bytes() > self.limits.spool_max_bytes;
            let too_old = spool
                .oldest_newest_unix_ms()
                .is_some_and(|newest| newest < oldest_allowed);
            if !too_big && !too_old {
                break;
            }
            let Some((last_id, _)) = spool.drop_oldest() else {
                break;
            };
            // Count what was not yet acknowledged (the segment may hold acknowledged records).
            let mut removed = 0;
            let mut datagrams = 0;
            while inner.entries.front().is_some_and(|e| e.meta.id <= last_id) {
                if let Some(entry) = inner.entries.pop_front() {
                    datagrams += u64::from(entry.meta.datagrams);
                    inner.memory_bytes -= entry.memory();
                }
                removed += 1;
            }
            inner.first_in_memory = inner.first_in_memory.saturating_sub(removed);
            self.dropped(
                datagrams,
                if too_big {
                    DropReason::SpoolFull
                } else {
                    DropReason::TooOld
                },
            );
        }
    }

    fn dropped(&self, datagrams: u64, reason: DropReason) {
        self.metrics.dropped(reason).inc_by(datagrams);
        let why = match reason {
            DropReason::BacklogFull => "memory backlog full (--backlog-bytes)",
            DropReason::SpoolFull => "spool full (--spool-max-bytes)",
            DropReason::TooOld => "spooled data too old (--spool-max-age)",
            _ => reason.as_str(),
        };
        if let Some(more) = self.drops.check() {
            tracing::warn!(
                sink = %self.name,
                dropped_datagrams = datagrams,
                reason = why,
                earlier_drops_not_logged = more,
                "backlog full: oldest batches dropped"
            );
        }
    }

    fn update_gauges(&self, inner: &Inner) {
        self.metrics
            .backlog_batches
            .set(i64::try_from(inner.entries.len()).unwrap_or(i64::MAX));
        self.metrics
            .backlog_memory_bytes
            .set(i64::try_from(inner.memory_bytes).unwrap_or(i64::MAX));
        self.metrics
            .spool_bytes
            .set(i64::try_from(inner.spool.as_ref().map_or(0, Spool::bytes)).unwrap_or(i64::MAX));
    }

    /// No more appends: the agent is shutting down.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.grew.notify_waiters();
    }

    /// Closes the backlog and throws away what it holds, in memory and in the spool (whose
    /// files are closed; the caller removes its folder): the sink's feed has ended. Returns
    /// the (batches, datagrams) thrown away.
    pub(crate) fn discard(&self) -> (u64, u64) {
        let mut inner = self.lock();
        inner.closed = true;
        let batches = inner.entries.len() as u64;
        let datagrams = inner
            .entries
            .iter()
            .map(|e| u64::from(e.meta.datagrams))
            .sum();
        inner.entries.clear();
        inner.first_in_memory = 0;
        inner.memory_bytes = 0;
        inner.spool = None;
        self.update_gauges(&inner);
        drop(inner);
        self.grew.notify_waiters();
        (batches, datagrams)
    }

    /// The oldest batch after `after` (an id; 0 for the start). Waits for one; `None` once the
    /// backlog is closed and holds nothing after `after`.
    pub(crate) async fn next_after(&self, after: u64) -> Option<Record> {
        loop {
            let grew = self.grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            {
                let inner = self.lock();
                // Entries are in id order: find the first past `after`.
                let start = inner.entries.partition_point(|e| e.meta.id <= after);
                if let Some(entry) = inner.entries.get(start) {
                    let bytes = match &entry.bytes {
                        Some(bytes) => Ok(bytes.clone()),
                        None => inner.spool.as_ref().map_or_else(
                            || Err(std::io::Error::other("no spool")),
                            |s| s.read(entry.meta.id),
                        ),
                    };
                    let meta = entry.meta;
                    match bytes {
                        Ok(bytes) => {
                            return Some(Record {
                                id: meta.id,
                                session: meta.session,
                                sequence: meta.sequence,
                                datagrams: u64::from(meta.datagrams),
                                bytes,
                                unix_ms: meta.unix_ms,
                                from_disk: entry.bytes.is_none(),
                            });
                        }
                        Err(error) => {
                            // Unreadable: skip it rather than stall the link on it.
                            drop(inner);
                            tracing::error!(sink = %self.name, id = meta.id, %error, "cannot read a batch back from the spool: skipped");
                            self.metrics
                                .dropped(DropReason::SpoolUnreadable)
                                .inc_by(u64::from(meta.datagrams));
                            self.release_through(meta.id);
                            continue;
                        }
                    }
                }
                if inner.closed {
                    return None;
                }
            }
            grew.await;
        }
    }

    /// True once the backlog is closed and nothing is left that only memory holds.
    pub(crate) fn is_settled(&self) -> bool {
        let inner = self.lock();
        inner.closed && inner.entries.iter().all(|e| e.on_disk)
    }

    /// Resolves once the backlog is closed and nothing is left that only memory holds
    /// (everything acknowledged, or on disk for the next run).
    pub(crate) async fn settled(&self) {
        loop {
            let changed = self.grew.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let inner = self.lock();
                if inner.closed && inner.entries.iter().all(|e| e.on_disk) {
                    return;
                }
            }
            changed.await;
        }
    }

    /// The sink has acknowledged everything up to id `id`.
    pub(crate) fn release_through(&self, id: u64) {
        let mut inner = self.lock();
        let mut removed = 0;
        while inner.entries.front().is_some_and(|e| e.meta.id <= id) {
            if let Some(entry) = inner.entries.pop_front() {
                inner.memory_bytes -= entry.memory();
            }
            removed += 1;
        }
        inner.first_in_memory = inner.first_in_memory.saturating_sub(removed);
        if let Some(spool) = &mut inner.spool {
            spool.release_through(id);
        }
        self.update_gauges(&inner);
        drop(inner);
        self.grew.notify_waiters();
    }

    /// Datagrams appended since the backlog was opened.
    pub(crate) fn appended_datagrams(&self) -> u64 {
        self.appended_datagrams.load(Ordering::Relaxed)
    }

    /// The link says whether it has a connection to send on.
    pub(crate) fn set_sending(&self, sending: bool) {
        self.sending.store(sending, Ordering::Relaxed);
    }

    /// Whether the link has a connection to send on (else what is appended waits).
    pub(crate) fn is_sending(&self) -> bool {
        self.sending.load(Ordering::Relaxed)
    }

    /// (batches, datagrams) not yet acknowledged, and how many of them only memory holds.
    pub(crate) fn pending(&self) -> (u64, u64, u64) {
        let inner = self.lock();
        let (datagrams, memory_only) = inner.entries.iter().fold((0, 0), |(all, memory), e| {
            let n = u64::from(e.meta.datagrams);
            (all + n, if e.on_disk { memory } else { memory + n })
        });
        (inner.entries.len() as u64, datagrams, memory_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sequence: u64) -> Frame {
        Frame {
            session: 5,
            sequence,
            datagrams: 3,
            bytes: Bytes::from(vec![sequence as u8; 1000]),
        }
    }

    /// Room in memory for `batches` of the test frames (1,000 bytes each).
    fn limits(batches: usize) -> Limits {
        Limits {
            memory_bytes: batches * (1000 + ENTRY_OVERHEAD),
            spool_max_bytes: u64::MAX,
            spool_max_age: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn reads_in_order_from_any_point_and_releases() {
        let backlog = Backlog::open("s", None, limits(100), Arc::default()).unwrap();
        for s in 1..=5 {
            backlog.append(frame(s));
        }
        let r = backlog.next_after(0).await.unwrap();
        assert_eq!((r.id, r.sequence), (1, 1));
        let r = backlog.next_after(3).await.unwrap();
        assert_eq!(r.sequence, 4);
        backlog.release_through(4);
        // After a reconnect the link starts again after what was released.
        assert_eq!(backlog.next_after(0).await.unwrap().sequence, 5);
        backlog.close();
        assert!(backlog.next_after(5).await.is_none());
    }

    #[tokio::test]
    async fn without_a_spool_the_oldest_are_dropped_and_counted() {
        let metrics = Arc::new(SinkMetrics::default());
        let backlog = Backlog::open("s", None, limits(2), metrics.clone()).unwrap();
        for s in 1..=5 {
            backlog.append(frame(s));
        }
        assert_eq!(metrics.dropped_total(), 9);
        assert_eq!(backlog.next_after(0).await.unwrap().sequence, 4);
    }

    #[tokio::test]
    async fn memory_is_bounded_in_bytes_whatever_the_batch_size() {
        let metrics = Arc::new(SinkMetrics::default());
        let limit = 250 * (1000 + ENTRY_OVERHEAD);
        let backlog = Backlog::open(
            "s",
            None,
            Limits {
                memory_bytes: limit,
                ..limits(0)
            },
            metrics.clone(),
        )
        .unwrap();
        // Small batches: many more fit than large ones would.
        let small = |sequence| Frame {
            bytes: Bytes::from(vec![0u8; 100]),
            ..frame(sequence)
        };
        for s in 1..=1_000 {
            backlog.append(small(s));
        }
        assert_eq!(metrics.dropped_total(), 0, "1,000 × 228 bytes fit");
        for s in 1_001..=1_300 {
            backlog.append(frame(s));
        }
        let held = metrics.backlog_memory_bytes.get() as usize;
        assert!(held <= limit, "{held} > {limit}");
        assert!(
            held > limit - 1000 - ENTRY_OVERHEAD,
            "{held}: full, not emptied"
        );
        // The oldest went first: what is left is the newest, in order.
        let first = backlog.next_after(0).await.unwrap().sequence;
        assert_eq!(first, 1_300 - 250 + 1);
        backlog.release_through(u64::MAX);
        assert_eq!(metrics.backlog_memory_bytes.get(), 0);
    }

    #[tokio::test]
    async fn with_a_spool_memory_lets_go_and_reads_back_and_a_restart_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(SinkMetrics::default());
        let backlog = Backlog::open("s", Some(dir.path()), limits(2), metrics.clone()).unwrap();
        for s in 1..=5 {
            backlog.append(frame(s));
        }
        assert_eq!(metrics.dropped_total(), 0);
        let r = backlog.next_after(0).await.unwrap();
        assert_eq!(&r.bytes[..], &[1u8; 1000][..], "read back from disk");
        backlog.release_through(2);
        drop(backlog);
        let again = Backlog::open("s", Some(dir.path()), limits(2), metrics).unwrap();
        let sequences: Vec<u64> = {
            let mut out = Vec::new();
            let mut after = 0;
            again.close();
            while let Some(r) = again.next_after(after).await {
                after = r.id;
                out.push(r.sequence);
            }
            out
        };
        assert_eq!(sequences, [3, 4, 5], "what was not acknowledged survives");
    }

    #[tokio::test]
    async fn discarding_empties_memory_and_spool_and_ends_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(SinkMetrics::default());
        let backlog = Backlog::open("s", Some(dir.path()), limits(100), metrics.clone()).unwrap();
        for sequence in 1..=3 {
            backlog.append(frame(sequence));
        }
        assert_eq!(backlog.discard(), (3, 9));
        assert_eq!(backlog.pending(), (0, 0, 0));
        assert_eq!(metrics.spool_bytes.get(), 0);
        assert!(backlog.next_after(0).await.is_none(), "closed and empty");
        backlog.append(frame(4));
        assert_eq!(backlog.pending().0, 0, "nothing is taken after the end");
    }
}
