//! The systemd units: `systemd-analyze verify` and `security --offline`, and an end-to-end
//! relay run as the units run it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use relay_tests::netns::is_root;
use relay_tests::{bin, path};

use super::running::{Launch, Root, RunAs, link_or_copy, run_example_site};
use super::{MAX_EXPOSURE, UNIT_USER, deploy, read, require, run_with_input, system_tool};

// === systemd units ===

/// A unit file's `[Service]` section: every key with its values in order.
pub(super) struct Unit {
    pub(super) name: String,
    pub(super) service: BTreeMap<String, Vec<String>>,
}

impl Unit {
    pub(super) fn read(name: &str) -> Self {
        let text = read(&deploy("systemd").join(name));
        let mut service = BTreeMap::<String, Vec<String>>::new();
        let mut section = String::new();
        let mut logical = String::new();
        for line in text.lines() {
            let line = line.trim();
            if logical.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            // A trailing backslash continues the line (systemd.syntax).
            if let Some(head) = line.strip_suffix('\\') {
                logical.push_str(head);
                logical.push(' ');
                continue;
            }
            logical.push_str(line);
            let line = std::mem::take(&mut logical);
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((key, value)) = line.split_once('=')
                && section == "Service"
            {
                service
                    .entry(key.trim().to_owned())
                    .or_default()
                    .push(value.trim().to_owned());
            }
        }
        Self {
            name: name.to_owned(),
            service,
        }
    }

    /// The value in force: the last one.
    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.service
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    /// `ExecStart=` as arguments, without systemd's prefixes (`-`, `@`, `:`, `+`, `!`).
    pub(super) fn exec_start(&self) -> Vec<String> {
        let line = self.get("ExecStart").expect("ExecStart");
        assert!(
            !line.contains(['"', '\'', '$', '%']),
            "{}: ExecStart quoting or expansion is not followed here: {line}",
            self.name
        );
        let line = line.trim_start_matches(['-', '@', ':', '+', '!']);
        line.split_whitespace().map(str::to_owned).collect()
    }

    /// `Environment=` assignments, in order.
    pub(super) fn environment(&self) -> Vec<(String, String)> {
        self.service
            .get("Environment")
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("KEY=VALUE");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// How this unit starts its program, with `user` for `User=` and `Group=`.
    pub(super) fn launch(&self, user: Option<RunAs>) -> Launch {
        let mut writable = Vec::new();
        if let Some(dirs) = self.get("StateDirectory") {
            let mode = self.get("StateDirectoryMode").unwrap_or("0755");
            let mode = u32::from_str_radix(mode, 8).expect("octal StateDirectoryMode");
            for dir in dirs.split_whitespace() {
                writable.push((format!("/var/lib/{dir}"), mode));
            }
        }
        Launch {
            what: self.name.clone(),
            exec: self.exec_start(),
            env: self.environment(),
            user,
            umask: self.get("UMask").map(str::to_owned),
            writable,
        }
    }
}

/// Every `.service` file shipped in deploy/systemd.
fn unit_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(deploy("systemd"))
        .expect("deploy/systemd")
        .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
        .filter(|n| n.ends_with(".service"))
        .collect();
    names.sort();
    names
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_keep_their_sandbox() {
    let Some(analyze) = require(system_tool("systemd-analyze", "systemd")) else {
        return;
    };
    let Some(unshare) = require(system_tool("unshare", "util-linux")) else {
        return;
    };
    let names = unit_names();
    assert!(names.len() >= 2, "units: {names:?}");

    // What the issue asks of the two daemons' units, stated where systemd-analyze does not
    // insist on it.
    for name in ["relay-agent.service", "relay-sink.service"] {
        let unit = Unit::read(name);
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
            ("Restart", "on-failure"),
            ("RestartPreventExitStatus", "64"),
        ] {
            assert_eq!(unit.get(key), Some(want), "{name}: {key}");
        }
        assert!(
            unit.get("User").is_some_and(|u| u != "root") || unit.get("DynamicUser") == Some("yes")
        );
        assert!(unit.get("RestrictAddressFamilies").is_some(), "{name}");
        let filters = &unit.service["SystemCallFilter"];
        assert!(
            filters.iter().any(|f| f == "@system-service"),
            "{name}: {filters:?}"
        );
        let exec = unit.exec_start();
        assert!(
            exec.iter().any(|a| a.starts_with("/etc/sflow-relay/")),
            "{name} takes its configuration from /etc/sflow-relay: {exec:?}"
        );
    }
    let agent = Unit::read("relay-agent.service");
    assert!(agent.get("StateDirectory").is_some(), "the spool's folder");

    // `verify` checks that each command exists and is executable. The workspace's binaries
    // are not installed on this machine: a private mount namespace puts them at the paths the
    // units name (bind-mounting a folder of them there), so the files checked are the shipped
    // units, unchanged.
    let mut missing: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for name in &names {
        let unit = Unit::read(name);
        for key in ["ExecStart", "ExecReload", "ExecStop", "ExecStartPre"] {
            for line in unit.service.get(key).into_iter().flatten() {
                let program = line
                    .trim_start_matches(['-', '@', ':', '+', '!'])
                    .split_whitespace()
                    .next()
                    .expect("a command");
                let program = Path::new(program);
                if !program.exists() {
                    let file = program.file_name().unwrap().to_str().unwrap().to_owned();
                    assert!(
                        bin(&file).is_file(),
                        "{name} runs {}, which is neither on this machine nor a workspace binary",
                        program.display()
                    );
                    missing
                        .entry(program.parent().unwrap().to_owned())
                        .or_default()
                        .push(file);
                }
            }
        }
    }
    let stand_ins = tempfile::tempdir().unwrap();
    let mut script = String::from("set -e\n");
    for (i, (dir, files)) in missing.iter().enumerate() {
        assert!(
            dir.is_dir(),
            "{} does not exist here to mount over",
            dir.display()
        );
        let folder = stand_ins.path().join(i.to_string());
        fs::create_dir(&folder).unwrap();
        for file in files {
            link_or_copy(&bin(file), &folder.join(file));
        }
        script += &format!("mount --bind '{}' '{}'\n", path(&folder), path(dir));
    }
    let units: Vec<String> = names
        .iter()
        .map(|n| format!("'{}'", path(&deploy("systemd").join(n))))
        .collect();
    let analyze = path(&analyze);
    script += &format!("'{analyze}' verify {}\n", units.join(" "));
    for unit in &units {
        // Exits non-zero above the threshold; the last line gives the level.
        script += &format!(
            "report=$('{analyze}' security --offline=true --threshold={MAX_EXPOSURE} {unit})\n\
             printf '%s\\n' \"$report\" | grep 'Overall exposure'\n"
        );
    }
    let mut cmd = Command::new(unshare);
    if is_root() {
        cmd.args(["--mount", "--propagation", "private"]);
    } else {
        cmd.args(["--user", "--map-root-user", "--mount"]);
    }
    let out = run_with_input(cmd.args(["sh", "-c", &script]), b"");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !is_root() && stderr.contains("unshare failed") {
        eprintln!("SKIPPED: no user namespace for a private mount here: {stderr}");
        return;
    }
    // verify exits 0 on warnings (an unknown key, a bad value it ignores), so any output at
    // all is a failure.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze: {}\n{stdout}{stderr}",
        out.status
    );
    let exposures: Vec<&str> = stdout.lines().collect();
    assert_eq!(exposures.len(), units.len(), "{stdout}");
    for line in exposures {
        eprintln!("{line}");
    }
}

#[test]
fn the_units_relay_end_to_end_as_systemd_runs_them() {
    let user = is_root().then(|| {
        require(system_tool("setpriv", "util-linux")).expect("setpriv");
        RunAs {
            uid: UNIT_USER.0,
            gid: UNIT_USER.1,
            groups: Vec::new(),
        }
    });
    let sink = Unit::read("relay-sink.service").launch(user.clone());
    let agent = Unit::read("relay-agent.service").launch(user);
    for launch in [&sink, &agent] {
        assert!(
            launch.env.iter().any(|(k, _)| k == "RUST_LOG"),
            "{}: {:?}",
            launch.what,
            launch.env
        );
    }
    run_example_site(&Root::new(), &sink, &agent);
}
