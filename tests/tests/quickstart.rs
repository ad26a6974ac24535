//! The README's quick start, `relay-demo`, run as a new user would (on ephemeral ports); and
//! `relay-agent demo`, the quick start's old command, which hands over to `relay-demo`.

use std::time::Duration;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use relay_tests::{Daemon, UdpCapture, WAIT, bin, datagrams, path, send_paced};

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// The program the README's quick start runs: its first command, `cargo run --release -p
/// PACKAGE`, names the package, whose binary has the same name.
fn quick_start_program() -> String {
    let readme = readme();
    let command = readme
        .split_once("## Quick start")
        .and_then(|(_, rest)| rest.split_once("```sh\n"))
        .and_then(|(_, rest)| rest.split_once('\n'))
        .expect("the quick start's first command")
        .0;
    let package = command
        .strip_prefix("cargo run --release -p ")
        .expect("the quick start runs a package with cargo");
    assert_eq!(
        package, "relay-demo",
        "the quick start's command: {command}"
    );
    package.to_owned()
}

/// Starts `program ARGS` with the demo's certificates in `demo_dir`, replaying to `forward`, on
/// ephemeral ports; returns it connected, and where it receives sFlow.
fn start(
    program: &str,
    first: &[&str],
    demo_dir: &Path,
    forward: SocketAddr,
) -> (Daemon, SocketAddr) {
    let forward = forward.to_string();
    let demo_dir = path(demo_dir);
    let mut args = first.to_vec();
    args.extend([
        "--dir",
        &demo_dir,
        "--listen",
        "127.0.0.1:0",
        "--sink-listen",
        "127.0.0.1:0",
        "--forward",
        &forward,
        "--report-every",
        "200ms",
    ]);
    let demo = Daemon::spawn(program, &args);
    let line = demo.wait_for_line("send sFlow to: udp ", WAIT);
    let listen = line
        .split("udp ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    demo.wait_for_line("connected to sink", WAIT);
    (demo, listen)
}

/// Starts the README's quick start (see [`start`]).
fn start_demo(demo_dir: &Path, forward: SocketAddr) -> (Daemon, SocketAddr) {
    start(&quick_start_program(), &[], demo_dir, forward)
}

#[test]
fn demo_relays_what_is_sent_to_it_and_reuses_its_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    for run in 0..2 {
        let capture = UdpCapture::bind();
        let (mut demo, listen) = start_demo(&demo_dir, capture.addr());
        let sent = datagrams(500, 0xD0 + run, 40 + u64::from(run));
        send_paced(listen, &sent, 32, || capture.len());
        assert!(
            capture.wait_until(WAIT, |r| r.len() >= sent.len()),
            "run {run}: {} of 500",
            capture.len()
        );
        assert_eq!(capture.received(), sent);
        let status = demo.wait_for_line("(total in 500, out 500)", WAIT);
        assert!(
            status.contains("dropped 0") && status.contains("link QUIC"),
            "the status line tells drops and the transport: {status}"
        );
        assert!(demo.terminate().success());
        assert!(
            demo.lines()
                .iter()
                .any(|l| l.contains("demo: stopped after 500 datagrams received, 500 replayed"))
        );
        assert!(demo_dir.join("pki/ca.pem").exists());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The quick start's sender, as the README gives it (port aside): the demo relays what it
/// sends, so it must be sFlow v5, which the agent relays by default.
#[test]
fn the_readme_sender_sends_sflow_that_the_demo_relays() {
    let readme = readme();
    let after = readme
        .split_once("send a few test datagrams to the agent")
        .expect("the quick start's sender")
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a sh block")
        .0;
    assert!(block.contains("(\"127.0.0.1\", 6343)"), "{block}");

    let dir = tempfile::tempdir().unwrap();
    let capture = UdpCapture::bind();
    let (mut demo, listen) = start_demo(&dir.path().join("demo"), capture.addr());
    let script = block.replace(
        "(\"127.0.0.1\", 6343)",
        &format!("(\"127.0.0.1\", {})", listen.port()),
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("run the README's sender");
    assert!(status.success());
    assert!(
        capture.wait_until(WAIT, |r| r.len() >= 3),
        "{}",
        capture.len()
    );
    let lens: Vec<usize> = capture.received().iter().map(Vec::len).collect();
    assert_eq!(lens, [100, 500, 1400]);
    for d in capture.received() {
        let header = proto::sflow::parse_header(&d).expect("sFlow v5");
        assert_eq!(header.agent.to_string(), "192.0.2.1");
    }
    demo.wait_for_line("dropped 0  (total in 3, out 3)", WAIT);
    assert!(demo.terminate().success());
}

/// `relay-agent demo`, the quick start before the demo became its own program, still works
/// where `relay-demo` is installed next to `relay-agent` (as cargo builds them): it says the
/// command has moved, and the demo runs with the arguments given.
#[test]
fn relay_agent_demo_runs_relay_demo_with_its_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let capture = UdpCapture::bind();
    let (mut demo, listen) = start(
        "relay-agent",
        &["demo"],
        &dir.path().join("demo"),
        capture.addr(),
    );
    demo.wait_for_line("`relay-agent demo` is now `relay-demo`", WAIT);
    let sent = datagrams(20, 0xDE, 60);
    send_paced(listen, &sent, 8, || capture.len());
    assert!(
        capture.wait_until(WAIT, |r| r.len() >= sent.len()),
        "{} of 20",
        capture.len()
    );
    assert_eq!(capture.received(), sent);
    assert!(demo.terminate().success());
    assert!(
        demo.lines()
            .iter()
            .any(|l| l.contains("demo: stopped after 20 datagrams received, 20 replayed"))
    );
}

/// Without `relay-demo` next to it (a relay-agent installed alone), `relay-agent demo` fails
/// at once with a usage error that names the new command, and starts nothing.
#[test]
fn relay_agent_demo_without_relay_demo_names_the_new_command() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("relay-agent");
    std::fs::copy(bin("relay-agent"), &alone).unwrap();
    let out = Command::new(&alone)
        .args(["demo", "--dir", &path(&dir.path().join("demo"))])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("`relay-agent demo` is now `relay-demo`")
            && stderr.contains("cargo run --release -p relay-demo"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty() && !dir.path().join("demo").exists());
}
