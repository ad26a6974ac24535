//! `relay-agent demo`: the whole relay on one host, in one command.
//!
//! On first run it makes a throwaway CA, a sink certificate for `localhost`/127.0.0.1 and an
//! agent certificate in `--dir`; then it runs a sink on loopback and an agent that sends to it,
//! both in this process, over real QUIC with mutual TLS. sFlow sent to the agent's UDP port is
//! replayed to `--forward`. Every few seconds it reports what it received and replayed.
//! Production runs the two binaries apart; see the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
    /// Report interval.
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

    let mut ticker = tokio::time::interval(args.report_every);
    let mut last = (u64::MAX, u64::MAX);
    let shutdown = runtime::shutdown::signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = (
                    agent_metrics.datagrams_received.get(),
                    sink_metrics.datagrams_replayed(),
                );
                if now != last {
                    println!(
                        "demo: {} datagrams received on {}, {} replayed to {}",
                        now.0, listen, now.1, args.forward
                    );
                    last = now;
                }
            }
            () = &mut shutdown => break,
        }
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
