//! Frames on a byte stream: a 4-byte big-endian length, then a protobuf message.
//!
//! Owns the frame header, the frame size limit and the [`Datagram`] domain type. Does not own
//! how frames are scheduled or acknowledged (that is the agent's and the sink's business).

pub mod hex;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::pb;

/// Length of the frame header (the big-endian `u32` length).
pub const FRAME_HEADER_LEN: usize = 4;

/// Default limit on a frame's length, enforced by readers: 4 MiB, far above the default batch
/// size and the largest datagram, far below what would let a peer exhaust memory.
pub const DEFAULT_MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Most that [`decode_frame`] reserves ahead of the bytes of an incomplete frame.
const RESERVE_AHEAD: usize = 256 * 1024;

/// What a [`FrameReader`] reads into when no frame has told it how much is coming (and the
/// least it allocates at a time).
const READ_AHEAD: usize = 4 * 1024;

/// Errors from decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frame header announces more bytes than the reader accepts.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The reader's limit.
        max: usize,
    },
    /// The frame's body is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    TruncatedFrame {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// Reading the underlying stream failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends `msg` to `dst` as one frame.
///
/// # Panics
///
/// If the encoded message is larger than `u32::MAX` bytes.
pub fn encode_frame<M: Message>(msg: &M, dst: &mut BytesMut) {
    let len = msg.encoded_len();
    let header = u32::try_from(len).expect("frame larger than 4 GiB");
    dst.reserve(FRAME_HEADER_LEN + len);
    dst.put_u32(header);
    msg.encode(dst)
        .expect("reserved enough capacity for the message");
}

/// A batch frame made earlier (by [`encode_frame`], compressed or not) marked as catch-up
/// traffic: the same frame with `timing = TIMING_CATCH_UP` and the agent's live rate
/// appended to its body, and its length updated. Protobuf keeps the last value of a scalar
/// field that occurs twice, so the mark overrides the `TIMING_LIVE` the frame was made with;
/// a sink older than the field skips both. Copies the frame once (catch-up batches are the
/// exception: they follow an outage).
///
/// `frame` must be one whole frame: header and body.
pub fn mark_catch_up(frame: &[u8], live_datagrams_per_second: u32) -> Bytes {
    let body = frame.get(FRAME_HEADER_LEN..).unwrap_or_default();
    let timing = pb::Timing::CatchUp as i32;
    let suffix_len = prost::encoding::int32::encoded_len(5, &timing)
        + prost::encoding::uint32::encoded_len(6, &live_datagrams_per_second);
    let len = body.len() + suffix_len;
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + len);
    out.put_u32(u32::try_from(len).expect("frame larger than 4 GiB"));
    out.extend_from_slice(body);
    prost::encoding::int32::encode(5, &timing, &mut out);
    prost::encoding::uint32::encode(6, &live_datagrams_per_second, &mut out);
    out.freeze()
}

/// Splits one complete frame's body off the front of `src`.
///
/// Returns `Ok(None)` when `src` holds no complete frame yet (nothing is consumed), and an
/// error, before any allocation, when the header announces more than `max_len` bytes.
pub fn decode_frame(src: &mut BytesMut, max_len: usize) -> Result<Option<Bytes>, WireError> {
    if src.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max_len {
        return Err(WireError::FrameTooLarge { len, max: max_len });
    }
    if src.len() < FRAME_HEADER_LEN + len {
        // Room for what is missing, but never more than `RESERVE_AHEAD` at a time: memory
        // follows the bytes that arrive, not what a header announces, so a peer that announces
        // a large frame and then stalls holds little.
        src.reserve((FRAME_HEADER_LEN + len - src.len()).min(RESERVE_AHEAD));
        return Ok(None);
    }
    src.advance(FRAME_HEADER_LEN);
    Ok(Some(src.split_to(len).freeze()))
}

/// Reads frames of type `M` from an async byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_len: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    /// A reader that refuses frames longer than `max_len` bytes.
    ///
    /// Its buffer starts small ([`READ_AHEAD`]) and grows to the frames that come: a sink
    /// holds one reader per connected agent, and most agents send a few kilobytes at a time.
    /// A frame's header makes room for the rest of it ([`decode_frame`]), so large frames are
    /// still read in few calls.
    pub fn new(inner: R, max_len: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_AHEAD),
            max_len,
        }
    }

    /// The next message, or `Ok(None)` at a clean end of stream (between frames).
    ///
    /// # Errors
    ///
    /// [`WireError`] when a frame is too large or malformed, the stream ends inside a frame, or
    /// the read fails. The stream is not usable after an error.
    pub async fn next<M: Message + Default>(&mut self) -> Result<Option<M>, WireError> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(body) = decode_frame(&mut self.buf, self.max_len)? {
                return Ok(Some(M::decode(body)?));
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(READ_AHEAD);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::TruncatedFrame {
                        buffered: self.buf.len(),
                    })
                };
            }
        }
    }

    /// Bytes read and not yet returned as a message: more than 0 between [`next`](Self::next)
    /// calls means a frame has begun and not yet completed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Gives back the underlying stream.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// One UDP datagram as received by the agent: payload, source and arrival time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The UDP payload, unchanged.
    pub payload: Bytes,
    /// Where it came from.
    pub source: SocketAddr,
    /// Arrival time, nanoseconds since the Unix epoch.
    pub received_unix_nanos: u64,
}

impl Datagram {
    /// The protobuf form (the payload is shared, not copied).
    pub fn to_proto(&self) -> pb::Datagram {
        let source_ip = match self.source.ip() {
            IpAddr::V4(ip) => Bytes::copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => Bytes::copy_from_slice(&ip.octets()),
        };
        pb::Datagram {
            payload: self.payload.clone(),
            source_ip,
            source_port: u32::from(self.source.port()),
            received_unix_nanos: self.received_unix_nanos,
        }
    }
}

impl pb::Datagram {
    /// The UDP source this datagram came from, when the message carries a valid one.
    pub fn source(&self) -> Option<SocketAddr> {
        let port = u16::try_from(self.source_port).ok()?;
        let ip = match self.source_ip.len() {
            4 => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&self.source_ip[..]).ok()?,
            )),
            16 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&self.source_ip[..]).ok()?,
            )),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }

    /// Bytes this datagram adds to an encoded [`pb::Batch`], including its field tag and length.
    pub fn encoded_len_in_batch(&self) -> usize {
        let len = self.encoded_len();
        1 + prost::length_delimiter_len(len) + len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize, size: usize) -> pb::Batch {
        pb::Batch {
            session: 7,
            sequence: 42,
            datagrams: (0..n)
                .map(|i| {
                    Datagram {
                        payload: Bytes::from(vec![i as u8; size]),
                        source: "192.0.2.1:6343".parse().unwrap(),
                        received_unix_nanos: i as u64,
                    }
                    .to_proto()
                })
                .collect(),
            timing: pb::Timing::Live.into(),
            ..Default::default()
        }
    }

    #[test]
    fn frame_round_trip() {
        let msg = batch(3, 1400);
        let mut buf = BytesMut::new();
        encode_frame(&msg, &mut buf);
        encode_frame(&msg, &mut buf);
        for _ in 0..2 {
            let body = decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
                .unwrap()
                .unwrap();
            assert_eq!(pb::Batch::decode(body).unwrap(), msg);
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn a_catch_up_mark_overrides_live_and_keeps_the_rest() {
        let live = batch(3, 200);
        let mut frame = BytesMut::new();
        encode_frame(&live, &mut frame);
        let marked = mark_catch_up(&frame, 2_000);
        let mut buf = BytesMut::from(&marked[..]);
        let body = decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap();
        assert!(buf.is_empty(), "the length was updated");
        let got = pb::Batch::decode(body).unwrap();
        assert_eq!(got.timing(), pb::Timing::CatchUp);
        assert_eq!(got.live_datagrams_per_second, 2_000);
        assert_eq!(
            pb::Batch {
                timing: live.timing,
                live_datagrams_per_second: 0,
                ..got
            },
            live
        );
        // Marked twice (sent again once more): still one batch, still catch-up.
        let twice = mark_catch_up(&marked, 7);
        let got = pb::Batch::decode(&twice[FRAME_HEADER_LEN..]).unwrap();
        assert_eq!(
            (got.timing(), got.live_datagrams_per_second),
            (pb::Timing::CatchUp, 7)
        );
    }

    /// `Batch` as the release before `timing` declared it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PreviousBatch {
        #[prost(fixed64, tag = "1")]
        session: u64,
        #[prost(uint64, tag = "2")]
        sequence: u64,
        #[prost(message, repeated, tag = "3")]
        datagrams: Vec<pb::Datagram>,
        #[prost(bytes = "bytes", tag = "4")]
        zstd_datagrams: Bytes,
    }

    #[test]
    fn the_previous_release_reads_marked_frames_and_this_one_reads_its_frames() {
        // A sink of the previous release, given a batch marked live and then catch-up:
        // the same batch, the marks skipped.
        let live = batch(2, 100);
        let mut frame = BytesMut::new();
        encode_frame(&live, &mut frame);
        let marked = mark_catch_up(&frame, 1_000);
        let old = PreviousBatch::decode(&marked[FRAME_HEADER_LEN..]).unwrap();
        assert_eq!(
            (old.session, old.sequence, &old.datagrams),
            (live.session, live.sequence, &live.datagrams)
        );
        // A batch of an agent of the previous release: no timing, which this release reads
        // as unspecified (the sink paces it as catch-up).
        let previous = PreviousBatch {
            session: 1,
            sequence: 2,
            datagrams: live.datagrams.clone(),
            zstd_datagrams: Bytes::new(),
        };
        let now = pb::Batch::decode(previous.encode_to_vec().as_slice()).unwrap();
        assert_eq!(now.timing(), pb::Timing::Unspecified);
        assert_eq!(now.datagrams, live.datagrams);
    }

    #[test]
    fn truncated_at_every_offset_is_incomplete() {
        let mut full = BytesMut::new();
        encode_frame(&batch(2, 100), &mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(
                decode_frame(&mut part, DEFAULT_MAX_FRAME_LEN)
                    .unwrap()
                    .is_none()
            );
            assert_eq!(part.len(), cut, "nothing consumed at offset {cut}");
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_its_body_arrives() {
        let mut buf = BytesMut::from(&[0x00, 0x10, 0x00, 0x01][..]);
        let err = decode_frame(&mut buf, 1024 * 1024).unwrap_err();
        assert!(matches!(
            err,
            WireError::FrameTooLarge {
                len: 1_048_577,
                max: 1_048_576
            }
        ));
    }

    #[test]
    fn encoded_len_in_batch_is_exact() {
        let msg = batch(5, 300);
        let parts: usize = msg
            .datagrams
            .iter()
            .map(pb::Datagram::encoded_len_in_batch)
            .sum();
        let empty = pb::Batch {
            datagrams: vec![],
            ..msg.clone()
        };
        assert_eq!(empty.encoded_len() + parts, msg.encoded_len());
    }

    #[test]
    fn source_round_trips_v4_and_v6() {
        for addr in ["192.0.2.1:6343", "[2001:db8::1]:40000"] {
            let d = Datagram {
                payload: Bytes::new(),
                source: addr.parse().unwrap(),
                received_unix_nanos: 0,
            };
            assert_eq!(d.to_proto().source(), Some(d.source));
        }
        let bad = pb::Datagram {
            source_ip: Bytes::from_static(&[1, 2, 3]),
            ..Default::default()
        };
        assert_eq!(bad.source(), None);
    }

    #[tokio::test]
    async fn reader_yields_messages_then_clean_end() {
        let mut buf = BytesMut::new();
        let msg = batch(2, 10);
        encode_frame(&msg, &mut buf);
        let mut reader = FrameReader::new(&buf[..], DEFAULT_MAX_FRAME_LEN);
        assert_eq!(reader.next::<pb::Batch>().await.unwrap(), Some(msg));
        assert_eq!(reader.next::<pb::Batch>().await.unwrap(), None);

        let mut reader = FrameReader::new(&buf[..buf.len() - 1], DEFAULT_MAX_FRAME_LEN);
        let err = reader.next::<pb::Batch>().await.unwrap_err();
        assert!(matches!(err, WireError::TruncatedFrame { .. }), "{err}");
    }
}
