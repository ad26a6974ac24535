//! Target `expand`: the compressed-batch expansion ([`Expander::expand`]) fed raw bytes as a
//! batch's `zstd_datagrams`, the path a decompression bomb would take.
//!
//! Input: one selector byte (the expansion limit), then the compressed bytes.
//!
//! Checks: a batch that announces more than the limit, or no size at all, is refused with that
//! error before anything is allocated for it; nothing the expansion allocates exceeds the
//! limit (plus zstd's own context) whatever the bytes announce or hold; the same expander
//! gives the same verdict a second time (the thread's context is reused batch after batch); what
//! expands compresses again with [`Compressor`] and expands to the same datagrams.

use bytes::{Bytes, BytesMut};
use prost::Message;
use proto::compression::{CompressionError, Compressor, DEFAULT_LEVEL, Expander};
use proto::pb;
use proto::wire::{decode_frame, encode_frame};

use super::{assert_within, limit};

/// zstd's decompression context and its tables: allocated once per thread (the first time it
/// expands anything), whatever the input (about 160 KiB with zstd 1.5).
const ZSTD_CONTEXT: usize = 256 * 1024;

/// The target.
pub fn expand(data: &[u8]) {
    let Some((&selector, packed)) = data.split_first() else {
        return;
    };
    let max_len = limit(selector);
    let packed = Bytes::copy_from_slice(packed);
    let (expanded, usage) = crate::alloc::measure(|| check(&packed, max_len));
    // The plain bytes (at most the limit) and the datagrams decoded from them, which share
    // that buffer: a few pointers per plain byte at most.
    let per_byte = 128 * (max_len.min(expanded) + packed.len());
    assert_within(
        usage,
        max_len + ZSTD_CONTEXT + per_byte,
        max_len + 2 * ZSTD_CONTEXT + 2 * per_byte,
        "expand",
    );
    if expanded > 0 {
        recompress(&packed, max_len);
    }
}

/// Expands `packed` twice with one expander; returns the plain length on success (0 if not).
fn check(packed: &Bytes, max_len: usize) -> usize {
    let mut expander = Expander::new(max_len);
    let announced = zstd::zstd_safe::get_frame_content_size(packed).ok();
    let first = run(&mut expander, packed);
    let second = run(&mut expander, packed);
    assert_eq!(
        first.as_ref().map_err(ToString::to_string),
        second.as_ref().map_err(ToString::to_string),
        "the same expander changed its verdict"
    );
    match first {
        _ if packed.is_empty() => {
            assert!(matches!(first, Ok(ref b) if b.datagrams.is_empty()));
            0
        }
        Ok(batch) => {
            let Some(Some(len)) = announced else {
                panic!("expanded a batch that does not announce its size: {announced:?}");
            };
            let len = usize::try_from(len).expect("within the limit");
            assert!(
                len <= max_len,
                "expanded {len} bytes over the limit {max_len}"
            );
            let list = pb::Datagrams {
                datagrams: batch.datagrams,
            };
            // Canonical re-encoding is never longer than what was decoded.
            assert!(list.encoded_len() <= len);
            len.max(1)
        }
        Err(CompressionError::TooLarge { len, max }) => {
            assert_eq!((Some(Some(len)), max), (announced, max_len));
            assert!(len > max_len as u64);
            0
        }
        Err(CompressionError::UnknownSize) => {
            assert_eq!(announced, Some(None));
            0
        }
        Err(CompressionError::Corrupt(_) | CompressionError::Malformed(_)) => 0,
        Err(error @ CompressionError::NoHistory { .. }) => {
            panic!("the batch names no history: {error}")
        }
    }
}

fn run(expander: &mut Expander, packed: &Bytes) -> Result<pb::Batch, CompressionError> {
    let mut batch = pb::Batch {
        session: 7,
        sequence: 1,
        datagrams: Vec::new(),
        zstd_datagrams: packed.clone(),
        ..Default::default()
    };
    expander.expand(&mut batch)?;
    assert!(batch.zstd_datagrams.is_empty());
    assert_eq!((batch.session, batch.sequence), (7, 1));
    Ok(batch)
}

/// What expanded compresses again and expands to the same datagrams.
fn recompress(packed: &Bytes, max_len: usize) {
    let mut batch = pb::Batch {
        zstd_datagrams: packed.clone(),
        ..Default::default()
    };
    Expander::new(max_len)
        .expand(&mut batch)
        .expect("expanded before");
    let original = batch.clone();
    let mut plain = BytesMut::new();
    encode_frame(&batch, &mut plain);
    let mut frame = BytesMut::from(
        &Compressor::new(DEFAULT_LEVEL)
            .expect("a zstd context")
            .compress_frame(&plain.freeze(), true)
            .expect("compressing valid datagrams")[..],
    );
    let body = decode_frame(&mut frame, usize::MAX)
        .expect("no limit")
        .expect("a whole frame");
    let mut again = pb::Batch::decode(body).expect("the compressor's frame decodes");
    Expander::new(usize::MAX)
        .expand(&mut again)
        .expect("the compressor's output expands");
    assert_eq!(again, original);
}
