//! `relay-demo`: the whole relay on one host, in one command (the README's quick start).
//!
//! On first run it makes a throwaway CA, a sink certificate for `localhost`/127.0.0.1 and an
//! agent certificate in `--dir`; then it runs a sink on loopback and an agent that sends to it,
//! both in this process, over real QUIC with mutual TLS. sFlow sent to the agent's UDP port is
//! replayed to `--forward`. On a terminal a status line shows, every second, datagrams per
//! second in and out, drops and the transport in use; elsewhere (a log file) a line is
//! printed every `--report-every` when something changed.
//! Production runs the two binaries apart; see the README.
//!
//! This is the one crate that uses both ends as libraries (`relay_agent::run` and
//! `relay_sink::run`), so that the agent and the sink share only the wire contract (`proto`),
//! identity (`certs`) and daemon plumbing (`runtime`). `relay-agent demo` still works: it
//! runs the `relay-demo` program installed next to it.
//!
//! # Layout
//!
//! - [`Args`] and [`run`]: the options, and the sink and agent run side by side.
//! - `status`: the status line (rates, drops, the transport in use) read from both ends'
//!   metrics.
//! - `pki`: the throwaway CA and certificates, made once in `--dir`.

mod pki;
mod status;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use status::Totals;

/// Options of `relay-demo` (and, forwarded to it, of `relay-agent demo`).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Folder for the throwaway certificates (made on first run, reused after).
    #[arg(long, default_value = "sflow-relay-demo")]
    pub dir: PathBuf,
    /// Where to receive sFlow (point your switches or hsflowd here).
    #[arg(long, default_value = "0.0.0.0:6343")]
    pub listen: SocketAddr,
    /// The demo sink's address (loopback): QUIC on UDP, gRPC on TCP.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub sink_listen: SocketAddr,
    /// Where the sink replays datagrams (e.g. sFlow-RT or sflowtool).
    #[arg(long, default_value = "127.0.0.1:6344")]
    pub forward: String,
    /// Report interval when standard output is not a terminal (on a terminal the status line
    /// is redrawn every second).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub report_every: Duration,
}

/// Runs the demo until SIGINT/SIGTERM.
///
/// # Errors
///
/// A message for the user when certificates cannot be made or a port cannot be bound.
pub async fn run(args: Args) -> Result<(), String> {
    let pki = args.dir.join("pki");
    pki::ensure(&pki)
        .map_err(|e| format!("cannot make demo certificates in {}: {e}", pki.display()))?;
    let shutdown = runtime::shutdown::signal();
    let relay = Relay::bind(&args, &pki)?;
    relay.print_banner(&args, &pki);
    let running = relay.start();
    report_until_shutdown(&running, &args, shutdown).await;
    running.stop().await
}

/// The sink and the agent, configured and bound, not yet running.
struct Relay {
    sink_config: sink::Config,
    sink_listeners: sink::Listeners,
    sink_addr: SocketAddr,
    agent_config: agent::Config,
    agent_sockets: Vec<std::net::UdpSocket>,
    listen: SocketAddr,
}

impl Relay {
    /// Both ends configured with every option at its default but the addresses and the
    /// demo certificates; the sink is bound first, so the agent is told its real address.
    fn bind(args: &Args, pki: &std::path::Path) -> Result<Self, String> {
        let sink_config = sink::Config::try_from(sink::Args {
            listen: Some(args.sink_listen),
            ca: Some(pki.join("ca.pem")),
            cert: Some(pki.join("localhost.pem")),
            key: Some(pki.join("localhost.key")),
            forward: vec![args.forward.clone()],
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        let sink_listeners = sink::bind(&sink_config).map_err(|e| format!("sink: {e}"))?;
        let sink_addr = sink_listeners
            .quic
            .local_addr()
            .map_err(|e| e.to_string())?;
        let agent_config = agent::Config::try_from(agent::Args {
            listen: vec![args.listen],
            sink: Some(agent::config::Sinks::One(sink_addr.to_string())),
            server_name: Some("localhost".into()),
            ca: Some(pki.join("ca.pem")),
            cert: Some(pki.join("demo-agent.pem")),
            key: Some(pki.join("demo-agent.key")),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        let agent_sockets = agent::bind_listeners(&agent_config)?;
        let listen = agent_sockets[0].local_addr().map_err(|e| e.to_string())?;
        Ok(Self {
            sink_config,
            sink_listeners,
            sink_addr,
            agent_config,
            agent_sockets,
            listen,
        })
    }

    fn print_banner(&self, args: &Args, pki: &std::path::Path) {
        let (listen, sink_addr) = (self.listen, self.sink_addr);
        println!("sflow-relay demo: sink and agent on this host, mutual TLS over QUIC");
        println!("  certificates:  {}", pki.display());
        println!("  send sFlow to: udp {listen}  (the agent)");
        println!(
            "  relayed over:  quic {sink_addr}, or gRPC on tcp {sink_addr} if UDP fails  (the sink)"
        );
        println!("  replayed to:   udp {}", args.forward);
        println!("  stop with Ctrl-C");
    }

    /// Runs the sink and the agent as tasks of this runtime.
    fn start(self) -> Running {
        let stop_agent = CancellationToken::new();
        let stop_sink = CancellationToken::new();
        let agent_metrics = Arc::new(agent::Metrics::default());
        let sink_metrics = Arc::new(sink::Metrics::default());
        let sink_task = tokio::spawn(sink::run(
            self.sink_config,
            self.sink_listeners,
            sink_metrics.clone(),
            stop_sink.clone().cancelled_owned(),
        ));
        let (metrics, stop) = (agent_metrics.clone(), stop_agent.clone());
        let (config, sockets) = (self.agent_config, self.agent_sockets);
        let agent_task = tokio::spawn(async move {
            let mut links = Vec::new();
            agent::run(config, sockets, metrics, &mut links, stop.cancelled_owned()).await
        });
        Running {
            stop_agent,
            stop_sink,
            agent_metrics,
            sink_metrics,
            agent_task,
            sink_task,
        }
    }
}

/// The running sink and agent.
struct Running {
    stop_agent: CancellationToken,
    stop_sink: CancellationToken,
    agent_metrics: Arc<agent::Metrics>,
    sink_metrics: Arc<sink::Metrics>,
    agent_task: tokio::task::JoinHandle<Result<(), agent::Error>>,
    sink_task: tokio::task::JoinHandle<Result<(), sink::Error>>,
}

impl Running {
    /// Stops the agent first, so what it holds reaches the sink; then the sink finishes its
    /// replay.
    async fn stop(self) -> Result<(), String> {
        self.stop_agent.cancel();
        self.agent_task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.stop_sink.cancel();
        self.sink_task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        println!(
            "demo: stopped after {} datagrams received, {} replayed",
            self.agent_metrics.datagrams_received.get(),
            self.sink_metrics.datagrams_replayed()
        );
        Ok(())
    }
}

/// Prints the status line until SIGINT/SIGTERM: redrawn in place every second on a terminal,
/// elsewhere a line every `--report-every` when the totals moved.
async fn report_until_shutdown(running: &Running, args: &Args, shutdown: impl Future<Output = ()>) {
    let live = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(if live {
        Duration::from_secs(1)
    } else {
        args.report_every
    });
    let mut last = Totals::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = Totals::read(&running.agent_metrics, &running.sink_metrics);
                let line = now.status(&last);
                if live {
                    // Redraw one line in place.
                    print!("\r\x1b[2K{line}");
                    let _ = std::io::stdout().flush();
                } else if now.moved_since(&last) {
                    println!("demo: {line}");
                }
                last = now;
            }
            () = &mut shutdown => break,
        }
    }
    if live {
        println!();
    }
}
