//! The `--ssh-hex` mode: a drop-in for the `sflow_fwd.py` script that carries sFlow through
//! `ssh` as one line of lowercase hex per datagram. Both binaries offer it, with the script's
//! options and defaults:
//!
//! - without `-s`: the collector side. Receive UDP on (`-c` address, `-p` port, default all
//!   IPv4 addresses and 6343) and write each datagram to stdout as a hex line.
//! - with `-s HOST`: the server side. Read hex lines from stdin and send each as one UDP
//!   datagram to (HOST, `-p` port, default 6343). End of input ends the process with status 0.
//!
//! The line format is `relay_proto::wire::hex`'s. What this mode does not give: no buffering
//! across a broken ssh session, no acknowledgements, and hex doubles the bytes on the wire.
//! The QUIC relay exists for that.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use proto::wire::hex::{Line, LineDecoder, encode_line};
use serde::{Deserialize, Serialize};

use crate::ratelimit::RateLimit;
use crate::udp::{self, Buffers};

/// The script's default port, for both sides.
pub const DEFAULT_PORT: u16 = 6343;
/// Hex waiting for stdout beyond this is dropped (and counted) rather than buffered without
/// bound: a stalled ssh must not grow the process until the kernel kills it.
const MAX_PENDING: usize = 16 * 1024 * 1024;
/// Hex taken from the socket per wake-up of the writer, at most.
const BURST_BYTES: usize = 1 << 20;
/// The first malformed lines are each reported; past this many, one report per interval.
const REPORT_EACH: u64 = 1000;

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
    /// Datagrams dropped because stdout could not keep up.
    pub dropped: AtomicU64,
    /// Malformed lines skipped.
    pub malformed: AtomicU64,
    /// Datagrams the UDP socket refused to send.
    pub send_errors: AtomicU64,
}

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

/// Runs the side `opts` asks for on the process's stdin or stdout.
///
/// # Errors
///
/// [`SshHexError`]; the collector side returns only on an error.
pub fn run(
    opts: &SshHexOptions,
    recv_buffer: usize,
    counters: &Counters,
) -> Result<(), SshHexError> {
    match &opts.server {
        Some(_) => grow_pipe(&io::stdin()),
        None => grow_pipe(&io::stdout()),
    }
    match &opts.server {
        Some(server) => serve(
            server,
            opts.port.unwrap_or(DEFAULT_PORT),
            io::stdin().lock(),
            counters,
        ),
        None => {
            let host = opts
                .collector
                .as_deref()
                .filter(|c| !c.is_empty())
                .unwrap_or("0.0.0.0");
            let addr = resolve(host, opts.port.unwrap_or(DEFAULT_PORT))?;
            collect(addr, recv_buffer, io::stdout(), counters)
        }
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

fn resolve(host: &str, port: u16) -> Result<SocketAddr, SshHexError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| SshHexError::Resolve(host.to_owned(), e.to_string()))?
        .next()
        .ok_or_else(|| SshHexError::Resolve(host.to_owned(), "no address".into()))
}

// === collector side ===

#[derive(Debug, Default)]
struct Pending {
    hex: Vec<u8>,
    failed: Option<String>,
}

/// Receives datagrams on `addr` and writes them to `out` as hex lines until writing fails.
///
/// A writer thread takes whatever accumulated while it wrote the last chunk, so a lone
/// datagram leaves at once, and at high rates many lines share one write.
///
/// # Errors
///
/// [`SshHexError::Socket`] when `addr` cannot be bound, [`SshHexError::StdoutClosed`] when
/// `out` fails.
pub fn collect<W: Write + Send + 'static>(
    addr: SocketAddr,
    recv_buffer: usize,
    mut out: W,
    counters: &Counters,
) -> Result<(), SshHexError> {
    let socket = udp::bind(
        addr,
        Buffers {
            recv: Some(recv_buffer),
            send: None,
        },
    )
    .and_then(|s| s.set_nonblocking(false).map(|()| s))
    .map_err(|e| SshHexError::Socket(addr.to_string(), e))?;
    tracing::info!(listen = %socket.local_addr().map_or(addr, |a| a), "ssh-hex: writing received datagrams to stdout as hex lines");
    let shared = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
    let writer = {
        let shared = shared.clone();
        std::thread::spawn(move || -> io::Error {
            let mut chunk = Vec::with_capacity(1 << 20);
            loop {
                {
                    let (lock, ready) = &*shared;
                    let mut pending = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while pending.hex.is_empty() {
                        pending = ready.wait(pending).unwrap_or_else(|e| e.into_inner());
                    }
                    std::mem::swap(&mut pending.hex, &mut chunk);
                }
                if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
                    shared.0.lock().unwrap_or_else(|e| e.into_inner()).failed = Some(e.to_string());
                    return e;
                }
                chunk.clear();
            }
        })
    };
    // The blocking wait wakes at least once a second, so a failed stdout ends the process
    // even when no datagram arrives.
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| SshHexError::Socket(addr.to_string(), e))?;
    let mut scratch = vec![0u8; 65_536];
    let mut burst = Vec::with_capacity(BURST_BYTES + 2 * scratch.len());
    let full = RateLimit::new(Duration::from_secs(10));
    loop {
        // Wait for one datagram, then take whatever else is queued without waiting, and wake
        // the writer once for the lot: one wake-up per burst, not per datagram.
        let n = match socket.recv_from(&mut scratch) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if shared
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .failed
                    .is_some()
                {
                    return Err(closed(writer, counters));
                }
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "receive error");
                continue;
            }
        };
        burst.clear();
        encode_line(&scratch[..n], &mut burst);
        let mut count = 1u64;
        if socket.set_nonblocking(true).is_ok() {
            while burst.len() < BURST_BYTES {
                let Ok((n, _)) = socket.recv_from(&mut scratch) else {
                    break;
                };
                encode_line(&scratch[..n], &mut burst);
                count += 1;
            }
            let _ = socket.set_nonblocking(false);
        }
        counters.datagrams.fetch_add(count, Ordering::Relaxed);
        let (lock, ready) = &*shared;
        let mut pending = lock.lock().unwrap_or_else(|e| e.into_inner());
        if pending.failed.is_some() {
            drop(pending);
            return Err(closed(writer, counters));
        }
        if pending.hex.len() > MAX_PENDING {
            counters.dropped.fetch_add(count, Ordering::Relaxed);
            if let Some(more) = full.check() {
                tracing::warn!(
                    dropped = count,
                    earlier_drops_not_logged = more,
                    "stdout cannot keep up: datagrams dropped"
                );
            }
            continue;
        }
        pending.hex.extend_from_slice(&burst);
        ready.notify_one();
    }
}

/// The error for a failed stdout, after the writer thread has ended.
fn closed(writer: std::thread::JoinHandle<io::Error>, counters: &Counters) -> SshHexError {
    let error = writer
        .join()
        .unwrap_or_else(|_| io::Error::other("writer thread panicked"));
    tracing::error!(
        datagrams = counters.datagrams.load(Ordering::Relaxed),
        dropped = counters.dropped.load(Ordering::Relaxed),
        "ssh-hex: stdout closed; exiting"
    );
    SshHexError::StdoutClosed(error)
}

// === server side ===

/// Reads hex lines from `input` and sends each datagram to (`host`, `port`), until end of
/// input. Malformed lines are reported (with their line number), counted and skipped.
///
/// # Errors
///
/// When the destination does not resolve, the socket cannot be made, or reading fails.
pub fn serve<R: Read>(
    host: &str,
    port: u16,
    mut input: R,
    counters: &Counters,
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
    let reports = RateLimit::new(Duration::from_secs(10));
    let send_errors = RateLimit::new(Duration::from_secs(10));
    let handle = |line: Option<Line<'_>>| match line {
        None => {}
        Some(Line::Datagram(datagram)) => {
            counters.datagrams.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = socket.send(datagram) {
                counters.send_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = send_errors.check() {
                    tracing::warn!(destination = %dest, %error, earlier_errors_not_logged = more, "send failed; datagram dropped");
                }
            }
        }
        Some(Line::Malformed { line, error }) => {
            let seen = counters.malformed.fetch_add(1, Ordering::Relaxed) + 1;
            if seen <= REPORT_EACH {
                tracing::warn!(line, reason = %error, "malformed line skipped");
            } else if let Some(more) = reports.check() {
                tracing::warn!(line, reason = %error, earlier_reports_not_logged = more, "malformed line skipped");
            }
        }
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SshHexError::Stdin(e)),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let (used, line) = decoder.decode(rest);
            handle(line);
            rest = &rest[used..];
        }
    }
    handle(decoder.finish());
    tracing::info!(
        lines = decoder.lines(),
        datagrams = counters.datagrams.load(Ordering::Relaxed),
        malformed = counters.malformed.load(Ordering::Relaxed),
        send_errors = counters.send_errors.load(Ordering::Relaxed),
        "ssh-hex: end of input"
    );
    Ok(())
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
        serve("127.0.0.1", port, &input[..], &counters).unwrap();
        let mut buf = [0u8; 16];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[1, 2]);
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0xab, 0xcd]);
        assert_eq!(counters.datagrams.load(Ordering::Relaxed), 2);
        assert_eq!(counters.malformed.load(Ordering::Relaxed), 2);
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
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
        let err = collect(addr, 1 << 20, ClosedPipe, &counters).unwrap_err();
        stop.store(true, Ordering::Relaxed);
        feeder.join().unwrap();
        assert!(matches!(err, SshHexError::StdoutClosed(_)), "{err}");
        assert!(err.to_string().contains("ssh session ended"), "{err}");
    }
}
