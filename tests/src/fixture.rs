//! The set-up most end-to-end tests share: a CA, a capture, a sink replaying to it, and one
//! agent sending to the sink, directly or through an impairment proxy ([`Relay`]), built on [`start_sink`], [`start_agent`],
//! [`start_agent_over`] and [`spawn_agent`] with their semantics unchanged.
//!
//! ```no_run
//! use relay_tests::{Transport, fixture::Relay};
//! let relay = Relay::over(Transport::Quic)
//!     .agent(&["--metrics-listen", "127.0.0.1:0"])
//!     .start();
//! relay_tests::send_paced(relay.listen, &relay_tests::datagrams(10, 1, 1), 8, || relay.capture.len());
//! let metrics = relay.agent_metrics();
//! # let _ = metrics;
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::impair::Proxy;
use crate::{
    Daemon, Pki, Transport, UdpCapture, metrics_addr, spawn_agent, start_agent, start_agent_over,
    start_sink,
};

/// `--metrics-listen 127.0.0.1:0`: a metrics endpoint on an ephemeral port (read back with
/// [`Relay::sink_metrics`] or [`Relay::agent_metrics`]).
pub const METRICS: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// A running relay: CA, capture, sink and one agent, connected unless started with
/// [`Builder::spawn`]. Dropping it stops both daemons and removes the CA.
#[derive(Debug)]
pub struct Relay {
    /// Where the CA and certificates live (removed on drop).
    pub dir: tempfile::TempDir,
    /// The CA: the sink's certificate is `sink` (see [`Pki::sink_cert`]), the agent's is
    /// the builder's agent name (`site-a` unless set).
    pub pki: Pki,
    /// Where the sink replays.
    pub capture: UdpCapture,
    /// The sink's certificate and key.
    pub sink_cert: (PathBuf, PathBuf),
    /// The sink.
    pub sink: Daemon,
    /// The sink's QUIC (and gRPC) address.
    pub sink_addr: SocketAddr,
    /// The options the sink was started with (beyond addresses, certificates and JSON logs).
    pub sink_args: Vec<String>,
    /// The path between agent and sink, when the builder put one there
    /// ([`Builder::through`]); the agent sends to its address.
    pub path: Option<Proxy>,
    /// The agent.
    pub agent: Daemon,
    /// Where the agent receives sFlow.
    pub listen: SocketAddr,
}

impl Relay {
    /// An agent started as [`start_agent_over`] does: over `transport` only, with
    /// `--reconnect-max 1s`.
    pub fn over<'a>(transport: Transport) -> Builder<'a> {
        Builder::new(Agent::Over(transport))
    }

    /// An agent started as [`start_agent`] does: both transports, `--reconnect-max 1s`.
    pub fn both_transports<'a>() -> Builder<'a> {
        Builder::new(Agent::Harness)
    }

    /// An agent started as [`spawn_agent`] does: every option at its default.
    pub fn with_defaults<'a>() -> Builder<'a> {
        Builder::new(Agent::Defaults)
    }

    /// Starts the sink again, as it was started (same certificate, options and address),
    /// and makes it [`sink`](Self::sink); the one before is dropped (killed, if it runs).
    ///
    /// # Panics
    ///
    /// When the new sink does not listen on the same address.
    pub fn restart_sink(&mut self) {
        let args: Vec<&str> = self.sink_args.iter().map(String::as_str).collect();
        let (sink, again) = start_sink(
            &self.pki,
            &self.sink_cert,
            &[self.capture.addr()],
            Some(self.sink_addr),
            &args,
        );
        assert_eq!(again, self.sink_addr, "the sink restarts on its address");
        self.sink = sink;
    }

    /// The sink's metrics endpoint, from its log (it must run with [`METRICS`]).
    pub fn sink_metrics(&self) -> SocketAddr {
        metrics_addr(&self.sink)
    }

    /// The agent's metrics endpoint, from its log (it must run with [`METRICS`]).
    pub fn agent_metrics(&self) -> SocketAddr {
        metrics_addr(&self.agent)
    }
}

/// How the agent is started.
#[derive(Debug, Clone, Copy)]
enum Agent {
    Over(Transport),
    Harness,
    Defaults,
}

/// Options of a [`Relay`] before it starts.
#[must_use = "a builder does nothing until started"]
pub struct Builder<'a> {
    agent: Agent,
    agent_name: &'a str,
    sink_args: Vec<&'a str>,
    agent_args: Vec<&'a str>,
    through: Option<Box<dyn FnOnce(SocketAddr) -> Proxy + 'a>>,
}

impl std::fmt::Debug for Builder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("agent", &self.agent)
            .field("agent_name", &self.agent_name)
            .field("sink_args", &self.sink_args)
            .field("agent_args", &self.agent_args)
            .field("through", &self.through.is_some())
            .finish()
    }
}

impl<'a> Builder<'a> {
    fn new(agent: Agent) -> Self {
        Self {
            agent,
            agent_name: "site-a",
            sink_args: Vec::new(),
            agent_args: Vec::new(),
            through: None,
        }
    }

    /// More options for the sink (beyond addresses, certificates and JSON logs).
    pub fn sink(mut self, args: &[&'a str]) -> Self {
        self.sink_args.extend_from_slice(args);
        self
    }

    /// More options for the agent (beyond addresses, certificates, JSON logs and what the
    /// constructor adds).
    pub fn agent(mut self, args: &[&'a str]) -> Self {
        self.agent_args.extend_from_slice(args);
        self
    }

    /// The agent's certificate name (`site-a` by default).
    pub fn agent_name(mut self, name: &'a str) -> Self {
        self.agent_name = name;
        self
    }

    /// Puts a path between agent and sink: `proxy(sink address)` (e.g.
    /// [`UdpProxy::start`](crate::impair::UdpProxy::start)), started after the sink; the agent
    /// sends to the proxy's address.
    pub fn through(mut self, proxy: impl FnOnce(SocketAddr) -> Proxy + 'a) -> Self {
        self.through = Some(Box::new(proxy));
        self
    }

    /// Starts everything and waits until the agent says `connected to sink`.
    pub fn start(self) -> Relay {
        let relay = self.spawn();
        relay.agent.wait_for("connected to sink");
        relay
    }

    /// Starts everything without waiting for the agent to connect (for tests where it must
    /// not, or that watch it try).
    pub fn spawn(self) -> Relay {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new(dir.path());
        let capture = UdpCapture::bind();
        let sink_cert = pki.sink_cert("sink");
        let (sink, sink_addr) =
            start_sink(&pki, &sink_cert, &[capture.addr()], None, &self.sink_args);
        let path = self.through.map(|proxy| proxy(sink_addr));
        let to = path.as_ref().map_or(sink_addr, Proxy::addr);
        let (ca, cert) = (pki.ca(), pki.agent_cert(self.agent_name));
        let args = &self.agent_args;
        let (agent, listen) = match self.agent {
            Agent::Over(t) => start_agent_over(t, &ca, &cert, to, "localhost", args),
            Agent::Harness => start_agent(&ca, &cert, to, "localhost", args),
            Agent::Defaults => spawn_agent(&ca, &cert, to, "localhost", args),
        };
        Relay {
            dir,
            pki,
            capture,
            sink_cert,
            sink,
            sink_addr,
            sink_args: self.sink_args.iter().map(|a| (*a).to_owned()).collect(),
            path,
            agent,
            listen,
        }
    }
}
