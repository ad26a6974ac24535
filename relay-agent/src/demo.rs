//! `relay-agent demo`: the whole relay on one host, in one command.
//!
//! On first run it makes a throwaway CA, a sink certificate for `localhost`/127.0.0.1 and an
//! agent certificate in `--dir`; then it runs a sink on loopback and an agent that sends to it,
//! both in this process, over real QUIC with mutual TLS. sFlow sent to the agent's UDP port is
//! replayed to `--forward`. On a terminal a status line shows, every second, datagrams per
//! second in and out, drops and the transport in use; elsewhere (a log file) a line is
//! printed every `--report-every` when something changed.
//! Production runs the two binaries apart; see the README.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use certs::store::{self, Secrecy};
use certs::{Ca, Leaf, Role};
use tokio_util::sync::CancellationToken;

/// Options of `relay-agent demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
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
pub async fn run(args: DemoArgs) -> Result<(), String> {
    let pki = args.dir.join("pki");
    ensure_pki(&pki)
        .map_err(|e| format!("cannot make demo certificates in {}: {e}", pki.display()))?;

    let sink_config = sink::Config::try_from(sink::Args {
        listen: Some(args.sink_listen),
        ca: Some(pki.join("ca.pem")),
        cert: Some(pki.join("localhost.pem")),
        key: Some(pki.join("localhost.key")),
        forward: vec![args.forward.clone()],
        ..Default::default()
    })?;
    let sink_listeners = sink::bind(&sink_config).map_err(|e| format!("sink: {e}"))?;
    let sink_addr = sink_listeners
        .quic
        .local_addr()
        .map_err(|e| e.to_string())?;
    let agent_config = crate::Config::try_from(crate::Args {
        listen: vec![args.listen],
        sink: Some(crate::config::Sinks::One(sink_addr.to_string())),
        server_name: Some("localhost".into()),
        ca: Some(pki.join("ca.pem")),
        cert: Some(pki.join("demo-agent.pem")),
        key: Some(pki.join("demo-agent.key")),
        ..Default::default()
    })?;
    let agent_sockets = crate::bind_listeners(&agent_config)?;
    let listen = agent_sockets[0].local_addr().map_err(|e| e.to_string())?;

    println!("sflow-relay demo: sink and agent on this host, mutual TLS over QUIC");
    println!("  certificates:  {}", pki.display());
    println!("  send sFlow to: udp {listen}  (the agent)");
    println!(
        "  relayed over:  quic {sink_addr}, or gRPC on tcp {sink_addr} if UDP fails  (the sink)"
    );
    println!("  replayed to:   udp {}", args.forward);
    println!("  stop with Ctrl-C");

    let stop_agent = CancellationToken::new();
    let stop_sink = CancellationToken::new();
    let agent_metrics = Arc::new(crate::Metrics::default());
    let sink_metrics = Arc::new(sink::Metrics::default());
    let sink_task = tokio::spawn(sink::run(
        sink_config,
        sink_listeners,
        sink_metrics.clone(),
        stop_sink.clone().cancelled_owned(),
    ));
    let agent_task = {
        let (metrics, stop) = (agent_metrics.clone(), stop_agent.clone());
        tokio::spawn(async move {
            let mut links = Vec::new();
            crate::run(
                agent_config,
                agent_sockets,
                metrics,
                &mut links,
                stop.cancelled_owned(),
            )
            .await
        })
    };

    let live = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(if live {
        Duration::from_secs(1)
    } else {
        args.report_every
    });
    let mut last = Totals::default();
    let shutdown = runtime::shutdown::signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = Totals::read(&agent_metrics, &sink_metrics);
                let line = now.status(&last);
                if live {
                    // Redraw one line in place.
                    print!("\r\x1b[2K{line}");
                    let _ = std::io::stdout().flush();
                } else if now.received != last.received || now.replayed != last.replayed {
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
    // Agent first, so what it holds reaches the sink; then the sink finishes its replay.
    stop_agent.cancel();
    agent_task
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    stop_sink.cancel();
    sink_task
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    println!(
        "demo: stopped after {} datagrams received, {} replayed",
        agent_metrics.datagrams_received.get(),
        sink_metrics.datagrams_replayed()
    );
    Ok(())
}

/// What the status line is made of.
#[derive(Debug, Clone, Copy)]
struct Totals {
    at: Instant,
    received: u64,
    replayed: u64,
    dropped: u64,
    transport: &'static str,
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            at: Instant::now(),
            received: 0,
            replayed: 0,
            dropped: 0,
            transport: "down",
        }
    }
}

impl Totals {
    fn read(agent: &crate::Metrics, sink: &sink::Metrics) -> Self {
        let agent_side = agent.registry().gather();
        let sum = |name: &str| -> f64 {
            agent_side
                .iter()
                .filter(|f| f.name() == name)
                .flat_map(|f| f.get_metric())
                .map(|m| m.get_counter().get_value())
                .sum()
        };
        let in_use = |transport: &str| {
            agent_side
                .iter()
                .filter(|f| f.name() == "relay_agent_transport")
                .flat_map(|f| f.get_metric())
                .any(|m| {
                    m.get_gauge().get_value() == 1.0
                        && m.get_label().iter().any(|l| l.value() == transport)
                })
        };
        Self {
            at: Instant::now(),
            received: agent.datagrams_received.get(),
            replayed: sink.datagrams_replayed(),
            // The demo's agent relays sFlow only (the default): what is not sFlow is dropped.
            dropped: sum("relay_agent_datagrams_dropped_total") as u64
                + sum("relay_agent_not_sflow_datagrams_total") as u64
                + sink.replay_errors()
                + sink.replay_queue_drops(),
            transport: if in_use("quic") {
                "QUIC"
            } else if in_use("grpc") {
                "gRPC"
            } else {
                "down"
            },
        }
    }

    /// `in 1200/s  out 1200/s  dropped 0  (total in 36000, out 36000)  link QUIC`
    fn status(&self, before: &Self) -> String {
        let seconds = self.at.duration_since(before.at).as_secs_f64().max(0.001);
        let rate = |now: u64, then: u64| (now.saturating_sub(then) as f64 / seconds).round();
        format!(
            "in {:.0}/s  out {:.0}/s  dropped {}  (total in {}, out {})  link {}",
            rate(self.received, before.received),
            rate(self.replayed, before.replayed),
            self.dropped,
            self.received,
            self.replayed,
            self.transport
        )
    }
}

/// Makes the demo PKI unless it is there already.
fn ensure_pki(dir: &Path) -> Result<(), String> {
    if dir.join("ca.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let ca = Ca::generate("sflow-relay demo CA", 30).map_err(|e| e.to_string())?;
    let mut sink = Leaf::new(Role::Sink, "localhost", 30);
    sink.ips = vec![
        "127.0.0.1".parse().expect("valid"),
        "::1".parse().expect("valid"),
    ];
    let sink = ca.issue(&sink).map_err(|e| e.to_string())?;
    let agent = ca
        .issue(&Leaf::new(Role::Agent, "demo-agent", 30))
        .map_err(|e| e.to_string())?;
    let files = [
        ("localhost.pem", sink.cert_pem.as_str(), Secrecy::Public),
        ("localhost.key", sink.key_pem.as_str(), Secrecy::Private),
        ("demo-agent.pem", agent.cert_pem.as_str(), Secrecy::Public),
        ("demo-agent.key", agent.key_pem.as_str(), Secrecy::Private),
        ("ca.key", &ca.key_pem(), Secrecy::Private),
        // Last: its presence marks a complete set.
        ("ca.pem", ca.cert_pem(), Secrecy::Public),
    ];
    for (name, pem, secrecy) in files {
        store::write(&dir.join(name), pem.as_bytes(), secrecy).map_err(|e| e.to_string())?;
    }
    Ok(())
}
