//! Tests of the token format: the round trip, every refusal, signatures by the issuing CA and
//! the root, and the fingerprint.

use rcgen::SigningKey as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::*;

/// A self-signed P-256 certificate made with OpenSSL, and what `openssl x509 -outform der |
/// sha256sum` printed for it.
const FIXTURE_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBoDCCAUWgAwIBAgIUKHmuNogdn8+4ewEVl4bgaJzPVWYwCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZdG9rZW4gZmluZ2VycHJpbnQgZml4dHVyZTAgFw0yNjEyMDMx
OTI2MTlaGA8yMTI2MTEwOTE5MjYxOVowJDEiMCAGA1UEAwwZdG9rZW4gZmluZ2Vy
cHJpbnQgZml4dHVyZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABBN8E6Nk57Vv
D2HgEcYtqvaMEBZ8Li+ZgwnLYcbP2Xcv/T5QCuWBptorSgLFI3XEALH+xhfEjpUi
GwfETjrJWZ6jUzBRMB0GA1UdDgQWBBRHXeHK8HapkfS72cuUhuOx5C6npTAfBgNV
HSMEGDAWgBRHXeHK8HapkfS72cuUhuOx5C6npTAPBgNVHRMBAf8EBTADAQH/MAoG
CCqGSM49BAMCA0kAMEYCIQDALjAQOpAy/j2DmLlPaBUanDXbzcSevk4cm5GMqBYd
KQIhAOkvz5oYFX/Lp1ZbPl6JJhwem5Z3iU45V5mSrdevG58g
-----END CERTIFICATE-----
";
const FIXTURE_SHA256SUM: &str = "a4c0f15b5bae12785d409c51db905d4465155dee5e0c66f94bb9fbd74e4a0341";

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn ca(name: &str) -> Ca {
    Ca::generate(name, 30).unwrap()
}

fn key(ca: &Ca) -> Vec<u8> {
    public_key_of(&der(ca.cert_pem())).unwrap()
}

fn root_fingerprint(ca: &Ca) -> [u8; 32] {
    fingerprint(&der(ca.cert_pem()))
}

/// A token text with `payload` signed by `ca` as `mint` signs.
fn signed(ca: &Ca, payload: &[u8]) -> String {
    let signature = ca
        .issuer()
        .key()
        .sign(&[CONTEXT, payload].concat())
        .unwrap();
    encode_text(payload, &signature)
}

fn minted(ca: &Ca) -> (String, Token) {
    let text = mint(ca, root_fingerprint(ca), "site-b", DEFAULT_TTL).unwrap();
    let token = parse(&text).unwrap().0;
    (text, token)
}

/// Verifies with `ca`'s key at the middle of the token's lifetime.
fn check(text: &str, ca: &Ca) -> Result<Token, TokenError> {
    let now = OffsetDateTime::now_utc() + Duration::minutes(30);
    verify(text, &[&key(ca)], now, SKEW)
}

#[test]
fn a_minted_token_round_trips() {
    let ca = ca("root");
    let before = OffsetDateTime::now_utc().unix_timestamp();
    let text = mint(&ca, root_fingerprint(&ca), "site-b", DEFAULT_TTL).unwrap();
    let after = OffsetDateTime::now_utc().unix_timestamp();
    assert!(text.starts_with("sfr1.") && text.len() < 300, "{text}");
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    );

    let (token, signed) = parse(&text).unwrap();
    assert_eq!(token.name, "site-b");
    assert_eq!(token.role, Role::Agent);
    assert_eq!(token.root_fingerprint, root_fingerprint(&ca));
    assert!((before..=after).contains(&token.not_before.unix_timestamp()));
    assert_eq!(token.not_after - token.not_before, Duration::hours(1));
    assert_eq!(signed.payload, token.payload());
    assert_eq!(encode_text(&signed.payload, &signed.signature), text);
    assert_eq!(token.id_hex().len(), 32);

    assert_eq!(check(&text, &ca).unwrap(), token);
    // Ids are random: a second token differs.
    assert_ne!(minted(&ca).1.id, token.id);
}

#[test]
fn a_flipped_bit_anywhere_is_refused() {
    let ca = ca("root");
    let (text, _) = minted(&ca);
    let (_, signed) = parse(&text).unwrap();
    let keys = [key(&ca)];
    let now = OffsetDateTime::now_utc() + Duration::minutes(30);
    let mut tried = 0;
    for in_signature in [false, true] {
        let bytes = if in_signature {
            &signed.signature
        } else {
            &signed.payload
        };
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let altered = if in_signature {
                encode_text(&signed.payload, &flipped)
            } else {
                encode_text(&flipped, &signed.signature)
            };
            let refused = verify(&altered, &[&keys[0]], now, SKEW);
            assert!(
                refused.is_err(),
                "bit {bit} of the {}: accepted",
                if in_signature { "signature" } else { "payload" }
            );
            tried += 1;
        }
    }
    assert!(tried > 8 * (FIXED_PAYLOAD_LEN + 6 + 64), "{tried}");
    // A flip in the payload's name or times is the signature's to catch.
    let mut name = signed.payload.clone();
    *name.last_mut().unwrap() ^= 0x01;
    assert_eq!(
        check(&encode_text(&name, &signed.signature), &ca),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn truncated_and_trailing_text_is_refused() {
    let ca = ca("root");
    let (text, _) = minted(&ca);
    for len in 0..text.len() {
        assert!(check(&text[..len], &ca).is_err(), "cut at {len}: accepted");
    }
    for suffix in [".", "=", "A", " ", "\n", ".AAAA"] {
        let longer = format!("{text}{suffix}");
        assert!(
            check(&longer, &ca).is_err(),
            "{suffix:?} appended: accepted"
        );
    }
    assert!(matches!(
        parse(&format!("{text}.AAAA")),
        Err(TokenError::Malformed(reason)) if reason.contains("signature is not base64url")
    ));
}

#[test]
fn trailing_payload_bytes_are_refused_even_when_signed() {
    let ca = ca("root");
    let (_, token) = minted(&ca);
    let mut payload = token.payload();
    payload.push(0);
    let err = check(&signed(&ca, &payload), &ca).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed token: the name is announced as 6 bytes, and 7 follow"
    );
    // Cut inside the fixed fields.
    let short = &token.payload()[..40];
    assert_eq!(
        check(&signed(&ca, short), &ca).unwrap_err().to_string(),
        "malformed token: payload of 40 bytes is truncated (at least 68 with a name)"
    );
}

#[test]
fn the_prefix_and_the_length_are_checked_first() {
    let ca = ca("root");
    let (text, _) = minted(&ca);
    let rest = text.strip_prefix(PREFIX).unwrap();
    for prefix in ["sfr2.", "SFR1.", "sfr1", "", "xsfr1."] {
        let err = parse(&format!("{prefix}{rest}")).unwrap_err();
        assert!(
            matches!(&err, TokenError::Malformed(r) if r.contains("does not start with")),
            "{prefix:?}: {err}"
        );
    }
    let long = format!("{text}{}", "A".repeat(MAX_TEXT_LEN + 1 - text.len()));
    assert_eq!(long.len(), 1025);
    assert_eq!(
        parse(&long).unwrap_err().to_string(),
        "malformed token: 1025 bytes, over the limit of 1024"
    );
    assert_eq!(
        parse("sfr1.AQID").unwrap_err().to_string(),
        "malformed token: no signature part (expected sfr1.PAYLOAD.SIGNATURE)"
    );
    // Padding and the standard alphabet are not base64url without padding.
    let (payload_text, signature_text) = rest.split_once('.').unwrap();
    let padded = format!("{PREFIX}{payload_text}==.{signature_text}");
    assert!(matches!(parse(&padded), Err(TokenError::Malformed(_))));
    let plus = format!("{PREFIX}+{}.{signature_text}", &payload_text[1..]);
    assert!(matches!(parse(&plus), Err(TokenError::Malformed(_))));
}

#[test]
fn names_are_checked_at_mint_and_at_parse() {
    let ca = ca("root");
    let fp = root_fingerprint(&ca);
    let at_mint = |name: &str| mint(&ca, fp, name, DEFAULT_TTL).unwrap_err().to_string();
    assert_eq!(
        at_mint(""),
        "name \"\" cannot be put in a token: it is empty"
    );
    let long = "a".repeat(65);
    assert_eq!(
        at_mint(&long),
        format!(
            "name \"{long}\" cannot be put in a token: it is longer than 64 bytes (the limit of a certificate's common name)"
        )
    );
    assert!(at_mint("a/b").contains("cannot be used as a file name"));
    assert!(at_mint(".hidden").contains("cannot be used as a file name"));
    assert!(at_mint(" site").contains("starts or ends with a space"));
    assert!(at_mint("site\nb").contains("control character"));
    assert!(mint(&ca, fp, &"a".repeat(64), DEFAULT_TTL).is_ok());

    // Signed payloads carrying such names are refused too.
    let (_, token) = minted(&ca);
    let with_name = |name: &[u8]| {
        let mut payload = token.payload()[..FIXED_PAYLOAD_LEN].to_vec();
        payload[FIXED_PAYLOAD_LEN - 1] = name.len() as u8;
        payload.extend_from_slice(name);
        check(&signed(&ca, &payload), &ca).unwrap_err().to_string()
    };
    assert_eq!(
        with_name(b""),
        "malformed token: name \"\" cannot be put in a token: it is empty"
    );
    assert!(with_name(&[b'a'; 65]).contains("longer than 64 bytes"));
    assert_eq!(
        with_name(&[0xff, 0xfe]),
        "malformed token: the name is not UTF-8"
    );
}

#[test]
fn lifetimes_over_seven_days_are_refused_at_mint() {
    let ca = ca("root");
    let fp = root_fingerprint(&ca);
    let err = mint(&ca, fp, "site-b", Duration::days(7) + Duration::seconds(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token lifetime 7d1s is refused: it must be from 1 second to 7 days"
    );
    assert!(matches!(
        mint(&ca, fp, "site-b", Duration::ZERO),
        Err(TokenError::InvalidTtl(_))
    ));
    let week = mint(&ca, fp, "site-b", Duration::days(7)).unwrap();
    let token = parse(&week).unwrap().0;
    assert_eq!(token.not_after - token.not_before, Duration::days(7));
    // A signed payload claiming more (or an end before its start) is refused at parse.
    let mut payload = token.payload();
    let later = token.not_after.unix_timestamp() + 1;
    payload[26..34].copy_from_slice(&later.to_be_bytes());
    assert!(
        check(&signed(&ca, &payload), &ca)
            .unwrap_err()
            .to_string()
            .contains("is not within 1 second to 7 days")
    );
    payload[26..34].copy_from_slice(&token.not_before.unix_timestamp().to_be_bytes());
    assert!(matches!(
        check(&signed(&ca, &payload), &ca),
        Err(TokenError::Malformed(_))
    ));
    payload[26..34].copy_from_slice(&i64::MAX.to_be_bytes());
    assert!(
        check(&signed(&ca, &payload), &ca)
            .unwrap_err()
            .to_string()
            .contains("out of range")
    );
}

#[test]
fn times_are_checked_with_the_skew() {
    let ca = ca("root");
    let (text, token) = minted(&ca);
    let keys = [key(&ca)];
    let at = |now: OffsetDateTime, skew: Duration| verify(&text, &[&keys[0]], now, skew);
    let second = Duration::seconds(1);

    assert!(at(token.not_after, Duration::ZERO).is_ok());
    assert!(at(token.not_after + SKEW, SKEW).is_ok());
    let expired = at(token.not_after + SKEW + second, SKEW).unwrap_err();
    assert_eq!(
        expired,
        TokenError::Expired {
            not_after: token.not_after
        }
    );
    assert_eq!(
        expired.to_string(),
        format!("token expired at {}", rfc3339(token.not_after))
    );
    assert!(matches!(
        at(token.not_after + second, Duration::ZERO),
        Err(TokenError::Expired { .. })
    ));

    assert!(at(token.not_before, Duration::ZERO).is_ok());
    assert!(at(token.not_before - SKEW, SKEW).is_ok());
    let early = at(token.not_before - SKEW - second, SKEW).unwrap_err();
    assert_eq!(
        early,
        TokenError::NotYetValid {
            not_before: token.not_before
        }
    );
    assert!(early.to_string().ends_with("(check the clocks)"));
    assert!(matches!(
        at(token.not_before - second, Duration::ZERO),
        Err(TokenError::NotYetValid { .. })
    ));
}

#[test]
fn another_cas_token_is_refused() {
    let ours = ca("ours");
    let theirs = ca("theirs");
    let (text, _) = minted(&theirs);
    assert_eq!(check(&text, &ours), Err(TokenError::BadSignature));
    assert_eq!(
        TokenError::BadSignature.to_string(),
        "token signature does not verify against this sink's issuing or root CA (altered, or \
         made by another CA)"
    );
    // Keys that are not public keys verify nothing.
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        verify(&text, &[b"not a key", &[]], now, SKEW),
        Err(TokenError::BadSignature)
    );
    assert_eq!(verify(&text, &[], now, SKEW), Err(TokenError::BadSignature));
}

#[test]
fn the_issuers_and_the_roots_signatures_are_both_accepted() {
    let root = ca("root");
    let issuer = ca("issuer");
    let fp = root_fingerprint(&root);
    let keys = [key(&issuer), key(&root)];
    let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let now = OffsetDateTime::now_utc() + Duration::minutes(1);
    for signer in [&issuer, &root] {
        let text = mint(signer, fp, "site-b", DEFAULT_TTL).unwrap();
        let token = verify(&text, &keys, now, SKEW).unwrap();
        assert_eq!(token.root_fingerprint, fp);
    }
    let stranger = mint(&ca("stranger"), fp, "site-b", DEFAULT_TTL).unwrap();
    assert_eq!(
        verify(&stranger, &keys, now, SKEW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn unknown_role_and_version_bytes_are_refused() {
    let ca = ca("root");
    let (_, token) = minted(&ca);
    for role in [0u8, 2, 7, 255] {
        let mut payload = token.payload();
        payload[17] = role;
        let err = check(&signed(&ca, &payload), &ca).unwrap_err();
        assert_eq!(err, TokenError::WrongRole(role));
        assert_eq!(
            err.to_string(),
            format!("token is for role {role}; tokens are only for agents (role 1)")
        );
    }
    let mut payload = token.payload();
    payload[0] = 2;
    let err = check(&signed(&ca, &payload), &ca).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token format version 2 is not supported (this build reads version 1)"
    );
}

#[test]
fn signatures_of_impossible_lengths_are_refused_at_parse() {
    let ca = ca("root");
    let (_, token) = minted(&ca);
    for len in [0, 7, 73, 200] {
        let text = encode_text(&token.payload(), &vec![0x30; len]);
        let err = parse(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "malformed token: signature of {len} bytes (an ECDSA P-256 signature has 8 to 72)"
            )
        );
    }
}

#[test]
fn the_fingerprint_is_sha256sum_of_the_der() {
    let der = der(FIXTURE_PEM);
    let fp = fingerprint(&der);
    assert_eq!(
        fp.as_slice(),
        ring::digest::digest(&ring::digest::SHA256, &der).as_ref()
    );
    assert_eq!(hex(&fp), FIXTURE_SHA256SUM);
    let shown = fingerprint_display(&fp);
    assert_eq!(shown, format!("SHA256:{FIXTURE_SHA256SUM}"));
    assert_eq!(parse_fingerprint(&shown), Ok(fp));
    assert_eq!(
        parse_fingerprint(&format!("sha256:{}", FIXTURE_SHA256SUM.to_uppercase())),
        Ok(fp)
    );
    for bad in [
        FIXTURE_SHA256SUM.to_owned(),
        format!("SHA256:{}", &FIXTURE_SHA256SUM[1..]),
        format!("SHA256:{FIXTURE_SHA256SUM}0"),
        format!("SHA256:+{}", &FIXTURE_SHA256SUM[1..]),
        format!("SHA256:{}g", &FIXTURE_SHA256SUM[1..]),
        format!("SHA1:{FIXTURE_SHA256SUM}"),
    ] {
        assert_eq!(
            parse_fingerprint(&bad),
            Err(TokenError::InvalidFingerprint(bad.clone()))
        );
    }
    assert!(
        TokenError::InvalidFingerprint("x".into())
            .to_string()
            .contains("expected SHA256: and 64 hex digits")
    );
}
