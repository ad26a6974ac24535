//! Target `hex_lines`: the line reader of `--ssh-hex` ([`LineDecoder`]), as the sink reads
//! stdin from an ssh pipe.
//!
//! Input: one selector byte (bits 0–2: the largest datagram, bits 3–7: the read size, 1 to 32
//! bytes), then the stream of lines.
//!
//! Checks: each call consumes at least one byte and at most what it was given; the datagrams
//! and errors (with their line numbers) are the same whether the stream arrives whole or in
//! pieces, and the same as a plain reading of the module's rules ([`model`]); every datagram
//! written back with [`encode_line`] reads back the same; memory stays within a line's limit.

use proto::MAX_DATAGRAM_LEN;
use proto::wire::hex::{Line, LineDecoder, LineError, encode_line};

use super::assert_within;

/// Largest datagrams the target picks from.
const MAX_LENS: [usize; 8] = [MAX_DATAGRAM_LEN, 1_400, 255, 64, 16, 3, 1, 0];

/// One line's outcome: a datagram, or an error with its line number.
type Outcome = Result<Vec<u8>, (u64, LineError)>;

/// The target.
pub fn hex_lines(data: &[u8]) {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let max_len = MAX_LENS[usize::from(selector & 0x07)];
    let read = usize::from(selector >> 3) + 1;
    let ((), usage) = crate::alloc::measure(|| check(stream, max_len, read));
    // The decoder keeps one line (2 digits a byte plus 256 of whitespace; a Vec may double)
    // and one datagram. The outcomes collected here are at most one a line, so one per byte
    // of input and one more, in a Vec that may double (a stream of one-byte lines, each an
    // error, once came to 16 KiB for 643 bytes).
    let line = 2 * max_len + 256;
    let outcomes = 2 * (stream.len() + 1) * size_of::<Outcome>();
    let largest = 2 * (line + 32) + 4096 + 2 * max_len + outcomes;
    assert_within(usage, largest, 4 * largest + 64 * stream.len(), "hex_lines");
}

fn check(stream: &[u8], max_len: usize, read: usize) {
    let (whole, lines) = decode(stream, max_len, stream.len().max(1));
    let (pieces, lines_in_pieces) = decode(stream, max_len, read);
    assert_eq!(pieces, whole, "reading {read} bytes at a time");
    assert_eq!(lines_in_pieces, lines);
    let (expected, expected_lines) = model(stream, max_len);
    assert_eq!(whole, expected, "the decoder and the rules disagree");
    assert_eq!(lines, expected_lines);
    for datagram in whole.iter().flatten() {
        assert!(datagram.len() <= max_len);
        let mut line = Vec::new();
        encode_line(datagram, &mut line);
        let (again, n) = decode(&line, max_len, line.len());
        assert_eq!((again, n), (vec![Ok(datagram.clone())], 1));
    }
}

/// Feeds `stream` to a decoder `read` bytes at a time; the outcomes and the line count.
fn decode(stream: &[u8], max_len: usize, read: usize) -> (Vec<Outcome>, u64) {
    let mut decoder = LineDecoder::new(max_len);
    let mut out = Vec::new();
    for piece in stream.chunks(read) {
        let mut rest = piece;
        while !rest.is_empty() {
            let (used, line) = decoder.decode(rest);
            assert!(
                (1..=rest.len()).contains(&used),
                "consumed {used} of {}",
                rest.len()
            );
            collect(line, &mut out);
            rest = &rest[used..];
        }
    }
    collect(decoder.finish(), &mut out);
    (out, decoder.lines())
}

fn collect(line: Option<Line<'_>>, out: &mut Vec<Outcome>) {
    match line {
        Some(Line::Datagram(d)) => out.push(Ok(d.to_vec())),
        Some(Line::Malformed { line, error }) => out.push(Err((line, error))),
        None => {}
    }
}

/// The rules of `proto::wire::hex`, read plainly: lines end at `\n` (a last line without one
/// counts); a line longer than the decoder holds (2 digits a byte plus 256) is too long;
/// spaces, tabs, `\r`, `\v` and `\f` around the digits are trimmed and a blank line is skipped;
/// an odd count is reported as its first non-digit, else as odd; more digits than the largest
/// datagram is too long; then the first non-digit, if any.
fn model(stream: &[u8], max_len: usize) -> (Vec<Outcome>, u64) {
    let mut lines: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|last| last.is_empty()) {
        lines.pop();
    }
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let number = i as u64 + 1;
        let space = |b: &u8| b" \t\r\x0b\x0c".contains(b);
        let start = line.iter().position(|b| !space(b)).unwrap_or(line.len());
        let end = line
            .iter()
            .rposition(|b| !space(b))
            .map_or(start, |i| i + 1);
        let digits = &line[start..end];
        let first_bad = digits.iter().position(|b| !b.is_ascii_hexdigit());
        let bad = |i: usize| LineError::InvalidCharacter {
            byte: digits[i],
            column: start + i + 1,
        };
        let outcome = if line.len() > 2 * max_len + 256 {
            Err(LineError::TooLong { max: max_len })
        } else if digits.is_empty() {
            continue;
        } else if !digits.len().is_multiple_of(2) {
            Err(first_bad.map_or(
                LineError::OddLength {
                    digits: digits.len(),
                },
                bad,
            ))
        } else if digits.len() / 2 > max_len {
            Err(LineError::TooLong { max: max_len })
        } else if let Some(i) = first_bad {
            Err(bad(i))
        } else {
            Ok(digits
                .chunks(2)
                .map(|pair| {
                    let text = std::str::from_utf8(pair).expect("hex digits are ASCII");
                    u8::from_str_radix(text, 16).expect("two hex digits")
                })
                .collect())
        };
        out.push(outcome.map_err(|e| (number, e)));
    }
    (out, lines.len() as u64)
}
