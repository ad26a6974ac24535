//! The README's quick start, `relay-agent demo`, run as a new user would (on ephemeral ports).

use std::time::Duration;

use std::net::SocketAddr;
use std::path::Path;

use relay_tests::{Daemon, UdpCapture, WAIT, datagrams, path, send_paced};

/// Starts `relay-agent demo` with its certificates in `demo_dir`, replaying to `forward`, on
/// ephemeral ports; returns it connected, and where it receives sFlow.
fn start_demo(demo_dir: &Path, forward: SocketAddr) -> (Daemon, SocketAddr) {
    let forward = forward.to_string();
    let args = [
        "demo",
        "--dir",
        &path(demo_dir),
        "--listen",
        "127.0.0.1:0",
        "--sink-listen",
        "127.0.0.1:0",
        "--forward",
        &forward,
        "--report-every",
        "200ms",
    ];
    let demo = Daemon::spawn("relay-agent", &args);
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
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
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
    let status = std::process::Command::new("sh")
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
