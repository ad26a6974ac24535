//! The load: a paced generator that says what rate it really offered, and a receiver that
//! counts arrivals (and, when asked, records who arrived when).
//!
//! Both run on a machine with two cores shared with the path under test, so both are made
//! cheap: the generator sends up to [`BATCH`] datagrams per system call (sendmmsg) and the
//! receiver takes up to [`BATCH`] per call (recvmmsg).

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, setsockopt, sockopt,
};
use relay_tests::sflow::stream_position;

/// Datagrams per sendmmsg or recvmmsg call at most.
pub(crate) const BATCH: usize = 64;

/// A trial whose generator achieved less than this share of its target rate was not offered
/// the target: it counts as a failure.
pub(crate) const OFFERED_MIN: f64 = 0.95;

/// (sFlow agent address, sub-agent, sequence number): one datagram's identity.
pub(crate) type Key = (Ipv4Addr, u32, u32);

/// What a generator run sent, and over how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offered {
    /// Datagrams sent.
    pub(crate) sent: u64,
    /// From the first send to the last.
    pub(crate) seconds: f64,
}

impl Offered {
    /// The rate really offered, datagrams per second.
    pub(crate) fn rate(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-9)
    }
}

/// A socket connected to `to`, with a send buffer past net.core.wmem_max where allowed (the
/// generator's buffer is not what is measured).
pub(crate) fn sender(to: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind generator");
    if setsockopt(&socket, sockopt::SndBufForce, &(8 << 20)).is_err() {
        let _ = socket2::SockRef::from(&socket).set_send_buffer_size(8 << 20);
    }
    socket.connect(to).expect("connect generator");
    socket
}

/// Sends from `pool` (cycling) to `to` at `rate` per second for `length`: `rate × length`
/// datagrams, each due at its own instant, those due sent together (short sleeps keep
/// bursts to about 50 µs of traffic, as traffic from many switches is smooth rather than
/// lumped). When the generator falls behind it carries on until all are sent; the
/// [`Offered`] rate tells.
pub(crate) fn send_at(pool: &[Vec<u8>], to: SocketAddr, rate: u64, length: Duration) -> Offered {
    let socket = sender(to);
    let fd = socket.as_raw_fd();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let addrs = [None::<SockaddrStorage>; BATCH];
    let total = (rate as f64 * length.as_secs_f64()) as u64;
    let per_second = rate as f64;
    let mut sent = 0u64;
    let mut errors = 0u32;
    let start = Instant::now();
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * per_second) as u64 + 1).min(total);
        while sent < due {
            let n = ((due - sent) as usize).min(BATCH);
            let slices: Vec<[IoSlice<'_>; 1]> = (0..n)
                .map(|k| [IoSlice::new(&pool[(sent as usize + k) % pool.len()])])
                .collect();
            match sendmmsg(
                fd,
                &mut headers,
                &slices,
                &addrs[..n],
                [],
                MsgFlags::empty(),
            ) {
                Ok(results) => {
                    sent += results.count() as u64;
                    errors = 0;
                }
                // A full buffer, or a refusal reported back from an earlier datagram: the
                // datagram was not sent; try again (loss the generator caused is not the
                // path's).
                Err(e) => {
                    errors += 1;
                    assert!(
                        errors < 100_000,
                        "generator: sendmmsg to {to} keeps failing: {e}"
                    );
                    if !matches!(e, Errno::EINTR | Errno::EAGAIN | Errno::ENOBUFS) {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
        }
        if sent >= total {
            break;
        }
        let next_due = Duration::from_secs_f64((sent + 1) as f64 / per_second);
        let wait = next_due
            .saturating_sub(start.elapsed())
            .max(Duration::from_micros(20));
        std::thread::sleep(wait);
    }
    Offered {
        sent,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Sends each of `datagrams` to `to`, one per call, at `rate` per second, and returns the
/// instant just before each send (for latency).
pub(crate) fn send_timed(datagrams: &[Vec<u8>], to: SocketAddr, rate: u64) -> Vec<Instant> {
    let socket = sender(to);
    let mut sent_at = Vec::with_capacity(datagrams.len());
    let start = Instant::now();
    for (i, d) in datagrams.iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        loop {
            match socket.send(d) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => std::thread::sleep(Duration::from_micros(50)),
            }
        }
        sent_at.push(now);
    }
    sent_at
}

/// Counts datagrams arriving on a loopback port, on a thread of its own.
pub(crate) struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    count: AtomicU64,
    stop: AtomicBool,
    recording: AtomicBool,
    arrivals: Mutex<Vec<(Key, Instant)>>,
}

impl Receiver {
    /// Binds 127.0.0.1:0 with a 64 MiB receive buffer (forced past net.core.rmem_max where
    /// allowed) and starts receiving.
    pub(crate) fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
        if setsockopt(&socket, sockopt::RcvBufForce, &(64 << 20)).is_err() {
            let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(64 << 20);
        }
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            count: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            recording: AtomicBool::new(false),
            arrivals: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || receive(&socket, &s));
        Self { addr, shared }
    }

    /// Where to send.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub(crate) fn count(&self) -> u64 {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// Waits until `expected` datagrams in all have arrived, or nothing has for `quiet` (at
    /// most `limit` in all); returns the count then.
    pub(crate) fn settle(&self, expected: u64, quiet: Duration, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        let mut last = self.count();
        let mut quiet_since = Instant::now();
        loop {
            if last >= expected {
                return last;
            }
            if Instant::now() >= deadline || quiet_since.elapsed() >= quiet {
                return last;
            }
            std::thread::sleep(Duration::from_millis(5));
            let now = self.count();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
    }

    /// Starts recording each arrival's identity and instant (forgetting earlier ones).
    pub(crate) fn record(&self) {
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.shared.recording.store(true, Ordering::Relaxed);
    }

    /// Stops recording; returns what was recorded.
    pub(crate) fn take(&self) -> Vec<(Key, Instant)> {
        self.shared.recording.store(false, Ordering::Relaxed);
        std::mem::take(
            &mut *self
                .shared
                .arrivals
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// The receive loop: up to [`BATCH`] datagrams per call, stamped with the instant the call
/// returned.
fn receive(socket: &UdpSocket, shared: &Shared) {
    // sFlow datagrams here are at most 1,400 bytes; a longer one is cut, and still counted.
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut keys = Vec::with_capacity(BATCH);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        // Blocks for the first (up to the read timeout), then takes what else is queued.
        let Ok(results) = recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        ) else {
            continue;
        };
        let now = Instant::now();
        let recording = shared.recording.load(Ordering::Relaxed);
        let mut n = 0;
        keys.clear();
        for r in results {
            n += 1;
            if recording && let Some(key) = r.iovs().next().and_then(stream_position) {
                keys.push((key, now));
            }
        }
        if !keys.is_empty() {
            shared
                .arrivals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&keys);
        }
        shared.count.fetch_add(n, Ordering::Relaxed);
    }
}
