//! Target `frame`: the length-prefixed frame decoder ([`decode_frame`]) and the
//! [`FrameReader`] on top of it, as a sink reads an agent's QUIC stream.
//!
//! Input: one selector byte (bits 0–2: the frame limit, bits 3–7: the read size, 1 to 32
//! bytes), then the stream.
//!
//! Checks: a frame comes out exactly as the stream holds it and only when whole; "need more"
//! consumes nothing; a length over the limit is refused, and nothing allocated follows a length
//! past the limit;
//! reading the stream in pieces gives the same frames as reading it whole, and so does
//! [`FrameReader`]; a frame body that decodes as a batch or an ack re-encodes into a frame
//! that decodes to the same message.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use prost::Message;
use proto::pb;
use proto::wire::{FRAME_HEADER_LEN, FrameReader, WireError, decode_frame, encode_frame};

use super::{assert_within, limit};

/// How a stream's decoding ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Out of bytes, with this many of an incomplete frame left over.
    Incomplete(usize),
    /// A header announced this length, over the limit.
    TooLarge(usize),
}

/// The target.
pub fn frame(data: &[u8]) {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let max_len = limit(selector);
    let read = usize::from(selector >> 3) + 1;
    let ((), usage) = crate::alloc::measure(|| check(stream, max_len, read));
    // A refused length allocates nothing; an accepted one at most its frame (BytesMut may
    // double on the way). The reader starts with 64 KiB and grows by 16 KiB; decoded
    // messages and the copies made here are a small multiple of the input.
    let largest = 2 * (max_len + FRAME_HEADER_LEN) + 80 * 1024 + 8 * stream.len();
    assert_within(usage, largest, 2 * largest + 64 * stream.len(), "frame");
}

fn check(stream: &[u8], max_len: usize, read: usize) {
    let (frames, end) = whole(stream, max_len);
    assert_eq!(
        in_pieces(stream, max_len, read),
        (frames.clone(), end),
        "reading {read} bytes at a time"
    );
    reader(stream, max_len, &frames, end);
    for body in &frames {
        round_trip::<pb::Batch>(body);
        round_trip::<pb::Ack>(body);
    }
}

/// Decodes `stream` from one buffer, checking each step against the header.
fn whole(stream: &[u8], max_len: usize) -> (Vec<Bytes>, End) {
    let mut buf = BytesMut::from(stream);
    let mut frames = Vec::new();
    loop {
        let before = buf.clone();
        let announced = before
            .first_chunk::<4>()
            .map(|h| u32::from_be_bytes(*h) as usize);
        match decode_frame(&mut buf, max_len) {
            Ok(Some(body)) => {
                let len = announced.expect("a frame has a header");
                assert!(len <= max_len, "frame of {len} over the limit {max_len}");
                assert_eq!(body.len(), len);
                assert_eq!(body, before[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]);
                assert_eq!(buf, before[FRAME_HEADER_LEN + len..]);
                frames.push(body);
            }
            Ok(None) => {
                assert_eq!(buf, before, "need-more consumed bytes");
                if let Some(len) = announced {
                    assert!(len <= max_len && before.len() < FRAME_HEADER_LEN + len);
                }
                return (frames, End::Incomplete(buf.len()));
            }
            Err(WireError::FrameTooLarge { len, max }) => {
                assert_eq!((Some(len), max), (announced, max_len));
                assert!(len > max_len);
                assert_eq!(buf, before, "a refused frame consumed bytes");
                return (frames, End::TooLarge(len));
            }
            Err(other) => panic!("decode_frame returned {other:?}"),
        }
    }
}

/// Decodes `stream` arriving `read` bytes at a time.
fn in_pieces(stream: &[u8], max_len: usize, read: usize) -> (Vec<Bytes>, End) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(read) {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame(&mut buf, max_len) {
                Ok(Some(body)) => frames.push(body),
                Ok(None) => break,
                Err(WireError::FrameTooLarge { len, .. }) => return (frames, End::TooLarge(len)),
                Err(other) => panic!("decode_frame returned {other:?}"),
            }
        }
    }
    (frames, End::Incomplete(buf.len()))
}

/// [`FrameReader`] over the stream: the same frames, as batches, then the same end.
fn reader(stream: &[u8], max_len: usize, frames: &[Bytes], end: End) {
    let mut reader = FrameReader::new(stream, max_len);
    for body in frames {
        let got = poll_now(reader.next::<pb::Batch>());
        match pb::Batch::decode(body.clone()) {
            Ok(batch) => assert_eq!(got.expect("a valid batch").as_ref(), Some(&batch)),
            Err(_) => {
                assert!(matches!(got, Err(WireError::Malformed(_))), "{got:?}");
                return;
            }
        }
    }
    let got = poll_now(reader.next::<pb::Batch>());
    match end {
        End::Incomplete(0) => assert!(matches!(got, Ok(None)), "{got:?}"),
        End::Incomplete(left) => assert!(
            matches!(got, Err(WireError::TruncatedFrame { buffered }) if buffered == left),
            "{got:?}"
        ),
        End::TooLarge(len) => assert!(
            matches!(got, Err(WireError::FrameTooLarge { len: l, max }) if l == len && max == max_len),
            "{got:?}"
        ),
    }
}

/// Polls a future that cannot wait (it reads from a slice) to its end.
fn poll_now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("reading from a slice waited"),
    }
}

/// If `body` decodes as an `M`, its frame decodes to the same `M`.
fn round_trip<M: Message + Default + PartialEq>(body: &Bytes) {
    let Ok(msg) = M::decode(body.clone()) else {
        return;
    };
    let mut buf = BytesMut::new();
    encode_frame(&msg, &mut buf);
    assert_eq!(buf.len(), FRAME_HEADER_LEN + msg.encoded_len());
    let again = decode_frame(&mut buf, usize::MAX)
        .expect("no limit")
        .expect("a whole frame");
    assert!(buf.is_empty());
    assert!(
        M::decode(again).expect("re-encoded message decodes") == msg,
        "a message changed in a round trip"
    );
}
