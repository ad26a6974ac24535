//! sFlow v5 awareness for loss accounting: the datagram header, and sequence numbers followed
//! per stream.
//!
//! Owns reading the fixed header of an sFlow version 5 datagram ([`parse_header`], after
//! sflow.org SFLOW-DATAGRAM5.txt, `sample_datagram_v5`) and, in [`SequenceTracker`], turning
//! each stream's `sequence_number` into counts of datagrams missing, late (reordered or
//! duplicated) and of agent restarts. Agent and sink call it once per datagram, on bytes they
//! forward unchanged whatever it says: it only reads. Past the header, it only checks, with
//! [`is_truncated`], that the sample records fit in the datagram (by way of [`counters`]' walk,
//! which skips them by their lengths); it deliberately does not decode them (reading counter
//! samples is [`counters`]' job), does not look at UDP source addresses, and has no I/O, clock or metrics of its own:
//! callers keep their counters, in a `Vec` indexed by [`StreamId`], and it never decides
//! whether a datagram is relayed.
//!
//! # Header
//!
//! XDR, so every field is a big-endian `u32` (sflow.org SFLOW-DATAGRAM5.txt):
//!
//! ```text
//!  offset (IPv4 / IPv6 agent)
//!   0 /  0   version = 5
//!   4 /  4   agent address type: 1 = IPv4, 2 = IPv6 (0 = unknown is refused)
//!   8 /  8   agent address, 4 or 16 bytes
//!  12 / 24   sub_agent_id
//!  16 / 28   sequence_number: +1 per datagram, per sub-agent
//!  20 / 32   uptime: ms since the agent (or sub-agent) started
//!  24 / 36   num_samples, then the sample records (not read here)
//!  28 / 40   end of the header
//! ```
//!
//! # Sequence accounting
//!
//! A *stream* is one (agent address, sub-agent id) pair ([`StreamKey`]): each sub-agent
//! numbers its own datagrams, so that is where a gap means loss. The agent address is the one
//! inside the datagram, not the UDP source, as sFlow analyzers key agents. For each stream the
//! tracker remembers the highest sequence number seen (the *front*), which of the
//! [`REORDER_WINDOW`] numbers up to the front have arrived, and the uptime each of those came
//! with (256 bytes per stream). The first
//! datagram of a stream is its baseline; each later one is exactly one of:
//!
//! - **next**: ahead of the front. [`Observation::missing`] is the count of numbers skipped
//!   (0 when in order). A big forward jump is real loss and is counted in full.
//! - **late**: behind the front by less than [`REORDER_WINDOW`], and fitting in the run since
//!   the baseline (below): a reordered datagram, or a duplicate when its number had already
//!   arrived ([`Observation::duplicate`]). The front does not move. A reordered datagram's
//!   number was already reported missing when its gap opened, and counters only go up, so
//!   what never arrived is `Σ missing − Σ (late and not duplicate)`, give or take datagrams
//!   reordered across a baseline (late, with no gap counted for them).
//! - **reset**: the agent restarted, which restarts its sequence numbers at 1 and its uptime
//!   at 0 (or, when only the sFlow process restarted, leaves the uptime running on). It shows
//!   as an uptime more than [`RESTART_UPTIME_MS`] behind the front's, as a sequence number
//!   [`REORDER_WINDOW`] or more behind the front (a far jump backwards, which also catches
//!   agents whose uptime field is useless), or as a datagram behind the front that does not
//!   fit the run. The datagram becomes the new baseline; nothing is counted missing.
//!
//! # What a late datagram looks like
//!
//! The tracker keeps the uptime of each number seen within [`REORDER_WINDOW`] of the front.
//! An agent stamps its datagrams in the order it numbers them, so a genuinely late datagram
//! numbered `n`, behind the front, is one of two things:
//!
//! - a copy of datagram `n` (a duplicate): it carries the uptime `n` came with, to the
//!   millisecond;
//! - datagram `n` itself, not seen yet: it was sent after the nearest lower number seen and
//!   before the nearest higher one (the front at most), so its uptime lies between theirs.
//!
//! and, either way, it trails the front's uptime by no more than [`LATE_UPTIME_MS`]: it spent
//! that much longer on the way than the front did, which reordering in a network never
//! comes near. A datagram behind the front that breaks any of this is a **reset**: an agent
//! that restarted with its uptime near 0 stamps its new `n` with an uptime other than the old
//! `n`'s, and earlier than the old numbers below it; one whose uptime ran on stamps it later
//! than the front; and a stream replayed from its start (a capture played again, a generator
//! run again) brings back datagrams whose uptime trails the front by the length of the run.
//! So a short stream that starts over counts one reset, and its new numbers count as next,
//! not as late or duplicate datagrams.
//!
//! Sequence numbers wrap at `u32`, and so does the uptime (every 49.7 days); both are compared
//! modulo 2³², "ahead" meaning less than half the number space ahead. So `u32::MAX` → 0 is
//! the next number, and an uptime wrapping to 0 is progress, not a restart.
//!
//! What this cannot tell apart, by design:
//!
//! - A datagram delayed behind [`REORDER_WINDOW`] or more newer ones, by more than
//!   [`LATE_UPTIME_MS`] of agent uptime, or across a step of the agent's clock that puts it
//!   out of order with its neighbours, reads as a restart, and the next in-order datagram
//!   then counts the distance back as missing; none of these happens on a LAN, nor behind
//!   the relay, which keeps each agent's order.
//! - A byte-identical replay of a run shorter than [`REORDER_WINDOW`] datagrams and
//!   [`LATE_UPTIME_MS`] of uptime is, datagram for datagram, what duplicates are: it counts
//!   as late duplicates. (A replay of a generator whose uptime is not real time, such as one
//!   that adds a few ms per datagram however fast it sends, can span less uptime than its
//!   run took.)
//! - A restarted agent whose new datagrams carry the same uptimes as the old ones with the
//!   same numbers (an agent whose uptime is always 0, say) is caught only once its new
//!   numbers go [`REORDER_WINDOW`] behind, or by the uptime; until then they read as
//!   duplicates.
//! - A restart whose first datagrams were lost so that the first one seen is ahead of the
//!   old front reads as next (with the numbers skipped counted missing), unless its uptime
//!   is more than [`RESTART_UPTIME_MS`] behind the front's: ahead of the front, only that
//!   much tells a restart from a small step of the agent's clock.
//! - An uptime more than 2³¹ ms (24.8 days) behind reads as progress, so a restart after
//!   that long is caught by its sequence number alone (which by then has gone far back), or
//!   by its datagrams not fitting the run.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

pub mod counters;

/// The only datagram version this module reads (sFlow v5). sflowtool also reads v2 and v4,
/// whose header has no sub-agent id; the relay forwards them, but they are not accounted.
pub const VERSION: u32 = 5;

/// Length of the datagram header with an IPv4 agent address.
pub const HEADER_LEN_IPV4: usize = 28;

/// Length of the datagram header with an IPv6 agent address.
pub const HEADER_LEN_IPV6: usize = 40;

/// How far behind a stream's front (in sequence numbers) a datagram is taken as late rather
/// than as a restart. Reordering on a LAN spans a few datagrams; 64 leaves a wide margin and
/// fits the set of numbers seen in one `u64`.
pub const REORDER_WINDOW: u32 = 64;

/// How far behind the uptime of a stream's front (in ms) a datagram's uptime may be before the
/// datagram is taken as a restart. A late datagram trails by the milliseconds it was
/// reordered by; 10 s tolerates that and small clock steps, and is far less than a restarted
/// agent's uptime usually falls back.
pub const RESTART_UPTIME_MS: u32 = 10_000;

/// How far behind the uptime of a stream's front (in ms) a datagram *behind the front* may be
/// and still be late (reordered or duplicated) rather than a restart or a replay. A late
/// datagram is one that spent longer on the way than a datagram sent after it, and its uptime
/// trails the front's by at least that difference: reordering in a network spans microseconds
/// to milliseconds, and the relay keeps each agent's order; a second is a wide margin.
pub const LATE_UPTIME_MS: u32 = 1_000;

/// A default cap on tracked streams: far above the sub-agents one relay serves, low enough
/// to bound the metric series a caller keeps per stream.
pub const DEFAULT_MAX_STREAMS: usize = 1024;

/// Agent address type of an IPv4 agent (`address_type` in SFLOW-DATAGRAM5.txt).
const ADDRESS_TYPE_IPV4: u32 = 1;

/// Agent address type of an IPv6 agent.
const ADDRESS_TYPE_IPV6: u32 = 2;

/// Half the `u32` number space: a distance modulo 2³² above it points the other way.
const HALF: u32 = 1 << 31;

/// The fixed header of an sFlow v5 datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The agent's address, as the agent wrote it (not the UDP source).
    pub agent: IpAddr,
    /// Which sub-agent of the agent sent the datagram (`sub_agent_id`).
    pub sub_agent: u32,
    /// The datagram's number in its sub-agent's sequence (`sequence_number`).
    pub sequence: u32,
    /// Milliseconds since the agent (or sub-agent) started (`uptime`).
    pub uptime_ms: u32,
    /// Count of sample records after the header (`num_samples`); not checked against them.
    pub samples: u32,
}

/// Why a datagram's header could not be read as sFlow v5. Label values for a per-reason
/// counter come from [`NotSflow::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum NotSflow {
    /// The datagram ends before the header does.
    #[error("shorter than an sflow v5 header")]
    TooShort,
    /// The version field is not 5.
    #[error("not sflow version 5")]
    Version,
    /// The agent address type is neither IPv4 (1) nor IPv6 (2), so the header's length and
    /// the stream it belongs to are unknown.
    #[error("agent address type neither ipv4 nor ipv6")]
    AddressType,
}

/// Which stream a datagram belongs to: an agent address and one of its sub-agents.
///
/// Displays as `agent#sub_agent` (`192.0.2.1#0`, `2001:db8::1#3`), a form neither a socket
/// address nor a network prefix can be mistaken for. As metric labels, `agent` and
/// `sub_agent` read better apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The agent's address, from the datagram.
    pub agent: IpAddr,
    /// The sub-agent id.
    pub sub_agent: u32,
}

/// A tracked stream's index: dense, from 0 in the order streams were first seen, below the
/// tracker's cap, and stable for the tracker's life, so callers can keep per-stream state in
/// a `Vec` and index it with [`StreamId::index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u32);

/// Which stream a datagram was counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// A stream whose sequence numbers are followed.
    Tracked(StreamId),
    /// A valid sFlow v5 datagram of a stream beyond the tracker's cap: to be counted in one
    /// "other" bucket, without sequence accounting.
    Other,
    /// Not an sFlow v5 datagram this module can read (the caller decides whether to relay it).
    NotSflow(NotSflow),
}

/// What one datagram tells about its stream. The counts are for this datagram alone; callers
/// add them to counters of their own. `missing > 0`, `late` and `reset` never occur together,
/// and all are zero or false for a stream's first datagram and for untracked datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Observation {
    /// The stream the datagram was counted in.
    pub stream: Stream,
    /// This is the first datagram of a newly tracked stream: its id appears here for the first
    /// time (the moment to build its metric handles, labelled from [`SequenceTracker::key`]).
    pub new_stream: bool,
    /// Sequence numbers skipped just before this datagram: the front went from `n` to
    /// `n + 1 + missing`.
    pub missing: u32,
    /// The datagram arrived behind the front, within [`REORDER_WINDOW`]: reordered, or (with
    /// `duplicate`) repeated.
    pub late: bool,
    /// A late datagram whose sequence number had already arrived (implies `late`).
    pub duplicate: bool,
    /// The stream restarted: this datagram is its new baseline, and nothing was counted
    /// missing.
    pub reset: bool,
}

/// Follows sFlow sequence numbers per stream (see the [module docs](self) for the rules).
///
/// Tracks at most a set number of streams, first come first served; datagrams of later
/// streams come back as [`Stream::Other`]. Each datagram costs at most one hash lookup (none
/// when it is from the same stream as the one before) and no allocation once its stream is
/// known.
#[derive(Debug)]
pub struct SequenceTracker {
    ids: HashMap<StreamKey, StreamId>,
    /// Indexed by [`StreamId`].
    streams: Vec<Tracked>,
    max_streams: usize,
    /// The stream of the previous datagram: consecutive datagrams mostly share one.
    last: Option<(StreamKey, StreamId)>,
}

/// One tracked stream.
#[derive(Debug)]
struct Tracked {
    key: StreamKey,
    sequence: Sequence,
}

/// Where a stream's sequence stands.
#[derive(Debug, Clone, Copy)]
struct Sequence {
    /// Highest sequence number since the baseline.
    front: u32,
    /// Bit `i` set: number `front - i` has arrived since the baseline.
    seen: u64,
    /// The uptime that came with number `n`, at `slot(n)`, for the numbers `seen` marks (the
    /// other slots hold stale values and are never read).
    uptimes: [u32; REORDER_WINDOW as usize],
}

/// What a datagram did to its stream's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Next { missing: u32 },
    Late { duplicate: bool },
    Reset,
}

/// Reads the header of an sFlow v5 datagram.
///
/// Reads the first 28 bytes (IPv4 agent) or 40 bytes (IPv6 agent) and nothing after them.
///
/// # Errors
///
/// [`NotSflow`] when the datagram is shorter than its header, its version is not 5, or its
/// agent address type is neither IPv4 nor IPv6. Never panics, whatever the bytes.
pub fn parse_header(datagram: &[u8]) -> Result<Header, NotSflow> {
    let version = be_u32(datagram, 0).ok_or(NotSflow::TooShort)?;
    if version != VERSION {
        return Err(NotSflow::Version);
    }
    let (agent, fields) = match be_u32(datagram, 4).ok_or(NotSflow::TooShort)? {
        ADDRESS_TYPE_IPV4 => (IpAddr::from(bytes::<4>(datagram, 8)?), 12),
        ADDRESS_TYPE_IPV6 => (IpAddr::from(bytes::<16>(datagram, 8)?), 24),
        _ => return Err(NotSflow::AddressType),
    };
    let field = |i: usize| be_u32(datagram, fields + 4 * i).ok_or(NotSflow::TooShort);
    Ok(Header {
        agent,
        sub_agent: field(0)?,
        sequence: field(1)?,
        uptime_ms: field(2)?,
        samples: field(3)?,
    })
}

impl Header {
    /// A header from `agent`, sub-agent 0, with every counter at zero: the start of a
    /// datagram built by hand (tests, benchmarks, generators).
    pub fn from_agent(agent: IpAddr) -> Self {
        Self {
            agent,
            sub_agent: 0,
            sequence: 0,
            uptime_ms: 0,
            samples: 0,
        }
    }

    /// Appends the header's wire form to `out`: what [`parse_header`] reads back.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&VERSION.to_be_bytes());
        match self.agent {
            IpAddr::V4(v4) => {
                out.extend_from_slice(&ADDRESS_TYPE_IPV4.to_be_bytes());
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.extend_from_slice(&ADDRESS_TYPE_IPV6.to_be_bytes());
                out.extend_from_slice(&v6.octets());
            }
        }
        for field in [self.sub_agent, self.sequence, self.uptime_ms, self.samples] {
            out.extend_from_slice(&field.to_be_bytes());
        }
    }

    /// The header's wire form alone (a datagram without samples).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40);
        self.write(&mut out);
        out
    }
}

/// Whether an sFlow v5 datagram was cut: its sample records, skipped by their declared
/// lengths, run past its end, or it ends before the `num_samples` its header announces. That
/// is what a `recv` into a buffer shorter than the datagram leaves (the original
/// `sflow_fwd.py` reads 2,048 bytes). `false` when the header cannot be read (see
/// [`parse_header`]), and when a counter sample's own framing is broken before the cut
/// ([`counters::Malformed::RecordOverrun`] ends the walk).
///
/// Reads each sample's 8-byte format and length, and the fields of counter samples; no
/// allocation. Never panics, whatever the bytes.
pub fn is_truncated(datagram: &[u8]) -> bool {
    counters::counter_samples(datagram).is_ok_and(|mut samples| {
        samples.any(|sample| sample == Err(counters::Malformed::Truncated))
    })
}

/// The big-endian `u32` at `at`, if the bytes reach that far.
fn be_u32(datagram: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(*datagram.get(at..)?.first_chunk()?))
}

/// The `N` bytes at `at`, or [`NotSflow::TooShort`].
fn bytes<const N: usize>(datagram: &[u8], at: usize) -> Result<[u8; N], NotSflow> {
    datagram
        .get(at..)
        .and_then(<[u8]>::first_chunk)
        .copied()
        .ok_or(NotSflow::TooShort)
}

// === impl Header ===

impl Header {
    /// The stream this datagram belongs to.
    pub fn key(&self) -> StreamKey {
        StreamKey {
            agent: self.agent,
            sub_agent: self.sub_agent,
        }
    }
}

// === impl NotSflow ===

impl NotSflow {
    /// Every reason, for registering one counter per label value up front.
    pub const ALL: [Self; 3] = [Self::TooShort, Self::Version, Self::AddressType];

    /// A short label value: `too_short`, `version` or `address_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooShort => "too_short",
            Self::Version => "version",
            Self::AddressType => "address_type",
        }
    }
}

// === impl StreamKey ===

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.agent, self.sub_agent)
    }
}

// === impl StreamId ===

impl StreamId {
    /// The id as an index, `0..` the number of tracked streams.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

// === impl Observation ===

impl Observation {
    /// A datagram whose sequence is not followed.
    fn untracked(stream: Stream) -> Self {
        Self {
            stream,
            new_stream: false,
            missing: 0,
            late: false,
            duplicate: false,
            reset: false,
        }
    }
}

// === impl SequenceTracker ===

impl Default for SequenceTracker {
    /// A tracker of up to [`DEFAULT_MAX_STREAMS`] streams.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_STREAMS)
    }
}

impl SequenceTracker {
    /// A tracker that follows up to `max_streams` streams (0: none, every valid datagram is
    /// [`Stream::Other`]).
    pub fn new(max_streams: usize) -> Self {
        Self {
            ids: HashMap::new(),
            streams: Vec::new(),
            max_streams,
            last: None,
        }
    }

    /// The cap on tracked streams.
    pub fn max_streams(&self) -> usize {
        self.max_streams
    }

    /// Changes the cap on tracked streams. Streams already tracked stay tracked with their
    /// ids, even above a lowered cap; the cap only decides whether new streams are.
    pub fn set_max_streams(&mut self, max_streams: usize) {
        self.max_streams = max_streams;
    }

    /// How many streams are tracked.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no stream is tracked yet.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The agent and sub-agent of a tracked stream.
    ///
    /// # Panics
    ///
    /// If `id` came from another tracker and is beyond this one's streams.
    pub fn key(&self, id: StreamId) -> StreamKey {
        self.streams[id.index()].key
    }

    /// Accounts for one datagram: reads its header, then its stream's sequence.
    pub fn observe(&mut self, datagram: &[u8]) -> Observation {
        match parse_header(datagram) {
            Ok(header) => self.observe_header(&header),
            Err(reason) => Observation::untracked(Stream::NotSflow(reason)),
        }
    }

    /// Accounts for one datagram whose header the caller has already read.
    pub fn observe_header(&mut self, header: &Header) -> Observation {
        let key = header.key();
        let id = match self.last {
            Some((last, id)) if last == key => id,
            _ => match self.ids.get(&key) {
                Some(&id) => id,
                None => return self.start(key, header),
            },
        };
        self.last = Some((key, id));
        let step = self.streams[id.index()]
            .sequence
            .step(header.sequence, header.uptime_ms);
        let mut observation = Observation::untracked(Stream::Tracked(id));
        match step {
            Step::Next { missing } => observation.missing = missing,
            Step::Late { duplicate } => {
                observation.late = true;
                observation.duplicate = duplicate;
            }
            Step::Reset => observation.reset = true,
        }
        observation
    }

    /// Starts tracking a stream with this datagram as its baseline, if under the cap.
    fn start(&mut self, key: StreamKey, header: &Header) -> Observation {
        let index = self.streams.len();
        let Ok(raw) = u32::try_from(index) else {
            return Observation::untracked(Stream::Other);
        };
        if index >= self.max_streams {
            return Observation::untracked(Stream::Other);
        }
        let id = StreamId(raw);
        self.ids.insert(key, id);
        self.streams.push(Tracked {
            key,
            sequence: Sequence::baseline(header.sequence, header.uptime_ms),
        });
        self.last = Some((key, id));
        Observation {
            new_stream: true,
            ..Observation::untracked(Stream::Tracked(id))
        }
    }
}

// === impl Sequence ===

impl Sequence {
    fn baseline(sequence: u32, uptime: u32) -> Self {
        let mut uptimes = [0; REORDER_WINDOW as usize];
        uptimes[slot(sequence)] = uptime;
        Self {
            front: sequence,
            seen: 1,
            uptimes,
        }
    }

    /// The uptime that came with the front.
    fn front_uptime(&self) -> u32 {
        self.uptimes[slot(self.front)]
    }

    /// The uptime that came with the number `i` behind the front (bit `i` of `seen`).
    fn uptime_behind_front(&self, i: u32) -> u32 {
        self.uptimes[slot(self.front.wrapping_sub(i))]
    }

    fn step(&mut self, sequence: u32, uptime: u32) -> Step {
        // Distances modulo 2^32; the half of the space behind the front is "behind".
        let ahead = sequence.wrapping_sub(self.front);
        let behind = self.front.wrapping_sub(sequence);
        let uptime_behind = self.front_uptime().wrapping_sub(uptime);
        let uptime_went_back = (RESTART_UPTIME_MS + 1..=HALF).contains(&uptime_behind);
        let far_back = (REORDER_WINDOW..=HALF).contains(&behind);
        if uptime_went_back || far_back {
            *self = Self::baseline(sequence, uptime);
            return Step::Reset;
        }
        if ahead != 0 && ahead < HALF {
            self.seen = self.seen.checked_shl(ahead).unwrap_or(0) | 1;
            self.front = sequence;
            self.uptimes[slot(sequence)] = uptime;
            return Step::Next { missing: ahead - 1 };
        }
        // 0 <= behind < REORDER_WINDOW here.
        if !self.fits(behind, uptime) {
            *self = Self::baseline(sequence, uptime);
            return Step::Reset;
        }
        let bit = 1u64 << behind;
        let duplicate = self.seen & bit != 0;
        if !duplicate {
            self.seen |= bit;
            self.uptimes[slot(sequence)] = uptime;
        }
        Step::Late { duplicate }
    }

    /// Whether a datagram `behind` numbers behind the front (less than [`REORDER_WINDOW`]),
    /// stamped `uptime`, can belong to the run since the baseline: a copy of a datagram seen
    /// (the same uptime), or one sent between the nearest numbers seen on either side of it
    /// (an uptime between theirs), and in either case not more than [`LATE_UPTIME_MS`] before
    /// the front. Anything else was numbered by a restarted agent, or replayed.
    fn fits(&self, behind: u32, uptime: u32) -> bool {
        let uptime_behind = self.front_uptime().wrapping_sub(uptime);
        if (LATE_UPTIME_MS + 1..=HALF).contains(&uptime_behind) {
            return false;
        }
        let bit = 1u64 << behind;
        if self.seen & bit != 0 {
            return self.uptime_behind_front(behind) == uptime;
        }
        // Not seen, so behind >= 1, and the front (bit 0) is a later number seen.
        let later = self.seen & (bit - 1);
        let Some(nearest_later) = later.checked_ilog2() else {
            return true;
        };
        if is_after(uptime, self.uptime_behind_front(nearest_later)) {
            return false;
        }
        let earlier = self.seen.checked_shr(behind + 1).unwrap_or(0);
        earlier == 0 || {
            let nearest_earlier = behind + 1 + earlier.trailing_zeros();
            !is_after(self.uptime_behind_front(nearest_earlier), uptime)
        }
    }
}

/// Where number `n`'s uptime is kept: numbers within [`REORDER_WINDOW`] of each other get
/// distinct slots.
fn slot(n: u32) -> usize {
    (n % REORDER_WINDOW) as usize
}

/// Whether uptime `a` is later than `b` (modulo 2³², less than half the space ahead).
fn is_after(a: u32, b: u32) -> bool {
    (1..HALF).contains(&a.wrapping_sub(b))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

    /// An sFlow v5 datagram header (no samples) built by hand, plus one byte of "samples" so
    /// that reading stops at the header.
    fn datagram(agent: IpAddr, sub_agent: u32, sequence: u32, uptime_ms: u32) -> Vec<u8> {
        let mut d = Header {
            agent,
            sub_agent,
            sequence,
            uptime_ms,
            samples: 7,
        }
        .to_bytes();
        d.push(0xee);
        d
    }

    /// Observes `(sequence, uptime_ms)` pairs of one stream; returns the observations.
    fn run(tracker: &mut SequenceTracker, steps: &[(u32, u32)]) -> Vec<Observation> {
        steps
            .iter()
            .map(|&(seq, up)| tracker.observe(&datagram(A, 0, seq, up)))
            .collect()
    }

    fn tracked(o: &Observation) -> StreamId {
        match o.stream {
            Stream::Tracked(id) => id,
            other => panic!("not tracked: {other:?}"),
        }
    }

    fn plain(o: &Observation) -> bool {
        o.missing == 0 && !o.late && !o.duplicate && !o.reset
    }

    /// Deterministic xorshift64, so the random tests need no dependency and replay exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn a_written_header_reads_back_as_itself() {
        for agent in [A, V6] {
            let header = Header {
                agent,
                sub_agent: 3,
                sequence: u32::MAX,
                uptime_ms: 12_345,
                samples: 2,
            };
            let bytes = header.to_bytes();
            assert_eq!(bytes.len(), if agent.is_ipv4() { 28 } else { 40 });
            assert_eq!(parse_header(&bytes), Ok(header));
        }
        assert_eq!(
            parse_header(&Header::from_agent(B).to_bytes()),
            Ok(Header::from_agent(B))
        );
    }

    #[test]
    fn parses_ipv4_header() {
        let d = datagram(A, 3, 1234, 99_000);
        assert_eq!(
            parse_header(&d),
            Ok(Header {
                agent: A,
                sub_agent: 3,
                sequence: 1234,
                uptime_ms: 99_000,
                samples: 7,
            })
        );
        assert_eq!(parse_header(&d[..HEADER_LEN_IPV4]).unwrap().sequence, 1234);
    }

    #[test]
    fn parses_ipv6_header() {
        let d = datagram(V6, 1, u32::MAX, 5);
        let header = parse_header(&d).unwrap();
        assert_eq!(header.agent, V6);
        assert_eq!((header.sub_agent, header.sequence), (1, u32::MAX));
        assert_eq!((header.uptime_ms, header.samples), (5, 7));
        assert_eq!(parse_header(&d[..HEADER_LEN_IPV6]), Ok(header));
        assert_eq!(header.key().to_string(), "2001:db8::1#1");

        let mut tracker = SequenceTracker::default();
        let o = tracker.observe(&d);
        assert!(o.new_stream);
        assert_eq!(tracker.key(tracked(&o)), header.key());
    }

    #[test]
    fn every_truncation_is_too_short() {
        for (agent, len) in [(A, HEADER_LEN_IPV4), (V6, HEADER_LEN_IPV6)] {
            let d = datagram(agent, 0, 1, 1);
            for cut in 0..len {
                assert_eq!(
                    parse_header(&d[..cut]),
                    Err(NotSflow::TooShort),
                    "cut at {cut}"
                );
            }
            assert!(parse_header(&d[..len]).is_ok());
        }
    }

    #[test]
    fn other_versions_and_address_types_are_refused() {
        let mut v4 = datagram(A, 0, 1, 1);
        v4[3] = 4;
        assert_eq!(parse_header(&v4), Err(NotSflow::Version));
        for address_type in [0u8, 3, 0xff] {
            let mut d = datagram(A, 0, 1, 1);
            d[7] = address_type;
            assert_eq!(parse_header(&d), Err(NotSflow::AddressType));
        }

        let mut tracker = SequenceTracker::default();
        let o = tracker.observe(&v4);
        assert_eq!(o.stream, Stream::NotSflow(NotSflow::Version));
        assert!(plain(&o) && !o.new_stream);
        let o = tracker.observe(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(o.stream, Stream::NotSflow(NotSflow::Version));
        let o = tracker.observe(&[0, 0, 0, 5, 0, 0]);
        assert_eq!(o.stream, Stream::NotSflow(NotSflow::TooShort));
        assert!(tracker.is_empty());
    }

    #[test]
    fn reasons_have_distinct_labels() {
        let labels: Vec<_> = NotSflow::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, ["too_short", "version", "address_type"]);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut tracker = SequenceTracker::new(4);
        for round in 0..200_000 {
            let len = (rng.next() % 48) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Most rounds get a plausible prefix, to reach past the first checks.
            if round % 4 != 0 && len >= 8 {
                d[..4].copy_from_slice(&5u32.to_be_bytes());
                let address_type = 1 + (rng.next() % 2) as u32;
                d[4..8].copy_from_slice(&address_type.to_be_bytes());
            }
            let o = tracker.observe(&d);
            assert!(!(o.reset && (o.late || o.missing > 0)));
            assert!(!(o.late && o.missing > 0));
            assert!(!o.duplicate || o.late);
        }
        assert_eq!(tracker.len(), 4);

        // One stream, with numbers and uptimes now close to the last ones, now anywhere.
        let mut tracker = SequenceTracker::default();
        let (mut seq, mut up) = (0u32, 0u32);
        for _ in 0..200_000 {
            let r = rng.next();
            (seq, up) = match r % 4 {
                0 => (r as u32, (r >> 32) as u32),
                1 => (seq.wrapping_add(1), up.wrapping_add(10)),
                _ => (
                    seq.wrapping_add((r >> 8) as u32 % 200).wrapping_sub(100),
                    up.wrapping_add((r >> 32) as u32 % 40_000)
                        .wrapping_sub(20_000),
                ),
            };
            let o = tracker.observe(&datagram(A, 0, seq, up));
            assert!(matches!(o.stream, Stream::Tracked(_)));
            assert!(!(o.reset && (o.late || o.missing > 0)));
            assert!(!(o.late && o.missing > 0));
            assert!(!o.duplicate || o.late);
            assert!(o.missing < HALF);
        }
    }

    #[test]
    fn a_datagram_cut_inside_its_samples_is_truncated() {
        // Three samples of 1,000 bytes each (opaque data of an unknown format, skipped by
        // length), as a recv(2048) leaves them: cut inside the second.
        let mut d = Header {
            samples: 3,
            ..Header::from_agent(A)
        }
        .to_bytes();
        for i in 0..3u32 {
            d.extend_from_slice(&(1000 + i).to_be_bytes());
            d.extend_from_slice(&992u32.to_be_bytes());
            d.extend_from_slice(&[0xab; 992]);
        }
        assert_eq!(d.len(), 28 + 3 * 1000);
        assert!(!is_truncated(&d));
        assert!(is_truncated(&d[..2048]));
        // Cut exactly after a sample: the third is missing.
        assert!(is_truncated(&d[..28 + 2000]));
        // Cut inside the header: not sFlow, so not "truncated" here.
        assert!(!is_truncated(&d[..20]));
        assert!(
            !is_truncated(&Header::from_agent(A).to_bytes()),
            "no samples"
        );
        assert!(
            is_truncated(&datagram(A, 0, 1, 1)),
            "7 samples announced, none there"
        );
        for cut in 28..d.len() {
            assert!(is_truncated(&d[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn in_order_has_no_gaps() {
        let mut tracker = SequenceTracker::default();
        let steps: Vec<_> = (1..=100).map(|i| (i, i * 10)).collect();
        let obs = run(&mut tracker, &steps);
        assert!(obs[0].new_stream);
        assert!(obs.iter().all(plain));
        assert!(obs[1..].iter().all(|o| !o.new_stream));
        assert_eq!(tracked(&obs[99]).index(), 0);
    }

    #[test]
    fn skipped_numbers_are_missing() {
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(10, 1), (11, 2), (15, 3), (16, 4)]);
        assert_eq!(
            obs.iter().map(|o| o.missing).collect::<Vec<_>>(),
            [0, 0, 3, 0]
        );
        assert!(obs.iter().all(|o| !o.late && !o.reset));
    }

    #[test]
    fn big_forward_jump_is_loss() {
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(1, 1), (1_000_001, 2), (1_000_002, 3)]);
        assert_eq!(obs[1].missing, 999_999);
        assert!(!obs[1].reset);
        assert!(plain(&obs[2]));
    }

    #[test]
    fn first_datagram_is_a_baseline_whatever_its_number() {
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(4_000_000, 1), (4_000_001, 2)]);
        assert!(obs[0].new_stream && plain(&obs[0]));
        assert!(plain(&obs[1]));
    }

    #[test]
    fn interleaved_streams_are_counted_apart() {
        let mut tracker = SequenceTracker::default();
        let streams = [(A, 0), (A, 1), (B, 0), (B, 1)];
        let mut ids = Vec::new();
        for (agent, sub) in streams {
            let o = tracker.observe(&datagram(agent, sub, 100, 1));
            assert!(o.new_stream);
            ids.push(tracked(&o));
        }
        assert_eq!(
            ids.iter().map(|id| id.index()).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // Each stream's own numbers: (A,0) in order, (A,1) skips one each round, (B,0) skips
        // two once, (B,1) in order.
        let mut missing = [0u32; 4];
        for round in 1..=5u32 {
            let seqs = [100 + round, 100 + 2 * round, 102 + round, 100 + round];
            for (i, (agent, sub)) in streams.into_iter().enumerate() {
                let o = tracker.observe(&datagram(agent, sub, seqs[i], 1 + round));
                assert_eq!(tracked(&o), ids[i]);
                assert!(!o.new_stream && !o.late && !o.reset, "{o:?}");
                missing[i] += o.missing;
            }
        }
        assert_eq!(missing, [0, 5, 2, 0]);
        assert_eq!(
            tracker.key(ids[1]),
            StreamKey {
                agent: A,
                sub_agent: 1
            }
        );
        assert_eq!(tracker.key(ids[2]).to_string(), "192.0.2.2#0");
    }

    #[test]
    fn sequence_wraparound_is_not_a_gap() {
        let mut tracker = SequenceTracker::default();
        let obs = run(
            &mut tracker,
            &[(u32::MAX - 1, 1), (u32::MAX, 2), (0, 3), (1, 4)],
        );
        assert!(obs.iter().all(plain), "{obs:?}");
        // A duplicate is a copy, so it carries its number's uptime (2, not a later one: a
        // different datagram with an old number is a restart since late datagrams must fit).
        let obs = run(&mut tracker, &[(u32::MAX, 2)]);
        assert!(obs[0].late && obs[0].duplicate);

        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(u32::MAX, 1), (2, 2)]);
        assert_eq!(obs[1].missing, 2);
    }

    #[test]
    fn uptime_wraparound_is_not_a_restart() {
        let mut tracker = SequenceTracker::default();
        let obs = run(
            &mut tracker,
            &[
                (7, u32::MAX - 500),
                (8, u32::MAX - 10),
                (9, 20_000),
                (10, 50_000),
            ],
        );
        assert!(obs.iter().all(plain), "{obs:?}");
    }

    #[test]
    fn reordered_datagram_is_late_not_reset() {
        let mut tracker = SequenceTracker::default();
        let obs = run(
            &mut tracker,
            &[(1, 1000), (2, 1010), (4, 1030), (3, 1020), (5, 1040)],
        );
        assert_eq!(obs[2].missing, 1);
        assert!(obs[3].late && !obs[3].duplicate && !obs[3].reset);
        assert_eq!(obs[3].missing, 0);
        assert!(plain(&obs[4]), "front did not move back: {:?}", obs[4]);

        // As far back as the window reaches, still late.
        let far = 5u32.wrapping_sub(REORDER_WINDOW - 1);
        let obs = run(&mut tracker, &[(far, 900), (6, 1050)]);
        assert!(obs[0].late && !obs[0].reset);
        assert!(plain(&obs[1]));
    }

    #[test]
    fn duplicate_is_late_and_duplicate() {
        let mut tracker = SequenceTracker::default();
        let obs = run(
            &mut tracker,
            &[(1, 10), (2, 20), (3, 30), (3, 30), (2, 20), (4, 40)],
        );
        assert!(obs[3].late && obs[3].duplicate);
        assert!(obs[4].late && obs[4].duplicate);
        assert!(plain(&obs[5]));
    }

    #[test]
    fn restart_is_a_reset_without_missing() {
        // A short run, so the sequence alone (back by 9) would read as late: the uptime tells.
        let mut tracker = SequenceTracker::default();
        let mut steps: Vec<_> = (1..=10).map(|i| (i, 3_600_000 + i * 1000)).collect();
        steps.extend([(1, 150), (2, 1150), (3, 2150)]);
        let obs = run(&mut tracker, &steps);
        assert!(obs[10].reset, "{:?}", obs[10]);
        assert_eq!(obs[10].missing, 0);
        assert!(!obs[10].late && !obs[10].new_stream);
        assert!(plain(&obs[11]) && plain(&obs[12]));
    }

    #[test]
    fn far_jump_backwards_is_a_reset_even_without_uptime() {
        // An agent that always sends uptime 0.
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(500, 0), (501, 0), (1, 0), (2, 0)]);
        assert!(obs[2].reset && obs[2].missing == 0);
        assert!(plain(&obs[3]));

        let obs = run(&mut tracker, &[(2u32.wrapping_sub(REORDER_WINDOW), 0)]);
        assert!(obs[0].reset, "{:?}", obs[0]);
    }

    #[test]
    fn uptime_backwards_with_sequence_forward_is_a_reset() {
        // A restart whose first datagrams were lost, seen across the sequence's wrap.
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(u32::MAX - 6, 900_000_000), (2, 2000)]);
        assert!(obs[1].reset && obs[1].missing == 0);
    }

    /// Counts of (reset, late, duplicate, missing) over `obs`.
    fn tally(obs: &[Observation]) -> (usize, usize, usize, u32) {
        (
            obs.iter().filter(|o| o.reset).count(),
            obs.iter().filter(|o| o.late).count(),
            obs.iter().filter(|o| o.duplicate).count(),
            obs.iter().map(|o| o.missing).sum(),
        )
    }

    #[test]
    fn a_short_stream_started_over_is_one_reset_and_no_duplicates() {
        // An agent that ran 3 s (30 datagrams) and restarted with its uptime near 0: its new
        // numbers are all behind the old front (by less than the window), and its uptimes
        // are less than 10 s behind the front's. Each new datagram carries another uptime than
        // the old one of its number did.
        let mut tracker = SequenceTracker::default();
        let old: Vec<_> = (1..=30).map(|i| (i, 1_000 + i * 100)).collect();
        let new: Vec<_> = (1..=30).map(|i| (i, 20 + i * 100)).collect();
        let obs = run(&mut tracker, &old);
        assert_eq!(tally(&obs), (0, 0, 0, 0));
        let obs = run(&mut tracker, &new);
        assert!(obs[0].reset, "{:?}", obs[0]);
        assert_eq!(tally(&obs), (1, 0, 0, 0), "one reset, then in order");
        // The new run goes on past the old front as next, with gaps counted again.
        let obs = run(&mut tracker, &[(31, 3_120), (33, 3_320)]);
        assert_eq!(tally(&obs), (0, 0, 0, 1));

        // Shorter than LATE_UPTIME_MS too: 10 datagrams 10 ms apart, restarted 2 ms earlier
        // in its uptime than it first started.
        let mut tracker = SequenceTracker::default();
        let old: Vec<_> = (1..=10).map(|i| (i, 5 + i * 10)).collect();
        let new: Vec<_> = (1..=10).map(|i| (i, 3 + i * 10)).collect();
        let obs = run(&mut tracker, &[old, new].concat());
        assert_eq!(tally(&obs), (1, 0, 0, 0));
        assert!(obs[10].reset);
    }

    #[test]
    fn a_restart_whose_uptime_ran_on_is_a_reset() {
        // Only the sFlow process restarted: its numbers start again at 1, its uptime (the
        // host's) goes on, so the new datagrams are stamped after the old front.
        let mut tracker = SequenceTracker::default();
        let old: Vec<_> = (1..=20).map(|i| (i, 500_000 + i * 100)).collect();
        let new: Vec<_> = (1..=20).map(|i| (i, 503_000 + i * 100)).collect();
        let obs = run(&mut tracker, &[old, new].concat());
        assert!(obs[20].reset, "{:?}", obs[20]);
        assert_eq!(tally(&obs), (1, 0, 0, 0));
    }

    #[test]
    fn a_late_datagram_fits_between_the_numbers_seen_around_it() {
        let steps = [(1, 100), (2, 110), (4, 130), (6, 150)];
        // Sent between 2 and 4, as the agent numbered it: late.
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[&steps[..], &[(3, 120), (5, 140)]].concat());
        assert!(obs[4].late && obs[5].late, "{obs:?}");
        assert_eq!(tally(&obs), (0, 2, 0, 2));
        // Stamped before 2 or after 4, its neighbours: not of this run.
        for uptime in [105, 135] {
            let mut tracker = SequenceTracker::default();
            let obs = run(&mut tracker, &[&steps[..], &[(3, uptime)]].concat());
            assert!(obs[4].reset, "uptime {uptime}: {:?}", obs[4]);
        }
        // Equal to a neighbour's (an agent that stamps in seconds, or not at all): late.
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(1, 7), (2, 7), (4, 7), (3, 7), (3, 7)]);
        assert!(obs[3].late && !obs[3].duplicate);
        assert!(obs[4].duplicate);
        // More than LATE_UPTIME_MS before the front, even between its neighbours: too old to
        // have been reordered.
        let mut tracker = SequenceTracker::default();
        let late = 5_000 - LATE_UPTIME_MS - 1;
        let obs = run(&mut tracker, &[(1, 0), (3, 5_000), (2, late)]);
        assert!(obs[2].reset, "{:?}", obs[2]);
        let obs = run(
            &mut tracker,
            &[(4, 5_000 - 1), (3, 5_000 - 1 - LATE_UPTIME_MS)],
        );
        assert!(
            obs[1].late,
            "exactly LATE_UPTIME_MS behind is still late: {obs:?}"
        );
    }

    #[test]
    fn a_copy_with_another_uptime_is_no_duplicate() {
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[(1, 10), (2, 20), (3, 30), (2, 20), (2, 21)]);
        assert!(obs[3].duplicate);
        assert!(obs[4].reset, "same number, another uptime: {:?}", obs[4]);
    }

    #[test]
    fn a_replay_from_the_start_is_one_reset() {
        // A capture of 40 datagrams, 50 ms apart (2 s of uptime), played twice, byte for byte.
        let capture: Vec<_> = (1..=40).map(|i| (1_000 + i, 3_600_000 + i * 50)).collect();
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[&capture[..], &capture[..]].concat());
        assert!(obs[40].reset);
        assert_eq!(tally(&obs), (1, 0, 0, 0));

        // Within LATE_UPTIME_MS, a replay is what duplicates are (documented).
        let capture: Vec<_> = (1..=10).map(|i| (i, 3_600_000 + i * 7)).collect();
        let mut tracker = SequenceTracker::default();
        let obs = run(&mut tracker, &[&capture[..], &capture[..]].concat());
        assert_eq!(tally(&obs), (0, 10, 10, 0));
    }

    #[test]
    fn streams_beyond_the_cap_are_other() {
        let mut tracker = SequenceTracker::new(2);
        let a = tracker.observe(&datagram(A, 0, 1, 1));
        let b = tracker.observe(&datagram(A, 1, 1, 1));
        let c = tracker.observe(&datagram(B, 0, 1, 1));
        assert!(a.new_stream && b.new_stream);
        assert_eq!(c.stream, Stream::Other);
        assert!(plain(&c) && !c.new_stream);
        // Still Other later, with no gap accounting; the first two are still tracked.
        let c = tracker.observe(&datagram(B, 0, 50, 2));
        assert_eq!(c.stream, Stream::Other);
        assert!(plain(&c));
        let a2 = tracker.observe(&datagram(A, 0, 3, 2));
        assert_eq!((a2.stream, a2.missing), (a.stream, 1));
        assert_eq!(tracker.len(), 2);

        // Raising the cap lets the next new stream in, with the next id.
        tracker.set_max_streams(3);
        let c = tracker.observe(&datagram(B, 0, 51, 3));
        assert!(c.new_stream);
        assert_eq!(tracked(&c).index(), 2);

        let mut none = SequenceTracker::new(0);
        assert_eq!(none.observe(&datagram(A, 0, 1, 1)).stream, Stream::Other);
    }
}
