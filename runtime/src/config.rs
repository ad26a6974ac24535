//! One set of option names for the command line and the TOML file (`--config`).
//!
//! Each binary's options struct derives both `clap::Parser` and serde. Loading reads the file,
//! lays the options given on the command line over it (the command line wins; a list given on
//! the command line replaces the file's list), and reads the result back into the struct. Keys
//! in the file that no option has are an error naming them, so a typo is not silently ignored.

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
}
