//! Target `batch`: a frame body as the sink handles it: decoded as a [`pb::Batch`], expanded
//! when compressed, then read datagram by datagram (source address, sFlow header); and, as the
//! agent does for a sink without compression, turned into a plain frame ([`plain_frame`]).
//!
//! Input: one selector byte (the expansion limit), then the frame body (protobuf).
//!
//! Checks: decoding never panics; a decoded batch re-encodes to one that decodes the same and
//! whose length [`pb::Datagram::encoded_len_in_batch`] predicts; a datagram's source address
//! survives the domain type and back; [`Expander::expand`] and [`plain_frame`] agree on what
//! they accept and produce the same datagrams; allocations stay within the limit plus a small
//! multiple of the input.

use bytes::{Bytes, BytesMut};
use prost::Message;
use proto::compression::{Expander, plain_frame};
use proto::pb;
use proto::sflow::SequenceTracker;
use proto::wire::{Datagram, decode_frame, encode_frame};

use super::{assert_within, limit};

/// The target.
pub fn batch(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let max_len = limit(selector);
    let body = Bytes::copy_from_slice(body);
    let ((), usage) = crate::alloc::measure(|| check(&body, max_len));
    // Expansion allocates at most the limit (plus zstd's context, some 100 KiB); decoding
    // a few pointers per input byte (a datagram can be 2 bytes: `1a 00`).
    let per_byte = 128 * body.len();
    assert_within(
        usage,
        max_len + 512 * 1024 + per_byte,
        3 * max_len + 1024 * 1024 + 4 * per_byte,
        "batch",
    );
}

fn check(body: &Bytes, max_len: usize) {
    if let Ok(ack) = pb::Ack::decode(body.clone()) {
        assert_eq!(pb::Ack::decode(ack.encode_to_vec().as_slice()), Ok(ack));
    }
    let Ok(batch) = pb::Batch::decode(body.clone()) else {
        return;
    };
    let encoded = Bytes::from(batch.encode_to_vec());
    assert_eq!(encoded.len(), batch.encoded_len());
    assert_eq!(pb::Batch::decode(encoded.clone()).as_ref(), Ok(&batch));
    let header_len = pb::Batch {
        datagrams: Vec::new(),
        ..batch.clone()
    }
    .encoded_len();
    let parts: usize = batch
        .datagrams
        .iter()
        .map(pb::Datagram::encoded_len_in_batch)
        .sum();
    assert_eq!(header_len + parts, batch.encoded_len());

    // The sink: expand, then read each datagram.
    let mut expanded = batch.clone();
    let mut expander = Expander::new(max_len);
    let outcome = expander.expand(&mut expanded);
    if outcome.is_ok() {
        assert!(expanded.zstd_datagrams.is_empty());
        if batch.zstd_datagrams.is_empty() {
            assert_eq!(expanded, batch, "a plain batch was changed");
        }
        let mut tracker = SequenceTracker::new(4);
        for d in &expanded.datagrams {
            read_datagram(d);
            let _ = tracker.observe(&d.payload);
        }
    } else {
        // A failed expansion leaves the batch as it was, not half expanded.
        assert_eq!(expanded, batch);
    }

    // The agent, for a sink without compression: the same verdict, the same datagrams.
    let mut frame = BytesMut::new();
    encode_frame(&batch, &mut frame);
    let frame = frame.freeze();
    match (plain_frame(&frame, max_len), outcome) {
        (Ok(plain), Ok(())) => {
            if batch.zstd_datagrams.is_empty() {
                assert_eq!(plain, frame, "a plain frame is sent as it is");
            }
            let mut buf = BytesMut::from(&plain[..]);
            let body = decode_frame(&mut buf, usize::MAX)
                .expect("no limit")
                .expect("a whole frame");
            assert!(buf.is_empty());
            assert_eq!(pb::Batch::decode(body), Ok(expanded));
        }
        (Err(_), Err(_)) => {}
        (plain, expand) => panic!(
            "plain_frame ({}) and expand ({}) disagree",
            describe(&plain),
            describe(&expand)
        ),
    }
}

/// What the sink reads of a datagram besides its payload: the source address, which must
/// survive the domain type and back.
fn read_datagram(d: &pb::Datagram) {
    let Some(source) = d.source() else {
        return;
    };
    assert_eq!(usize::from(source.port()), d.source_port as usize);
    let domain = Datagram {
        payload: d.payload.clone(),
        source,
        received_unix_nanos: d.received_unix_nanos,
    };
    let back = domain.to_proto();
    assert_eq!(back.source(), Some(source));
    assert_eq!(
        &back, d,
        "a datagram with a valid source changed through the domain type"
    );
}

fn describe<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    }
}
