//! One datagram per line of hex: the protocol of the older `sflow_fwd.py | ssh` pipe.
//!
//! The writer side emits exactly what the original script printed: the datagram's bytes as
//! **lowercase** hex digits, then `\n`. The reader side is lenient where the original was
//! strict and strict where it was silent: it accepts upper case, a trailing `\r` and
//! surrounding spaces or tabs, skips blank lines, and reports each malformed line (odd
//! length, a non-hex character, longer than the largest datagram) with its line number
//! instead of crashing or sending garbage. Memory stays bounded whatever the line length.
//!
//! Sans-IO: the caller reads and writes; this module only turns bytes into bytes.

use std::fmt;

/// The two lowercase hex digits of each byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [DIGITS[i >> 4], DIGITS[i & 0x0f]];
        i += 1;
    }
    table
};

/// Value of each byte as a hex digit, or `0xff`.
const HEX_VALUE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Appends `datagram` to `out` as one line: lowercase hex, then `\n`.
pub fn encode_line(datagram: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + datagram.len() * 2 + 1, b'\n');
    for (pair, &b) in out[start..].chunks_exact_mut(2).zip(datagram) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// Why a line was not a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// An odd number of hex digits.
    OddLength {
        /// Digits on the line.
        digits: usize,
    },
    /// A character that is not a hex digit (inside the line, after trimming).
    InvalidCharacter {
        /// The offending byte.
        byte: u8,
        /// Its 1-based column.
        column: usize,
    },
    /// More hex digits than the largest datagram needs.
    TooLong {
        /// The largest datagram, bytes.
        max: usize,
    },
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OddLength { digits } => write!(f, "odd number of hex digits ({digits})"),
            Self::InvalidCharacter { byte, column } => {
                write!(
                    f,
                    "not a hex digit at column {column}: {:?}",
                    char::from(*byte).escape_default().to_string()
                )
            }
            Self::TooLong { max } => {
                write!(f, "line longer than the largest datagram ({max} bytes)")
            }
        }
    }
}

/// What one line held.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A datagram's bytes.
    Datagram(&'a [u8]),
    /// A malformed line, to report and skip.
    Malformed {
        /// 1-based line number.
        line: u64,
        /// Why.
        error: LineError,
    },
}

/// Splits a byte stream into lines and decodes each into a datagram.
///
/// Holds at most one line's worth of hex (`2 × max_len` digits plus a little whitespace); the
/// rest of a longer line is skipped as it arrives and the line reported as too long.
#[derive(Debug)]
pub struct LineDecoder {
    max_len: usize,
    line: u64,
    raw: Vec<u8>,
    overflow: bool,
    out: Vec<u8>,
}

/// Whitespace tolerated around the hex digits (`\r` of CRLF included).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\x0b' | b'\x0c')
}

impl LineDecoder {
    /// A decoder for datagrams of at most `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            line: 0,
            raw: Vec::with_capacity(4096),
            overflow: false,
            out: Vec::with_capacity(2048),
        }
    }

    /// Lines completed so far.
    pub fn lines(&self) -> u64 {
        self.line
    }

    /// Consumes `input` up to and including its first `\n`. Returns how many bytes were
    /// consumed and, when a line ended there and was not blank, what it held. Call again
    /// with the rest.
    pub fn decode<'s>(&'s mut self, input: &[u8]) -> (usize, Option<Line<'s>>) {
        match memchr::memchr(b'\n', input) {
            None => {
                self.push(input);
                (input.len(), None)
            }
            // The common case, a whole line inside `input`: decode it in place, no copy. A
            // line over the limit goes through `push`, as it would have in pieces, so that how
            // the stream was cut into reads never changes the verdict.
            Some(end) if self.raw.is_empty() && !self.overflow && end <= self.line_limit() => {
                self.line += 1;
                let result = self.decode_line(&input[..end]);
                (end + 1, self.outcome(result))
            }
            Some(end) => {
                self.push(&input[..end]);
                (end + 1, self.finish_line())
            }
        }
    }

    /// At end of input: the last line when it had no `\n` (the original script would have
    /// dropped its last character; this decodes it whole).
    pub fn finish(&mut self) -> Option<Line<'_>> {
        if self.raw.is_empty() && !self.overflow {
            return None;
        }
        self.finish_line()
    }

    fn push(&mut self, part: &[u8]) {
        if self.overflow {
            return;
        }
        if self.raw.len() + part.len() > self.line_limit() {
            // No line this long can be valid, whatever follows: drop it now, remember, and
            // skip the rest of it as it arrives.
            self.overflow = true;
            self.raw.clear();
            return;
        }
        self.raw.extend_from_slice(part);
    }

    /// The longest line held: room for the digits of the largest datagram plus generous
    /// whitespace.
    fn line_limit(&self) -> usize {
        self.max_len * 2 + 256
    }

    fn finish_line(&mut self) -> Option<Line<'_>> {
        self.line += 1;
        if std::mem::take(&mut self.overflow) {
            return Some(Line::Malformed {
                line: self.line,
                error: LineError::TooLong { max: self.max_len },
            });
        }
        let raw = std::mem::take(&mut self.raw);
        let result = self.decode_line(&raw);
        self.raw = raw;
        self.raw.clear();
        self.outcome(result)
    }

    fn outcome(&self, result: Result<bool, LineError>) -> Option<Line<'_>> {
        match result {
            Ok(true) => Some(Line::Datagram(&self.out)),
            Ok(false) => None,
            Err(error) => Some(Line::Malformed {
                line: self.line,
                error,
            }),
        }
    }

    /// Decodes one line (without its `\n`) into `self.out`; `Ok(false)` for a blank line.
    fn decode_line(&mut self, raw: &[u8]) -> Result<bool, LineError> {
        let start = raw.iter().position(|&b| !is_space(b)).unwrap_or(raw.len());
        let end = raw
            .iter()
            .rposition(|&b| !is_space(b))
            .map_or(start, |i| i + 1);
        let digits = &raw[start..end];
        if digits.is_empty() {
            return Ok(false);
        }
        if !digits.len().is_multiple_of(2) {
            // Report a bad character before the odd length: it is the more useful message.
            if let Some(i) = digits
                .iter()
                .position(|&b| HEX_VALUE[usize::from(b)] == 0xff)
            {
                return Err(LineError::InvalidCharacter {
                    byte: digits[i],
                    column: start + i + 1,
                });
            }
            return Err(LineError::OddLength {
                digits: digits.len(),
            });
        }
        if digits.len() / 2 > self.max_len {
            return Err(LineError::TooLong { max: self.max_len });
        }
        self.out.clear();
        self.out.resize(digits.len() / 2, 0);
        // Decode without branching per byte; any non-digit sets a high bit in `bad`.
        let mut bad = 0u8;
        for (byte, pair) in self.out.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = HEX_VALUE[usize::from(pair[0])];
            let lo = HEX_VALUE[usize::from(pair[1])];
            bad |= hi | lo;
            *byte = hi << 4 | lo;
        }
        if bad > 15 {
            let i = digits
                .iter()
                .position(|&b| HEX_VALUE[usize::from(b)] == 0xff)
                .expect("a non-digit is there");
            return Err(LineError::InvalidCharacter {
                byte: digits[i],
                column: start + i + 1,
            });
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns datagrams and errors in order.
    fn run(input: &[u8], step: usize, max: usize) -> Vec<Result<Vec<u8>, (u64, LineError)>> {
        let mut decoder = LineDecoder::new(max);
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (used, line) = decoder.decode(rest);
                match line {
                    Some(Line::Datagram(d)) => out.push(Ok(d.to_vec())),
                    Some(Line::Malformed { line, error }) => out.push(Err((line, error))),
                    None => {}
                }
                rest = &rest[used..];
            }
        }
        match decoder.finish() {
            Some(Line::Datagram(d)) => out.push(Ok(d.to_vec())),
            Some(Line::Malformed { line, error }) => out.push(Err((line, error))),
            None => {}
        }
        out
    }

    #[test]
    fn encodes_lowercase_with_newline() {
        let mut out = Vec::new();
        encode_line(&[0x00, 0xab, 0xff, 0x10], &mut out);
        encode_line(&[], &mut out);
        assert_eq!(out, b"00abff10\n\n");
    }

    #[test]
    fn round_trips_every_byte_value_in_any_chunking() {
        let datagrams: Vec<Vec<u8>> = (0..40)
            .map(|i| (0..=255u8).cycle().skip(i * 7).take(i * 31 + 1).collect())
            .collect();
        let mut stream = Vec::new();
        for d in &datagrams {
            encode_line(d, &mut stream);
        }
        for step in [1, 2, 3, 7, 64, 4096, stream.len()] {
            let got: Vec<Vec<u8>> = run(&stream, step, 65_507)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, datagrams, "step {step}");
        }
    }

    #[test]
    fn tolerates_case_crlf_whitespace_and_blank_lines() {
        let input = b"  ABcd01 \r\n\r\n\n\tff\t\nEF";
        let got: Vec<Vec<u8>> = run(input, 5, 100).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, vec![vec![0xab, 0xcd, 0x01], vec![0xff], vec![0xef]]);
    }

    #[test]
    fn reports_bad_lines_with_numbers_and_goes_on() {
        let long = "ab".repeat(101);
        let input = format!("0102\nabc\n01zz\n{long}\n03\nab cd\n");
        let got = run(input.as_bytes(), 3, 100);
        assert_eq!(
            got,
            vec![
                Ok(vec![1, 2]),
                Err((2, LineError::OddLength { digits: 3 })),
                Err((
                    3,
                    LineError::InvalidCharacter {
                        byte: b'z',
                        column: 3
                    }
                )),
                Err((4, LineError::TooLong { max: 100 })),
                Ok(vec![3]),
                Err((
                    6,
                    LineError::InvalidCharacter {
                        byte: b' ',
                        column: 3
                    }
                )),
            ]
        );
    }

    #[test]
    fn a_huge_line_is_skipped_with_bounded_memory() {
        let mut decoder = LineDecoder::new(1000);
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..100 {
            let (used, line) = decoder.decode(&chunk);
            assert_eq!((used, line), (chunk.len(), None));
            assert!(decoder.raw.capacity() <= 2 * 1000 + 256 + 64 * 1024);
        }
        let (used, line) = decoder.decode(b"\n0a0b\n");
        assert_eq!(used, 1);
        assert_eq!(
            line,
            Some(Line::Malformed {
                line: 1,
                error: LineError::TooLong { max: 1000 }
            })
        );
        let (_, line) = decoder.decode(b"0a0b\n");
        assert_eq!(line, Some(Line::Datagram(&[0x0a, 0x0b])));
    }

    #[test]
    fn a_line_over_the_limit_is_too_long_however_it_arrives() {
        // Found by the fuzzer (target hex_lines): 597 digits with a largest datagram of 1 byte
        // were "too long" when read in pieces but "odd length" when read whole. Whitespace
        // around the digits makes it visible for valid lines too.
        let mut line = vec![b' '; 300];
        line.extend_from_slice(b"0a\n");
        for input in [&[b'a'; 597][..], &line] {
            let mut stream = input.to_vec();
            if !stream.ends_with(b"\n") {
                stream.push(b'\n');
            }
            for step in [1, 2, 7, stream.len()] {
                assert_eq!(
                    run(&stream, step, 1),
                    vec![Err((1, LineError::TooLong { max: 1 }))],
                    "step {step}"
                );
            }
        }
    }

    #[test]
    fn error_messages_read_well() {
        assert_eq!(
            LineError::OddLength { digits: 3 }.to_string(),
            "odd number of hex digits (3)"
        );
        assert_eq!(
            LineError::InvalidCharacter {
                byte: b'z',
                column: 4
            }
            .to_string(),
            "not a hex digit at column 4: \"z\""
        );
    }
}
