//! Target `token`: the enrollment token reader ([`parse`], and [`verify`] up to its signature
//! check), as the sink's enrollment port and `relay-agent enroll` read what a user pasted.
//!
//! Input: the token text. There is no selector byte; bytes that are not UTF-8 are replaced
//! (U+FFFD) before parsing, so the mutations still reach the reader.
//!
//! Checks: the verdict (accepted, or which kind of refusal) is the same as a reading written
//! apart ([`model`]: its own base64url decoder and field offsets, the rules in the order the
//! module documents them); an accepted token's fields are those the model read and within
//! their bounds, its payload re-encodes to the same bytes and the text to the same text (one
//! text form per payload); [`verify`] refuses what [`parse`] refuses with the same error, and
//! an accepted token with no key as a bad signature; memory stays within a few token lengths.

use certs::Role;
use certs::token::{
    FIXED_PAYLOAD_LEN, MAX_NAME_LEN, MAX_TEXT_LEN, MAX_TTL, PREFIX, ROLE_AGENT, SIGNATURE_LEN,
    SKEW, TokenError, VERSION, check_name, encode_text, parse, verify,
};

use super::assert_within;

/// Unix seconds the `time` crate represents (years -9999 to 9999).
const TIMES: std::ops::RangeInclusive<i64> = -377_705_116_800..=253_402_300_799;

/// The target.
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (outcome, usage) = crate::alloc::measure(|| parse(&text));
    // The decoded parts (at most the text), the name, and an error message quoting a name
    // (255 bytes, each written at most as a 10-byte escape).
    assert_within(usage, 4 * 1024, 16 * 1024, "token");
    let expected = model(text.as_bytes());
    let now = time::OffsetDateTime::now_utc();
    match (outcome, expected) {
        (Ok((token, signed)), Ok(fields)) => {
            assert_eq!(token.id, fields.id);
            assert_eq!(token.role, Role::Agent);
            assert_eq!(token.not_before.unix_timestamp(), fields.not_before);
            assert_eq!(token.not_after.unix_timestamp(), fields.not_after);
            assert_eq!(token.root_fingerprint, fields.root_fingerprint);
            assert_eq!(token.name.as_bytes(), fields.name);
            assert!((1..=MAX_NAME_LEN).contains(&token.name.len()));
            assert!(check_name(&token.name).is_ok());
            let lifetime = token.not_after - token.not_before;
            assert!(lifetime >= time::Duration::seconds(1) && lifetime <= MAX_TTL);
            assert!(SIGNATURE_LEN.contains(&signed.signature.len()));
            assert!(text.len() <= MAX_TEXT_LEN);
            assert_eq!(token.payload(), signed.payload, "the payload re-encodes");
            assert_eq!(signed.signature, fields.signature);
            assert_eq!(encode_text(&signed.payload, &signed.signature), text);
            assert!(text[PREFIX.len()..].starts_with(signed.payload_text));
            assert_eq!(verify(&text, &[], now, SKEW), Err(TokenError::BadSignature));
        }
        (Err(error), Err(kind)) => {
            let got = match &error {
                TokenError::Malformed(_) => Refusal::Malformed,
                TokenError::UnsupportedVersion(v) => Refusal::Version(*v),
                TokenError::WrongRole(r) => Refusal::Role(*r),
                other => panic!("parse refused with {other:?}, which it never should"),
            };
            assert_eq!(got, kind, "parse: {error}");
            assert_eq!(verify(&text, &[], now, SKEW), Err(error));
        }
        (Ok((token, _)), Err(kind)) => panic!("accepted {token:?}; the model refuses: {kind:?}"),
        (Err(error), Ok(_)) => panic!("refused ({error}); the model accepts"),
    }
}

/// The kinds of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Malformed,
    Version(u8),
    Role(u8),
}

/// What the model reads from an accepted token.
struct Fields {
    id: [u8; 16],
    not_before: i64,
    not_after: i64,
    root_fingerprint: [u8; 32],
    name: Vec<u8>,
    signature: Vec<u8>,
}

/// The token rules, read apart from the module: length, prefix, two base64url parts, the
/// signature's length, then the payload's version, size, role, name and times.
fn model(text: &[u8]) -> Result<Fields, Refusal> {
    use Refusal::Malformed;
    if text.len() > MAX_TEXT_LEN || !text.starts_with(PREFIX.as_bytes()) {
        return Err(Malformed);
    }
    let rest = &text[PREFIX.len()..];
    let dot = rest.iter().position(|&b| b == b'.').ok_or(Malformed)?;
    let payload = base64url(&rest[..dot]).ok_or(Malformed)?;
    let signature = base64url(&rest[dot + 1..]).ok_or(Malformed)?;
    if !(8..=72).contains(&signature.len()) {
        return Err(Malformed);
    }
    match payload.first() {
        None => return Err(Malformed),
        Some(&v) if v != VERSION => return Err(Refusal::Version(v)),
        Some(_) => {}
    }
    if payload.len() < 67 {
        return Err(Malformed);
    }
    if payload[17] != ROLE_AGENT {
        return Err(Refusal::Role(payload[17]));
    }
    let name = &payload[67..];
    if name.len() != usize::from(payload[66]) || !name_ok(name) {
        return Err(Malformed);
    }
    let at = |i: usize| i64::from_be_bytes(payload[i..i + 8].try_into().unwrap());
    let (not_before, not_after) = (at(18), at(26));
    if !TIMES.contains(&not_before) || !TIMES.contains(&not_after) {
        return Err(Malformed);
    }
    if !(1..=7 * 24 * 3600).contains(&(not_after - not_before)) {
        return Err(Malformed);
    }
    assert_eq!(FIXED_PAYLOAD_LEN, 67);
    Ok(Fields {
        id: payload[1..17].try_into().unwrap(),
        not_before,
        not_after,
        root_fingerprint: payload[34..66].try_into().unwrap(),
        name: name.to_vec(),
        signature,
    })
}

/// 1 to 64 bytes of UTF-8, no `/` or `\`, no leading `.`, no control character, no space at
/// either end.
fn name_ok(name: &[u8]) -> bool {
    let Ok(name) = std::str::from_utf8(name) else {
        return false;
    };
    (1..=64).contains(&name.len())
        && !name.contains(['/', '\\'])
        && !name.starts_with('.')
        && !name.chars().any(char::is_control)
        && name.trim() == name
}

/// RFC 4648 §5 without padding, canonical: the unused bits of the last digit are zero.
fn base64url(digits: &[u8]) -> Option<Vec<u8>> {
    let value = |d: u8| match d {
        b'A'..=b'Z' => Some(d - b'A'),
        b'a'..=b'z' => Some(d - b'a' + 26),
        b'0'..=b'9' => Some(d - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    if digits.len() % 4 == 1 {
        return None;
    }
    let mut bits = 0u32;
    let mut held = 0;
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for &d in digits {
        bits = (bits << 6) | u32::from(value(d)?);
        held += 6;
        if held >= 8 {
            held -= 8;
            out.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    // What is left are the unused low bits of the last digit.
    (bits == 0).then_some(out)
}
