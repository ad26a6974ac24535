//! End-to-end: authorization beyond "signed by our CA". Agents whose certificate has expired,
//! is not yet valid or is revoked are refused at the handshake; agents not on the allow-list,
//! or over their identity's connection limit, are refused once authenticated. Revoking an
//! agent, or taking it off the allow-list, and reloading closes its open connections.
//!
//! Each test runs a good agent (`site-a`) streaming throughout, and asserts that the sink stays
//! up, that every one of the good agent's datagrams arrives exactly once, and that each refusal
//! is counted (`relay_sink_handshakes_refused_total{reason}`,
//! `relay_sink_connections_closed_total{reason}`) and logged as a security event.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use relay_tests::metrics::{self, Scrape};
use relay_tests::{
    Daemon, Pki, Transport, UdpCapture, WAIT, bare, bin, datagrams, datagrams_up_to, field,
    metrics_addr, start_agent_over, start_sink,
};
use serde_json::Value;

const BOTH: [Transport; 2] = [Transport::Quic, Transport::Grpc];

/// A sink with metrics and a good agent, `site-a`, connected over QUIC.
struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    capture: UdpCapture,
    sink: Daemon,
    sink_addr: SocketAddr,
    metrics: SocketAddr,
    agent: Daemon,
    agent_listen: SocketAddr,
}

impl Setup {
    /// `sink_extra` may name files in the PKI folder as `{pki}/…`.
    fn new(sink_extra: &[&str], before_sink: impl FnOnce(&Pki, &Path)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new(&dir.path().join("pki"));
        let good = pki.agent_cert("site-a");
        before_sink(&pki, &dir.path().join("pki"));
        let capture = UdpCapture::bind();
        let pki_dir = relay_tests::path(&dir.path().join("pki"));
        let extra: Vec<String> = ["--metrics-listen", "127.0.0.1:0"]
            .iter()
            .chain(sink_extra)
            .map(|a| a.replace("{pki}", &pki_dir))
            .collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (sink, sink_addr) = start_sink(
            &pki,
            &pki.sink_cert("sink"),
            &[capture.addr()],
            None,
            &extra,
        );
        let metrics = metrics_addr(&sink);
        let (agent, agent_listen) = start_agent_over(
            Transport::Quic,
            &pki.ca(),
            &good,
            sink_addr,
            "localhost",
            &[],
        );
        agent.wait_for("connected to sink");
        Self {
            dir,
            pki,
            capture,
            sink,
            sink_addr,
            metrics,
            agent,
            agent_listen,
        }
    }

    fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// Runs `during` while the good agent streams, then checks what every test checks: the
    /// sink is still running, the good agent kept its one connection, and everything it was
    /// sent arrived exactly once.
    fn while_good_agent_streams(&mut self, during: impl FnOnce(&Self)) {
        let pool = datagrams_up_to(40_000, 0x5A, 9, 1_400);
        let stop = AtomicBool::new(false);
        let sent = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind sender");
                let start = Instant::now();
                let mut n = 0;
                // 500 a second, until `during` is done and a second more.
                while !stop.load(Ordering::Relaxed) && n < pool.len() {
                    let due = start + Duration::from_millis(2 * n as u64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        // Pacing the sender at 500 a second.
                        std::thread::sleep(wait);
                    }
                    socket
                        .send_to(&pool[n], self.agent_listen)
                        .expect("send datagram");
                    n += 1;
                }
                n
            });
            // The stream flows before `during` starts.
            let flowing = self.capture.wait_until(WAIT, |r| {
                r.iter().any(|d| relay_tests::tag_of(d) == Some(0x5A))
            });
            assert!(flowing, "the good agent's stream does not arrive");
            during(self);
            // Intentional: the stream goes on for a second after `during`.
            std::thread::sleep(Duration::from_secs(1));
            stop.store(true, Ordering::Relaxed);
            sender.join().expect("sender")
        });
        assert!(self.sink.is_running(), "the sink stays up");
        // Exactly what was sent, in order (other agents' datagrams, if any, have other tags).
        assert!(
            self.capture.wait_until(WAIT, |r| r
                .iter()
                .filter(|d| relay_tests::tag_of(d) == Some(0x5A))
                .count()
                >= sent),
            "only {} of {sent} arrived",
            self.capture.count_tagged(0x5A)
        );
        // Intentional: a duplicate, if any, gets time to show up before the count.
        std::thread::sleep(Duration::from_millis(200));
        let got = self.capture.tagged(0x5A);
        assert_eq!(got.len(), sent, "count differs: duplicates or extras");
        assert!(
            got == pool[..sent],
            "the datagrams differ or are out of order"
        );
        assert_eq!(
            self.agent.count("connection to sink lost"),
            0,
            "the good agent's connection carried on"
        );
        assert_eq!(self.agent.count("connected to sink"), 1);
    }

    /// The value of the series `name{reason}`; 0 when absent.
    fn by_reason(&self, name: &str, reason: &str) -> u64 {
        Scrape::of(self.metrics).value_or_zero(name, &[("reason", reason)]) as u64
    }

    fn refused(&self, reason: &str) -> u64 {
        self.by_reason("relay_sink_handshakes_refused_total", reason)
    }

    fn closed(&self, reason: &str) -> u64 {
        self.by_reason("relay_sink_connections_closed_total", reason)
    }

    /// Waits until `relay_sink_handshakes_refused_total{reason}` reaches `at_least`.
    fn wait_refused(&self, reason: &str, at_least: u64) {
        let name = "relay_sink_handshakes_refused_total";
        let reached = metrics::poll(self.metrics, WAIT, |s| {
            s.value_or_zero(name, &[("reason", reason)]) as u64 >= at_least
        });
        if let Err(last) = reached {
            panic!(
                "{reason}: {} refusals, expected {at_least}; sink log:\n{}",
                last.value_or_zero(name, &[("reason", reason)]),
                self.sink.lines().join("\n")
            );
        }
    }

    /// The sink's security events of `kind`.
    fn security_events(&self, kind: &str) -> Vec<Value> {
        self.sink
            .events()
            .into_iter()
            .filter(|e| e["security_event"].is_string() && e["kind"] == kind)
            .collect()
    }

    /// One batch from a bare client presenting `cert`; must be refused. (Over gRPC the client
    /// may try a second connection when the first is refused: one or two refusals.) Waits a
    /// little afterwards, so the next refusal of the kind is not held back by the log's rate
    /// limit (ten lines a second per kind).
    fn refused_batch(&self, transport: Transport, cert: &(PathBuf, PathBuf)) -> String {
        let error = bare::relay_one_batch(
            transport,
            self.sink_addr,
            &self.pki.ca(),
            Some(cert),
            &datagrams(1, 0xEE, 1),
        )
        .expect_err("refused");
        // Intentional: past the log's rate limit for the next refusal of the kind.
        std::thread::sleep(Duration::from_millis(150));
        error
    }

    /// The refusal lines of `kind`: at least one per transport, each a WARN security event.
    fn assert_refusals_logged(&self, kind: &str) -> Vec<Value> {
        let lines: Vec<_> = self
            .security_events(kind)
            .into_iter()
            .filter(|e| e["security_event"] == "tls_handshake_refused")
            .collect();
        for transport in BOTH {
            assert!(
                lines.iter().any(|l| l["transport"] == transport.name()),
                "{kind} over {}: {lines:?}",
                transport.name()
            );
        }
        assert!(lines.iter().all(|l| l["level"] == "WARN"), "{lines:?}");
        let logged: u64 = lines
            .iter()
            .map(|l| 1 + l["earlier_refusals_not_logged"].as_u64().expect("a count"))
            .sum();
        assert!(
            logged <= self.refused(kind) && self.refused(kind) >= 2,
            "{kind}: counted {}, logged {logged}",
            self.refused(kind)
        );
        lines
    }

    /// Waits for a refusal line of `kind` naming `agent`.
    fn wait_refusal_of(&self, kind: &str, agent: &str) {
        self.sink
            .wait_for_event(&format!("{kind} refusing {agent}"), WAIT, |e| {
                e["security_event"] == "tls_handshake_refused"
                    && e["kind"] == kind
                    && e["agent"] == agent
            });
    }

    /// Waits for a handshake refusal line of `kind` whose refused certificate is `subject`.
    fn wait_refused_subject(&self, kind: &str, subject: &str) {
        self.sink
            .wait_for_event(&format!("{kind} refusing {subject}"), WAIT, |e| {
                e["security_event"] == "tls_handshake_refused"
                    && e["kind"] == kind
                    && e["presented_subject"] == subject
            });
    }

    fn hangup_sink(&self) {
        self.sink.hangup();
    }
}

/// An agent certificate valid from `not_before` to `not_after` (relative to now), made with
/// the CA in `dir` (relay-certs issues only from now on).
fn agent_cert_valid(
    dir: &Path,
    name: &str,
    not_before: time::Duration,
    not_after: time::Duration,
) -> (PathBuf, PathBuf) {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read CA");
    let ca = certs::Ca::from_pem(&read("ca.pem"), &read("ca.key")).expect("CA");
    let now = time::OffsetDateTime::now_utc();
    let mut leaf = certs::Leaf::new(certs::Role::Agent, name, 1);
    leaf.not_before = now + not_before;
    leaf.not_after = now + not_after;
    let issued = ca.issue(&leaf).expect("issue");
    let files = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&files.0, issued.cert_pem).expect("write cert");
    std::fs::write(&files.1, issued.key_pem).expect("write key");
    files
}

fn revoke(pki_dir: &Path, cert: &Path) -> String {
    let out = Command::new(bin("relay-certs"))
        .args(["revoke", "--dir"])
        .arg(pki_dir)
        .arg("--cert")
        .arg(cert)
        .output()
        .expect("run relay-certs");
    assert!(
        out.status.success(),
        "relay-certs revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn expired_and_not_yet_valid_agents_are_refused_with_their_reasons() {
    let mut setup = Setup::new(&[], |_, _| {});
    let days = time::Duration::days;
    let old = agent_cert_valid(&setup.pki_dir(), "old-agent", days(-30), days(-1));
    let future = agent_cert_valid(&setup.pki_dir(), "future-agent", days(2), days(30));
    setup.while_good_agent_streams(|s| {
        for transport in BOTH {
            let error = s.refused_batch(transport, &old);
            eprintln!("expired over {}: {error}", transport.name());
            s.refused_batch(transport, &future);
        }
        s.wait_refused("expired", 2);
        s.wait_refused("not_yet_valid", 2);
    });
    for (kind, subject) in [
        ("expired", "CN=old-agent"),
        ("not_yet_valid", "CN=future-agent"),
    ] {
        let lines = setup.assert_refusals_logged(kind);
        for line in &lines {
            assert_eq!(line["presented_subject"], subject, "{line}");
            assert_eq!(
                line["message"], "agent refused: TLS handshake failed",
                "{line}"
            );
        }
    }
    assert_eq!(
        setup.sink.count("agent connected"),
        1,
        "only the good agent"
    );
}

#[test]
fn only_listed_agents_are_accepted_and_a_reloaded_list_applies_to_open_connections() {
    let mut setup = Setup::new(&["--allowed-agents", "{pki}/allowed"], |_, dir| {
        std::fs::write(dir.join("allowed"), "# sites\nsite-a\n").expect("write list");
    });
    let list = setup.pki_dir().join("allowed");
    let stranger = setup.pki.agent_cert("stranger");
    let site_b = setup.pki.agent_cert("site-b");
    setup.while_good_agent_streams(|s| {
        // Signed by our CA, but not listed: refused on both transports.
        for transport in BOTH {
            let error = s.refused_batch(transport, &stranger);
            eprintln!("not allowed over {}: {error}", transport.name());
        }
        s.wait_refused("not_allowed", 2);

        // site-b is added: a SIGHUP later it connects (over gRPC, to show the close there).
        std::fs::write(&list, "site-a\nsite-b\n").expect("write list");
        s.hangup_sink();
        s.sink.wait_for("agent authorization reloaded");
        let (agent_b, _) = start_agent_over(
            Transport::Grpc,
            &s.pki.ca(),
            &site_b,
            s.sink_addr,
            "localhost",
            &[],
        );
        let connected = s.sink.wait_for_nth("agent connected", 2, WAIT);
        assert_eq!(connected["agent"], "site-b", "{connected}");

        // Taken off again: its open connection is closed, and it is refused from then on.
        let before = s.refused("not_allowed");
        std::fs::write(&list, "site-a\n").expect("write list");
        s.hangup_sink();
        let closed = s.sink.wait_for("agent disconnected: no longer authorized");
        assert_eq!(closed["agent"], "site-b", "{closed}");
        assert_eq!(closed["kind"], "not_allowed", "{closed}");
        assert_eq!(closed["transport"], "grpc", "{closed}");
        assert_eq!(closed["security_event"], "agent_disconnected", "{closed}");
        agent_b.wait_for("connection to sink lost");
        s.wait_refused("not_allowed", before + 1);
        s.wait_refusal_of("not_allowed", "site-b");
    });
    assert_eq!(setup.closed("not_allowed"), 1);
    assert_eq!(setup.closed("revoked"), 0);
    let lines = setup.assert_refusals_logged("not_allowed");
    assert!(
        lines
            .iter()
            .all(|l| l["message"] == "agent refused: not authorized"),
        "{lines:?}"
    );
    for transport in BOTH {
        assert!(
            lines
                .iter()
                .any(|l| l["agent"] == "stranger" && l["transport"] == transport.name()),
            "{lines:?}"
        );
    }
}

#[test]
fn an_identity_over_its_connection_limit_is_refused_and_the_first_keeps_relaying() {
    let mut setup = Setup::new(&["--max-connections-per-agent", "1"], |_, _| {});
    let site_a = (
        setup.pki_dir().join("site-a.pem"),
        setup.pki_dir().join("site-a.key"),
    );
    let site_b = setup.pki.agent_cert("site-b");
    setup.while_good_agent_streams(|s| {
        for transport in BOTH {
            let error = s.refused_batch(transport, &site_a);
            eprintln!("second site-a over {}: {error}", transport.name());
        }
        s.wait_refused("too_many_connections", 2);
        // The limit is per identity: another agent still gets in.
        bare::relay_one_batch(
            Transport::Quic,
            s.sink_addr,
            &s.pki.ca(),
            Some(&site_b),
            &[b"\x01site-b".to_vec()],
        )
        .expect("another identity is accepted");
    });
    let lines = setup.assert_refusals_logged("too_many_connections");
    assert!(lines.iter().all(|l| l["agent"] == "site-a"), "{lines:?}");
    assert_eq!(
        setup.sink.count("agent connected"),
        2,
        "the good agent and site-b only"
    );
}

#[test]
fn revoked_agents_are_refused_and_revoking_closes_their_open_connections() {
    let mut setup = Setup::new(&["--crl", "{pki}/crl.pem"], |pki, dir| {
        // An agent retired earlier (`relay-certs init` wrote the empty list, number 1).
        let retired = pki.agent_cert("retired");
        let said = revoke(dir, &retired.0);
        assert!(said.contains("CRL number 2"), "{said}");
    });
    let retired = (
        setup.pki_dir().join("retired.pem"),
        setup.pki_dir().join("retired.key"),
    );
    let site_b = setup.pki.agent_cert("site-b");
    let site_c = setup.pki.agent_cert("site-c");
    setup.while_good_agent_streams(|s| {
        for transport in BOTH {
            s.refused_batch(transport, &retired);
        }
        s.wait_refused("revoked", 2);

        let (agent_b, _) = start_agent_over(
            Transport::Quic,
            &s.pki.ca(),
            &site_b,
            s.sink_addr,
            "localhost",
            &[],
        );
        let (agent_c, _) = start_agent_over(
            Transport::Grpc,
            &s.pki.ca(),
            &site_c,
            s.sink_addr,
            "localhost",
            &[],
        );
        s.sink.wait_for_nth("agent connected", 3, WAIT);

        let before = s.refused("revoked");
        let said = revoke(&s.pki_dir(), &site_b.0);
        assert!(said.contains("CRL number 3"), "{said}");
        let said = revoke(&s.pki_dir(), &site_c.0);
        assert!(said.contains("CRL number 4"), "{said}");
        s.hangup_sink();
        let reloaded = s.sink.wait_for("agent authorization reloaded");
        assert_eq!(reloaded["revoked"], 3, "{reloaded}");
        s.sink
            .wait_for_nth("agent disconnected: no longer authorized", 2, WAIT);
        agent_b.wait_for("connection to sink lost");
        agent_c.wait_for("connection to sink lost");
        // Their reconnections are refused at the handshake (each agent's own: the count
        // alone could be met by one agent retrying faster than the other).
        s.wait_refused("revoked", before + 2);
        for subject in ["CN=site-b", "CN=site-c"] {
            s.wait_refused_subject("revoked", subject);
        }
    });
    assert_eq!(setup.closed("revoked"), 2);
    let closed: Vec<_> = setup
        .sink
        .events()
        .into_iter()
        .filter(|e| e["security_event"] == "agent_disconnected")
        .collect();
    let mut who: Vec<_> = closed
        .iter()
        .map(|e| {
            (
                field(e, "agent").to_owned(),
                field(e, "transport").to_owned(),
            )
        })
        .collect();
    who.sort();
    assert_eq!(
        who,
        [
            ("site-b".to_owned(), "quic".to_owned()),
            ("site-c".to_owned(), "grpc".to_owned())
        ],
        "{closed:?}"
    );
    let refused = setup.assert_refusals_logged("revoked");
    assert!(
        refused
            .iter()
            .any(|l| l["presented_subject"] == "CN=retired"),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l["presented_subject"] == "CN=site-b"),
        "{refused:?}"
    );
}
