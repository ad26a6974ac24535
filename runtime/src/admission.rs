//! Which received datagrams the agent relays: what `--accept` and `--allow-sources` decide.
//!
//! Owns the policy and its parts: [`Accept`] (sFlow v5 only, the default, or any UDP),
//! [`Cidr`] (an IPv4 or IPv6 prefix, parsed and matched here: a dozen lines do not need a
//! crate), and [`Admission`], the checked pair, whose [`Admission::check`] gives one
//! [`Verdict`] per datagram. Both receive paths of the agent (the relay's receive loop and the
//! `--ssh-hex` collector) ask it. It deliberately does not count, log or drop anything itself:
//! callers hold the counters and rate limits, and it does no allocation per datagram.
//!
//! # Addresses
//!
//! Prefixes and sources are compared as IPv6 addresses, IPv4 ones in their IPv4-mapped form
//! (`::ffff:a.b.c.d`). So an IPv4 prefix matches a sender whether it arrived on an IPv4 socket
//! or as a mapped address on a dual-stack one, and an IPv6 prefix that covers
//! `::ffff:0:0/96` (`::/0` does) covers IPv4 senders too.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use proto::sflow::{Header, NotSflow, parse_header};
use serde::{Deserialize, Serialize};

/// What the agent relays, of what passes `--allow-sources`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accept {
    /// sFlow v5 datagrams only (their header reads as one); the rest is dropped and counted.
    #[default]
    Sflow,
    /// Any UDP datagram, for sites that carry other UDP through the relay.
    Any,
}

/// An IPv4 or IPv6 network prefix, `ADDR/LEN`, or a lone address (`/32`, `/128`).
///
/// Parsing refuses host bits set beyond the prefix (`10.1.0.0/8`): such a prefix is usually
/// a typo, and taking it as `10.0.0.0/8` would admit more than was meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network, IPv4 in its mapped form.
    net: u128,
    /// Prefix length over the 128 bits (an IPv4 `/n` is `96 + n`).
    len: u8,
    /// Written as IPv4, for display.
    v4: bool,
}

/// The `reason` label value of datagrams dropped for their source, beside
/// [`NotSflow::as_str`]'s in `relay_agent_not_sflow_datagrams_total`.
pub const SOURCE_NOT_ALLOWED: &str = "source_not_allowed";

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Relay it. Carries its sFlow header, or why it has none (only under [`Accept::Any`]),
    /// for the caller's sFlow accounting.
    Relay(Result<Header, NotSflow>),
    /// Drop it: it is not sFlow v5, and only sFlow is accepted.
    NotSflow(NotSflow),
    /// Drop it: its source is outside `--allow-sources` (its bytes were not read).
    SourceNotAllowed,
}

/// The checked policy: what is accepted, from where. The default relays anything from
/// anywhere (what the sink's `--ssh-hex` collector does).
#[derive(Debug, Clone)]
pub struct Admission {
    accept: Accept,
    /// Empty: every source is allowed.
    allow: Vec<Cidr>,
}

// === impl Accept ===

impl Accept {
    /// The name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sflow => "sflow",
            Self::Any => "any",
        }
    }
}

// === impl Admission ===

impl Default for Admission {
    fn default() -> Self {
        Self::new(Accept::Any, Vec::new())
    }
}

impl Admission {
    /// Relays what `accept` says, from the sources in `allow` (every source when empty).
    pub fn new(accept: Accept, allow: Vec<Cidr>) -> Self {
        Self { accept, allow }
    }

    /// The policy from option values: `allow` as written by the user.
    ///
    /// # Errors
    ///
    /// A message naming the first entry of `allow` that is not a prefix, and why.
    pub fn parse(accept: Accept, allow: &[String]) -> Result<Self, String> {
        let allow = allow
            .iter()
            .map(|s| s.parse().map_err(|e| format!("allow-sources: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self::new(accept, allow))
    }

    /// What is accepted.
    pub fn accept(&self) -> Accept {
        self.accept
    }

    /// The allowed source prefixes (empty: all).
    pub fn allow(&self) -> &[Cidr] {
        &self.allow
    }

    /// The allowed sources for a log line: the prefixes, comma-separated, or `any`.
    pub fn allow_display(&self) -> String {
        if self.allow.is_empty() {
            return "any".into();
        }
        let list: Vec<String> = self.allow.iter().map(Cidr::to_string).collect();
        list.join(",")
    }

    /// Whether a datagram from `source` may be relayed at all.
    pub fn source_allowed(&self, source: SocketAddr) -> bool {
        self.allow.is_empty() || {
            let ip = mapped(source.ip());
            self.allow.iter().any(|c| c.contains_mapped(ip))
        }
    }

    /// The verdict on `datagram`, received from `source`: the source first (no byte read when
    /// it is not allowed), then the sFlow header (read once, whatever the policy, as the
    /// caller's accounting needs it).
    pub fn check(&self, source: SocketAddr, datagram: &[u8]) -> Verdict {
        if !self.source_allowed(source) {
            return Verdict::SourceNotAllowed;
        }
        match (parse_header(datagram), self.accept) {
            (Err(reason), Accept::Sflow) => Verdict::NotSflow(reason),
            (parsed, _) => Verdict::Relay(parsed),
        }
    }
}

// === impl Verdict ===

impl Verdict {
    /// The label value of a drop's reason; `None` for [`Verdict::Relay`].
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Self::Relay(_) => None,
            Self::NotSflow(reason) => Some(reason.as_str()),
            Self::SourceNotAllowed => Some(SOURCE_NOT_ALLOWED),
        }
    }
}

// === impl Cidr ===

/// `ip` as 128 bits, IPv4 in its mapped form.
fn mapped(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The mask of a prefix `len` bits long, out of 128.
fn mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl Cidr {
    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.contains_mapped(mapped(ip))
    }

    fn contains_mapped(&self, ip: u128) -> bool {
        (ip ^ self.net) & mask(self.len) == 0
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = addr.trim().parse().map_err(|_| {
            format!(
                "{s:?} is not a network prefix (ADDR/LEN, such as 192.0.2.0/24 or 2001:db8::/32)"
            )
        })?;
        let (v4, max) = match ip {
            IpAddr::V4(_) => (true, 32u8),
            IpAddr::V6(_) => (false, 128),
        };
        let len = match len {
            None => max,
            Some(len) => len
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let len = if v4 { 96 + len } else { len };
        let net = mapped(ip);
        if net & !mask(len) != 0 {
            let cidr = Self {
                net: net & mask(len),
                len,
                v4,
            };
            return Err(format!(
                "{s:?} has address bits set past the prefix length (the network is {cidr})"
            ));
        }
        Ok(Self { net, len, v4 })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = Ipv6Addr::from(self.net);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.v4 => write!(f, "{v4}/{}", self.len - 96),
            _ => write!(f, "{v6}/{}", self.len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn from(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 6343)
    }

    #[test]
    fn prefixes_match_their_addresses_and_no_others() {
        let net = cidr("192.0.2.0/24");
        assert!(net.contains(ip("192.0.2.0")));
        assert!(net.contains(ip("192.0.2.255")));
        assert!(!net.contains(ip("192.0.3.0")));
        assert!(!net.contains(ip("192.0.1.255")));
        let host = cidr("127.0.0.1");
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("192.0.2.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(cidr("fe80::1/128").contains(ip("fe80::1")));
        assert!(!cidr("fe80::1/128").contains(ip("fe80::2")));
        assert!(cidr("10.0.0.0/31").contains(ip("10.0.0.1")));
        assert!(!cidr("10.0.0.0/31").contains(ip("10.0.0.2")));
    }

    #[test]
    fn ipv4_mapped_sources_match_ipv4_prefixes() {
        let admission = Admission::new(Accept::Any, vec![cidr("10.0.0.0/8")]);
        assert!(admission.source_allowed(from("10.1.2.3")));
        assert!(admission.source_allowed(from("::ffff:10.1.2.3")));
        assert!(!admission.source_allowed(from("::ffff:11.1.2.3")));
        assert!(!admission.source_allowed(from("11.1.2.3")));
        // IPv4-compatible (deprecated ::a.b.c.d) is not IPv4-mapped: no match.
        assert!(!admission.source_allowed(from("::10.1.2.3")));
    }

    #[test]
    fn bad_prefixes_are_refused_with_the_reason() {
        for (bad, why) in [
            ("10.0.0.0/33", "0 to 32"),
            ("2001:db8::/129", "0 to 128"),
            ("10.0.0.0/", "0 to 32"),
            ("10.0.0.0/x", "0 to 32"),
            ("10.0.0/8", "not a network prefix"),
            ("example.com/24", "not a network prefix"),
            ("", "not a network prefix"),
            ("10.1.0.0/8", "the network is 10.0.0.0/8"),
            ("2001:db8::1/32", "the network is 2001:db8::/32"),
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let err =
            Admission::parse(Accept::Sflow, &["127.0.0.1/32".into(), "nope".into()]).unwrap_err();
        assert!(err.starts_with("allow-sources: \"nope\""), "{err}");
    }

    #[test]
    fn prefixes_display_as_written() {
        for s in [
            "192.0.2.0/24",
            "0.0.0.0/0",
            "2001:db8::/32",
            "::/0",
            "::ffff:0.0.0.0/96",
        ] {
            assert_eq!(cidr(s).to_string(), s);
        }
        assert_eq!(cidr("127.0.0.1").to_string(), "127.0.0.1/32");
    }

    fn sflow() -> Vec<u8> {
        Header {
            sequence: 1,
            uptime_ms: 1_000,
            ..Header::from_agent(ip("192.0.2.1"))
        }
        .to_bytes()
    }

    #[test]
    fn verdicts_follow_the_policy() {
        let local = from("127.0.0.1");
        let garbage = b"not sflow at all, just some bytes".as_slice();
        let strict = Admission::new(Accept::Sflow, Vec::new());
        assert!(matches!(
            strict.check(local, &sflow()),
            Verdict::Relay(Ok(_))
        ));
        assert_eq!(
            strict.check(local, garbage),
            Verdict::NotSflow(NotSflow::Version)
        );
        assert_eq!(
            strict.check(local, &[]),
            Verdict::NotSflow(NotSflow::TooShort)
        );
        assert_eq!(strict.check(local, garbage).reason(), Some("version"));

        let any = Admission::default();
        assert_eq!(any.accept(), Accept::Any);
        assert_eq!(
            any.check(local, garbage),
            Verdict::Relay(Err(NotSflow::Version))
        );
        assert_eq!(any.check(local, garbage).reason(), None);

        let fenced = Admission::new(Accept::Any, vec![cidr("127.0.0.1/32")]);
        assert!(matches!(fenced.check(local, garbage), Verdict::Relay(_)));
        let outside = from("127.0.0.2");
        assert_eq!(fenced.check(outside, &sflow()), Verdict::SourceNotAllowed);
        assert_eq!(
            fenced.check(outside, &sflow()).reason(),
            Some(SOURCE_NOT_ALLOWED)
        );
    }
}
