//! The command-line tools as an operator meets them: relay-certs files and output, and clear
//! errors for bad configuration.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use relay_tests::{Pki, bin, path};

fn run(name: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin(name)).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A sink certificate's extra names and validity, as an operator would give them.
const SINK_NAMES: &[&str] = &[
    "--dns",
    "relay.example.net",
    "--ip",
    "192.0.2.7",
    "--days",
    "30",
];

#[test]
fn relay_certs_writes_private_keys_0600_and_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (cert, key) = pki.issue("sink", "sink.example.com", SINK_NAMES);
    for (file, mode) in [
        (&key, 0o600),
        (&dir.path().join("ca.key"), 0o600),
        (&cert, 0o644),
    ] {
        assert_eq!(
            std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
            mode,
            "{}",
            file.display()
        );
    }
    let before = std::fs::read(&cert).unwrap();
    let d = path(dir.path());
    let (ok, _, err) = run(
        "relay-certs",
        &[
            "issue",
            "--role",
            "sink",
            "--name",
            "sink.example.com",
            "--dir",
            &d,
        ],
    );
    assert!(!ok && err.contains("exists; pass --force"), "{err}");
    let (ok, _, err) = run("relay-certs", &["init", "--dir", &d]);
    assert!(!ok && err.contains("ca.pem exists"), "{err}");
    assert_eq!(std::fs::read(&cert).unwrap(), before, "nothing overwritten");
    let (ok, _, err) = run(
        "relay-certs",
        &[
            "issue",
            "--role",
            "sink",
            "--name",
            "sink.example.com",
            "--dir",
            &d,
            "--force",
        ],
    );
    assert!(ok, "{err}");
    assert_ne!(std::fs::read(&cert).unwrap(), before, "--force overwrites");
}

#[test]
fn relay_certs_show_prints_subject_names_usage_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (sink, _) = pki.issue("sink", "sink.example.com", SINK_NAMES);
    let (agent, _) = pki.agent_cert("site-a");
    let (ok, out, err) = run("relay-certs", &["show", &path(&sink), &path(&agent)]);
    assert!(ok, "{err}");
    for want in [
        "subject:      CN=sink.example.com",
        "names (SAN):  DNS:sink.example.com, DNS:relay.example.net, IP:192.0.2.7",
        "usage (EKU):  serverAuth",
        "subject:      CN=site-a",
        "usage (EKU):  clientAuth",
        "(expires in 29 days)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let (ok, _, err) = run(
        "relay-certs",
        &["show", &path(&dir.path().join("missing.pem"))],
    );
    assert!(!ok && err.contains("cannot read"), "{err}");
}

#[test]
fn configuration_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "sink = \"127.0.0.1:4433\"\nbatch-byte = 1000\n").unwrap();
    let (ok, _, err) = run("relay-agent", &["--config", &path(&config)]);
    assert!(
        !ok && err.contains("unknown option(s): batch-byte"),
        "{err}"
    );

    let (ok, _, err) = run("relay-agent", &["--listen", "127.0.0.1:0"]);
    assert!(!ok && err.contains("--sink HOST:PORT is required"), "{err}");

    let (ok, _, err) = run(
        "relay-sink",
        &["--ca", "ca.pem", "--cert", "c.pem", "--key", "k.pem"],
    );
    assert!(!ok && err.contains("--forward"), "{err}");

    let (ok, _, err) = run(
        "relay-sink",
        &[
            "--listen",
            "127.0.0.1:0",
            "--ca",
            "nope.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--forward",
            "127.0.0.1:9",
        ],
    );
    assert!(!ok && err.contains("cannot read nope.pem"), "{err}");
}

#[test]
fn the_example_configs_parse_with_the_real_loader() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    for (program, file) in [
        ("relay-agent", "agent.example.toml"),
        ("relay-sink", "sink.example.toml"),
    ] {
        let config = root.join("deploy/config").join(file);
        let out = Command::new(bin(program))
            .args(["--config", &path(&config), "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // The files name certificates under /etc/sflow-relay, absent here: the run must get
        // past the configuration (status 64 would be a configuration error) to fail on those.
        assert_ne!(out.status.code(), Some(64), "{file}: {err}");
        assert!(err.contains("/etc/sflow-relay/"), "{file}: {err}");
    }
}

#[test]
fn a_bad_allow_sources_network_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "sink = \"localhost:4433\"\nca = \"c\"\ncert = \"a\"\nkey = \"k\"\nallow-sources = [\"10.1.0.0/8\"]\n",
    )
    .unwrap();
    let from_file = ["--config", &path(&file)];
    let on_the_command_line = [
        "--sink",
        "localhost:4433",
        "--ca",
        "c",
        "--cert",
        "a",
        "--key",
        "k",
        "--allow-sources",
        "127.0.0.1/32",
        "--allow-sources",
        "10.1.0.0/8",
    ];
    let in_ssh_hex_mode = ["--ssh-hex", "--allow-sources", "10.1.0.0/8"];
    for args in [&from_file[..], &on_the_command_line, &in_ssh_hex_mode] {
        let out = Command::new(bin("relay-agent"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains("configuration error: allow-sources: \"10.1.0.0/8\"")
                && err.contains("the network is 10.0.0.0/8"),
            "{args:?}: {err}"
        );
    }
    let (ok, _, err) = run("relay-agent", &["--accept", "udp"]);
    assert!(!ok && err.contains("sflow") && err.contains("any"), "{err}");
}
