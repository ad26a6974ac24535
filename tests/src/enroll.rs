//! The set-up of the enrollment tests: a root CA, an issuing CA made by `relay-certs
//! init-issuer`, a sink whose certificate the root issued, serving enrollment
//! (`--enroll-listen`, `--enroll-issuer`) and replaying to a capture; and the commands around
//! it (`relay-certs token`, `relay-agent enroll`), run as a user would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{Daemon, Pki, UdpCapture, bin, field, metrics_addr, start_sink};

/// A sink serving enrollment.
#[derive(Debug)]
pub struct Enrollment {
    /// Holds the root (`pki/`), the issuer (`pki/issuer/`) and whatever the test adds.
    pub dir: tempfile::TempDir,
    /// The root CA.
    pub pki: Pki,
    /// The issuing CA folder.
    pub issuer: PathBuf,
    /// Where the sink replays.
    pub capture: UdpCapture,
    /// The sink.
    pub sink: Daemon,
    /// Its relay address (QUIC and gRPC).
    pub sink_addr: SocketAddr,
    /// Its enrollment address.
    pub enroll_addr: SocketAddr,
    sink_cert: (PathBuf, PathBuf),
    sink_args: Vec<String>,
}

/// Runs `relay-certs ARGS`, asserting success; its standard output.
pub fn certs(args: &[&str]) -> String {
    let out = Command::new(bin("relay-certs"))
        .args(args)
        .output()
        .expect("run relay-certs");
    assert!(
        out.status.success(),
        "relay-certs {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

impl Enrollment {
    /// A root, an issuer, and a sink serving enrollment with `extra` options (besides
    /// `--metrics-listen`).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, false)
    }

    /// As [`start`](Self::start), the sink also reading the issuer's revocation list
    /// (`--crl ISSUER/crl.pem`, which `init-issuer` writes empty).
    pub fn start_revocable(extra: &[&str]) -> Self {
        Self::start_with(extra, true)
    }

    fn start_with(extra: &[&str], crl: bool) -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let root = dir.path().join("pki");
        let pki = Pki::new(&root);
        let issuer = root.join("issuer");
        certs(&[
            "init-issuer",
            "--dir",
            &crate::path(&root),
            "--name",
            "test issuer",
        ]);
        let sink_cert = pki.sink_cert("sink");
        let mut sink_args: Vec<String> = [
            "--metrics-listen",
            "127.0.0.1:0",
            "--enroll-listen",
            "127.0.0.1:0",
            "--enroll-issuer",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sink_args.push(crate::path(&issuer));
        if crl {
            sink_args.extend(["--crl".to_owned(), crate::path(&issuer.join("crl.pem"))]);
        }
        sink_args.extend(extra.iter().map(|s| s.to_string()));
        let capture = UdpCapture::bind();
        let args: Vec<&str> = sink_args.iter().map(String::as_str).collect();
        let (sink, sink_addr) = start_sink(&pki, &sink_cert, &[capture.addr()], None, &args);
        let enroll_addr = enroll_addr(&sink);
        Self {
            dir,
            pki,
            issuer,
            capture,
            sink,
            sink_addr,
            enroll_addr,
            sink_cert,
            sink_args,
        }
    }

    /// Stops the sink and starts it again with the same options (new ports).
    pub fn restart_sink(&mut self) {
        self.sink.terminate();
        let args: Vec<&str> = self.sink_args.iter().map(String::as_str).collect();
        let (sink, addr) = start_sink(
            &self.pki,
            &self.sink_cert,
            &[self.capture.addr()],
            None,
            &args,
        );
        self.enroll_addr = enroll_addr(&sink);
        (self.sink, self.sink_addr) = (sink, addr);
    }

    /// A token for `name` valid for `ttl` (`relay-certs token`).
    pub fn token(&self, name: &str, ttl: &str) -> String {
        certs(&[
            "token",
            "--dir",
            &crate::path(&self.issuer),
            "--name",
            name,
            "--ttl",
            ttl,
        ])
        .trim()
        .to_owned()
    }

    /// `relay-agent enroll` with `token` into `dir`, against this sink (as `localhost`).
    pub fn enroll(&self, token: &str, dir: &Path) -> Output {
        enroll_at(self.enroll_addr, token, dir)
    }

    /// The sink's metrics endpoint.
    pub fn metrics(&self) -> SocketAddr {
        metrics_addr(&self.sink)
    }

    /// The sink's `security_event="enrollment"` lines with `outcome`.
    pub fn decisions(&self, outcome: &str) -> Vec<serde_json::Value> {
        self.sink
            .events()
            .into_iter()
            .filter(|e| {
                field(e, "security_event") == "enrollment" && field(e, "outcome") == outcome
            })
            .collect()
    }

    /// Waits for a decision with `outcome` to be logged; returns it.
    pub fn wait_decision(&self, outcome: &str) -> serde_json::Value {
        crate::wait_until(
            &format!("an enrollment decision {outcome}"),
            Duration::from_secs(10),
            || self.decisions(outcome).pop(),
        )
    }
}

/// `relay-agent enroll --sink ADDR --server-name localhost --token TOKEN --dir DIR`.
pub fn enroll_at(addr: SocketAddr, token: &str, dir: &Path) -> Output {
    Command::new(bin("relay-agent"))
        .args(["enroll", "--sink", &addr.to_string()])
        .args(["--server-name", "localhost", "--token", token, "--dir"])
        .arg(dir)
        .output()
        .expect("run relay-agent enroll")
}

/// The enrollment address a sink logged.
pub fn enroll_addr(sink: &Daemon) -> SocketAddr {
    let event = sink.wait_for("serving enrollment");
    field(&event, "enroll_listen")
        .parse()
        .expect("enrollment address in log")
}
