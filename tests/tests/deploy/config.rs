//! Every configuration file shipped under `deploy/` loads with the real programs; where
//! deploy/README.md installs each.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relay_tests::{WAIT, bin, path};

use super::{deploy, read};

// === Configuration files ===

/// Every `.toml` file under deploy/, with the program that reads it.
fn shipped_configs() -> Vec<(PathBuf, &'static str)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                walk(&p, found);
            } else if p.extension().is_some_and(|e| e == "toml") {
                found.push(p);
            }
        }
    }
    let mut found = Vec::new();
    walk(&deploy(""), &mut found);
    found.sort();
    found
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            let program = if name.contains("agent") {
                "relay-agent"
            } else if name.contains("sink") {
                "relay-sink"
            } else {
                panic!("{}: neither an agent's nor a sink's file", p.display())
            };
            (p, program)
        })
        .collect()
}

#[test]
fn every_shipped_configuration_file_loads_with_the_real_programs() {
    let configs = shipped_configs();
    assert!(configs.len() >= 4, "{configs:?}");
    for (file, program) in configs {
        let table = toml_table(&read(&file));
        let ca = table
            .get("ca")
            .and_then(toml::Value::as_str)
            .expect("a ca key")
            .to_owned();
        // The files name certificates that do not exist here: the run must get past the
        // configuration (status 64 is a configuration error) and stop on the CA file. The
        // listen and metrics addresses are moved to ephemeral ports in case it gets further.
        let mut child = Command::new(bin(program))
            .args(["--config", &path(&file)])
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_child(&mut child, WAIT)
            .unwrap_or_else(|| panic!("{}: still running", file.display()));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{}: {err}", file.display());
        assert!(err.contains(&ca), "{}: {err}", file.display());
    }
}

fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        // Polling the process state (a child of this test, not a Daemon).
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn toml_table(text: &str) -> toml::Table {
    text.parse().expect("TOML")
}

/// Where deploy/README.md installs `example` (`install … deploy/config/FILE DEST`).
pub(super) fn installed_as(example: &str) -> String {
    let readme = read(&deploy("README.md"));
    let source = format!("deploy/config/{example}");
    readme
        .lines()
        .filter(|l| l.trim_start().starts_with("install "))
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == source)?;
            words.get(at + 1).map(|w| (*w).to_owned())
        })
        .unwrap_or_else(|| panic!("deploy/README.md installs no {source}"))
}
