//! Harness for the end-to-end tests: the real `relay-certs`, `relay-sink` and `relay-agent`
//! binaries, run as processes on loopback with ephemeral ports, plus UDP senders and captures.
//!
//! - [`bin`] builds the binaries once per test process (`cargo build --bins`) and finds them.
//! - [`Pki`] makes a CA and certificates with `relay-certs`.
//! - [`Daemon`] runs a binary with JSON logs, collects its log lines, and waits for events.
//! - [`UdpCapture`] receives replayed datagrams on a thread, for byte-exact assertions.
//! - [`send_paced`] sends datagrams with a bounded number in flight, so that the kernel
//!   buffers on the way (whose size the test cannot choose) never overflow: a test asserts
//!   the relay's behaviour, not the kernel's.
//! - [`http`] is a minimal blocking HTTP/1.1 GET client for `/metrics` and JSON APIs.
//! - [`fixture::Relay`] is the usual set-up: CA, capture, sink and one agent.
//! - [`metrics`] scrapes `/metrics` ([`metrics::Scrape`]): one series by its exact labels,
//!   a family's sum, and bounded waits on a condition over repeated scrapes.
//! - [`procfs`] reads what `/proc` says of a process: memory, CPU time, threads, fds.
//! - [`prometheus`] runs a real Prometheus server scraping the binaries, and `promtool`.
//! - [`tshark`] writes datagrams to a capture file and has Wireshark decode them.
//! - [`enroll`] runs a sink that serves enrollment, with a root and an issuing CA.
//!
//! Every wait has a deadline and fails with the daemon's logs attached.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod bare;
pub mod enroll;
pub mod fixture;
pub mod http;
pub mod impair;
pub mod metrics;
pub mod netns;
pub mod procfs;
pub mod prometheus;
pub mod sflow;
pub mod stream;
pub mod tshark;

/// The transports between agent and sink; the end-to-end suite runs over each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC (UDP).
    Quic,
    /// gRPC (HTTP/2 over TLS on TCP).
    Grpc,
}

/// Defines, for each named scenario `fn name(t: Transport)` in scope, one `#[test]` per
/// transport: `quic::name` and `grpc::name`.
#[macro_export]
macro_rules! over_each_transport {
    ($($name:ident),* $(,)?) => {
        mod quic {
            $(#[test] fn $name() { super::$name($crate::Transport::Quic) })*
        }
        mod grpc {
            $(#[test] fn $name() { super::$name($crate::Transport::Grpc) })*
        }
    };
}

impl Transport {
    /// The agent's `--transport` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Grpc => "grpc",
        }
    }
}

/// Default deadline for a wait.
pub const WAIT: Duration = Duration::from_secs(20);

/// The path of a workspace binary, built (once per process) in the profile of the running
/// executable: a test (`target/<profile>/deps/…`) or the benchmark (`target/<profile>/…`).
///
/// # Panics
///
/// When the build fails.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("executable path");
        let mut dir = exe.parent().expect("target/<profile>").to_path_buf();
        let test = dir.file_name().is_some_and(|n| n == "deps");
        if test {
            dir.pop();
        }
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins"]);
        // `cargo run` and `cargo test` hand the program its package's CARGO_MANIFEST_DIR,
        // CARGO_PKG_* and the like. Some build scripts (ring's) declare these as inputs, so a
        // build that inherits them differs, to cargo, from one typed at a shell: it rebuilds
        // ring and all above it (minutes, in release), and the next shell build does it again.
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            let set_for_the_program = key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
                || matches!(
                    key,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                );
            if set_for_the_program {
                cmd.env_remove(key);
            }
        }
        if test {
            // The same targets and features as `cargo test --workspace` (the test command), so
            // this build is a no-op after it; a narrower selection would unify dependency
            // features differently and relink the binaries on every run.
            cmd.arg("--tests");
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    });
    dir.join(name)
}

// === Pki ===

/// A CA made by `relay-certs init`, and certificates issued from it.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A new CA in `dir` (created).
    pub fn new(dir: &Path) -> Self {
        let out = Command::new(bin("relay-certs"))
            .args(["init", "--dir"])
            .arg(dir)
            .output()
            .expect("run relay-certs");
        assert!(
            out.status.success(),
            "relay-certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate: `relay-certs issue --role ROLE --name NAME EXTRA…`; returns
    /// (certificate, key).
    pub fn issue(&self, role: &str, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        let out = Command::new(bin("relay-certs"))
            .args(["issue", "--role", role, "--name", name, "--dir"])
            .arg(&self.dir)
            .args(extra)
            .output()
            .expect("run relay-certs");
        assert!(
            out.status.success(),
            "relay-certs issue: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    /// Issues the usual sink certificate: `localhost`, 127.0.0.1 and ::1.
    pub fn sink_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue(
            "sink",
            name,
            &["--dns", "localhost", "--ip", "127.0.0.1", "--ip", "::1"],
        )
    }

    /// Issues an agent certificate.
    pub fn agent_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue("agent", name, &[])
    }
}

// === Daemon ===

/// A running binary whose stdout and stderr lines are collected.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    lines: Collected<String>,
}

impl Daemon {
    /// Starts `bin(name)` with `args`.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S]) -> Self {
        let mut cmd = Command::new(bin(name));
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        Self::start(name, cmd)
    }

    /// Starts `cmd` (its stdin and stdout as the caller set them; stdout is collected when
    /// piped, stderr always).
    pub fn start(name: &str, mut cmd: Command) -> Self {
        let child = cmd
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self::adopt(name, child)
    }

    /// Takes over a started child: collects its stdout (when still piped) and stderr (when
    /// piped), and kills it on drop.
    pub fn adopt(name: &str, mut child: Child) -> Self {
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let mut streams: Vec<Box<dyn std::io::Read + Send>> =
            vec![Box::new(child.stderr.take().expect("stderr"))];
        if let Some(stdout) = child.stdout.take() {
            streams.push(Box::new(stdout));
        }
        for stream in streams {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let (store, ready) = &*lines;
                    store.lock().unwrap().push(line);
                    ready.notify_all();
                }
            });
        }
        Self {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// All output lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.0.lock().unwrap().clone()
    }

    /// Output lines that are JSON log events.
    pub fn events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Number of log events with `message` containing `text`.
    pub fn count(&self, text: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| message(e).contains(text))
            .count()
    }

    /// Waits for the `nth` (1-based) log event whose message contains `text`, and returns it.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the output so far.
    pub fn wait_for_nth(&self, text: &str, nth: usize, timeout: Duration) -> Value {
        let found = wait_on(&self.lines, timeout, |lines| {
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|e| message(e).contains(text))
                .nth(nth - 1)
        });
        found.unwrap_or_else(|| {
            panic!(
                "{}: no log event #{nth} containing {text:?} within {timeout:?}; output:\n{}",
                self.name,
                self.lines().join("\n")
            )
        })
    }

    /// Waits for the first log event whose message contains `text`.
    pub fn wait_for(&self, text: &str) -> Value {
        self.wait_for_nth(text, 1, WAIT)
    }

    /// Waits for the first log event for which `pred` holds, and returns it.
    ///
    /// # Panics
    ///
    /// After `timeout`, naming `what`, with the output so far.
    pub fn wait_for_event(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let found = wait_on(&self.lines, timeout, |lines| {
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| pred(e))
        });
        found.unwrap_or_else(|| {
            panic!(
                "{}: no log event {what} within {timeout:?}; output:\n{}",
                self.name,
                self.lines().join("\n")
            )
        })
    }

    /// Waits until `pred` holds of the log events so far; returns whether it did within
    /// `timeout`.
    pub fn wait_events(&self, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> bool {
        wait_on(&self.lines, timeout, |lines| {
            let events: Vec<Value> = lines
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            pred(&events).then_some(())
        })
        .is_some()
    }

    /// Waits for an output line (plain text, e.g. the demo's) containing `text`.
    pub fn wait_for_line(&self, text: &str, timeout: Duration) -> String {
        let found = wait_on(&self.lines, timeout, |lines| {
            lines.iter().find(|l| l.contains(text)).cloned()
        });
        found.unwrap_or_else(|| {
            panic!(
                "{}: no line containing {text:?}; output:\n{}",
                self.name,
                self.lines().join("\n")
            )
        })
    }

    /// Waits (bounded) for the process to exit by itself.
    ///
    /// # Panics
    ///
    /// When it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running; output:\n{}",
                self.name,
                self.lines().join("\n")
            );
            // Polling the process state: nothing signals an exit to a thread that is not
            // blocked in wait().
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    ///
    /// # Panics
    ///
    /// When the process does not exit within [`WAIT`].
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(WAIT)
    }

    /// Sends SIGHUP (reload the configuration and certificates).
    ///
    /// # Panics
    ///
    /// When `kill` fails.
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP");
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A list that a thread fills, with a condition variable signalled on each addition.
type Collected<T> = Arc<(Mutex<Vec<T>>, Condvar)>;

/// Calls `check` on the list now and after each addition until it returns `Some`, or
/// `timeout` passes (then `None`).
fn wait_on<T, R>(
    collected: &Collected<T>,
    timeout: Duration,
    mut check: impl FnMut(&[T]) -> Option<R>,
) -> Option<R> {
    let deadline = Instant::now() + timeout;
    let (list, ready) = &**collected;
    let mut guard = list.lock().unwrap();
    loop {
        if let Some(found) = check(&guard) {
            return Some(found);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        guard = ready.wait_timeout(guard, deadline - now).unwrap().0;
    }
}

/// The `message` field of a log event.
pub fn message(event: &Value) -> &str {
    event
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A string field of a log event.
pub fn field<'a>(event: &'a Value, name: &str) -> &'a str {
    event.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// Starts `relay-sink` on an ephemeral loopback port (or `listen`), replaying to `forward`.
/// Returns the daemon and its QUIC address.
pub fn start_sink(
    pki: &Pki,
    cert: &(PathBuf, PathBuf),
    forward: &[SocketAddr],
    listen: Option<SocketAddr>,
    extra: &[&str],
) -> (Daemon, SocketAddr) {
    let mut args: Vec<String> = vec![
        "--log-format".into(),
        "json".into(),
        "--listen".into(),
        listen.map_or_else(|| "127.0.0.1:0".into(), |a| a.to_string()),
        "--ca".into(),
        path(&pki.ca()),
        "--cert".into(),
        path(&cert.0),
        "--key".into(),
        path(&cert.1),
    ];
    for f in forward {
        args.extend(["--forward".into(), f.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let sink = Daemon::spawn("relay-sink", &args);
    let event = sink.wait_for("sink listening");
    let addr = field(&event, "listen")
        .parse()
        .expect("listen address in log");
    (sink, addr)
}

/// Starts `relay-agent` on an ephemeral loopback port, sending to `sink` as `server_name` over
/// `transport` only. Returns the daemon and its UDP receive address.
pub fn start_agent_over(
    transport: Transport,
    ca: &Path,
    cert: &(PathBuf, PathBuf),
    sink: SocketAddr,
    server_name: &str,
    extra: &[&str],
) -> (Daemon, SocketAddr) {
    let extra = [&["--transport", transport.name()], extra].concat();
    start_agent(ca, cert, sink, server_name, &extra)
}

/// Starts `relay-agent` on an ephemeral loopback port, sending to `sink` as `server_name`,
/// reconnecting at least every second (`--reconnect-max 1s`, so tests that cut the path wait
/// less). Returns the daemon and its UDP receive address.
pub fn start_agent(
    ca: &Path,
    cert: &(PathBuf, PathBuf),
    sink: SocketAddr,
    server_name: &str,
    extra: &[&str],
) -> (Daemon, SocketAddr) {
    spawn_agent(
        ca,
        cert,
        sink,
        server_name,
        &[&["--reconnect-max", "1s"], extra].concat(),
    )
}

/// As [`start_agent`], with every option but the addresses, the certificates and the log
/// format at its default.
pub fn spawn_agent(
    ca: &Path,
    cert: &(PathBuf, PathBuf),
    sink: SocketAddr,
    server_name: &str,
    extra: &[&str],
) -> (Daemon, SocketAddr) {
    let mut args: Vec<String> = vec![
        "--log-format".into(),
        "json".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--sink".into(),
        sink.to_string(),
        "--server-name".into(),
        server_name.into(),
        "--ca".into(),
        path(ca),
        "--cert".into(),
        path(&cert.0),
        "--key".into(),
        path(&cert.1),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let agent = Daemon::spawn("relay-agent", &args);
    let addr = agent_listen_addr(&agent);
    (agent, addr)
}

/// The UDP address an agent reported it receives on.
pub fn agent_listen_addr(agent: &Daemon) -> SocketAddr {
    let event = agent.wait_for("receiving sFlow");
    field(&event, "listen")
        .parse()
        .expect("listen address in log")
}

/// The address of a daemon's metrics endpoint (`--metrics-listen`), from its log.
pub fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    let event = daemon.wait_for("serving /metrics");
    field(&event, "metrics_listen")
        .parse()
        .expect("metrics address in log")
}

/// A path as a string argument.
pub fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

// === UdpCapture ===

/// Collects datagrams arriving on a loopback UDP port, on a thread of its own.
#[derive(Debug)]
pub struct UdpCapture {
    addr: SocketAddr,
    received: Collected<Vec<u8>>,
}

impl UdpCapture {
    /// Binds 127.0.0.1:0 and starts receiving. The thread ends with the test process.
    pub fn bind() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind capture");
        // As large as the kernel allows (net.core.rmem_max): replay comes in bursts.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(16 << 20);
        Self::start(socket)
    }

    /// A plain UDP socket on `addr`, with the kernel's default receive buffer, as a collector
    /// that was not tuned has. See [`kernel_drops`](Self::kernel_drops).
    pub fn bind_plain(addr: SocketAddr) -> Self {
        Self::start(UdpSocket::bind(addr).expect("bind capture"))
    }

    /// Datagrams the kernel dropped at this socket because its buffer was full.
    pub fn kernel_drops(&self) -> u64 {
        runtime::udp::kernel_drops(self.addr).expect("the socket in /proc/net/udp")
    }

    fn start(socket: UdpSocket) -> Self {
        let addr = socket.local_addr().expect("capture address");
        let received = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let store = received.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = socket.recv(&mut buf) {
                let (list, ready) = &*store;
                list.lock().unwrap().push(buf[..n].to_vec());
                ready.notify_all();
            }
        });
        Self { addr, received }
    }

    /// Where to send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The datagrams tagged `tag` ([`tag_of`]), in arrival order.
    pub fn tagged(&self, tag: u8) -> Vec<Vec<u8>> {
        self.received
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|d| tag_of(d) == Some(tag))
            .cloned()
            .collect()
    }

    /// Datagrams received so far.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received.0.lock().unwrap().clone()
    }

    /// How many datagrams tagged `tag` ([`tag_of`]) arrived.
    pub fn count_tagged(&self, tag: u8) -> usize {
        self.received
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|d| tag_of(d) == Some(tag))
            .count()
    }

    /// How many datagrams arrived.
    pub fn len(&self) -> usize {
        self.received.0.lock().unwrap().len()
    }

    /// Whether none arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `pred(received)` holds, or `timeout` passes; returns whether it held.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Vec<u8>]) -> bool) -> bool {
        wait_on(&self.received, timeout, |r| pred(r).then_some(())).is_some()
    }

    /// Asserts that exactly `sent` arrived, in order: waits for as many datagrams as were sent,
    /// gives a duplicate time to show up, then compares count and bytes.
    ///
    /// # Panics
    ///
    /// When datagrams are missing, extra, different or out of order.
    pub fn assert_exactly(&self, sent: &[Vec<u8>]) {
        assert!(
            self.wait_until(WAIT, |r| r.len() >= sent.len()),
            "only {} of {} arrived",
            self.len(),
            sent.len()
        );
        // Intentional: a duplicate, if any, gets time to show up before the count.
        std::thread::sleep(Duration::from_millis(200));
        let received = self.received();
        assert_eq!(
            received.len(),
            sent.len(),
            "count differs: duplicates or extras"
        );
        for (i, (got, want)) in received.iter().zip(sent).enumerate() {
            assert!(
                got == want,
                "datagram {i} differs (len {} vs {})",
                got.len(),
                want.len()
            );
        }
    }
}

// === Sending ===

/// The agent address of [`datagrams`] tagged `tag`: 198.18.`tag`.1, in the benchmarking
/// range (RFC 2544), which neither real agents nor [`sflow::SflowGen`] (192.0.2.x) use.
const TAG_AGENT: [u8; 2] = [198, 18];

/// Length of the smallest datagram [`datagrams`] makes: an sFlow v5 header with an IPv4
/// agent address and no samples.
pub const MIN_LEN: usize = proto::sflow::HEADER_LEN_IPV4;

/// Deterministic test datagrams: `n` payloads that read as sFlow v5 (the agent relays only
/// that by default), tagged so a capture can tell streams apart:
///
/// ```text
///  0  version 5          4  address type 1 (IPv4)    8  agent 198.18.TAG.1
/// 12  sub-agent 0       16  sequence: index + 1     20  uptime (ms)
/// 24  samples: 0        28  index (u32, big-endian), then seeded random bytes
/// ```
///
/// Sequence numbers run from 1 without gaps, so sFlow accounting sees one gapless stream per
/// tag. Sizes mostly near 1,400 bytes, with small ones (from [`MIN_LEN`], the bare header)
/// and large ones (up to 65,507 bytes, the IPv4 maximum) mixed in. [`tag_of`] and
/// [`index_of`] read tag and index back.
pub fn datagrams(n: usize, tag: u8, seed: u64) -> Vec<Vec<u8>> {
    datagrams_up_to(n, tag, seed, proto::MAX_DATAGRAM_LEN)
}

/// As [`datagrams`], with no datagram longer than `max_len` (the large ones take sizes from
/// a quarter of `max_len` up to `max_len`); `max_len` is at least [`MIN_LEN`].
pub fn datagrams_up_to(n: usize, tag: u8, seed: u64, max_len: usize) -> Vec<Vec<u8>> {
    let max_len = max_len.max(MIN_LEN);
    let large_min = (max_len / 4).max(MIN_LEN);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    (0..n)
        .map(|i| {
            let r = next();
            let len = match i {
                0 => MIN_LEN,
                1 => max_len,
                _ if i % 200 == 7 => large_min + (r % (max_len - large_min + 1) as u64) as usize,
                _ if i % 200 == 8 => max_len,
                _ if i % 10 == 3 => MIN_LEN + (r % 200) as usize,
                _ => 1_300 + (r % 200) as usize,
            }
            .min(max_len);
            let mut d = tagged_datagram(tag, i as u32, MIN_LEN + 4);
            d.reserve(len.saturating_sub(d.len()));
            while d.len() < len {
                d.extend_from_slice(&next().to_le_bytes());
            }
            d.truncate(len);
            d
        })
        .collect()
}

/// One datagram as [`datagrams`] makes them, `len` bytes long (at least [`MIN_LEN`]): the
/// header for `tag` and `index`, the index again (when `len` leaves room), then zeros for
/// the caller to fill.
pub fn tagged_datagram(tag: u8, index: u32, len: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(len.max(MIN_LEN));
    proto::sflow::Header {
        sequence: index.wrapping_add(1),
        uptime_ms: 3_600_000u32.wrapping_add(index),
        ..proto::sflow::Header::from_agent([TAG_AGENT[0], TAG_AGENT[1], tag, 1].into())
    }
    .write(&mut d);
    d.extend_from_slice(&index.to_be_bytes());
    d.resize(len.max(MIN_LEN), 0);
    d
}

/// The tag of a datagram made by [`datagrams`], or `None` for any other datagram.
pub fn tag_of(d: &[u8]) -> Option<u8> {
    let header = d.get(..MIN_LEN)?;
    let made_here = header[..8] == [0, 0, 0, 5, 0, 0, 0, 1]
        && header[8..10] == TAG_AGENT
        && header[11] == 1
        && header[12..16] == [0; 4];
    made_here.then_some(header[10])
}

/// The index of a datagram made by [`datagrams`] in its batch (its sequence number less
/// one), or `None` for any other datagram.
pub fn index_of(d: &[u8]) -> Option<u32> {
    tag_of(d)?;
    let sequence = u32::from_be_bytes(d[16..20].try_into().ok()?);
    Some(sequence.wrapping_sub(1))
}

/// Sends `datagrams` to `to` in order, keeping at most `window` datagrams (and about 128 KiB)
/// between what was sent and what `delivered()` reports as arrived. Fails when nothing
/// arrives for [`WAIT`].
pub fn send_paced(
    to: SocketAddr,
    datagrams: &[Vec<u8>],
    window: usize,
    delivered: impl Fn() -> usize,
) {
    const WINDOW_BYTES: usize = 128 * 1024;
    let socket = sender_for(to);
    let mut prefix = Vec::with_capacity(datagrams.len() + 1);
    prefix.push(0usize);
    for d in datagrams {
        prefix.push(prefix.last().unwrap() + d.len());
    }
    let mut last_progress = (0usize, Instant::now());
    for (i, d) in datagrams.iter().enumerate() {
        loop {
            let done = delivered().min(i);
            if done != last_progress.0 {
                last_progress = (done, Instant::now());
            }
            let in_flight = i - done;
            let bytes = prefix[i] - prefix[done];
            if in_flight == 0 || (in_flight < window && bytes + d.len() <= WINDOW_BYTES) {
                break;
            }
            assert!(
                last_progress.1.elapsed() < WAIT,
                "no progress for {WAIT:?}: {done} of {} delivered",
                datagrams.len()
            );
            // Pacing the sender: waiting for the window to open.
            std::thread::sleep(Duration::from_micros(200));
        }
        socket.send_to(d, to).expect("send datagram");
    }
}

/// Sends `datagrams` to `to` at `per_second`, whatever becomes of them (for tests whose path
/// is down part of the time, where pacing on delivery would stall).
pub fn send_at_rate(to: SocketAddr, datagrams: &[Vec<u8>], per_second: u32) {
    let socket = sender_for(to);
    let start = Instant::now();
    for (i, d) in datagrams.iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / f64::from(per_second));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            // Pacing the sender at `per_second`.
            std::thread::sleep(wait);
        }
        socket.send_to(d, to).expect("send datagram");
    }
}

/// A UDP socket to send to `to` from: on loopback for loopback, else on any address (a
/// network namespace's veth).
fn sender_for(to: SocketAddr) -> UdpSocket {
    let from: SocketAddr = match (to.ip().is_loopback(), to.is_ipv4()) {
        (true, true) => "127.0.0.1:0",
        (true, false) => "[::1]:0",
        (false, true) => "0.0.0.0:0",
        (false, false) => "[::]:0",
    }
    .parse()
    .expect("address");
    UdpSocket::bind(from).expect("bind sender")
}

/// Sends `datagrams` to `to` without pacing (for traffic whose delivery is not asserted).
pub fn send_all(to: SocketAddr, datagrams: &[Vec<u8>]) {
    let socket = sender_for(to);
    for d in datagrams {
        socket.send_to(d, to).expect("send datagram");
    }
}

/// Starts `left | right`: `left`'s stdout feeds `right`'s stdin; `right`'s stdout is
/// collected, and both stderrs.
pub fn pipe(mut left: Command, mut right: Command) -> (Daemon, Daemon) {
    left.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = left.spawn().expect("start the left side of the pipe");
    let stdout = child.stdout.take().expect("left stdout");
    let left = Daemon::adopt("left", child);
    right.stdin(Stdio::from(stdout)).stdout(Stdio::piped());
    (left, Daemon::start("right", right))
}

/// Waits until some process has a UDP socket bound to `addr`'s port (read from
/// `/proc/net/udp`), for peers that do not say when they are ready.
///
/// # Panics
///
/// After [`WAIT`].
pub fn wait_udp_bound(addr: SocketAddr) {
    wait_until(&format!("something bound UDP {addr}"), WAIT, || {
        runtime::udp::kernel_drops(addr)
    });
}

/// Calls `check` now and every 20 ms until it returns `Some`, and returns that: a bounded
/// wait on a condition that nothing signals (a file, a port, an HTTP answer, a process).
///
/// # Panics
///
/// After `timeout`, saying the test waited for `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "waited {timeout:?} for {what}");
        // Poll interval: nothing signals these conditions.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free loopback TCP port (bound, then released, so another program may take it first:
/// use only where nothing better exists). It remains for what cannot bind port 0 and report:
/// Prometheus (`prometheus.rs`) and sshd (`ssh_hex.rs`) must be told their port, and a test
/// may need a port nothing listens on (`prometheus_harness.rs`). Drawn as [`quiet_port`] says.
pub fn free_tcp_port() -> u16 {
    quiet_port("TCP", |at| std::net::TcpListener::bind(at).is_ok()).port()
}

/// A loopback port where a sink can listen later: free for both UDP (QUIC) and TCP (gRPC),
/// drawn as [`quiet_port`] says. For a sink address the agent must be given before the sink
/// starts (`observe.rs`).
pub fn free_sink_port() -> SocketAddr {
    quiet_port("UDP and TCP", |at| {
        UdpSocket::bind(at).is_ok() && std::net::TcpListener::bind(at).is_ok()
    })
}

/// A free loopback UDP port (bound, then released, so another program may take it first).
/// Everything that can binds port 0 and reports its address; this remains where that cannot
/// be: a port nothing listens on (a closed replay destination in `relay.rs` and `faults.rs`,
/// a sink that is not there in `observe.rs`), and programs that must be told their port (the
/// Python `sflow_fwd.py` collector in `ssh_hex.rs` and in the benchmark's paths). Drawn as
/// [`quiet_port`] says.
pub fn free_udp_port() -> SocketAddr {
    quiet_port("UDP", |at| UdpSocket::bind(at).is_ok())
}

/// A loopback port for which `free` holds, drawn at random below the kernel's ephemeral
/// range: every port-0 bind and outgoing connection of the tests running beside this one
/// takes its port from that range, so one drawn from it may be taken between the probe and
/// its use (CI once found a sink's TCP port so taken).
///
/// # Panics
///
/// When no such port is found in a bounded number of tries.
fn quiet_port(what: &str, free: impl Fn(SocketAddr) -> bool) -> SocketAddr {
    use rand::Rng;
    static EPHEMERAL_LOW: OnceLock<u16> = OnceLock::new();
    let ephemeral_low = *EPHEMERAL_LOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32_768)
    });
    let (low, high) = (10_000, ephemeral_low.max(10_001));
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let at = SocketAddr::from(([127, 0, 0, 1], rng.random_range(low..high)));
        if free(at) {
            return at;
        }
    }
    panic!("no loopback port free for {what} in {low}..{high}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_datagrams_read_as_sflow_and_carry_tag_and_index() {
        let sent = datagrams_up_to(1_000, 0xA1, 7, 9_000);
        assert_eq!(sent[0].len(), MIN_LEN);
        assert_eq!(sent[1].len(), 9_000);
        let mut tracker = proto::sflow::SequenceTracker::new(8);
        for (i, d) in sent.iter().enumerate() {
            assert!((MIN_LEN..=9_000).contains(&d.len()), "{i}: {}", d.len());
            let header = proto::sflow::parse_header(d).expect("sFlow v5");
            assert_eq!(header.agent.to_string(), "198.18.161.1");
            assert_eq!(header.sequence, i as u32 + 1);
            assert_eq!(header.samples, 0);
            let seen = tracker.observe(d);
            assert_eq!(
                (seen.missing, seen.late, seen.reset),
                (0, false, false),
                "{i}"
            );
            assert_eq!(tag_of(d), Some(0xA1));
            assert_eq!(index_of(d), Some(i as u32));
            if d.len() >= MIN_LEN + 4 {
                assert_eq!(d[MIN_LEN..MIN_LEN + 4], (i as u32).to_be_bytes());
            }
        }
        assert_eq!(
            datagrams_up_to(1_000, 0xA1, 7, 9_000),
            sent,
            "deterministic"
        );
        assert_ne!(datagrams_up_to(1_000, 0xA1, 8, 9_000), sent, "seeded");
        assert_eq!(tag_of(&sent[5][..MIN_LEN - 1]), None);
        assert_eq!(tag_of(&sflow::SflowGen::new(1, 1, 1).datagram()), None);
        assert_eq!(tag_of(b"\xA1 not sflow at all, not even close"), None);
        assert!(
            datagrams(300, 1, 1)
                .iter()
                .any(|d| d.len() == proto::MAX_DATAGRAM_LEN)
        );
    }
}
