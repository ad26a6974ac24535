//! Compressed batches: zstd over a batch's datagrams, negotiated per connection.
//!
//! sFlow compresses well (headers of similar packets, counters that change in their low
//! bytes, runs of zeros), and a whole batch compresses better than each datagram alone: the
//! agent compresses the encoding of a batch's datagrams once, into [`pb::Batch::zstd_datagrams`],
//! and a sink expands it back to the same datagrams, byte for byte.
//!
//! A sink accepts compressed batches only if it says so on the connection (ALPN
//! [`crate::ALPN_ZSTD`] on QUIC, header [`crate::GRPC_COMPRESSION_HEADER`] on gRPC), so an
//! older sink never sees one: for it the agent expands a compressed frame back to a plain one
//! ([`plain_frame`]). Expansion is bounded: a batch that says it expands beyond the reader's
//! frame limit, or does not say how large it expands, is refused before any allocation.

use bytes::{Bytes, BytesMut};
use prost::Message;

use crate::pb;
use crate::wire::{FRAME_HEADER_LEN, encode_frame};

/// Default zstd level: the fastest of the regular levels; higher levels cost far more CPU for
/// a few percent on sFlow.
pub const DEFAULT_LEVEL: i32 = 1;

/// The zstd levels this build accepts (negative ones are the fast levels).
pub fn levels() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

/// Errors from expanding a compressed batch.
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
    /// The zstd frame is corrupt.
    #[error("corrupt compressed batch: {0}")]
    Corrupt(std::io::Error),
    /// The expanded bytes are not a valid list of datagrams.
    #[error("malformed compressed batch: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Compresses batches; keeps its zstd context and buffers from one batch to the next.
pub struct Compressor {
    zstd: zstd::bulk::Compressor<'static>,
    level: i32,
    plain: Vec<u8>,
    packed: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// A compressor at zstd `level` (negative levels are faster still; 1 to 19 are the regular
    /// ones).
    ///
    /// # Errors
    ///
    /// When zstd refuses the level.
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::bulk::Compressor::new(level)?,
            level,
            plain: Vec::new(),
            packed: Vec::new(),
        })
    }

    /// The zstd level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Appends `batch` to `dst` as one frame, its datagrams compressed (`batch.datagrams` is
    /// emptied into the frame and handed back empty, for reuse).
    ///
    /// # Errors
    ///
    /// When zstd fails (it does not on valid input; the caller then sends the batch plain).
    pub fn encode_frame(
        &mut self,
        batch: &mut pb::Batch,
        dst: &mut BytesMut,
    ) -> std::io::Result<()> {
        let list = pb::Datagrams {
            datagrams: std::mem::take(&mut batch.datagrams),
        };
        self.plain.clear();
        list.encode(&mut self.plain)
            .expect("a Vec grows to fit the message");
        batch.datagrams = list.datagrams;
        self.packed.clear();
        self.packed
            .reserve(zstd::zstd_safe::compress_bound(self.plain.len()));
        self.zstd
            .compress_to_buffer(&self.plain, &mut self.packed)?;
        let compressed = pb::Batch {
            session: batch.session,
            sequence: batch.sequence,
            datagrams: Vec::new(),
            zstd_datagrams: Bytes::copy_from_slice(&self.packed),
            timing: batch.timing,
            live_datagrams_per_second: batch.live_datagrams_per_second,
        };
        encode_frame(&compressed, dst);
        batch.datagrams.clear();
        Ok(())
    }
}

/// Expands compressed batches; keeps its zstd context from one batch to the next.
pub struct Expander {
    zstd: zstd::bulk::Decompressor<'static>,
    max_len: usize,
}

impl std::fmt::Debug for Expander {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expander")
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl Expander {
    /// An expander that refuses batches expanding beyond `max_len` bytes (the reader's frame
    /// limit).
    ///
    /// # Errors
    ///
    /// When zstd cannot make a context (out of memory).
    pub fn new(max_len: usize) -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::bulk::Decompressor::new()?,
            max_len,
        })
    }

    /// Expands a compressed batch in place (its datagrams back in `batch.datagrams`, sharing
    /// one buffer); a plain batch is left as it is.
    ///
    /// # Errors
    ///
    /// When the compressed datagrams are corrupt, unsized, or expand beyond the limit.
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
        let mut plain = Vec::with_capacity(len as usize);
        self.zstd
            .decompress_to_buffer(&batch.zstd_datagrams[..], &mut plain)
            .map_err(CompressionError::Corrupt)?;
        let list = pb::Datagrams::decode(Bytes::from(plain))?;
        batch.datagrams = list.datagrams;
        batch.zstd_datagrams = Bytes::new();
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
    Expander::new(max_len)
        .map_err(CompressionError::Corrupt)?
        .expand(&mut batch)?;
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
        Expander::new(DEFAULT_MAX_FRAME_LEN).unwrap()
    }

    fn body(frame: &BytesMut) -> Bytes {
        let mut buf = frame.clone();
        decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_compressed_batch_expands_to_the_same_datagrams_and_is_smaller() {
        let original = batch(40);
        let mut plain = BytesMut::new();
        encode_frame(&original, &mut plain);
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        let mut to_send = original.clone();
        let mut packed = BytesMut::new();
        compressor.encode_frame(&mut to_send, &mut packed).unwrap();
        assert!(to_send.datagrams.is_empty(), "handed back empty for reuse");
        assert!(
            packed.len() * 4 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );

        let mut received = pb::Batch::decode(body(&packed)).unwrap();
        assert!(received.datagrams.is_empty());
        let mut expander = Expander::new(DEFAULT_MAX_FRAME_LEN).unwrap();
        expander.expand(&mut received).unwrap();
        assert_eq!(received, original);
        // The context is reused batch after batch.
        let mut again = pb::Batch::decode(body(&packed)).unwrap();
        expander.expand(&mut again).unwrap();
        assert_eq!(again, original);

        // For a sink without compression: the same batch, plain.
        let again = plain_frame(&packed.clone().freeze(), DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(&again[..], &plain[..]);
        // A plain frame goes as it is.
        let same = plain_frame(&plain.clone().freeze(), DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(&same[..], &plain[..]);
    }

    #[test]
    fn expansion_beyond_the_limit_is_refused_before_allocating() {
        let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
        let mut big = batch(1_000);
        let mut frame = BytesMut::new();
        compressor.encode_frame(&mut big, &mut frame).unwrap();
        let mut received = pb::Batch::decode(body(&frame)).unwrap();
        let error = Expander::new(64 * 1024)
            .unwrap()
            .expand(&mut received)
            .unwrap_err();
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
        let mut b = batch(10);
        let mut frame = BytesMut::new();
        compressor.encode_frame(&mut b, &mut frame).unwrap();
        let mut received = pb::Batch::decode(body(&frame)).unwrap();
        let cut = received.zstd_datagrams.len() / 2;
        received.zstd_datagrams = received.zstd_datagrams.slice(..cut);
        assert!(expander().expand(&mut received).is_err());
    }
}
