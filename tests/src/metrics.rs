//! Reading a daemon's `/metrics`: one scrape parsed once ([`Scrape`]), the value of one
//! series by its exact label set, the sum of a family, and bounded waits on a condition over
//! repeated scrapes ([`wait_until`], [`poll`]). Every suite reads metrics through this
//! module, so "the series with exactly these labels" means the same everywhere.
//!
//! The parser reads the Prometheus text exposition format as the binaries write it: one
//! sample a line, `name` or `name{label="value",…}`, then the value (and an optional
//! timestamp); comments (`#`) and blank lines are skipped, escapes in label values (`\\`,
//! `\"`, `\n`) are undone.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::http;

/// How often a wait scrapes again.
const POLL: Duration = Duration::from_millis(50);

/// One sample line: metric name, labels (unescaped, in exposition order) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name (for a histogram, with its `_bucket`/`_sum`/`_count` suffix).
    pub name: String,
    /// The labels, as exposed.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, when the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the sample's label set is exactly `labels` (in any order).
    fn has_exactly(&self, labels: &[(&str, &str)]) -> bool {
        self.labels.len() == labels.len() && labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// One `/metrics` exposition, parsed.
#[derive(Debug, Clone)]
pub struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Fetches `addr`'s `/metrics` once.
    ///
    /// # Panics
    ///
    /// When the request fails or the status is not 200.
    pub fn of(addr: SocketAddr) -> Self {
        Self::try_of(addr).unwrap_or_else(|e| panic!("scrape {addr}/metrics: {e}"))
    }

    /// Fetches `addr`'s `/metrics` once.
    ///
    /// # Errors
    ///
    /// When the request fails or the status is not 200 (the error has the status and body).
    pub fn try_of(addr: SocketAddr) -> std::io::Result<Self> {
        let response = http::get(addr, "/metrics")?;
        if response.status != 200 {
            return Err(std::io::Error::other(format!(
                "HTTP {}: {}",
                response.status,
                response.body.trim()
            )));
        }
        Ok(Self::parse(&response.body))
    }

    /// Parses an exposition; lines that are not samples are skipped.
    pub fn parse(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            samples: text.lines().filter_map(parse_sample).collect(),
        }
    }

    /// The exposition as text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every sample, in exposition order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The samples of metric `name`, whatever their labels.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the series `name` whose label set is exactly `labels` (in any order;
    /// `&[]` for the series without labels); `None` when there is no such series.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.series(name)
            .find(|s| s.has_exactly(labels))
            .map(|s| s.value)
    }

    /// As [`value`](Self::value), 0 when the series is absent (a counter not yet incremented
    /// is often not exposed at all).
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The sum of every series of `name`; 0 when there is none.
    pub fn sum(&self, name: &str) -> f64 {
        self.series(name).map(|s| s.value).sum()
    }
}

impl fmt::Display for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Scrapes `addr` until `pred` holds of a scrape or `timeout` passes: `Ok` with the scrape
/// that satisfied it, or `Err` with the last one (for a caller that asserts with its own
/// message). A failed request counts as a scrape that does not satisfy `pred`.
///
/// # Errors
///
/// After `timeout`, with the last scrape (empty when no request succeeded).
pub fn poll(
    addr: SocketAddr,
    timeout: Duration,
    mut pred: impl FnMut(&Scrape) -> bool,
) -> Result<Scrape, Scrape> {
    let deadline = Instant::now() + timeout;
    loop {
        let scrape = Scrape::try_of(addr).unwrap_or_else(|_| Scrape::parse(""));
        if pred(&scrape) {
            return Ok(scrape);
        }
        if Instant::now() >= deadline {
            return Err(scrape);
        }
        // Poll interval: a metric changes without telling anyone.
        std::thread::sleep(POLL);
    }
}

/// Scrapes `addr` until `pred` holds of a scrape, and returns that scrape.
///
/// # Panics
///
/// After `timeout`, naming `what` and showing the last exposition.
pub fn wait_until(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    pred: impl FnMut(&Scrape) -> bool,
) -> Scrape {
    poll(addr, timeout, pred).unwrap_or_else(|last| {
        panic!("{addr}: not {what} within {timeout:?}; last scrape:\n{last}")
    })
}

/// Waits until the series `name{labels}` (exactly those labels) is `want`.
///
/// # Panics
///
/// After `timeout`, with the last value and exposition.
pub fn wait_value(
    addr: SocketAddr,
    timeout: Duration,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> Scrape {
    let what = format!("{name}{labels:?} = {want}");
    wait_until(addr, timeout, &what, |s| {
        s.value(name, labels) == Some(want)
    })
}

/// A sample line parsed, or `None` for comments, blank and malformed lines.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        rest = body;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_owned(), value));
            rest = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# HELP relay_agent_datagrams_received_total Datagrams received.
# TYPE relay_agent_datagrams_received_total counter
relay_agent_datagrams_received_total 1000
relay_agent_datagrams_dropped_total{reason=\"backlog_full\",sink=\"127.0.0.1:4433\"} 7
relay_agent_datagrams_dropped_total{sink=\"127.0.0.1:4433\",reason=\"not_sflow\"} 0.5
relay_agent_datagrams_dropped_total{reason=\"odd \\\"quoted\\\", with\\\\slash\\n\"} 2
relay_agent_datagrams_dropped_total_extra 99
relay_agent_up{} 1 1700000000000

relay_agent_rtt_seconds_bucket{le=\"+Inf\"} 3
not a sample line
";

    #[test]
    fn test_value_matches_exactly_the_labels_given_in_any_order() {
        let s = Scrape::parse(SAMPLE);
        assert_eq!(
            s.value("relay_agent_datagrams_received_total", &[]),
            Some(1000.0)
        );
        let dropped = "relay_agent_datagrams_dropped_total";
        let sink = ("sink", "127.0.0.1:4433");
        assert_eq!(
            s.value(dropped, &[("reason", "backlog_full"), sink]),
            Some(7.0)
        );
        assert_eq!(
            s.value(dropped, &[sink, ("reason", "not_sflow")]),
            Some(0.5)
        );
        // A subset of the labels is not the series.
        assert_eq!(s.value(dropped, &[("reason", "backlog_full")]), None);
        assert_eq!(s.value(dropped, &[]), None);
        assert_eq!(
            s.value("relay_agent_up", &[]),
            Some(1.0),
            "empty braces, timestamp"
        );
        assert_eq!(s.value("absent", &[]), None);
        assert_eq!(s.value_or_zero("absent", &[]), 0.0);
    }

    #[test]
    fn test_a_brace_and_a_comma_inside_a_quoted_label_value_do_not_end_it() {
        let text = "# HELP x_total X.\n# TYPE x_total counter\n\
            x_total{a=\"1\",b=\"2\"} 3\n\
            x_total{a=\"1\"} 4\n\
            x_total{b=\"q\\\"},\", a=\"1\"} 5 1700000000000\n\
            y 6\n";
        let s = Scrape::parse(text);
        assert_eq!(s.value("x_total", &[("a", "1"), ("b", "2")]), Some(3.0));
        assert_eq!(s.value("x_total", &[("a", "1")]), Some(4.0));
        assert_eq!(s.value("x_total", &[("a", "1"), ("b", "q\"},")]), Some(5.0));
        assert_eq!(s.value("y", &[]), Some(6.0));
        assert_eq!(s.value("x_total", &[("a", "2")]), None);
        assert_eq!(s.value("x", &[]), None);
    }

    #[test]
    fn test_label_values_are_unescaped() {
        let s = Scrape::parse(SAMPLE);
        let odd = "odd \"quoted\", with\\slash\n";
        assert_eq!(
            s.value("relay_agent_datagrams_dropped_total", &[("reason", odd)]),
            Some(2.0)
        );
        assert_eq!(
            s.value("relay_agent_rtt_seconds_bucket", &[("le", "+Inf")]),
            Some(3.0)
        );
    }

    #[test]
    fn test_sum_adds_every_series_of_one_family_only() {
        let s = Scrape::parse(SAMPLE);
        assert_eq!(s.sum("relay_agent_datagrams_dropped_total"), 9.5);
        assert_eq!(s.sum("relay_agent_datagrams_dropped_total_extra"), 99.0);
        assert_eq!(s.sum("relay_agent_datagrams_received_total"), 1000.0);
        assert_eq!(s.sum("absent"), 0.0);
        assert_eq!(s.series("relay_agent_datagrams_dropped_total").count(), 3);
        assert_eq!(
            s.samples().len(),
            7,
            "comments, blank and malformed lines skipped"
        );
        assert_eq!(s.text(), SAMPLE);
    }
}
