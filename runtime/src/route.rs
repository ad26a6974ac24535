//! Which datagrams a route carries: the `agents`, `sites` and `not-after` of an agent's
//! `[[sink]]` entry or a sink's `[[forward]]` entry.
//!
//! Matching is on what sFlow analyzers themselves key on: the agent address inside the sFlow
//! v5 datagram (its fixed header, IPv4 or IPv6, not the UDP sender, which behind a relay is
//! the relay) and, at the sink, the site: the certificate name of the relay agent that
//! carried it. The rules, exact and in one place:
//!
//! - A route with neither `agents` nor `sites` carries everything, sFlow or not.
//! - `agents` lists prefixes (`10.1.0.0/24`, `2001:db8::/48`) or lone addresses; an entry
//!   starting with `!` excludes. A datagram matches when its agent address is inside an
//!   included prefix (or, when only exclusions are listed, anywhere) and inside no excluded
//!   one: exclusions win.
//! - `sites` lists relay-agent certificate names, compared exactly. Where the site is not
//!   known (at the agent), a route with `sites` matches nothing.
//! - With both, a datagram must match both.
//! - A datagram that is not sFlow v5 never matches a route with `agents` or `sites`.
//! - `not-after` (RFC 3339) is when the route ends; [`Route::expired`] says whether it has.
//!
//! A malformed entry is an error that names it, never skipped. Matching does no allocation:
//! the caller parses a datagram's header once ([`proto::sflow::parse_header`]) and asks each
//! route with [`Route::matches`].

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use proto::sflow::Header;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::admission::Cidr;

/// A route's filter and end, as written in a configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RouteConfig {
    /// sFlow agent addresses: prefixes or addresses, `!` to exclude.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Relay-agent certificate names (at the sink only).
    #[serde(default)]
    pub sites: Vec<String>,
    /// When the route ends (RFC 3339, such as `2027-01-31T18:00:00Z`).
    #[serde(default)]
    pub not_after: Option<String>,
}

/// Why a route's configuration cannot be used; each names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// An `agents` entry that is not a prefix or address.
    #[error("agents: {0}")]
    Agent(String),
    /// An empty `sites` entry.
    #[error("sites: {0:?} is not a relay-agent certificate name")]
    Site(String),
    /// A `not-after` that is not an RFC 3339 time.
    #[error(
        "not-after: {0:?} is not an RFC 3339 time with its offset (such as 2027-01-31T18:00:00Z)"
    )]
    NotAfter(String),
}

/// A checked route: which datagrams it carries, and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    include: Vec<Cidr>,
    exclude: Vec<Cidr>,
    sites: Vec<String>,
    not_after: Option<NotAfter>,
}

/// The moment a route ends, and how it was written (for logs and status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAfter {
    at: SystemTime,
    text: String,
}

impl TryFrom<&RouteConfig> for Route {
    type Error = RouteError;

    fn try_from(config: &RouteConfig) -> Result<Self, RouteError> {
        let mut route = Self::default();
        for entry in &config.agents {
            let (list, prefix) = match entry.trim().strip_prefix('!') {
                Some(rest) => (&mut route.exclude, rest),
                None => (&mut route.include, entry.as_str()),
            };
            list.push(prefix.parse().map_err(RouteError::Agent)?);
        }
        for site in &config.sites {
            if site.trim().is_empty() || site.trim() != site {
                return Err(RouteError::Site(site.clone()));
            }
            route.sites.push(site.clone());
        }
        route.not_after = config
            .not_after
            .as_deref()
            .map(NotAfter::parse)
            .transpose()?;
        Ok(route)
    }
}

impl Route {
    /// Whether the route filters at all (`agents` or `sites`); one that does not carries
    /// every datagram.
    pub fn is_filtered(&self) -> bool {
        !(self.include.is_empty() && self.exclude.is_empty() && self.sites.is_empty())
    }

    /// Whether the route carries a datagram whose header is `header` (an error: not sFlow
    /// v5), carried by the relay agent `site` where it is known.
    pub fn matches<E>(&self, header: Result<&Header, E>, site: Option<&str>) -> bool {
        if !self.is_filtered() {
            return true;
        }
        let Ok(header) = header else {
            return false;
        };
        self.matches_agent(header.agent) && self.matches_site(site)
    }

    /// Whether the agent address passes `agents`.
    pub fn matches_agent(&self, agent: IpAddr) -> bool {
        let included =
            self.include.is_empty() || self.include.iter().any(|cidr| cidr.contains(agent));
        included && !self.exclude.iter().any(|cidr| cidr.contains(agent))
    }

    /// Whether the site passes `sites` (an unknown site passes only a route without them).
    pub fn matches_site(&self, site: Option<&str>) -> bool {
        self.sites.is_empty() || site.is_some_and(|site| self.sites.iter().any(|s| s == site))
    }

    /// Whether `other` carries exactly the datagrams this route does (their ends aside):
    /// routes that do can share one batch.
    pub fn same_filter(&self, other: &Self) -> bool {
        self.include == other.include && self.exclude == other.exclude && self.sites == other.sites
    }

    /// When the route ends, if it does.
    pub fn not_after(&self) -> Option<&NotAfter> {
        self.not_after.as_ref()
    }

    /// Whether the route has ended by `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.not_after.as_ref().is_some_and(|end| now >= end.at)
    }

    /// How long until the route ends, from `now` (zero once it has); `None` when it does not.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.not_after
            .as_ref()
            .map(|end| end.at.duration_since(now).unwrap_or_default())
    }

    /// The filter as one line for logs: `agents=… sites=…`, or `everything`.
    pub fn describe(&self) -> String {
        if !self.is_filtered() {
            return "everything".into();
        }
        let mut parts = Vec::new();
        let agents: Vec<String> = (self.include.iter().map(ToString::to_string))
            .chain(self.exclude.iter().map(|cidr| format!("!{cidr}")))
            .collect();
        if !agents.is_empty() {
            parts.push(format!("agents={}", agents.join(",")));
        }
        if !self.sites.is_empty() {
            parts.push(format!("sites={}", self.sites.join(",")));
        }
        parts.join(" ")
    }
}

impl NotAfter {
    /// Parses an RFC 3339 time with its offset.
    ///
    /// # Errors
    ///
    /// [`RouteError::NotAfter`] naming the text.
    pub fn parse(text: &str) -> Result<Self, RouteError> {
        let at = OffsetDateTime::parse(text.trim(), &Rfc3339)
            .map_err(|_| RouteError::NotAfter(text.into()))?;
        Ok(Self {
            at: at.into(),
            text: text.trim().into(),
        })
    }

    /// The moment.
    pub fn at(&self) -> SystemTime {
        self.at
    }

    /// Seconds since the Unix epoch (for a gauge).
    pub fn unix_seconds(&self) -> i64 {
        OffsetDateTime::from(self.at).unix_timestamp()
    }

    /// As it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sflow::{NotSflow, parse_header};

    fn route(agents: &[&str], sites: &[&str]) -> Route {
        Route::try_from(&RouteConfig {
            agents: agents.iter().map(ToString::to_string).collect(),
            sites: sites.iter().map(ToString::to_string).collect(),
            not_after: None,
        })
        .expect("route")
    }

    fn carries(route: &Route, agent: &str, site: Option<&str>) -> bool {
        let datagram = Header::from_agent(agent.parse().unwrap()).to_bytes();
        route.matches(parse_header(&datagram).as_ref(), site)
    }

    #[test]
    fn included_prefixes_minus_excluded_addresses() {
        let r = route(&["10.1.0.0/24", "!10.1.0.99", "2001:db8:10::/48"], &[]);
        assert!(carries(&r, "10.1.0.1", None));
        assert!(carries(&r, "10.1.0.255", None));
        assert!(!carries(&r, "10.1.0.99", None), "exclusions win");
        assert!(!carries(&r, "10.1.1.1", None));
        assert!(carries(&r, "2001:db8:10:ffff::1", None));
        assert!(!carries(&r, "2001:db8:11::1", None));
        assert!(!carries(&r, "192.0.2.1", None));
    }

    #[test]
    fn only_exclusions_carry_everything_else() {
        let r = route(&["!10.1.0.0/16"], &[]);
        assert!(carries(&r, "10.2.0.1", None));
        assert!(carries(&r, "2001:db8::1", None));
        assert!(!carries(&r, "10.1.200.3", None));
    }

    #[test]
    fn sites_are_exact_and_unknown_sites_match_no_site_route() {
        let r = route(&[], &["site-a", "site-b"]);
        assert!(carries(&r, "10.0.0.1", Some("site-a")));
        assert!(!carries(&r, "10.0.0.1", Some("site-c")));
        assert!(!carries(&r, "10.0.0.1", Some("Site-A")));
        assert!(!carries(&r, "10.0.0.1", None));
    }

    #[test]
    fn with_both_a_datagram_must_match_both() {
        let r = route(&["10.0.0.0/8"], &["site-a"]);
        assert!(carries(&r, "10.9.9.9", Some("site-a")));
        assert!(!carries(&r, "10.9.9.9", Some("site-b")));
        assert!(!carries(&r, "192.0.2.1", Some("site-a")));
    }

    #[test]
    fn unfiltered_routes_carry_everything_and_filtered_ones_no_non_sflow() {
        let everything = route(&[], &[]);
        let not_sflow: Result<&Header, NotSflow> = Err(NotSflow::Version);
        assert!(!everything.is_filtered());
        assert!(everything.matches(not_sflow, None));
        assert!(carries(&everything, "192.0.2.1", None));
        assert_eq!(everything.describe(), "everything");
        for filtered in [route(&["!10.0.0.0/8"], &[]), route(&[], &["site-a"])] {
            assert!(filtered.is_filtered());
            assert!(!filtered.matches(not_sflow, Some("site-a")));
        }
    }

    #[test]
    fn malformed_entries_are_errors_that_name_them() {
        let bad = |agents: &[&str], sites: &[&str], not_after: Option<&str>| {
            Route::try_from(&RouteConfig {
                agents: agents.iter().map(ToString::to_string).collect(),
                sites: sites.iter().map(ToString::to_string).collect(),
                not_after: not_after.map(Into::into),
            })
            .unwrap_err()
            .to_string()
        };
        assert!(bad(&["10.1.0.0/33"], &[], None).contains("\"10.1.0.0/33\""));
        assert!(bad(&["10.1.0.1/24"], &[], None).contains("10.1.0.0/24"));
        assert!(bad(&["!"], &[], None).starts_with("agents: "));
        assert!(bad(&["site-a"], &[], None).contains("\"site-a\""));
        assert!(bad(&[], &[""], None).starts_with("sites: "));
        assert!(bad(&[], &[" site-a"], None).starts_with("sites: "));
        let e = bad(&[], &[], Some("2027-01-31 18:00"));
        assert!(
            e.contains("\"2027-01-31 18:00\"") && e.contains("RFC 3339"),
            "{e}"
        );
        assert!(bad(&[], &[], Some("2027-01-31T18:00:00")).starts_with("not-after: "));
    }

    #[test]
    fn not_after_ends_the_route_at_its_moment() {
        let r = Route::try_from(&RouteConfig {
            not_after: Some("2027-01-31T18:00:00+01:00".into()),
            ..RouteConfig::default()
        })
        .unwrap();
        let end = r.not_after().expect("not-after");
        assert_eq!(end.unix_seconds(), 1_801_414_800);
        assert_eq!(end.as_str(), "2027-01-31T18:00:00+01:00");
        let second = Duration::from_secs(1);
        assert!(!r.expired(end.at() - second));
        assert!(r.expired(end.at()));
        assert_eq!(r.remaining(end.at() - second), Some(second));
        assert_eq!(r.remaining(end.at() + second), Some(Duration::ZERO));
        assert_eq!(route(&[], &[]).remaining(end.at()), None);
    }

    #[test]
    fn routes_with_the_same_filter_and_other_ends_share_it() {
        let a = route(&["10.1.0.0/24", "!10.1.0.99"], &[]);
        let mut b = a.clone();
        b.not_after = Some(NotAfter::parse("2027-01-31T18:00:00Z").unwrap());
        assert!(a.same_filter(&b) && a != b);
        assert!(!a.same_filter(&route(&["10.1.0.0/24"], &[])));
        assert!(!a.same_filter(&route(&["10.1.0.0/24", "!10.1.0.99"], &["site-a"])));
        assert!(route(&[], &[]).same_filter(&Route::default()));
    }

    #[test]
    fn the_filter_describes_itself_as_configured() {
        let r = route(&["10.1.0.0/24", "!10.1.0.99", "2001:db8::/32"], &["site-a"]);
        assert_eq!(
            r.describe(),
            "agents=10.1.0.0/24,2001:db8::/32,!10.1.0.99/32 sites=site-a"
        );
    }

    #[test]
    fn the_file_form_reads_kebab_case_keys() {
        let config: RouteConfig = toml::from_str(
            "agents = [\"10.1.0.0/24\", \"!10.1.0.99\"]\nsites = [\"site-a\"]\nnot-after = \"2027-01-31T18:00:00Z\"\n",
        )
        .unwrap();
        assert_eq!(config.agents, ["10.1.0.0/24", "!10.1.0.99"]);
        assert_eq!(config.sites, ["site-a"]);
        assert_eq!(config.not_after.as_deref(), Some("2027-01-31T18:00:00Z"));
    }
}
