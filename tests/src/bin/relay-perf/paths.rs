//! The paths under test, started as the processes they are in practice.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::ValueEnum;
use relay_tests::{
    Daemon, Pki, Transport, WAIT, bin, field, free_udp_port, metrics_addr, pipe, start_agent_over,
    start_sink, wait_udp_bound,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PathKind {
    Direct,
    Forwarder,
    PythonHex,
    SshHex,
    Quic,
    QuicFiltered,
    QuicSflowMetrics,
    QuicPlain,
    Grpc,
}

impl PathKind {
    /// Every path, in the default order: the baselines first.
    pub(crate) const ALL: [Self; 9] = [
        Self::Direct,
        Self::Forwarder,
        Self::PythonHex,
        Self::SshHex,
        Self::Quic,
        Self::QuicFiltered,
        Self::QuicSflowMetrics,
        Self::QuicPlain,
        Self::Grpc,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Forwarder => "forwarder",
            Self::PythonHex => "python-hex",
            Self::SshHex => "ssh-hex",
            Self::Quic => "quic",
            Self::QuicFiltered => "quic-filtered",
            Self::QuicSflowMetrics => "quic-sflow-metrics",
            Self::QuicPlain => "quic-plain",
            Self::Grpc => "grpc",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Direct => "generator straight to receiver",
            Self::Forwarder => "plain UDP forwarder, recv/send per datagram (samplicator stand-in)",
            Self::PythonHex => "sflow_fwd.py | sflow_fwd.py -s (Python, no ssh)",
            Self::SshHex => "relay-agent --ssh-hex | relay-sink --ssh-hex -s (no ssh)",
            Self::Quic => "relay-agent → QUIC + mTLS → relay-sink",
            Self::QuicFiltered => "the same, relay-sink with three filtered [[forward]] entries",
            Self::QuicSflowMetrics => {
                "the same, relay-sink --sflow-metrics (interface counters to Prometheus)"
            }
            Self::QuicPlain => "the same, relay-agent --compression none",
            Self::Grpc => "relay-agent → gRPC (HTTP/2 + mTLS, TCP) → relay-sink",
        }
    }

    /// The agent-to-sink transport of a relay path over the network.
    fn transport(self) -> Option<Transport> {
        match self {
            Self::Quic | Self::QuicFiltered | Self::QuicSflowMetrics | Self::QuicPlain => {
                Some(Transport::Quic)
            }
            Self::Grpc => Some(Transport::Grpc),
            Self::Direct | Self::Forwarder | Self::PythonHex | Self::SshHex => None,
        }
    }
}

/// A process of a path, by the role it plays.
pub(crate) struct Process {
    pub(crate) name: &'static str,
    pub(crate) daemon: Daemon,
}

impl Process {
    pub(crate) fn pid(&self) -> String {
        self.daemon.pid().to_string()
    }
}

/// A path under test: where to send, and the processes to account.
pub(crate) struct Running {
    pub(crate) input: SocketAddr,
    pub(crate) processes: Vec<Process>,
    /// The agent's metrics endpoint, on the paths over QUIC.
    pub(crate) agent_metrics: Option<SocketAddr>,
    _dir: Option<tempfile::TempDir>,
}

/// Extra arguments for the relay's daemons.
#[derive(Debug, Clone, Default)]
pub(crate) struct Extra {
    pub(crate) agent: Vec<String>,
    pub(crate) sink: Vec<String>,
}

/// Starts the path `kind` replaying to `output`, each input socket asking for `rcvbuf`.
pub(crate) fn start(kind: PathKind, output: SocketAddr, rcvbuf: usize, extra: &Extra) -> Running {
    let rcvbuf_arg = rcvbuf.to_string();
    let out_port = output.port().to_string();
    let process = |name, daemon| Process { name, daemon };
    match kind {
        PathKind::Direct => Running {
            input: output,
            processes: Vec::new(),
            agent_metrics: None,
            _dir: None,
        },
        PathKind::Forwarder => {
            // This program, as built now (`bin` may have rebuilt it since it started).
            let mut cmd = Command::new(bin("relay-perf"));
            cmd.args([
                "forward",
                "--to",
                &output.to_string(),
                "--buffer",
                &rcvbuf_arg,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
            let daemon = Daemon::start("forwarder", cmd);
            let line = daemon.wait_for_line("forwarder listening on", WAIT);
            let input = line
                .rsplit(' ')
                .next()
                .and_then(|a| a.parse().ok())
                .expect("forwarder address");
            Running {
                input,
                processes: vec![process("forwarder", daemon)],
                agent_metrics: None,
                _dir: None,
            }
        }
        PathKind::PythonHex | PathKind::SshHex => {
            let input = free_udp_port();
            let in_port = input.port().to_string();
            let (left, right) = if kind == PathKind::PythonHex {
                let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python");
                let script = python.join("sflow_fwd.py");
                let mut l = Command::new("python3");
                l.arg(python.join("with_rcvbuf.py"))
                    .arg(&rcvbuf_arg)
                    .arg(&script)
                    .args(["-c", "127.0.0.1", "-p", &in_port]);
                let mut r = Command::new("python3");
                r.arg(&script).args(["-s", "127.0.0.1", "-p", &out_port]);
                (l, r)
            } else {
                let mut l = Command::new(bin("relay-agent"));
                l.args([
                    "--ssh-hex",
                    "-c",
                    "127.0.0.1",
                    "-p",
                    &in_port,
                    "--recv-buffer",
                    &rcvbuf_arg,
                ]);
                l.env("RUST_LOG", "warn");
                let mut r = Command::new(bin("relay-sink"));
                r.args(["--ssh-hex", "-s", "127.0.0.1", "-p", &out_port]);
                (l, r)
            };
            let (l, r) = pipe(left, right);
            wait_udp_bound(input);
            let names = if kind == PathKind::PythonHex {
                ("python-left", "python-right")
            } else {
                ("agent", "sink")
            };
            Running {
                input,
                processes: vec![process(names.0, l), process(names.1, r)],
                agent_metrics: None,
                _dir: None,
            }
        }
        PathKind::Quic
        | PathKind::QuicFiltered
        | PathKind::QuicSflowMetrics
        | PathKind::QuicPlain
        | PathKind::Grpc => {
            let transport = kind.transport().expect("a relay path has a transport");
            let dir = tempfile::tempdir().expect("temp dir");
            let pki = Pki::new(dir.path());
            let (forward, mut sink_args) = if kind == PathKind::QuicFiltered {
                (Vec::new(), filtered_forward(output))
            } else {
                (vec![output], Vec::new())
            };
            if kind == PathKind::QuicSflowMetrics {
                sink_args.extend(
                    ["--metrics-listen", "127.0.0.1:0", "--sflow-metrics"].map(String::from),
                );
            }
            sink_args.extend(extra.sink.iter().cloned());
            // The sink serves gRPC on TCP at its QUIC port number, so one address serves both.
            let (sink, sink_addr) = start_sink(
                &pki,
                &pki.sink_cert("sink"),
                &forward,
                None,
                &as_strs(&sink_args),
            );
            let mut agent_args = vec!["--recv-buffer", &rcvbuf_arg];
            if kind == PathKind::QuicPlain {
                agent_args.extend(["--compression", "none"]);
            }
            if kind != PathKind::Grpc {
                agent_args.extend(["--metrics-listen", "127.0.0.1:0"]);
            }
            agent_args.extend(as_strs(&extra.agent));
            let (agent, input) = start_agent_over(
                transport,
                &pki.ca(),
                &pki.agent_cert("site"),
                sink_addr,
                "localhost",
                &agent_args,
            );
            let connected = agent.wait_for("connected to sink");
            assert_eq!(
                field(&connected, "transport"),
                transport.name(),
                "the agent connected over another transport than asked"
            );
            let agent_metrics = (kind != PathKind::Grpc).then(|| metrics_addr(&agent));
            Running {
                input,
                processes: vec![process("agent", agent), process("sink", sink)],
                agent_metrics,
                _dir: Some(dir),
            }
        }
    }
}

/// The sink's destinations on `quic-filtered`: three `[[forward]]` entries (inline tables)
/// whose filters split the generator's agents (192.0.2.1 to .8) between them, one also by
/// site, so that each datagram is matched against every entry and replayed exactly once, as
/// on `quic`, and the receiver's count of loss means the same. Destinations are told apart
/// by their `addr`, so the receiver's address is spelled three ways (`127.1` and `127.0.1`
/// are 127.0.0.1 to the resolver).
fn filtered_forward(output: SocketAddr) -> Vec<String> {
    assert!(
        output.ip().is_loopback() && output.is_ipv4(),
        "the receiver is on 127.0.0.1"
    );
    let port = output.port();
    [
        format!(r#"{{ addr = "127.0.0.1:{port}", agents = ["192.0.2.0/30"] }}"#),
        format!(r#"{{ addr = "127.1:{port}", agents = ["192.0.2.0/24", "!192.0.2.0/30", "!192.0.2.8/29"] }}"#),
        format!(r#"{{ addr = "127.0.1:{port}", agents = ["192.0.2.8/29"], sites = ["site"] }}"#),
    ]
    .into_iter()
    .flat_map(|entry| ["--forward".to_owned(), entry])
    .collect()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
