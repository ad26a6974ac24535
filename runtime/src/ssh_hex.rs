//! The `--ssh-hex` mode: a drop-in for the `sflow_fwd.py` script that carries sFlow through
//! `ssh` as one line of lowercase hex per datagram. Both binaries offer it, with the script's
//! options and defaults:
//!
//! - without `-s`: the collector side. Receive UDP on (`-c` address, `-p` port, default all
//!   IPv4 addresses and 6343) and write each datagram to stdout as a hex line.
//! - with `-s HOST`: the server side. Read hex lines from stdin and send each as one UDP
//!   datagram to (HOST, `-p` port, default 6343). End of input ends the process with status 0.
//!
//! The collector side relays only what the [`Admission`] it is given admits: the agent's
//! `--accept` and `--allow-sources` apply here as on the relay's own receive path (the
//! sink's collector admits everything). The line format is `relay_proto::wire::hex`'s. What this mode does not give: no buffering
//! across a broken ssh session, no acknowledgements, and hex doubles the bytes on the wire.
//! The QUIC relay exists for that.
//!
//! Both sides spot sFlow datagrams whose samples run past their end (the original script's
//! collector cuts datagrams to 2,048 bytes), count them and warn (at most once per 10 s,
//! [`Truncation`]); they still pass them on as they are. Both end on SIGTERM or SIGINT with
//! status 0 and a summary line of their counts, as the normal modes do: [`run`] takes the
//! signals in a thread of its own ([`Stop`]), and each side looks at it at least every
//! [`STOP_CHECK`] between datagrams, so no line is left half written.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use proto::sflow::parse_header;
use proto::wire::hex::{Line, LineDecoder, encode_line};
use serde::{Deserialize, Serialize};

use crate::accounting::Truncation;
use crate::admission::{Admission, Verdict};
use crate::ratelimit::RateLimit;
use crate::udp::{self, Buffers};

/// The script's default port, for both sides.
pub const DEFAULT_PORT: u16 = 6343;
/// Datagrams sent per system call (sendmmsg), at most.
const SEND_BATCH: usize = 64;
/// How often the kernel's drop count for the receive socket is read.
const DROP_CHECK: Duration = Duration::from_secs(5);
/// The source of a datagram the kernel gave no address for: no prefix but `0.0.0.0/0` (or
/// `::/0`) admits it.
const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
/// Hex written per call, at most (then the socket is read again).
const BURST_BYTES: usize = 1 << 20;
/// The first malformed lines are each reported; past this many, one report per interval.
const REPORT_EACH: u64 = 1000;
/// The longest either side waits for input before it looks at [`Stop`] again.
pub const STOP_CHECK: Duration = Duration::from_millis(100);
/// How long a side has, after the signal, to finish what it is writing (a write to a stalled
/// ssh session can block): then the process exits all the same, with status 0.
const STOP_GRACE: Duration = crate::daemon::DEFAULT_SHUTDOWN_GRACE;

/// Options of the `--ssh-hex` mode (flags and config keys of both binaries).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SshHexOptions {
    /// Compatibility with the `sflow_fwd.py | ssh` pipe: UDP to hex lines on stdout, or with
    /// -s, hex lines on stdin to UDP. Takes the script's -c, -s and -p.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssh_hex: bool,
    /// --ssh-hex: address to receive sFlow on (the script's -c/--collector). [default: all IPv4 addresses]
    #[arg(short = 'c', long, value_name = "ADDR", requires = "ssh_hex")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// --ssh-hex: read hex lines from stdin and send them as UDP to this host (the script's
    /// -s/--server).
    #[arg(short = 's', long, value_name = "HOST", requires = "ssh_hex")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// --ssh-hex: UDP port to receive on, or to send to with -s (the script's -p/--port). [default: 6343]
    #[arg(short = 'p', long, value_name = "PORT", requires = "ssh_hex")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl SshHexOptions {
    /// The script's options make sense only with `--ssh-hex` (clap checks the command line;
    /// this checks what a config file set).
    ///
    /// # Errors
    ///
    /// A message naming the stray option.
    pub fn check(&self) -> Result<(), String> {
        if !self.ssh_hex {
            for (set, name) in [
                (self.collector.is_some(), "collector"),
                (self.server.is_some(), "server"),
                (self.port.is_some(), "port"),
            ] {
                if set {
                    return Err(format!(
                        "`{name}` applies only with ssh-hex = true (--ssh-hex)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Counters of an ssh-hex run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received (collector side) or lines decoded (server side).
    pub datagrams: AtomicU64,
    /// Datagrams the kernel dropped on the collector's full socket buffer (stdout too slow).
    pub dropped: AtomicU64,
    /// Datagrams the collector received and did not write: not sFlow, or from a source
    /// outside the allowed ones (see [`Admission`]).
    pub refused: AtomicU64,
    /// Malformed lines skipped.
    pub malformed: AtomicU64,
    /// Datagrams the UDP socket refused to send.
    pub send_errors: AtomicU64,
    /// sFlow datagrams whose samples run past their end (cut on the way), passed on as they
    /// are.
    pub truncated: AtomicU64,
}

/// Whether SIGTERM or SIGINT has come: set by the thread [`Stop::on_signals`] starts, read by
/// the loops of both sides.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

/// Errors that end the mode.
#[derive(Debug, thiserror::Error)]
pub enum SshHexError {
    /// The UDP socket could not be set up.
    #[error("cannot use UDP {0}: {1}")]
    Socket(String, io::Error),
    /// The destination host does not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    /// stdout was closed (the ssh session ended).
    #[error("stdout closed ({0}): the ssh session ended or the reader exited")]
    StdoutClosed(io::Error),
    /// Reading stdin failed.
    #[error("cannot read stdin: {0}")]
    Stdin(io::Error),
}

/// Runs the side `opts` asks for on the process's stdin or stdout; the collector side writes
/// what `admission` admits. Takes SIGTERM and SIGINT ([`Stop::on_signals`]), so call it before
/// any other thread is started.
///
/// # Errors
///
/// [`SshHexError`]; the collector side returns `Ok` only on a signal, the server side on a
/// signal or at the end of its input.
pub fn run(
    opts: &SshHexOptions,
    recv_buffer: usize,
    admission: &Admission,
    counters: &Counters,
) -> Result<(), SshHexError> {
    let stop = Stop::on_signals();
    match &opts.server {
        Some(_) => grow_pipe(&io::stdin()),
        None => {
            grow_pipe(&io::stdout());
            watch_stdout();
        }
    }
    match &opts.server {
        Some(server) => serve(
            server,
            opts.port.unwrap_or(DEFAULT_PORT),
            StopRead { stdin: io::stdin() },
            counters,
            &stop,
        ),
        None => {
            let host = opts
                .collector
                .as_deref()
                .filter(|c| !c.is_empty())
                .unwrap_or("0.0.0.0");
            let addr = resolve(host, opts.port.unwrap_or(DEFAULT_PORT))?;
            collect(addr, recv_buffer, admission, io::stdout(), counters, &stop)
        }
    }
}

// === impl Stop ===

impl Stop {
    /// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread it starts
    /// from now on) and starts a thread that waits for them: the first sets the flag, and if
    /// the process is still there [`STOP_GRACE`] later, it exits with status 0. Without the
    /// signals blocked (they could not be), the default action stays: the process dies on
    /// them, as before.
    pub fn on_signals() -> Self {
        use nix::sys::signal::{SigSet, Signal};
        let stop = Self::default();
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGTERM);
        signals.add(Signal::SIGINT);
        if let Err(error) = signals.thread_block() {
            tracing::warn!(%error, "ssh-hex: cannot take SIGTERM and SIGINT; they end the process at once");
            return stop;
        }
        let flag = stop.clone();
        std::thread::spawn(move || {
            let Ok(signal) = signals.wait() else { return };
            tracing::info!(signal = signal.as_str(), "shutting down");
            flag.0.store(true, Ordering::Relaxed);
            std::thread::sleep(STOP_GRACE);
            tracing::warn!(grace = ?STOP_GRACE, "ssh-hex: still busy after the shutdown grace (a write to a stalled stdout?); exiting");
            std::process::exit(0);
        });
        stop
    }

    /// Whether a signal has come.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the flag, as a signal does (for callers that stop the mode themselves).
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// stdin, read only once poll says there is something (or the end), so that a read returns
/// within [`STOP_CHECK`] with `TimedOut` when nothing comes, and the server looks at [`Stop`].
struct StopRead {
    stdin: io::Stdin,
}

impl Read for StopRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let timeout = PollTimeout::try_from(STOP_CHECK).unwrap_or(PollTimeout::NONE);
        let ready = {
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&self.stdin),
                PollFlags::POLLIN,
            )];
            poll(&mut fds, timeout).map_err(io::Error::from)?
        };
        if ready == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        // Readable, at its end, or in error: a read says which without blocking. The raw
        // descriptor, not Stdin's buffer, which could hold bytes that poll does not see.
        nix::unistd::read(&self.stdin, buf).map_err(io::Error::from)
    }
}

/// Pipe capacity asked for on stdin or stdout when it is a pipe: 1 MiB (Linux's limit for
/// unprivileged processes, /proc/sys/fs/pipe-max-size) instead of the default 64 KiB, so
/// writer and reader hand over hundreds of lines per wake-up instead of about twenty.
const PIPE_SIZE: i32 = 1 << 20;

fn grow_pipe(fd: &impl std::os::fd::AsFd) {
    use nix::fcntl::{FcntlArg, fcntl};
    match fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        Ok(size) => tracing::debug!(size, "pipe capacity set"),
        // Not a pipe (a file, a terminal, an ssh channel's socket): nothing to do.
        Err(error) => tracing::debug!(%error, "pipe capacity left as it is"),
    }
}

/// Ends the process as soon as the reader of stdout goes away (ssh exited), even when no
/// datagram arrives to find out by writing: the service manager then restarts the tunnel.
fn watch_stdout() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    std::thread::spawn(|| {
        let stdout = io::stdout();
        loop {
            // No events asked for: poll reports only POLLERR and POLLHUP, which a pipe's write
            // end gets when its read end is closed.
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&stdout),
                PollFlags::empty(),
            )];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(n) if n > 0 => {
                    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
                    if revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
                        tracing::error!(
                            "ssh-hex: stdout closed (the ssh session ended or the reader exited); exiting"
                        );
                        std::process::exit(1);
                    }
                    if revents.contains(PollFlags::POLLNVAL) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    });
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, SshHexError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| SshHexError::Resolve(host.to_owned(), e.to_string()))?
        .next()
        .ok_or_else(|| SshHexError::Resolve(host.to_owned(), "no address".into()))
}

// === collector side ===

/// Receives datagrams on `addr` and writes those `admission` admits to `out` as hex lines,
/// until `stop` is set (then it logs its counts and returns `Ok`) or writing fails. The others
/// are counted (`refused`) and logged, one warning per 10 s at most; so are sFlow datagrams
/// cut short (`truncated`), which are written all the same.
///
/// One thread: wait for a datagram, take every other one already queued without waiting,
/// and write the lot in one call. A lone datagram leaves at once; under load, datagrams that
/// arrive during a write share the next one, so the cost per datagram falls as the rate
/// rises. While a write waits on a slow reader (ssh), the socket's kernel buffer holds the
/// arrivals; what overflows it the kernel drops, and this loop reports those drops (from
/// `/proc/net/udp`) as they grow.
///
/// # Errors
///
/// [`SshHexError::Socket`] when `addr` cannot be bound, [`SshHexError::StdoutClosed`] when
/// `out` fails.
pub fn collect<W: Write>(
    addr: SocketAddr,
    recv_buffer: usize,
    admission: &Admission,
    mut out: W,
    counters: &Counters,
    stop: &Stop,
) -> Result<(), SshHexError> {
    let socket = udp::bind(
        addr,
        Buffers {
            recv: Some(recv_buffer),
            send: None,
        },
    )
    .and_then(|s| s.set_nonblocking(false).map(|()| s))
    // A blocked receive gives up after STOP_CHECK, to look at `stop`.
    .and_then(|s| s.set_read_timeout(Some(STOP_CHECK)).map(|()| s))
    .map_err(|e| SshHexError::Socket(addr.to_string(), e))?;
    let local = socket.local_addr().unwrap_or(addr);
    tracing::info!(listen = %local, "ssh-hex: writing received datagrams to stdout as hex lines");
    let mut collector = Collector {
        socket,
        admission,
        counters,
        slots: udp::RecvBatch::default(),
        burst: Vec::with_capacity(BURST_BYTES),
        refusals: RateLimit::new(Duration::from_secs(10)),
        truncation: Truncation::new(),
        kernel_drops: KernelDrops::new(local),
    };
    while !stop.is_set() {
        let count = collector.receive_burst();
        if count == 0 {
            continue;
        }
        counters.datagrams.fetch_add(count, Ordering::Relaxed);
        if let Err(error) = out.write_all(&collector.burst).and_then(|()| out.flush()) {
            tracing::error!(
                datagrams = counters.datagrams.load(Ordering::Relaxed),
                refused = counters.refused.load(Ordering::Relaxed),
                "ssh-hex: stdout closed; exiting"
            );
            return Err(SshHexError::StdoutClosed(error));
        }
        collector.kernel_drops.check(counters);
    }
    tracing::info!(
        datagrams = counters.datagrams.load(Ordering::Relaxed),
        refused = counters.refused.load(Ordering::Relaxed),
        truncated = counters.truncated.load(Ordering::Relaxed),
        dropped = counters.dropped.load(Ordering::Relaxed),
        "ssh-hex: stopped"
    );
    Ok(())
}

/// The collector's receiving half: the socket, and the hex lines of the current burst.
struct Collector<'a> {
    socket: UdpSocket,
    admission: &'a Admission,
    counters: &'a Counters,
    slots: udp::RecvBatch,
    /// Hex lines of the admitted datagrams of the current burst, written out in one call.
    burst: Vec<u8>,
    refusals: RateLimit,
    truncation: Truncation,
    kernel_drops: KernelDrops,
}

impl Collector<'_> {
    /// Waits for a datagram and takes the others already queued (recvmmsg), as long as a
    /// full batch keeps coming, encoding the admitted ones into `burst`. Returns how many
    /// datagrams were received (admitted or not).
    fn receive_burst(&mut self) -> u64 {
        self.burst.clear();
        let mut count = 0u64;
        let mut wait = true;
        loop {
            let n = match self.slots.recv(&self.socket, wait) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "receive error");
                    break;
                }
            };
            for i in 0..n {
                self.admit(i);
            }
            count += n as u64;
            if n < udp::RECV_BATCH || self.burst.len() >= BURST_BYTES {
                break;
            }
            wait = false;
        }
        count
    }

    /// Encodes datagram `i` of the received batch, or counts and logs its refusal.
    fn admit(&mut self, i: usize) {
        let datagram = self.slots.datagram(i);
        let source = self.slots.source(i).unwrap_or(UNSPECIFIED);
        match self.admission.check(source, datagram) {
            Verdict::Relay(header) => {
                if let Ok(header) = header
                    && self.truncation.check(&header, datagram)
                {
                    self.counters.truncated.fetch_add(1, Ordering::Relaxed);
                }
                encode_line(datagram, &mut self.burst);
            }
            refused => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = self.refusals.check() {
                    tracing::warn!(
                        %source,
                        len = datagram.len(),
                        reason = refused.reason().unwrap_or_default(),
                        earlier_drops_not_logged = more,
                        "ssh-hex: datagram dropped (see --accept and --allow-sources)"
                    );
                }
            }
        }
    }
}

/// The kernel's count of datagrams dropped on the collector's full receive buffer, read from
/// `/proc/net/udp` at most every [`DROP_CHECK`]; growth is counted and logged.
struct KernelDrops {
    local: SocketAddr,
    seen: u64,
    checked: std::time::Instant,
}

impl KernelDrops {
    fn new(local: SocketAddr) -> Self {
        Self {
            local,
            seen: udp::kernel_drops(local).unwrap_or(0),
            checked: std::time::Instant::now(),
        }
    }

    fn check(&mut self, counters: &Counters) {
        if self.checked.elapsed() < DROP_CHECK {
            return;
        }
        self.checked = std::time::Instant::now();
        if let Some(now) = udp::kernel_drops(self.local) {
            if now > self.seen {
                counters
                    .dropped
                    .fetch_add(now - self.seen, Ordering::Relaxed);
                tracing::warn!(
                    dropped = now - self.seen,
                    total = now,
                    "socket receive buffer overflowed (stdout too slow, or the process starved): datagrams dropped by the kernel"
                );
            }
            self.seen = now;
        }
    }
}

// === server side ===

/// Reads hex lines from `input` and sends each datagram to (`host`, `port`), until end of
/// input or until `stop` is set (looked at whenever a read returns, `TimedOut` included); then
/// logs its counts. Malformed lines are reported (with their line number), counted and
/// skipped; sFlow datagrams cut short are counted, reported and sent as they are.
///
/// # Errors
///
/// When the destination does not resolve, the socket cannot be made, or reading fails.
pub fn serve<R: Read>(
    host: &str,
    port: u16,
    mut input: R,
    counters: &Counters,
    stop: &Stop,
) -> Result<(), SshHexError> {
    let dest = resolve(host, port)?;
    let local: SocketAddr = if dest.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local)
        .and_then(|s| s.connect(dest).map(|()| s))
        .map_err(|e| SshHexError::Socket(dest.to_string(), e))?;
    tracing::info!(destination = %dest, "ssh-hex: sending hex lines from stdin as UDP datagrams");
    let mut decoder = LineDecoder::new(proto::MAX_DATAGRAM_LEN);
    let mut buf = vec![0u8; PIPE_SIZE as usize];
    let mut sender = Sender {
        socket,
        dest,
        counters,
        batch: Vec::with_capacity(buf.len()),
        ends: Vec::with_capacity(SEND_BATCH),
        reports: RateLimit::new(Duration::from_secs(10)),
        send_errors: RateLimit::new(Duration::from_secs(10)),
        truncation: Truncation::new(),
    };
    let mut stopped = false;
    loop {
        if stop.is_set() {
            stopped = true;
            break;
        }
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(SshHexError::Stdin(e)),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let (used, line) = decoder.decode(rest);
            sender.handle(line);
            rest = &rest[used..];
        }
        sender.flush();
    }
    // At a signal, a line still without its end is incomplete: it is not sent.
    if !stopped {
        sender.handle(decoder.finish());
        sender.flush();
    }
    let (lines, datagrams) = (decoder.lines(), counters.datagrams.load(Ordering::Relaxed));
    let malformed = counters.malformed.load(Ordering::Relaxed);
    let truncated = counters.truncated.load(Ordering::Relaxed);
    let send_errors = counters.send_errors.load(Ordering::Relaxed);
    if stopped {
        tracing::info!(
            lines,
            datagrams,
            malformed,
            truncated,
            send_errors,
            "ssh-hex: stopped"
        );
    } else {
        tracing::info!(
            lines,
            datagrams,
            malformed,
            truncated,
            send_errors,
            "ssh-hex: end of input"
        );
    }
    Ok(())
}

/// The server's sending half. Decoded datagrams wait in `batch` (back to back, with their end
/// offsets in `ends`) and leave together, many per system call, after each read: nothing
/// waits for more input.
struct Sender<'a> {
    socket: UdpSocket,
    dest: SocketAddr,
    counters: &'a Counters,
    batch: Vec<u8>,
    ends: Vec<usize>,
    reports: RateLimit,
    send_errors: RateLimit,
    truncation: Truncation,
}

impl Sender<'_> {
    /// Queues a decoded datagram (sending the batch when it is full), or counts and reports a
    /// malformed line.
    fn handle(&mut self, line: Option<Line<'_>>) {
        match line {
            None => {}
            Some(Line::Datagram(datagram)) => {
                self.counters.datagrams.fetch_add(1, Ordering::Relaxed);
                if let Ok(header) = parse_header(datagram)
                    && self.truncation.check(&header, datagram)
                {
                    self.counters.truncated.fetch_add(1, Ordering::Relaxed);
                }
                self.batch.extend_from_slice(datagram);
                self.ends.push(self.batch.len());
                if self.ends.len() == SEND_BATCH {
                    self.flush();
                }
            }
            Some(Line::Malformed { line, error }) => {
                let seen = self.counters.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                if seen <= REPORT_EACH {
                    tracing::warn!(line, reason = %error, "malformed line skipped");
                } else if let Some(more) = self.reports.check() {
                    tracing::warn!(line, reason = %error, earlier_reports_not_logged = more, "malformed line skipped");
                }
            }
        }
    }

    /// Sends the queued datagrams; a failed send is counted and logged, and the rest go on.
    fn flush(&mut self) {
        let mut start = 0;
        let datagrams: Vec<&[u8]> = self
            .ends
            .iter()
            .map(|&end| {
                let d = &self.batch[start..end];
                start = end;
                d
            })
            .collect();
        let (counters, send_errors, dest) = (self.counters, &self.send_errors, self.dest);
        udp::send_batch(&self.socket, &datagrams, |datagram, error| {
            counters.send_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(more) = send_errors.check() {
                tracing::warn!(destination = %dest, %error, len = datagram.len(), earlier_errors_not_logged = more, "send failed; datagram dropped");
            }
        });
        self.batch.clear();
        self.ends.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_sends_good_lines_and_counts_bad_ones() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let port = receiver.local_addr().unwrap().port();
        let input = b"0102\nzz\n\nABCD\r\n0\n".to_vec();
        let counters = Counters::default();
        serve("127.0.0.1", port, &input[..], &counters, &Stop::default()).unwrap();
        let mut buf = [0u8; 16];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[1, 2]);
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0xab, 0xcd]);
        assert_eq!(counters.datagrams.load(Ordering::Relaxed), 2);
        assert_eq!(counters.malformed.load(Ordering::Relaxed), 2);
    }

    /// An sFlow v5 datagram of one 1,000-byte sample (skipped by its length), cut to `len`.
    fn sflow_cut_to(len: usize) -> Vec<u8> {
        let mut d = proto::sflow::Header {
            samples: 1,
            ..proto::sflow::Header::from_agent([192, 0, 2, 9].into())
        }
        .to_bytes();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&992u32.to_be_bytes());
        d.extend_from_slice(&[0x5a; 992]);
        d.truncate(len);
        d
    }

    #[test]
    fn serve_counts_a_cut_sflow_datagram_and_sends_it_as_it_is() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let port = receiver.local_addr().unwrap().port();
        let (whole, cut) = (sflow_cut_to(usize::MAX), sflow_cut_to(600));
        let mut input = Vec::new();
        for d in [&whole, &cut] {
            encode_line(d, &mut input);
        }
        let counters = Counters::default();
        serve("127.0.0.1", port, &input[..], &counters, &Stop::default()).unwrap();
        let mut buf = [0u8; 2048];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &whole[..]);
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &cut[..], "sent as it is");
        assert_eq!(counters.datagrams.load(Ordering::Relaxed), 2);
        assert_eq!(counters.truncated.load(Ordering::Relaxed), 1);
    }

    /// A reader with nothing to say yet, as stdin is between lines.
    struct Quiet;
    impl Read for Quiet {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(5));
            Err(io::ErrorKind::TimedOut.into())
        }
    }

    #[test]
    fn both_sides_end_with_ok_once_stop_is_set() {
        let stop = Stop::default();
        let counters = Counters::default();
        let setter = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                stop.set();
            })
        };
        serve("127.0.0.1", 9, Quiet, &counters, &stop).expect("stopped, not failed");
        setter.join().unwrap();
        // The collector, with nothing arriving, looks at `stop` every STOP_CHECK.
        let started = std::time::Instant::now();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        collect(
            addr,
            1 << 20,
            &Admission::default(),
            io::sink(),
            &counters,
            &stop,
        )
        .expect("stopped, not failed");
        assert!(started.elapsed() < STOP_CHECK * 5);
    }

    /// A writer that fails like a pipe whose reader went away.
    struct ClosedPipe;
    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn collect_ends_with_an_error_when_stdout_closes() {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let feeder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for _ in 0..500 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = sender.send_to(b"x", addr);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let counters = Counters::default();
        let err = collect(
            addr,
            1 << 20,
            &Admission::default(),
            ClosedPipe,
            &counters,
            &Stop::default(),
        )
        .unwrap_err();
        stop.store(true, Ordering::Relaxed);
        feeder.join().unwrap();
        assert!(matches!(err, SshHexError::StdoutClosed(_)), "{err}");
        assert!(err.to_string().contains("ssh session ended"), "{err}");
    }
}
