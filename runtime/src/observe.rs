//! The observability endpoint both binaries serve on `--metrics-listen`: `/metrics` (Prometheus
//! text format 0.0.4), `/healthz` (the process answers), `/readyz` (it does its job), and the
//! JSON pages a binary adds (the sink's `/agents`).
//!
//! Also the few helpers that register metrics, so that both binaries name and register them the
//! same way: each registers its families once at start and keeps the handles; the hot path
//! bumps a handle it already holds (an atomic add), never looks a name or a label up.
//!
//! Why the `prometheus` crate and not `prometheus-client`: the latter writes only OpenMetrics
//! text, whose `# TYPE x counter` + `x_total` lines `promtool check metrics` (Prometheus 2.x)
//! rejects; the classic text format is what every Prometheus and promtool accept.
//!
//! What this does not do: TLS or authentication on the endpoint. It carries counters, not
//! datagrams or keys; bind it to a management address or localhost (the default is off).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Scrapers and probes served at once; more wait for a free slot.
const MAX_CONNECTIONS: usize = 32;
/// A client has this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default cap on the sFlow streams (agent address, sub-agent) followed one by one; the rest
/// share an `other` series. Far above one site's switches, low enough for any Prometheus.
pub const DEFAULT_SFLOW_MAX_STREAMS: usize = 1024;

/// Observability options, the same on both binaries (flags and config keys).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObserveOptions {
    /// Serve /metrics (Prometheus), /healthz and /readyz (and /agents on the sink) over HTTP
    /// on this TCP address, e.g. 127.0.0.1:9108. Off unless set; the endpoint has no
    /// authentication, so bind it to a management address.
    #[arg(long, value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// sFlow streams (agent address, sub-agent) counted one by one in the sequence-gap
    /// metrics; beyond this they share one "other" series. [default: 1024]
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sflow_max_streams: Option<usize>,
}

impl ObserveOptions {
    /// The cap on tracked sFlow streams.
    pub fn sflow_max_streams(&self) -> usize {
        self.sflow_max_streams.unwrap_or(DEFAULT_SFLOW_MAX_STREAMS)
    }
}

/// Binds `--metrics-listen`, when set.
///
/// # Errors
///
/// When the address cannot be bound; the error names it.
pub fn bind(options: &ObserveOptions) -> Result<Option<std::net::TcpListener>, String> {
    options
        .metrics_listen
        .map(|addr| {
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
        })
        .transpose()
}

/// Serves `status` on `listener` (from [`bind`]) in a task of its own, until `token` is
/// cancelled; logs the address.
///
/// # Errors
///
/// When the listener cannot be registered with the runtime.
pub fn spawn(
    listener: std::net::TcpListener,
    status: Arc<dyn Status>,
    token: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    tracing::info!(metrics_listen = %addr, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(serve(listener, status, token)))
}

/// What a binary exposes on its observability endpoint.
pub trait Status: Send + Sync + 'static {
    /// The registry `/metrics` is gathered from.
    fn registry(&self) -> &Registry;

    /// Brings values read from elsewhere up to date before a scrape (certificate expiry,
    /// kernel drop counts, round-trip times).
    fn refresh(&self) {}

    /// `Ok` when the process does its job; else why not, for `/readyz`'s body.
    ///
    /// # Errors
    ///
    /// The reason the process is not ready.
    fn ready(&self) -> Result<(), String>;

    /// A JSON page other than the fixed ones, by path (`/agents`), if the binary has it.
    fn page(&self, _path: &str) -> Option<serde_json::Value> {
        None
    }

    /// A metrics page other than `/metrics`, by path (`/metrics/sflow`), in the Prometheus
    /// text format, if the binary has it: for metrics Prometheus is to scrape as a job of
    /// their own.
    fn exposition(&self, _path: &str) -> Option<String> {
        None
    }
}

/// Serves `status` on `listener` until `token` is cancelled.
pub async fn serve(listener: TcpListener, status: Arc<dyn Status>, token: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = token.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (stream, _) = tokio::select! {
            () = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let status = status.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(respond(&*status, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = token.cancelled() => {}
            }
            drop(permit);
        });
    }
}

fn respond(status: &dyn Status, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            status.refresh();
            let mut body = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&status.registry().gather(), &mut body) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                Err(error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {error}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match status.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        path if let Some(text) = status.exposition(path) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        path => match status.page(path) {
            Some(value) => {
                let mut body = serde_json::to_vec_pretty(&value).unwrap_or_default();
                body.push(b'\n');
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
            None => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz, /readyz\n".into(),
            ),
        },
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

// === registration helpers ===
//
// A name clash is a programming error (two families of one name), found by every test run,
// hence the panics.

/// Registers a counter.
///
/// # Panics
///
/// When `name` is invalid or already registered.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Registers a counter family with `labels`.
///
/// # Panics
///
/// When `name` is invalid or already registered.
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Registers an integer gauge.
///
/// # Panics
///
/// When `name` is invalid or already registered.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Registers an integer gauge family with `labels`.
///
/// # Panics
///
/// When `name` is invalid or already registered.
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Registers a floating-point gauge (seconds and the like).
///
/// # Panics
///
/// When `name` is invalid or already registered.
pub fn float_gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let metric = Gauge::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Registers a floating-point gauge family with `labels`.
///
/// # Panics
///
/// When `name` is invalid or already registered.
pub fn float_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Raises `counter` to `total`, a count kept elsewhere that only grows (the kernel's drop count
/// of a socket); a lower `total` (a new socket) is ignored.
pub fn catch_up(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// The sum of a family's series; only of those whose label `only.0` is `only.1`, when given.
/// For summary log lines, not for the hot path (it walks every series).
pub fn sum(family: &IntCounterVec, only: Option<(&str, &str)>) -> u64 {
    use prometheus::core::Collector;
    family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            only.is_none_or(|(name, value)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == name && l.value() == value)
            })
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        registry: Registry,
        ready: bool,
    }

    impl Status for Fixed {
        fn registry(&self) -> &Registry {
            &self.registry
        }
        fn ready(&self) -> Result<(), String> {
            if self.ready {
                Ok(())
            } else {
                Err("sink down".into())
            }
        }
        fn page(&self, path: &str) -> Option<serde_json::Value> {
            (path == "/things").then(|| serde_json::json!([{"name": "a"}]))
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_readiness_and_pages() {
        let registry = Registry::new();
        let c = counter(&registry, "demo_things_total", "Things.");
        c.inc_by(7);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let status = Arc::new(Fixed {
            registry,
            ready: false,
        });
        let server = tokio::spawn(serve(listener, status, token.clone()));

        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        assert!(
            metrics.contains("# TYPE demo_things_total counter"),
            "{metrics}"
        );
        assert!(metrics.contains("demo_things_total 7"), "{metrics}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let ready = get(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("not ready: sink down"), "{ready}");
        let page = get(addr, "/things").await;
        assert!(page.contains("application/json") && page.contains("\"name\": \"a\""));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        token.cancel();
        server.await.unwrap();
    }

    #[test]
    fn catch_up_only_raises() {
        let registry = Registry::new();
        let c = counter(&registry, "drops_total", "Drops.");
        catch_up(&c, 5);
        catch_up(&c, 3);
        assert_eq!(c.get(), 5);
        catch_up(&c, 9);
        assert_eq!(c.get(), 9);
    }

    #[test]
    fn sums_a_family_or_part_of_it() {
        let registry = Registry::new();
        let family = counter_vec(&registry, "dropped_total", "Drops.", &["reason", "where"]);
        family.with_label_values(&["full", "a"]).inc_by(2);
        family.with_label_values(&["full", "b"]).inc_by(3);
        family.with_label_values(&["error", "a"]).inc_by(5);
        assert_eq!(sum(&family, None), 10);
        assert_eq!(sum(&family, Some(("reason", "full"))), 5);
        assert_eq!(sum(&family, Some(("where", "a"))), 7);
    }
}
