//! Tests of the ledger: claims, reopening, expiry, corrupt lines, the bound.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::Role;

fn token(id: u8, not_after: OffsetDateTime) -> Token {
    Token {
        id: [id; 16],
        role: Role::Agent,
        name: "site-b".into(),
        not_before: not_after - Duration::hours(1),
        not_after,
        root_fingerprint: [7; 32],
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn open(path: &Path, at: OffsetDateTime) -> Loaded {
    Ledger::open(path, at).unwrap()
}

const KEY_A: &[u8] = b"spki of key A";
const KEY_B: &[u8] = b"spki of key B";

#[test]
fn a_token_is_claimed_once_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.log");
    let mut ledger = open(&path, now()).ledger;
    let t = token(1, now() + Duration::hours(1));

    assert_eq!(ledger.claim(&t, KEY_A).unwrap(), Claim::First);
    assert_eq!(ledger.claim(&t, KEY_A).unwrap(), Claim::Again);
    let err = ledger.claim(&t, KEY_B).unwrap_err();
    assert!(matches!(err, LedgerError::UsedByAnotherKey(_)));
    assert_eq!(
        err.to_string(),
        format!("token {} was already used by another key", t.id_hex())
    );
    assert_eq!(
        ledger.claim(&token(2, t.not_after), KEY_B).unwrap(),
        Claim::First
    );
    assert_eq!(ledger.len(), 2);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let fields: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(fields[0], "01".repeat(16));
    assert_eq!(fields[1], hex(&super::super::fingerprint(KEY_A)));
    assert_eq!(fields[2], t.not_after.unix_timestamp().to_string());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn claims_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.log");
    let t = token(3, now() + Duration::hours(1));
    {
        let mut ledger = open(&path, now()).ledger;
        assert_eq!(ledger.claim(&t, KEY_A).unwrap(), Claim::First);
    }
    let loaded = open(&path, now());
    assert_eq!((loaded.live, loaded.expired), (1, 0));
    assert!(loaded.corrupt.is_empty());
    let mut ledger = loaded.ledger;
    assert!(matches!(
        ledger.claim(&t, KEY_B),
        Err(LedgerError::UsedByAnotherKey(_))
    ));
    assert_eq!(ledger.claim(&t, KEY_A).unwrap(), Claim::Again);
    drop(ledger);
    // Again, after the compaction of the second open.
    let mut ledger = open(&path, now()).ledger;
    assert!(matches!(
        ledger.claim(&t, KEY_B),
        Err(LedgerError::UsedByAnotherKey(_))
    ));
}

#[test]
fn expired_entries_are_dropped_at_load_and_the_file_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.log");
    let start = now();
    let soon = token(4, start + Duration::minutes(10));
    let later = token(5, start + Duration::hours(2));
    {
        let mut ledger = open(&path, start).ledger;
        ledger.claim_at(&soon, KEY_A, start).unwrap();
        ledger.claim_at(&later, KEY_A, start).unwrap();
    }
    // Within the skew after the end, the entry still counts: the token still verifies.
    let loaded = open(&path, soon.not_after + SKEW);
    assert_eq!((loaded.live, loaded.expired), (2, 0));
    drop(loaded);
    let loaded = open(&path, soon.not_after + SKEW + Duration::seconds(1));
    assert_eq!((loaded.live, loaded.expired), (1, 1));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.starts_with(&"05".repeat(16)), "{text}");
}

#[test]
fn corrupt_lines_are_skipped_and_counted_and_good_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.log");
    let after = now() + Duration::hours(1);
    let good = |id: u8, key: &[u8]| {
        let entry = Entry {
            key: super::super::fingerprint(key),
            not_after: after.unix_timestamp(),
            used: 1,
        };
        line(&[id; 16], &entry).into_bytes()
    };
    let mut file = Vec::new();
    file.extend(good(1, KEY_A));
    file.extend(b"not a ledger line at all\n");
    file.extend(good(2, KEY_A));
    file.extend(format!("{} {} 1 2\n", "zz".repeat(16), "00".repeat(32)).as_bytes());
    file.extend(format!("{} {} 1 2\n", "00".repeat(16), "00".repeat(31)).as_bytes());
    file.extend(format!("{} {} x 2\n", "00".repeat(16), "00".repeat(32)).as_bytes());
    file.extend(vec![b'a'; 100_000]);
    file.push(b'\n');
    file.extend(good(3, KEY_A));
    file.extend(b"\xff\xfe\n");
    file.extend(good(1, KEY_B)); // a second claim of token 1 by another key
    file.extend(good(2, KEY_A)); // the same claim twice
    file.extend(b"\n");
    file.extend(good(4, KEY_A));
    file.extend(&good(5, KEY_A)[..40]); // cut short by a crash
    std::fs::write(&path, &file).unwrap();

    let loaded = open(&path, now());
    assert_eq!((loaded.live, loaded.expired), (4, 0));
    let counts: Vec<(&str, u64, u64)> = loaded
        .corrupt
        .iter()
        .map(|c| (c.reason.as_str(), c.lines, c.first_line))
        .collect();
    assert_eq!(
        counts,
        [
            ("fields", 2, 2),
            ("id", 1, 4),
            ("key", 1, 5),
            ("time", 1, 6),
            ("bytes", 3, 7),
            ("conflict", 1, 10),
        ]
    );
    let mut ledger = loaded.ledger;
    for id in 1..=4 {
        let t = token(id, after);
        assert_eq!(ledger.claim(&t, KEY_A).unwrap(), Claim::Again, "token {id}");
        assert!(ledger.claim(&t, KEY_B).is_err());
    }
    // The torn line is gone: a new claim is a line of its own.
    assert_eq!(ledger.claim(&token(5, after), KEY_B).unwrap(), Claim::First);
    drop(ledger);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 5, "{text}");
    let loaded = open(&path, now());
    assert_eq!(loaded.live, 5);
    assert!(loaded.corrupt.is_empty());
}

#[test]
fn a_full_ledger_refuses_new_tokens_until_some_expire() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.log");
    let start = now();
    let first_end = start + Duration::minutes(10);
    let mut text = String::new();
    for i in 0..MAX_LIVE as u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        // The first ten end soon; the others in a day.
        let end = if i < 10 {
            first_end
        } else {
            start + Duration::days(1)
        };
        let entry = Entry {
            key: [1; 32],
            not_after: end.unix_timestamp(),
            used: start.unix_timestamp(),
        };
        text.push_str(&line(&id, &entry));
    }
    std::fs::write(&path, text).unwrap();
    let loaded = open(&path, start);
    assert_eq!(loaded.live, MAX_LIVE);
    let mut ledger = loaded.ledger;

    let new = token(0xee, start + Duration::hours(1));
    let err = ledger.claim_at(&new, KEY_A, start).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the ledger of used tokens is full (100000 live entries); new tokens are refused until \
         some expire"
    );
    // A known token still answers.
    let mut known = token(0, start + Duration::days(1));
    known.id = [0; 16];
    known.id[3] = 42;
    assert!(matches!(
        ledger.claim_at(&known, KEY_A, start),
        Err(LedgerError::UsedByAnotherKey(_))
    ));
    // Once ten expire, there is room, and the file is compacted to the live entries.
    let later = first_end + SKEW + Duration::seconds(1);
    assert_eq!(ledger.claim_at(&new, KEY_A, later).unwrap(), Claim::First);
    assert_eq!(ledger.len(), MAX_LIVE - 9);
    drop(ledger);
    let lines = std::fs::read_to_string(&path).unwrap().lines().count();
    assert_eq!(lines, MAX_LIVE - 9);
}

#[test]
fn expired_claims_are_pruned_from_memory_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.log");
    let start = now();
    let mut ledger = open(&path, start).ledger;
    let end = start + Duration::minutes(1);
    for i in 0..PRUNE_EVERY as u32 - 1 {
        let mut t = token(0, end);
        t.id[..4].copy_from_slice(&i.to_be_bytes());
        assert_eq!(ledger.claim_at(&t, KEY_A, start).unwrap(), Claim::First);
    }
    let fresh = token(0xff, start + Duration::hours(1));
    ledger.claim_at(&fresh, KEY_A, start).unwrap();
    assert_eq!(ledger.len(), PRUNE_EVERY);
    // Later, the first ones have expired: the next claim prunes them, from the file too.
    let later = end + SKEW + Duration::seconds(1);
    let next = token(0xfe, start + Duration::hours(1));
    assert_eq!(ledger.claim_at(&next, KEY_A, later).unwrap(), Claim::First);
    assert_eq!(ledger.len(), 2);
    assert_eq!(ledger.claim_at(&fresh, KEY_A, later).unwrap(), Claim::Again);
    drop(ledger);
    let text = std::fs::read_to_string(&path).unwrap();
    let ids: Vec<&str> = text.lines().map(|l| &l[..32]).collect();
    assert_eq!(ids, ["ff".repeat(16), "fe".repeat(16)], "{text}");
}
