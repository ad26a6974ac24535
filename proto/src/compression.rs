//! Compressed batches: zstd over a batch's datagrams, negotiated per connection.
//!
//! sFlow compresses well (headers of similar packets, counters that change in their low
//! bytes, runs of zeros), and a whole batch compresses better than each datagram alone: the
//! encoding of a batch's datagrams is compressed once, into [`pb::Batch::zstd_datagrams`], and
//! a sink expands it back to the same datagrams, byte for byte.
//!
//! **History.** A small batch (a site's usual few datagrams in a batch delay) compresses
//! poorly on its own: what it shares with the batches before it (agent addresses, the record
//! layout, MAC and IP addresses) is spelled out again each time. On a connection whose sink
//! accepts it, each batch is therefore compressed with the last [`HISTORY_LEN`] bytes of the
//! batches before it on the same stream as its prefix (zstd's raw-content dictionary), and
//! [`pb::Batch::zstd_prefix`] says how many. The sink keeps those bytes per stream and nothing
//! else: the zstd contexts themselves are shared (a thread's, at the sink), so a connected
//! agent costs the sink [`HISTORY_LEN`] bytes for it, not a context of its own. A new
//! connection starts with an empty history, so whatever is sent again after a reconnect is
//! compressed anew and decodable. Each batch stays one complete zstd frame with its content
//! size, so the bound on expansion is checked before any allocation, as for the others.
//!
//! A sink accepts compressed batches only if it says so on the connection (ALPN
//! [`crate::ALPN_ZSTD_HISTORY`] or [`crate::ALPN_ZSTD`] on QUIC; headers
//! [`crate::GRPC_HISTORY_HEADER`] and [`crate::GRPC_COMPRESSION_HEADER`] on gRPC), so an older
//! sink never sees what it cannot read: for a sink that takes batches compressed each on its
//! own, the agent compresses without history; for one older than compression it sends the
//! frame plain ([`plain_frame`] expands one compressed earlier, e.g. read back from a spool).
//! Expansion is bounded: a batch that says it expands beyond the reader's frame limit, or does
//! not say how large it expands, is refused before any allocation.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use prost::Message;

use crate::pb;
use crate::wire::{FRAME_HEADER_LEN, encode_frame};

/// Default zstd level: the fastest of the regular levels; higher levels cost far more CPU for
/// a few percent on sFlow.
pub const DEFAULT_LEVEL: i32 = 1;

/// Bytes of a stream's history that a batch may use as its prefix, and that a sink keeps per
/// stream. Part of the protocol (ALPN [`crate::ALPN_ZSTD_HISTORY`]). Measured on sFlow with
/// random payloads in batches of three datagrams: 8 KiB of history takes the compressed size
/// from 0.570 to 0.533 of the datagrams, and 64 KiB gains nothing more.
pub const HISTORY_LEN: usize = 8 * 1024;

/// The least history a batch is compressed against: a batch uses the last
/// max([`PREFIX_FLOOR`], 2 × its own size) bytes of the history, up to [`HISTORY_LEN`]. zstd
/// hashes the whole prefix for every batch, so a one-datagram batch against 8 KiB costs the
/// agent more than the batch itself; measured on sFlow with random payloads, 4 KiB of history
/// compresses as well as 8 KiB (0.534 against 0.533 of the datagrams).
pub const PREFIX_FLOOR: usize = 4 * 1024;

/// zstd's dictionary magic number as it appears in bytes: a prefix that began with it would be
/// read as a formatted dictionary rather than as raw content, so the compressor never uses one
/// that does.
const DICTIONARY_MAGIC: [u8; 4] = 0xEC30_A437_u32.to_le_bytes();

/// The zstd levels this build accepts (negative ones are the fast levels).
pub fn levels() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

/// Errors from compressing or expanding a batch.
#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    /// The zstd frame does not say how large it expands.
    #[error("compressed batch without its content size")]
    UnknownSize,
    /// The batch would expand beyond the limit.
    #[error("compressed batch expands to {len} bytes, over the limit of {max} bytes")]
    TooLarge {
        /// What the zstd frame header announces.
        len: u64,
        /// The reader's limit.
        max: usize,
    },
    /// The batch names more history than the stream has.
    #[error("compressed batch needs {wanted} bytes of the stream's history, which has {have}")]
    NoHistory {
        /// `zstd_prefix`.
        wanted: u32,
        /// What the stream's history holds.
        have: usize,
    },
    /// The zstd frame is corrupt (or zstd failed).
    #[error("corrupt compressed batch: {0}")]
    Corrupt(std::io::Error),
    /// The bytes are not a valid batch, or its expanded bytes not a valid list of datagrams.
    #[error("malformed compressed batch: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// What a sink accepts on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    /// Plain batches only: a sink older than compression.
    Plain,
    /// Batches compressed each on its own, too.
    Zstd,
    /// Batches compressed against the stream's history, too.
    ZstdHistory,
}

impl Accepts {
    /// For the log: what the sink accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "none",
            Self::Zstd => "zstd",
            Self::ZstdHistory => "zstd-history",
        }
    }
}

/// The last [`HISTORY_LEN`] bytes of a stream's expanded batches (those sent against it).
#[derive(Debug, Default)]
struct History {
    bytes: Vec<u8>,
}

impl History {
    /// The last `len` bytes.
    fn tail(&self, len: usize) -> &[u8] {
        &self.bytes[self.bytes.len() - len.min(self.bytes.len())..]
    }

    /// Appends a batch's expanded bytes, keeping the last [`HISTORY_LEN`] (and never holding
    /// more: a sink keeps one of these per connected agent).
    fn push(&mut self, plain: &[u8]) {
        if self.bytes.capacity() == 0 {
            self.bytes.reserve_exact(HISTORY_LEN);
        }
        let plain = &plain[plain.len().saturating_sub(HISTORY_LEN)..];
        let excess = (self.bytes.len() + plain.len()).saturating_sub(HISTORY_LEN);
        self.bytes.drain(..excess);
        self.bytes.extend_from_slice(plain);
    }

    fn clear(&mut self) {
        self.bytes = Vec::new();
    }
}

/// Compresses batches for one link; keeps its zstd context and buffers from one batch to the
/// next, and the history of the connection it sends on.
pub struct Compressor {
    zstd: zstd::zstd_safe::CCtx<'static>,
    level: i32,
    plain: Vec<u8>,
    history: History,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level)
            .field("history", &self.history.bytes.len())
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// A compressor at zstd `level` (negative levels are faster still; 1 to 19 are the regular
    /// ones).
    ///
    /// # Errors
    ///
    /// When zstd refuses the level, or cannot make a context.
    pub fn new(level: i32) -> std::io::Result<Self> {
        if !levels().contains(&level) {
            return Err(std::io::Error::other(format!("zstd has no level {level}")));
        }
        let zstd = zstd::zstd_safe::CCtx::try_create()
            .ok_or_else(|| std::io::Error::other("cannot make a zstd context"))?;
        Ok(Self {
            zstd,
            level,
            plain: Vec::new(),
            history: History::default(),
        })
    }

    /// Forgets the history: a new connection (or stream) starts without one.
    pub fn reset(&mut self) {
        self.history.clear();
    }

    /// The frame `frame` (a plain batch) compressed: against the history of the connection
    /// with `history` (and extending it), else on its own. A frame already compressed comes
    /// back as it is, and leaves the history alone.
    ///
    /// # Errors
    ///
    /// When `frame` is not a batch frame, or zstd fails (it does not on valid input; the
    /// caller then sends the frame plain).
    pub fn compress_frame(
        &mut self,
        frame: &Bytes,
        history: bool,
    ) -> Result<Bytes, CompressionError> {
        let mut batch = pb::Batch::decode(frame.slice(FRAME_HEADER_LEN.min(frame.len())..))?;
        if !batch.zstd_datagrams.is_empty() {
            return Ok(frame.clone());
        }
        let list = pb::Datagrams {
            datagrams: std::mem::take(&mut batch.datagrams),
        };
        self.plain.clear();
        list.encode(&mut self.plain)
            .expect("a Vec grows to fit the message");
        let prefix = if history {
            let wanted = (2 * self.plain.len()).clamp(PREFIX_FLOOR, HISTORY_LEN);
            let mut prefix = self.history.tail(wanted);
            while prefix.starts_with(&DICTIONARY_MAGIC) {
                prefix = &prefix[1..];
            }
            prefix
        } else {
            &[]
        };
        // Compressed straight into the buffer the frame's field will own.
        let mut packed = Vec::with_capacity(zstd::zstd_safe::compress_bound(self.plain.len()));
        self.zstd
            .compress_using_dict(&mut packed, &self.plain, prefix, self.level)
            .map_err(|code| {
                CompressionError::Corrupt(std::io::Error::other(zstd::zstd_safe::get_error_name(
                    code,
                )))
            })?;
        let prefix_len = history.then_some(prefix.len() as u32);
        if history {
            self.history.push(&self.plain);
        }
        batch.zstd_datagrams = Bytes::from(packed);
        batch.zstd_prefix = prefix_len;
        let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + batch.encoded_len());
        encode_frame(&batch, &mut out);
        Ok(out.freeze())
    }
}

thread_local! {
    /// The thread's zstd decompression context, shared by every stream expanded on it: a
    /// context costs about 100 KiB, a stream's history [`HISTORY_LEN`].
    static DCTX: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Expands the compressed batches of one stream; keeps the stream's history (what batches
/// made against it need), and nothing else of its own.
#[derive(Debug)]
pub struct Expander {
    max_len: usize,
    history: History,
}

impl Expander {
    /// An expander that refuses batches expanding beyond `max_len` bytes (the reader's frame
    /// limit).
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            history: History::default(),
        }
    }

    /// Expands a compressed batch in place (its datagrams back in `batch.datagrams`, sharing
    /// one buffer); a plain batch is left as it is. Call for every batch of the stream, in
    /// order: a batch made against the history extends it.
    ///
    /// # Errors
    ///
    /// When the compressed datagrams are corrupt, unsized, expand beyond the limit, or need
    /// more history than the stream has.
    pub fn expand(&mut self, batch: &mut pb::Batch) -> Result<(), CompressionError> {
        if batch.zstd_datagrams.is_empty() {
            return Ok(());
        }
        let len = match zstd::zstd_safe::get_frame_content_size(&batch.zstd_datagrams) {
            Ok(Some(len)) => len,
            Ok(None) => return Err(CompressionError::UnknownSize),
            Err(_) => {
                return Err(CompressionError::Corrupt(std::io::Error::other(
                    "not a zstd frame",
                )));
            }
        };
        if len > self.max_len as u64 {
            return Err(CompressionError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let prefix = match batch.zstd_prefix {
            None => &[][..],
            Some(wanted) if wanted as usize <= self.history.bytes.len() => {
                self.history.tail(wanted as usize)
            }
            Some(wanted) => {
                return Err(CompressionError::NoHistory {
                    wanted,
                    have: self.history.bytes.len(),
                });
            }
        };
        let mut plain = Vec::with_capacity(len as usize);
        DCTX.with_borrow_mut(|dctx| {
            if dctx.is_none() {
                *dctx = zstd::zstd_safe::DCtx::try_create();
            }
            let dctx = dctx.as_mut().ok_or_else(|| {
                CompressionError::Corrupt(std::io::Error::other("cannot make a zstd context"))
            })?;
            dctx.decompress_using_dict(&mut plain, &batch.zstd_datagrams, prefix)
                .map_err(|code| {
                    CompressionError::Corrupt(std::io::Error::other(
                        zstd::zstd_safe::get_error_name(code),
                    ))
                })
        })?;
        let plain = Bytes::from(plain);
        let list = pb::Datagrams::decode(plain.clone())?;
        if batch.zstd_prefix.is_some() {
            self.history.push(&plain);
        }
        batch.datagrams = list.datagrams;
        batch.zstd_datagrams = Bytes::new();
        batch.zstd_prefix = None;
        Ok(())
    }
}

/// The frame to send a sink that does not accept compression: `frame` itself when plain, else
/// the same batch re-encoded with its datagrams expanded.
///
/// # Errors
///
/// When `frame` is not a batch frame, or its compressed datagrams cannot be expanded.
pub fn plain_frame(frame: &Bytes, max_len: usize) -> Result<Bytes, CompressionError> {
    let mut batch = pb::Batch::decode(frame.slice(FRAME_HEADER_LEN.min(frame.len())..))?;
    if batch.zstd_datagrams.is_empty() {
        return Ok(frame.clone());
    }
    Expander::new(max_len).expand(&mut batch)?;
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + batch.encoded_len());
    encode_frame(&batch, &mut out);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{DEFAULT_MAX_FRAME_LEN, decode_frame};

    fn batch(n: usize) -> pb::Batch {
        let datagrams = (0..n)
            .map(|i| pb::Datagram {
                // Structured like sFlow: a repeated header, a counter, filler.
                payload: Bytes::from(
                    [
                        &[0, 0, 0, 5, 0, 0, 0, 1, 192, 0, 2, 1][..],
                        &(i as u32).to_be_bytes(),
                    ]
                    .concat()
                    .repeat(80),
                ),
                source_ip: Bytes::from_static(&[10, 0, 0, 1]),
                source_port: 50_000 + i as u32,
                received_unix_nanos: 1_700_000_000_000_000_000 + i as u64,
            })
            .collect();
        pb::Batch {
            session: 7,
            sequence: 3,
            datagrams,
            timing: pb::Timing::Live.into(),
            ..Default::default()
        }
    }

    fn expander() -> Expander {
        Expander::new(DEFAULT_MAX_FRAME_LEN)
    }

    fn frame(batch: &pb::Batch) -> Bytes {
        let mut out = BytesMut::new();
        encode_frame(batch, &mut out);
        out.freeze()
    }

    fn body(frame: &Bytes) -> Bytes {
        let mut buf = BytesMut::from(&frame[..]);
        decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap()
    }

    /// What the sink makes of `frame`: the batch, expanded by `expander`.
    fn receive(expander: &mut Expander, frame: &Bytes) -> Result<pb::Batch, CompressionError> {
        let mut batch = pb::Batch::decode(body(frame)).unwrap();
        expander.expand(&mut batch)?;
        Ok(batch)
    }

    /// Small batches of sFlow-like datagrams, each a little different from the last.
    fn small_batches(n: usize) -> Vec<pb::Batch> {
        (0..n)
            .map(|i| {
                let mut b = batch(2);
                b.sequence = i as u64 + 1;
                for (k, d) in b.datagrams.iter_mut().enumerate() {
                    let mut payload = d.payload.to_vec();
                    payload.truncate(600);
                    payload.extend_from_slice(&((i * 7 + k) as u64).to_be_bytes());
                    d.payload = Bytes::from(payload);
                }
                b
            })
            .collect()
    }

    #[test]
    fn a_compressed_batch_expands_to_the_same_datagrams_and_is_smaller() {
        let original = batch(40);
        let plain = frame(&original);
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        let packed = compressor.compress_frame(&plain, false).unwrap();
        assert!(
            packed.len() * 4 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        let sent = pb::Batch::decode(body(&packed)).unwrap();
        assert!(sent.datagrams.is_empty());
        assert_eq!(sent.zstd_prefix, None, "made on its own");

        let mut expander = expander();
        assert_eq!(receive(&mut expander, &packed).unwrap(), original);
        // The same batch again (a resend): the same datagrams.
        assert_eq!(receive(&mut expander, &packed).unwrap(), original);
        // A frame compressed already goes as it is.
        assert_eq!(compressor.compress_frame(&packed, true).unwrap(), packed);

        // For a sink without compression: the same batch, plain.
        let again = plain_frame(&packed, DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(again, plain);
        // A plain frame goes as it is.
        assert_eq!(plain_frame(&plain, DEFAULT_MAX_FRAME_LEN).unwrap(), plain);
    }

    #[test]
    fn batches_made_against_the_history_expand_in_order_and_are_smaller() {
        let batches = small_batches(40);
        let mut with = Compressor::new(DEFAULT_LEVEL).unwrap();
        let mut without = Compressor::new(DEFAULT_LEVEL).unwrap();
        let mut expander = expander();
        let (mut bytes_with, mut bytes_without) = (0, 0);
        for (i, original) in batches.iter().enumerate() {
            let plain = frame(original);
            let packed = with.compress_frame(&plain, true).unwrap();
            let prefix = pb::Batch::decode(body(&packed)).unwrap().zstd_prefix;
            if i == 0 {
                assert_eq!(prefix, Some(0), "nothing before the first");
            } else {
                assert!(prefix.unwrap() > 0, "batch {i}: {prefix:?}");
            }
            assert_eq!(&receive(&mut expander, &packed).unwrap(), original);
            assert!(expander.history.bytes.capacity() <= HISTORY_LEN);
            bytes_with += packed.len();
            bytes_without += without.compress_frame(&plain, false).unwrap().len();
        }
        assert!(
            bytes_with * 10 < bytes_without * 7,
            "with history {bytes_with} bytes, without {bytes_without}"
        );
        assert_eq!(expander.history.bytes.len(), HISTORY_LEN);
        assert_eq!(expander.history.bytes, with.history.bytes);
    }

    #[test]
    fn a_small_batch_uses_less_history_than_a_large_one() {
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        let mut expander = expander();
        let prefix_of = |packed: &Bytes| pb::Batch::decode(body(packed)).unwrap().zstd_prefix;
        // Fill the history.
        for original in small_batches(10) {
            let packed = compressor.compress_frame(&frame(&original), true).unwrap();
            receive(&mut expander, &packed).unwrap();
        }
        assert_eq!(compressor.history.bytes.len(), HISTORY_LEN);
        let mut small = batch(1);
        small.datagrams[0].payload = Bytes::from_static(b"one small datagram");
        let packed = compressor.compress_frame(&frame(&small), true).unwrap();
        assert_eq!(prefix_of(&packed), Some(PREFIX_FLOOR as u32));
        assert_eq!(receive(&mut expander, &packed).unwrap(), small);
        let large = batch(40);
        let packed = compressor.compress_frame(&frame(&large), true).unwrap();
        assert_eq!(prefix_of(&packed), Some(HISTORY_LEN as u32));
        assert_eq!(receive(&mut expander, &packed).unwrap(), large);
    }

    #[test]
    fn a_batch_needs_the_history_before_it_and_a_reset_starts_afresh() {
        let batches = small_batches(3);
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        let first = compressor
            .compress_frame(&frame(&batches[0]), true)
            .unwrap();
        let second = compressor
            .compress_frame(&frame(&batches[1]), true)
            .unwrap();
        // Without the first (a new connection at the sink): refused, and said why.
        let error = receive(&mut expander(), &second).unwrap_err();
        assert!(
            matches!(error, CompressionError::NoHistory { have: 0, .. }),
            "{error}"
        );
        // A batch made on its own in between neither uses nor extends the history.
        let mut expander = expander();
        receive(&mut expander, &first).unwrap();
        let alone = compressor
            .compress_frame(&frame(&batches[2]), false)
            .unwrap();
        assert_eq!(receive(&mut expander, &alone).unwrap(), batches[2]);
        assert_eq!(receive(&mut expander, &second).unwrap(), batches[1]);
        // A new connection: the compressor forgets, a new expander can read it.
        compressor.reset();
        let again = compressor
            .compress_frame(&frame(&batches[1]), true)
            .unwrap();
        assert_eq!(
            receive(&mut Expander::new(DEFAULT_MAX_FRAME_LEN), &again).unwrap(),
            batches[1]
        );
    }

    #[test]
    fn a_prefix_never_starts_with_the_dictionary_magic() {
        let mut history = DICTIONARY_MAGIC.to_vec();
        history.resize(HISTORY_LEN, 7);
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        compressor.history.bytes = history.clone();
        // Large enough to be made against the whole history.
        let original = batch(40);
        let packed = compressor.compress_frame(&frame(&original), true).unwrap();
        let sent = pb::Batch::decode(body(&packed)).unwrap();
        assert_eq!(sent.zstd_prefix, Some(HISTORY_LEN as u32 - 1));
        let mut expander = expander();
        expander.history.bytes = history;
        assert_eq!(receive(&mut expander, &packed).unwrap(), original);
    }

    #[test]
    fn expansion_beyond_the_limit_is_refused_before_allocating() {
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        let packed = compressor
            .compress_frame(&frame(&batch(1_000)), false)
            .unwrap();
        let error = receive(&mut Expander::new(64 * 1024), &packed).unwrap_err();
        assert!(
            matches!(error, CompressionError::TooLarge { max: 65_536, .. }),
            "{error}"
        );
    }

    #[test]
    fn corrupt_or_unsized_compressed_batches_are_errors() {
        let mut garbage = batch(0);
        garbage.zstd_datagrams = Bytes::from_static(b"not zstd at all");
        assert!(matches!(
            expander().expand(&mut garbage),
            Err(CompressionError::Corrupt(_))
        ));

        // A valid zstd frame whose header does not carry the content size (streaming mode).
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        encoder.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut encoder, &[1, 2, 3]).unwrap();
        let mut unsized_batch = batch(0);
        unsized_batch.zstd_datagrams = Bytes::from(encoder.finish().unwrap());
        assert!(matches!(
            expander().expand(&mut unsized_batch),
            Err(CompressionError::UnknownSize)
        ));

        // A truncated frame.
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        let packed = compressor.compress_frame(&frame(&batch(10)), true).unwrap();
        let mut received = pb::Batch::decode(body(&packed)).unwrap();
        let cut = received.zstd_datagrams.len() / 2;
        received.zstd_datagrams = received.zstd_datagrams.slice(..cut);
        assert!(expander().expand(&mut received).is_err());
    }
}
