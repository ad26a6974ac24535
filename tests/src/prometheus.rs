//! A real Prometheus server for the tests, and `promtool`: [`Prometheus`] runs the
//! `prometheus` binary on a free loopback port with a throwaway configuration and storage,
//! scraping the given `/metrics` endpoints every second, and answers PromQL through its
//! HTTP API; [`promtool_check_metrics`] lints an exposition the way Prometheus's own tool
//! does.
//!
//! Needs the Debian package `prometheus` (2.42, which ships `promtool` too); tests/run.sh
//! installs it as root. [`installed`] (and [`Prometheus::start`]) say why when it is missing,
//! so a test can print `SKIPPED: reason`; anything that goes wrong once it is installed is a
//! test failure. It does not assert what the relay's metrics mean: tests do, through
//! [`Prometheus::wait_for`].

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{WAIT, free_tcp_port, http};

/// The job name of Prometheus's own `/metrics` in [`Prometheus::start_with_self`].
pub const SELF_JOB: &str = "self";

/// How often Prometheus scrapes each target.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// How often [`Prometheus::wait_for`] and [`Prometheus::wait_targets_up`] ask.
const POLL: Duration = Duration::from_millis(200);

/// Whether `prometheus` and `promtool` can run here; `Err` has the reason to print with
/// `SKIPPED`.
///
/// # Errors
///
/// When either binary is not installed (or does not run).
pub fn installed() -> Result<(), String> {
    for tool in ["prometheus", "promtool"] {
        match Command::new(tool).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(format!(
                    "`{tool} --version` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "`{tool}` is not installed ({e}; Debian package prometheus, which \
                     tests/run.sh installs as root)"
                ));
            }
        }
    }
    Ok(())
}

/// Runs `promtool check metrics` on `exposition` (classic text format 0.0.4, as a
/// `/metrics` endpoint serves it).
///
/// promtool 2.42 parses the classic format only: an OpenMetrics-style `# TYPE x counter`
/// family with an `x_total` sample is two families to it, one of them without help, and is
/// rejected.
///
/// # Errors
///
/// When promtool finds a parse error or a lint problem (missing help, a counter without
/// `_total`, …): its exit status and output. Also when promtool cannot run; call
/// [`installed`] first to skip instead.
pub fn promtool_check_metrics(exposition: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run promtool: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let text = exposition.to_owned();
    // Written on a thread, so that promtool's output cannot fill a pipe while it still reads.
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for promtool: {e}"))?;
    let written = writer.join().expect("stdin writer");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "promtool check metrics: {}: {}",
            out.status,
            output.trim()
        ));
    }
    written.map_err(|e| format!("write to promtool: {e}"))
}

// === Sample, Target ===

/// One element of an instant query's result: a series' labels (including `__name__` when
/// the expression keeps it) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// The value (`NaN` and infinities as Prometheus gives them).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, when the series has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

impl fmt::Display for Sample {
    /// `name{label="value", …} value`, as Prometheus writes series.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label("__name__").unwrap_or_default())?;
        let labels: Vec<String> = self
            .labels
            .iter()
            .filter(|(name, _)| *name != "__name__")
            .map(|(name, value)| format!("{name}={value:?}"))
            .collect();
        write!(f, "{{{}}} {}", labels.join(", "), self.value)
    }
}

/// A scrape target as Prometheus reports it (`/api/v1/targets`, active targets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The `job` label.
    pub job: String,
    /// The URL it scrapes.
    pub scrape_url: String,
    /// `up`, `down` or `unknown` (not scraped yet).
    pub health: String,
    /// Why the last scrape failed; empty when it did not.
    pub last_error: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.job, self.scrape_url, self.health)?;
        if !self.last_error.is_empty() {
            write!(f, " ({})", self.last_error)?;
        }
        Ok(())
    }
}

// === Prometheus ===

/// A `prometheus` server on `127.0.0.1`, scraping each target's `/metrics` every
/// [`SCRAPE_INTERVAL`], with configuration, storage and log in a temporary directory. It is
/// killed and reaped on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    jobs: usize,
    // Last, so the directory goes after the process.
    _dir: tempfile::TempDir,
}

/// Why one attempt to start did not give a ready server.
enum StartError {
    /// Another process took the port between choosing and binding it: try another.
    PortTaken,
    /// Anything else: the test fails with this.
    Failed(String),
}

impl Prometheus {
    /// Starts Prometheus scraping `targets`, one job per `(job, address)` (job names must
    /// differ), and waits until it is ready.
    ///
    /// Ready is not scraping yet: Prometheus hands its targets to the scrapers about 5 s
    /// after it starts (its service discovery's update period), and scrapes each within an
    /// interval of that; so allow 10 s or more for the first `up == 1`.
    ///
    /// # Errors
    ///
    /// Only when Prometheus is not installed ([`installed`]): the reason to print with
    /// `SKIPPED`.
    ///
    /// # Panics
    ///
    /// When it is installed but does not become ready within [`WAIT`], with its log.
    pub fn start(targets: &[(&str, SocketAddr)]) -> Result<Self, String> {
        let targets: Vec<_> = targets
            .iter()
            .map(|(job, addr)| (*job, *addr, "/metrics"))
            .collect();
        Self::launch(&targets, false)
    }

    /// As [`start`](Self::start), each target scraped at its own path (such as the sink's
    /// `/metrics/sflow`): (job, address, path).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_paths(targets: &[(&str, SocketAddr, &str)]) -> Result<Self, String> {
        Self::launch(targets, false)
    }

    /// As [`start`](Self::start), and also scraping Prometheus's own `/metrics` as job
    /// [`SELF_JOB`] (a target that is known to work, to test the harness).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with_self(targets: &[(&str, SocketAddr)]) -> Result<Self, String> {
        let targets: Vec<_> = targets
            .iter()
            .map(|(job, addr)| (*job, *addr, "/metrics"))
            .collect();
        Self::launch(&targets, true)
    }

    fn launch(targets: &[(&str, SocketAddr, &str)], scrape_self: bool) -> Result<Self, String> {
        installed()?;
        let mut jobs: Vec<&str> = targets.iter().map(|(job, _, _)| *job).collect();
        if scrape_self {
            jobs.push(SELF_JOB);
        }
        let mut unique = jobs.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), jobs.len(), "job names must differ: {jobs:?}");
        // The port is chosen by binding port 0 and released before Prometheus binds it;
        // another process may take it in between, which shows as Prometheus exiting with
        // "address already in use": then another port.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            match Self::try_start(addr, targets, scrape_self) {
                Ok(prometheus) => return Ok(prometheus),
                Err(StartError::PortTaken) => continue,
                Err(StartError::Failed(message)) => panic!("{message}"),
            }
        }
        panic!("prometheus: no free port after 5 attempts");
    }

    fn try_start(
        addr: SocketAddr,
        targets: &[(&str, SocketAddr, &str)],
        scrape_self: bool,
    ) -> Result<Self, StartError> {
        let failed = |what: &str, e: std::io::Error| StartError::Failed(format!("{what}: {e}"));
        let dir = tempfile::tempdir().map_err(|e| failed("temporary directory", e))?;
        let mut jobs: Vec<(&str, SocketAddr, &str)> = targets.to_vec();
        if scrape_self {
            jobs.push((SELF_JOB, addr, "/metrics"));
        }
        let config = dir.path().join("prometheus.yml");
        // JSON is YAML, and serde_json quotes whatever a job name holds.
        std::fs::write(&config, config_text(&jobs)).map_err(|e| failed("write config", e))?;
        let log = dir.path().join("prometheus.log");
        let log_file = File::create(&log).map_err(|e| failed("create log", e))?;
        let log_file2 = log_file.try_clone().map_err(|e| failed("log", e))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=info")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_file2)
            .spawn()
            .map_err(|e| failed("start prometheus", e))?;
        // From here on, a failure drops `prometheus`, which kills the process.
        let mut prometheus = Self {
            child,
            addr,
            log,
            jobs: jobs.len(),
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = prometheus.child.try_wait().expect("wait for prometheus") {
                let log = prometheus.log();
                return Err(if log.contains("address already in use") {
                    StartError::PortTaken
                } else {
                    StartError::Failed(format!(
                        "prometheus exited before it was ready ({status}); log:\n{log}"
                    ))
                });
            }
            let ready = http::get(addr, "/-/ready").is_ok_and(|r| r.status == 200);
            // Alive after answering: the answer was its own, not another server's that
            // took the port.
            if ready && prometheus.child.try_wait().is_ok_and(|s| s.is_none()) {
                return Ok(prometheus);
            }
            if Instant::now() >= deadline {
                return Err(StartError::Failed(format!(
                    "prometheus on {addr} not ready within {WAIT:?}; log:\n{}",
                    prometheus.log()
                )));
            }
            // Poll interval of a bounded wait for readiness.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where its HTTP API and its own `/metrics` are.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its log (stdout and stderr) so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Evaluates `promql` now (`/api/v1/query`). A vector gives its samples; a scalar gives
    /// one sample without labels.
    ///
    /// # Errors
    ///
    /// When the request fails, Prometheus rejects the expression (its message), or the
    /// result is a range vector or a string.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        self.query_path(
            promql,
            format!("/api/v1/query?query={}", http::encode_component(promql)),
        )
    }

    /// As [`query`](Self::query), evaluated at `unix` (seconds since the Unix epoch) rather
    /// than now: say, just after a scrape, so a range ends on a sample.
    ///
    /// # Errors
    ///
    /// As [`query`](Self::query).
    pub fn query_at(&self, promql: &str, unix: f64) -> Result<Vec<Sample>, String> {
        let path = format!(
            "/api/v1/query?query={}&time={unix:.3}",
            http::encode_component(promql)
        );
        self.query_path(promql, path)
    }

    fn query_path(&self, promql: &str, path: String) -> Result<Vec<Sample>, String> {
        let body =
            http::get_json(self.addr, &path).map_err(|e| format!("query {promql:?}: {e}"))?;
        parse_query(&body).map_err(|e| format!("query {promql:?}: {e}: {body}"))
    }

    /// Queries `promql` until `pred` holds for the result, or `timeout` passes (the
    /// [`Prometheus`] scrapes every [`SCRAPE_INTERVAL`], so allow a few).
    ///
    /// # Errors
    ///
    /// After `timeout`: the last result (or the last query error) and the targets' health,
    /// with each one's last scrape error.
    pub fn wait_for(
        &self,
        promql: &str,
        pred: impl Fn(&[Sample]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<Sample>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.query(promql);
            if let Ok(samples) = &last
                && pred(samples)
            {
                return last;
            }
            if Instant::now() >= deadline {
                let last = match last {
                    Ok(samples) if samples.is_empty() => "no samples".to_owned(),
                    Ok(samples) => samples
                        .iter()
                        .map(Sample::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                    Err(e) => e,
                };
                return Err(format!(
                    "`{promql}` did not satisfy the condition within {timeout:?}; last \
                     result: {last}; targets: {}",
                    self.targets_summary()
                ));
            }
            // Poll interval of a bounded wait on a query.
            std::thread::sleep(POLL);
        }
    }

    /// The active scrape targets and their health (`/api/v1/targets`).
    ///
    /// # Errors
    ///
    /// When the request fails or the answer is not as documented.
    pub fn targets(&self) -> Result<Vec<Target>, String> {
        let body = http::get_json(self.addr, "/api/v1/targets?state=active")
            .map_err(|e| format!("targets: {e}"))?;
        let active = body
            .pointer("/data/activeTargets")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("targets: no data.activeTargets in {body}"))?;
        let text = |t: &Value, pointer: &str| {
            t.pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok(active
            .iter()
            .map(|t| Target {
                job: text(t, "/labels/job"),
                scrape_url: text(t, "/scrapeUrl"),
                health: text(t, "/health"),
                last_error: text(t, "/lastError"),
            })
            .collect())
    }

    /// Waits until every configured target has been scraped successfully (health `up`), and
    /// returns them.
    ///
    /// # Errors
    ///
    /// After `timeout`: the targets' health, with each one's last scrape error.
    pub fn wait_targets_up(&self, timeout: Duration) -> Result<Vec<Target>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(targets) = self.targets()
                && targets.len() == self.jobs
                && targets.iter().all(|t| t.health == "up")
            {
                return Ok(targets);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not every target was up within {timeout:?}: {}",
                    self.targets_summary()
                ));
            }
            // Poll interval of a bounded wait on a query.
            std::thread::sleep(POLL);
        }
    }

    /// The targets' health on one line, for failure messages.
    fn targets_summary(&self) -> String {
        match self.targets() {
            Ok(targets) if targets.is_empty() => {
                "none yet (Prometheus lists them about 5 s after it starts)".to_owned()
            }
            Ok(targets) => targets
                .iter()
                .map(Target::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => e,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration: every target scraped at `/metrics` every [`SCRAPE_INTERVAL`].
fn config_text(jobs: &[(&str, SocketAddr, &str)]) -> String {
    let interval = format!("{}ms", SCRAPE_INTERVAL.as_millis());
    // Below the interval, as Prometheus requires.
    let timeout = format!("{}ms", SCRAPE_INTERVAL.as_millis() * 4 / 5);
    let scrape_configs: Vec<Value> = jobs
        .iter()
        .map(|(job, addr, path)| {
            json!({
                "job_name": job,
                "scheme": "http",
                "metrics_path": path,
                "static_configs": [{ "targets": [addr.to_string()] }],
            })
        })
        .collect();
    let config = json!({
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": timeout,
            "evaluation_interval": interval,
        },
        "scrape_configs": scrape_configs,
    });
    serde_json::to_string_pretty(&config).expect("config as JSON")
}

/// The samples of a `/api/v1/query` answer.
fn parse_query(body: &Value) -> Result<Vec<Sample>, String> {
    if body.get("status").and_then(Value::as_str) != Some("success") {
        return Err("status is not success".into());
    }
    let data = body.get("data").ok_or("no data")?;
    let result = data.get("result").ok_or("no data.result")?;
    match data.get("resultType").and_then(Value::as_str) {
        Some("vector") => result
            .as_array()
            .ok_or("data.result is not an array")?
            .iter()
            .map(|series| {
                let labels = series
                    .get("metric")
                    .and_then(Value::as_object)
                    .ok_or("a series without metric")?
                    .iter()
                    .map(|(name, value)| {
                        let value = value.as_str().ok_or("a label value that is not a string")?;
                        Ok((name.clone(), value.to_owned()))
                    })
                    .collect::<Result<_, String>>()?;
                let value = parse_value(series.get("value").ok_or("a series without value")?)?;
                Ok(Sample { labels, value })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: parse_value(result)?,
        }]),
        other => Err(format!(
            "result type {other:?}: only instant vectors and scalars are supported"
        )),
    }
}

/// `[timestamp, "value"]`: the value (`"NaN"`, `"+Inf"` and `"-Inf"` included).
fn parse_value(pair: &Value) -> Result<f64, String> {
    let text = pair
        .get(1)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("not a [time, \"value\"] pair: {pair}"))?;
    text.parse()
        .map_err(|e| format!("value {text:?} is not a number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vectors_and_scalars() {
        let body = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"__name__": "up", "job": "self"}, "value": [1.5, "1"]},
            {"metric": {}, "value": [1.5, "+Inf"]},
            {"metric": {}, "value": [1.5, "NaN"]},
        ]}});
        let samples = parse_query(&body).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].label("job"), Some("self"));
        assert_eq!(samples[0].value, 1.0);
        assert_eq!(samples[0].to_string(), r#"up{job="self"} 1"#);
        assert_eq!(samples[1].value, f64::INFINITY);
        assert!(samples[2].value.is_nan());

        let body =
            json!({"status": "success", "data": {"resultType": "scalar", "result": [2, "-Inf"]}});
        assert_eq!(parse_query(&body).unwrap()[0].value, f64::NEG_INFINITY);

        let body = json!({"status": "success", "data": {"resultType": "matrix", "result": []}});
        assert!(parse_query(&body).is_err());
    }

    #[test]
    fn config_is_json_with_one_job_per_target() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let config: Value = serde_json::from_str(&config_text(&[
            ("a\"b", addr, "/metrics"),
            ("c", addr, "/metrics/sflow"),
        ]))
        .unwrap();
        assert_eq!(config["global"]["scrape_interval"], "1000ms");
        assert_eq!(config["global"]["scrape_timeout"], "800ms");
        assert_eq!(config["scrape_configs"][0]["job_name"], "a\"b");
        assert_eq!(
            config["scrape_configs"][1]["static_configs"][0]["targets"][0],
            "127.0.0.1:9"
        );
        assert_eq!(
            config["scrape_configs"][1]["metrics_path"],
            "/metrics/sflow"
        );
    }
}
