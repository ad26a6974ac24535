//! One set of option names for the command line and the TOML file (`--config`).
//!
//! Each binary's options struct derives both `clap::Parser` and serde. Loading reads the file,
//! lays the options given on the command line over it (the command line wins; a list given on
//! the command line replaces the file's list), and reads the result back into the struct. Keys
//! in the file that no option has are an error naming them, so a typo is not silently ignored.
//!
//! Durations are written the same way in both places (`500ms`, `30s`, `1m`, `1h 30m`): the
//! [`duration`] module is the one parser for both, so an option of either binary is declared
//! as
//!
//! ```text
//! #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
//! #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
//! pub shutdown_grace: Option<Duration>,
//! ```

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Errors from reading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The file names options that do not exist.
    #[error("config file {path}: unknown option(s): {keys}")]
    Unknown {
        /// The file.
        path: String,
        /// The unknown keys, comma-separated.
        keys: String,
    },
}

/// The options of `cli` laid over those of the TOML file at `path` (when given).
///
/// # Errors
///
/// When the file cannot be read, is not TOML, has a value of the wrong type, or has a key no
/// option matches.
pub fn load<T: Serialize + DeserializeOwned + clap::CommandFactory>(
    cli: &T,
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return round_trip(cli, "command line");
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut merged: Table = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let file_keys: Vec<String> = merged.keys().cloned().collect();
    let cli_table = Table::try_from(cli).map_err(|e| ConfigError::Invalid {
        path: "command line".into(),
        message: e.to_string(),
    })?;
    for (key, value) in cli_table {
        merged.insert(key, value);
    }
    let parsed: T = Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
    // The file's keys are the command line's long option names: anything else is a typo that
    // serde would skip silently.
    let command = T::command();
    let known: Vec<&str> = command
        .get_arguments()
        .filter_map(clap::Arg::get_long)
        .filter(|name| !matches!(*name, "config" | "help" | "version"))
        .collect();
    let unknown: Vec<String> = file_keys
        .into_iter()
        .filter(|k| !known.contains(&k.as_str()))
        .collect();
    if !unknown.is_empty() {
        return Err(ConfigError::Unknown {
            path: shown,
            keys: unknown.join(", "),
        });
    }
    Ok(parsed)
}

/// Durations as options: `humantime` forms (`500ms`, `30s`, `1m`, `1h 30m`, `0s`) on the
/// command line and in the file alike. Use `value_parser = duration::parse` on the clap side
/// and `with = "duration"` on an `Option<Duration>` field on the serde side.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Reads a command-line value; the error says what is wrong with it (clap shows it).
    ///
    /// # Errors
    ///
    /// When `text` is not a duration such as `500ms`, `30s` or `1m`.
    pub fn parse(text: &str) -> Result<Duration, humantime::DurationError> {
        humantime::parse_duration(text)
    }

    /// Writes an option back as text (`1m 30s`), for the merge of command line and file.
    ///
    /// # Errors
    ///
    /// Those of the serializer.
    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(value, s)
    }

    /// Reads an option from the file.
    ///
    /// # Errors
    ///
    /// When the value is not a string holding a duration; the message says which.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        humantime_serde::deserialize(d)
    }
}

fn round_trip<T: Serialize + DeserializeOwned>(value: &T, origin: &str) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: origin.into(),
        message,
    };
    let table = Table::try_from(value).map_err(|e| invalid(e.to_string()))?;
    Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq, clap::Parser)]
    #[serde(rename_all = "kebab-case")]
    struct Opts {
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        listen: Vec<String>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch_bytes: Option<u64>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn command_line_wins_and_file_fills_the_rest() {
        let f = file("listen = [\"a\", \"b\"]\nbatch-bytes = 10\nname = \"file\"\n");
        let cli = Opts {
            name: Some("cli".into()),
            ..Default::default()
        };
        let got = load(&cli, Some(f.path())).unwrap();
        assert_eq!(
            got,
            Opts {
                listen: vec!["a".into(), "b".into()],
                batch_bytes: Some(10),
                name: Some("cli".into())
            }
        );
    }

    #[test]
    fn an_empty_list_is_a_known_key() {
        let f = file("listen = []\n");
        assert_eq!(
            load(&Opts::default(), Some(f.path())).unwrap(),
            Opts::default()
        );
    }

    #[test]
    fn unknown_and_mistyped_keys_are_errors() {
        let f = file("batch-byte = 10\n");
        let err = load(&Opts::default(), Some(f.path())).unwrap_err();
        assert!(
            err.to_string().contains("unknown option(s): batch-byte"),
            "{err}"
        );
        let f = file("batch-bytes = \"ten\"\n");
        let err = load(&Opts::default(), Some(f.path())).unwrap_err();
        assert!(err.to_string().contains("batch-bytes"), "{err}");
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq, clap::Parser)]
    #[serde(rename_all = "kebab-case")]
    struct Timed {
        #[arg(long, value_parser = duration::parse)]
        #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
        grace: Option<std::time::Duration>,
    }

    #[test]
    fn durations_read_the_same_on_the_command_line_and_in_the_file() {
        use clap::Parser;
        use std::time::Duration;
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("1m", Duration::from_secs(60)),
            ("1h 30m", Duration::from_secs(5400)),
            ("0s", Duration::ZERO),
        ] {
            let cli = Timed::try_parse_from(["t", "--grace", text]).unwrap();
            assert_eq!(cli.grace, Some(want), "{text} on the command line");
            let f = file(&format!("grace = \"{text}\"\n"));
            let got = load(&Timed::default(), Some(f.path())).unwrap();
            assert_eq!(got.grace, Some(want), "{text} in the file");
            // The command line's value survives the merge with a file unchanged.
            assert_eq!(load(&cli, Some(f.path())).unwrap().grace, Some(want));
        }
        assert!(Timed::try_parse_from(["t", "--grace", "5 parsecs"]).is_err());
        let f = file("grace = \"soon\"\n");
        let err = load(&Timed::default(), Some(f.path())).unwrap_err();
        assert!(err.to_string().contains("grace"), "{err}");
        let f = file("grace = 5\n");
        assert!(
            load(&Timed::default(), Some(f.path())).is_err(),
            "a bare number has no unit"
        );
    }
}
