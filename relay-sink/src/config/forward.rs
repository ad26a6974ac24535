//! Replay destinations as configured: `--forward HOST:PORT` (everything), and `[[forward]]`
//! tables in a config file that filter by sFlow agent and site and end at a `not-after`.
//!
//! Both forms go in the one `forward` list of [`Args`](super::Args), a list of strings: a
//! table from the file is kept as its inline TOML text (`{ addr = "…", sites = […] }`), which
//! is also how the command line writes one, so the command line can say anything the file can
//! and `--forward` on the command line still replaces the file's list. Each entry is checked
//! here into a [`ForwardConfig`]: the address, and the [`Route`] whose rules
//! (`runtime::route`) decide which datagrams it gets. What is done with them is
//! [`crate::replay`]'s; re-reading them on SIGHUP is [`crate::reload`]'s.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use runtime::route::{Route, RouteConfig};
use serde::{Deserialize, Serialize};

/// One `[[forward]]` table of a config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ForwardEntry {
    /// HOST:PORT to replay to.
    pub addr: String,
    /// sFlow agent addresses: prefixes or addresses, `!` to exclude.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Relay-agent certificate names (the site that carried a datagram).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// When the destination's replay ends (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

/// One item of the `forward` list: an address, or a table.
enum Item {
    Addr(String),
    Table(ForwardEntry),
}

/// By hand rather than `untagged`, so a mistake inside a `[[forward]]` table is reported as
/// itself (say, "unknown field `agent`") instead of "did not match any variant".
impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Item;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"HOST:PORT\" or a [[forward]] table")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Item, E> {
                Ok(Item::Addr(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Item, A::Error> {
                ForwardEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Item::Table)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Reads the `forward` list of a file or of the command line: strings stay as they are, each
/// table becomes its inline TOML text. For `#[serde(deserialize_with)]`.
///
/// # Errors
///
/// When an item is neither a string nor a table, or a table has an unknown key or a value of
/// the wrong type (the message says which).
pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    use serde::de::Error as _;
    Vec::<Item>::deserialize(deserializer)?
        .into_iter()
        .map(|item| match item {
            Item::Addr(addr) => Ok(addr),
            Item::Table(entry) => toml::Value::try_from(&entry)
                .map(|table| table.to_string())
                .map_err(D::Error::custom),
        })
        .collect()
}

/// One replay destination, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// HOST:PORT, resolved at start; also the `destination` label of its metrics.
    pub addr: String,
    /// Which datagrams it gets, and until when.
    pub route: Route,
}

/// Why a `forward` entry cannot be used; the message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// An address that is not `HOST:PORT`.
    #[error("--forward {0:?} is not HOST:PORT")]
    Addr(String),
    /// A table (inline on the command line) that does not read.
    #[error("forward entry {entry}: {message}")]
    Table {
        /// The entry as written.
        entry: String,
        /// What is wrong.
        message: String,
    },
    /// A filter or `not-after` that does not read ([`runtime::route::RouteError`]).
    #[error("forward entry {addr:?}: {message}")]
    Route {
        /// The entry's address.
        addr: String,
        /// What is wrong, naming the value.
        message: String,
    },
    /// The same address twice: destinations are told apart by their address.
    #[error("forward {0:?} is listed twice")]
    Twice(String),
    /// Every destination has ended.
    #[error("every forward destination's not-after has passed ({0}): nothing would be replayed")]
    AllEnded(String),
}

/// Checks one `forward` item: `HOST:PORT`, or an inline table (`{ addr = "…", … }`).
///
/// # Errors
///
/// A [`ForwardError`] naming the entry and what is wrong in it.
pub fn parse(item: &str) -> Result<ForwardConfig, ForwardError> {
    let entry = if item.trim_start().starts_with('{') {
        let table: toml::Value = item
            .parse()
            .map_err(|e: toml::de::Error| table_error(item, e))?;
        ForwardEntry::deserialize(table).map_err(|e| table_error(item, e))?
    } else {
        ForwardEntry {
            addr: item.to_owned(),
            ..ForwardEntry::default()
        }
    };
    match entry.addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(ForwardError::Addr(entry.addr)),
    }
    let route = Route::try_from(&RouteConfig {
        agents: entry.agents,
        sites: entry.sites,
        not_after: entry.not_after,
    })
    .map_err(|e| ForwardError::Route {
        addr: entry.addr.clone(),
        message: e.to_string(),
    })?;
    Ok(ForwardConfig {
        addr: entry.addr,
        route,
    })
}

fn table_error(item: &str, error: toml::de::Error) -> ForwardError {
    ForwardError::Table {
        entry: item.trim().to_owned(),
        message: error.message().trim().to_owned(),
    }
}

/// Checks a whole `forward` list: each entry, no address twice, and not every one ended by
/// `now` (a sink that would replay nothing is a configuration mistake).
///
/// # Errors
///
/// The first [`ForwardError`].
pub fn parse_all(items: &[String], now: SystemTime) -> Result<Vec<ForwardConfig>, ForwardError> {
    let forward = parse_list(items)?;
    if !forward.is_empty() && forward.iter().all(|f| f.route.expired(now)) {
        let ends: Vec<String> = forward
            .iter()
            .map(|f| {
                let end = f.route.not_after().map_or("", |n| n.as_str());
                format!("{} at {end}", f.addr)
            })
            .collect();
        return Err(ForwardError::AllEnded(ends.join(", ")));
    }
    Ok(forward)
}

/// Each entry checked, and no address twice.
fn parse_list(items: &[String]) -> Result<Vec<ForwardConfig>, ForwardError> {
    let forward = items
        .iter()
        .map(|item| parse(item))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::new();
    if let Some(twice) = forward.iter().find(|f| !seen.insert(f.addr.as_str())) {
        return Err(ForwardError::Twice(twice.addr.clone()));
    }
    Ok(forward)
}

/// The `forward` list of the config file at `path`, checked (for a reload). Other keys are
/// not looked at: they are not reloaded.
///
/// # Errors
///
/// When the file cannot be read or parsed, or an entry is wrong; the message says which.
pub fn read_file(path: &Path) -> Result<Vec<ForwardConfig>, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default, deserialize_with = "deserialize")]
        forward: Vec<String>,
    }
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let file: File = toml::from_str(&text).map_err(|e| format!("{shown}: {}", e.message()))?;
    parse_list(&file.forward).map_err(|e| format!("{shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        #[serde(deserialize_with = "deserialize")]
        forward: Vec<String>,
    }

    fn read(text: &str) -> Result<Vec<ForwardConfig>, String> {
        let file: File = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        parse_all(&file.forward, SystemTime::UNIX_EPOCH).map_err(|e| e.to_string())
    }

    #[test]
    fn strings_and_tables_mix_in_one_list() {
        let forward = read(concat!(
            "forward = [\"127.0.0.1:6343\"]\n",
            "[[forward]]\n",
            "addr = \"sflow-rt-emea:6343\"\n",
            "sites = [\"site-a\", \"site-b\"]\n",
            "agents = [\"10.0.0.0/8\", \"!10.0.0.99\"]\n",
            "not-after = \"2027-01-31T18:00:00Z\"\n",
        ));
        // TOML cannot mix the two forms under one key that way: the file is refused.
        assert!(forward.is_err());
        let forward = read(concat!(
            "forward = [\"127.0.0.1:6343\", ",
            "{ addr = \"sflow-rt-emea:6343\", sites = [\"site-a\"], agents = [\"10.0.0.0/8\", \"!10.0.0.99\"], not-after = \"2027-01-31T18:00:00Z\" }]\n",
        ))
        .unwrap();
        assert_eq!(forward[0].addr, "127.0.0.1:6343");
        assert!(!forward[0].route.is_filtered());
        assert_eq!(forward[1].addr, "sflow-rt-emea:6343");
        assert_eq!(
            forward[1].route.describe(),
            "agents=10.0.0.0/8,!10.0.0.99/32 sites=site-a"
        );
        assert_eq!(
            forward[1].route.not_after().unwrap().as_str(),
            "2027-01-31T18:00:00Z"
        );
    }

    #[test]
    fn forward_tables_read_as_destinations() {
        let forward = read(concat!(
            "[[forward]]\naddr = \"127.0.0.1:1\"\nsites = [\"site-a\"]\n",
            "[[forward]]\naddr = \"127.0.0.1:2\"\n",
        ))
        .unwrap();
        assert_eq!(forward.len(), 2);
        assert_eq!(forward[0].route.describe(), "sites=site-a");
        assert_eq!(forward[1].route.describe(), "everything");
    }

    #[test]
    fn a_mistake_in_an_entry_is_said_as_itself() {
        let err =
            read("[[forward]]\naddr = \"127.0.0.1:1\"\nagent = [\"10.0.0.0/8\"]\n").unwrap_err();
        assert!(err.contains("unknown field `agent`"), "{err}");
        let err =
            read("[[forward]]\naddr = \"127.0.0.1:1\"\nagents = [\"10.1.0.0/33\"]\n").unwrap_err();
        assert!(
            err.starts_with("forward entry \"127.0.0.1:1\": agents: ")
                && err.contains("\"10.1.0.0/33\""),
            "{err}"
        );
        let err =
            read("[[forward]]\naddr = \"127.0.0.1:1\"\nnot-after = \"tomorrow\"\n").unwrap_err();
        assert!(
            err.contains("not-after: \"tomorrow\" is not an RFC 3339 time"),
            "{err}"
        );
        let err = read("[[forward]]\naddr = \"nowhere\"\n").unwrap_err();
        assert_eq!(err, "--forward \"nowhere\" is not HOST:PORT");
        let err = read("forward = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n").unwrap_err();
        assert_eq!(err, "forward \"127.0.0.1:1\" is listed twice");
        let err = read("forward = [7]\n").unwrap_err();
        assert!(
            err.contains("\"HOST:PORT\" or a [[forward]] table"),
            "{err}"
        );
    }

    #[test]
    fn the_command_line_takes_an_inline_table() {
        let f = parse("{ addr = \"[::1]:6343\", agents = [\"2001:db8::/32\"] }").unwrap();
        assert_eq!(f.addr, "[::1]:6343");
        assert_eq!(f.route.describe(), "agents=2001:db8::/32");
        let err = parse("{ addr = \"[::1]:6343\", site = [\"a\"] }").unwrap_err();
        assert!(
            err.to_string().starts_with("forward entry { addr")
                && err.to_string().contains("unknown field `site`"),
            "{err}"
        );
    }

    #[test]
    fn every_destination_ended_is_an_error_and_one_is_not() {
        let ended = "{ addr = \"127.0.0.1:1\", not-after = \"2020-01-01T00:00:00Z\" }";
        let now = SystemTime::now();
        let err = parse_all(&[ended.into()], now).unwrap_err();
        assert_eq!(
            err.to_string(),
            "every forward destination's not-after has passed (127.0.0.1:1 at 2020-01-01T00:00:00Z): nothing would be replayed"
        );
        assert_eq!(
            parse_all(&[ended.into(), "127.0.0.1:2".into()], now)
                .unwrap()
                .len(),
            2
        );
    }
}
