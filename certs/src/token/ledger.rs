//! The ledger of used tokens: which key claimed each token id, kept on disk so that a token
//! stays used across sink restarts.
//!
//! # File
//!
//! `DIR/tokens.log`, one line per first use, four fields separated by one space:
//!
//! ```text
//! <token id, 32 hex digits> <SHA-256 of the requester's SubjectPublicKeyInfo, 64 hex digits>
//!     <token not_after, Unix seconds> <time of use, Unix seconds>
//! ```
//!
//! Each claim appends its line and syncs the file before it is answered, so a certificate is
//! never issued for a claim the disk does not hold. On [`Ledger::open`], entries past their
//! token's `not_after` plus the clock skew are dropped (the token can no longer verify, so it
//! can no longer be reused), and the file is rewritten atomically with the live entries only.
//! That rewrite also removes a line cut short by a crash, so the next append never lands on
//! the end of one. Lines that do not read are skipped and reported by reason ([`Loaded`]); a
//! good line is never dropped for a bad neighbour.
//!
//! # Bounds
//!
//! At most [`MAX_LIVE`] entries. Expired entries are pruned every [`PRUNE_EVERY`] new claims
//! and whenever the ledger is full, and the file is rewritten when that dropped any, so it
//! holds the live entries plus at most [`PRUNE_EVERY`] lines. When a full ledger has nothing
//! to prune, new tokens are refused ([`LedgerError::Full`]) while claims of known tokens
//! still answer.
//!
//! What this does not do: verify tokens ([`super::verify`] does, before a claim), or lock the
//! file against a second process (one sink owns its issuer folder).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};

use super::{SKEW, Token, hex};

/// Most live entries the ledger holds.
pub const MAX_LIVE: usize = 100_000;
/// Longest line read from the file; the longest written is 32 + 64 + 2 × 20 + 4 bytes.
const MAX_LINE: usize = 256;
/// New claims between two prunings of expired entries.
pub const PRUNE_EVERY: usize = 1024;

/// The outcome of a claim that may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The token was not used before: it is now recorded as used by this key.
    First,
    /// The same key claimed this token before (a retry after a crash or a lost answer):
    /// issue again.
    Again,
}

/// Why a claim was refused, or the ledger could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Another key has claimed this token.
    #[error("token {0} was already used by another key")]
    UsedByAnotherKey(String),
    /// The ledger holds [`MAX_LIVE`] live entries, none expired.
    #[error(
        "the ledger of used tokens is full ({0} live entries); new tokens are refused until \
         some expire"
    )]
    Full(usize),
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a line of the file was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CorruptReason {
    /// Not four fields separated by spaces (including a line cut short).
    Fields,
    /// The id is not 32 hex digits.
    Id,
    /// The key hash is not 64 hex digits.
    Key,
    /// A time is not a decimal Unix time in range.
    Time,
    /// Not UTF-8, or longer than any line the ledger writes.
    Bytes,
    /// A second line for an id already read with another key (the first one is kept).
    Conflict,
}

impl CorruptReason {
    /// A short label, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fields => "fields",
            Self::Id => "id",
            Self::Key => "key",
            Self::Time => "time",
            Self::Bytes => "bytes",
            Self::Conflict => "conflict",
        }
    }
}

/// Lines of one reason skipped at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt {
    /// Why.
    pub reason: CorruptReason,
    /// How many lines.
    pub lines: u64,
    /// The first of them (1-based).
    pub first_line: u64,
}

/// What [`Ledger::open`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The ledger, ready for claims.
    pub ledger: Ledger,
    /// Live entries kept.
    pub live: usize,
    /// Entries dropped because their token expired.
    pub expired: usize,
    /// Lines skipped, by reason (sorted by reason): for the caller to log.
    pub corrupt: Vec<Corrupt>,
}

/// One used token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    key: [u8; 32],
    not_after: i64,
    used: i64,
}

/// The ledger of used tokens (see the module's documentation).
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
    entries: HashMap<[u8; 16], Entry>,
    /// New claims since the last pruning.
    since_prune: usize,
    /// A write failed part way: rewrite the file before the next append.
    dirty: bool,
}

// === impl Ledger ===

impl Ledger {
    /// Opens the ledger at `path` (creating it, mode 0600), drops entries expired at `now`,
    /// and rewrites the file with the live ones.
    ///
    /// # Errors
    ///
    /// [`LedgerError::Io`] when the file cannot be read or rewritten. Lines that do not read
    /// are no error: they are counted in [`Loaded::corrupt`].
    pub fn open(path: &Path, now: OffsetDateTime) -> Result<Loaded, LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_owned(),
            source,
        };
        let (entries, expired, corrupt) = match File::open(path) {
            Ok(file) => read_entries(file, now).map_err(io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(io(e)),
        };
        let file = rewrite(path, &entries).map_err(io)?;
        let live = entries.len();
        Ok(Loaded {
            ledger: Self {
                path: path.to_owned(),
                file,
                since_prune: 0,
                entries,
                dirty: false,
            },
            live,
            expired,
            corrupt,
        })
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no live entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records that the key with SubjectPublicKeyInfo `spki_der` uses `token`, now.
    ///
    /// # Errors
    ///
    /// As [`Ledger::claim_at`].
    pub fn claim(&mut self, token: &Token, spki_der: &[u8]) -> Result<Claim, LedgerError> {
        self.claim_at(token, spki_der, OffsetDateTime::now_utc())
    }

    /// Records that the key with SubjectPublicKeyInfo `spki_der` uses `token` at `now`:
    /// [`Claim::First`] once the line is on disk, [`Claim::Again`] for the key that claimed it
    /// before.
    ///
    /// # Errors
    ///
    /// [`LedgerError::UsedByAnotherKey`], [`LedgerError::Full`], and [`LedgerError::Io`] when
    /// the line cannot be written and synced (nothing is recorded then).
    pub fn claim_at(
        &mut self,
        token: &Token,
        spki_der: &[u8],
        now: OffsetDateTime,
    ) -> Result<Claim, LedgerError> {
        let key = super::fingerprint(spki_der);
        if let Some(entry) = self.entries.get(&token.id) {
            return if entry.key == key {
                Ok(Claim::Again)
            } else {
                Err(LedgerError::UsedByAnotherKey(token.id_hex()))
            };
        }
        if self.entries.len() >= MAX_LIVE || self.since_prune >= PRUNE_EVERY {
            self.prune(now)?;
        }
        if self.entries.len() >= MAX_LIVE {
            return Err(LedgerError::Full(self.entries.len()));
        }
        if self.dirty {
            self.compact()?;
        }
        let entry = Entry {
            key,
            not_after: token.not_after.unix_timestamp(),
            used: now.unix_timestamp(),
        };
        let line = line(&token.id, &entry);
        if let Err(source) = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
        {
            self.dirty = true;
            return Err(self.io(source));
        }
        self.since_prune += 1;
        self.entries.insert(token.id, entry);
        Ok(Claim::First)
    }

    /// Drops entries expired at `now`, and rewrites the file when that dropped any.
    fn prune(&mut self, now: OffsetDateTime) -> Result<(), LedgerError> {
        let before = self.entries.len();
        self.entries.retain(|_, e| live(e.not_after, now));
        self.since_prune = 0;
        if self.entries.len() < before {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file with the live entries, atomically.
    fn compact(&mut self) -> Result<(), LedgerError> {
        self.file = rewrite(&self.path, &self.entries).map_err(|e| self.io(e))?;
        self.dirty = false;
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> LedgerError {
        LedgerError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// Whether an entry whose token ends at `not_after` may still be presented at `now`.
fn live(not_after: i64, now: OffsetDateTime) -> bool {
    OffsetDateTime::from_unix_timestamp(not_after)
        .map_or(true, |t| t + SKEW + Duration::seconds(1) > now)
}

/// The line of one entry, with its newline.
fn line(id: &[u8; 16], entry: &Entry) -> String {
    format!(
        "{} {} {} {}\n",
        hex(id),
        hex(&entry.key),
        entry.not_after,
        entry.used
    )
}

type Contents = (HashMap<[u8; 16], Entry>, usize, Vec<Corrupt>);

/// Reads every line of the file: the live entries, how many expired, the corrupt lines.
fn read_entries(file: File, now: OffsetDateTime) -> std::io::Result<Contents> {
    let mut reader = BufReader::new(file);
    let mut entries: HashMap<[u8; 16], Entry> = HashMap::new();
    let mut expired = 0;
    let mut corrupt: Vec<Corrupt> = Vec::new();
    let mut buf = Vec::with_capacity(MAX_LINE + 1);
    let mut number = 0u64;
    while let Some(complete) = next_line(&mut reader, &mut buf)? {
        number += 1;
        let outcome = if complete {
            read_line(&buf)
        } else {
            Err(CorruptReason::Bytes)
        };
        let reason = match outcome {
            Ok((_, entry)) if !live(entry.not_after, now) => {
                expired += 1;
                None
            }
            Ok((id, entry)) => match entries.get(&id) {
                Some(first) if first.key != entry.key => Some(CorruptReason::Conflict),
                // The same claim written twice: nothing lost.
                Some(_) => None,
                None => {
                    entries.insert(id, entry);
                    None
                }
            },
            Err(reason) => Some(reason),
        };
        if let Some(reason) = reason {
            match corrupt.iter_mut().find(|c| c.reason == reason) {
                Some(c) => c.lines += 1,
                None => corrupt.push(Corrupt {
                    reason,
                    lines: 1,
                    first_line: number,
                }),
            }
        }
    }
    corrupt.sort_by_key(|c| c.reason);
    Ok((entries, expired, corrupt))
}

/// Reads the next line into `buf` (without its newline): `Some(true)` when it fits in
/// [`MAX_LINE`] bytes, `Some(false)` for a longer one (skipped to its end), `None` at the end.
fn next_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(true));
    }
    if buf.len() <= MAX_LINE {
        // The last line, without its newline: cut short by a crash, or written by hand.
        return Ok(Some(false));
    }
    // Too long: skip to the next newline without keeping it.
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Some(false));
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(Some(false));
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}

/// One line: `id key not_after used`.
fn read_line(line: &[u8]) -> Result<([u8; 16], Entry), CorruptReason> {
    let line = std::str::from_utf8(line).map_err(|_| CorruptReason::Bytes)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let [id, key, not_after, used] = fields[..] else {
        return Err(CorruptReason::Fields);
    };
    let id = unhex::<16>(id).ok_or(CorruptReason::Id)?;
    let key = unhex::<32>(key).ok_or(CorruptReason::Key)?;
    let time = |s: &str| {
        s.parse::<i64>()
            .ok()
            .filter(|&t| OffsetDateTime::from_unix_timestamp(t).is_ok())
            .ok_or(CorruptReason::Time)
    };
    let entry = Entry {
        key,
        not_after: time(not_after)?,
        used: time(used)?,
    };
    Ok((id, entry))
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Writes `entries` to a temporary file beside `path`, syncs it, renames it over `path`,
/// syncs the folder, and returns `path` opened for appending.
fn rewrite(path: &Path, entries: &HashMap<[u8; 16], Entry>) -> std::io::Result<File> {
    let tmp = path.with_extension("log.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort_by_key(|(_, e)| (e.used, e.not_after));
    let mut text = String::with_capacity(entries.len() * 140);
    for (id, entry) in sorted {
        text.push_str(&line(id, entry));
    }
    out.write_all(text.as_bytes())?;
    out.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests;
