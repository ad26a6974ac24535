//! Long streams of sFlow at a steady rate, for tests that run for minutes at thousands of
//! datagrams a second: datagrams are made as they are sent (never held all at once), and the
//! collector keeps only each arrival's place in its stream (agent, sub-agent, sequence), which
//! is what a loss, a duplicate or a reordering shows in. Byte-for-byte checks belong to the
//! shorter tests of [`crate::UdpCapture`].

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sflow::{SflowGen, stream_position};

/// A datagram's place in its stream: (sFlow agent address, sub-agent, sequence number).
pub type Position = (Ipv4Addr, u32, u32);

/// A collector on a loopback port that records where each arriving datagram belongs.
#[derive(Debug)]
pub struct PositionCapture {
    addr: SocketAddr,
    positions: Arc<Mutex<Vec<Position>>>,
    /// How many positions there are, readable without taking `positions`' lock: a waiting
    /// test that polls must never hold up the receiving thread (were the poller descheduled
    /// while holding the lock, the socket's buffer would fill behind it).
    count: Arc<AtomicUsize>,
    /// Datagrams that were not sFlow.
    other: Arc<AtomicUsize>,
}

impl PositionCapture {
    /// Binds 127.0.0.1:0 with a receive buffer of `buffer` bytes (as far as
    /// net.core.rmem_max allows), or the kernel's default with `None`: a collector nobody
    /// tuned. Its receiving thread runs at a raised priority (as root), as a collector with
    /// CPU of its own would.
    pub fn bind(buffer: Option<usize>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind collector");
        if let Some(bytes) = buffer {
            let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(bytes);
        }
        let addr = socket.local_addr().expect("collector address");
        let positions = Arc::new(Mutex::new(Vec::new()));
        let other = Arc::new(AtomicUsize::new(0));
        let count = Arc::new(AtomicUsize::new(0));
        let (store, others, counted) = (positions.clone(), other.clone(), count.clone());
        std::thread::spawn(move || {
            crate::procfs::raise_current_thread_priority();
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = socket.recv(&mut buf) {
                match stream_position(&buf[..n]) {
                    Some(position) => {
                        store.lock().unwrap().push(position);
                        counted.fetch_add(1, Ordering::Release);
                    }
                    None => {
                        others.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            addr,
            positions,
            count,
            other,
        }
    }

    /// Where to send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// sFlow datagrams received so far.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether nothing has arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Datagrams received that were not sFlow.
    pub fn other(&self) -> usize {
        self.other.load(Ordering::Relaxed)
    }

    /// The positions received, in arrival order.
    pub fn positions(&self) -> Vec<Position> {
        self.positions.lock().unwrap().clone()
    }

    /// Datagrams the kernel dropped at this socket because its buffer was full.
    pub fn kernel_drops(&self) -> u64 {
        runtime::udp::kernel_drops(self.addr).expect("the socket in /proc/net/udp")
    }

    /// Waits until `n` datagrams have arrived, or `timeout`; then, for duplicates to show,
    /// a further half second. Returns whether `n` arrived.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until_len(n, timeout);
        // Intentional: a duplicate, if any, gets half a second to show up.
        std::thread::sleep(Duration::from_millis(500));
        self.len() >= n
    }

    /// Waits until `n` datagrams have arrived or been dropped at this socket for a full
    /// buffer (its kernel drops), or `timeout`; returns whether they had.
    pub fn wait_until_accounted(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.len() + (self.kernel_drops() as usize) < n {
            if Instant::now() >= deadline {
                return false;
            }
            // Polling the count and /proc/net/udp while datagrams arrive.
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits until `n` datagrams have arrived, or `timeout`; returns whether they did.
    pub fn wait_until_len(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.len() < n {
            if Instant::now() >= deadline {
                return false;
            }
            // Poll interval of a bounded wait (the capture's thread signals nothing).
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// A stream being sent on a thread of its own; see [`send_stream`].
#[derive(Debug)]
pub struct StreamSender {
    sent: Arc<AtomicUsize>,
    thread: JoinHandle<Vec<Position>>,
}

impl StreamSender {
    /// Datagrams sent so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Waits for the end of the stream; returns the positions sent, in order.
    pub fn join(self) -> Vec<Position> {
        self.thread.join().expect("sender thread")
    }
}

/// Sends `n` datagrams of `sflow` to `to` from 127.0.0.1, at `per_second` (in bursts of a
/// millisecond's worth), on a thread of its own.
pub fn send_stream(to: SocketAddr, mut sflow: SflowGen, per_second: u32, n: usize) -> StreamSender {
    let sent = Arc::new(AtomicUsize::new(0));
    let progress = sent.clone();
    let thread = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
        let mut positions = Vec::with_capacity(n);
        let start = Instant::now();
        while positions.len() < n {
            let due = ((start.elapsed().as_secs_f64() * f64::from(per_second)) as usize).min(n);
            while positions.len() < due {
                let datagram = sflow.datagram();
                socket.send_to(&datagram, to).expect("send datagram");
                positions.push(stream_position(&datagram).expect("the generator makes sFlow"));
                progress.store(positions.len(), Ordering::Relaxed);
            }
            // Pacing the sender: a millisecond's worth at a time.
            std::thread::sleep(Duration::from_millis(1));
        }
        positions
    });
    StreamSender { sent, thread }
}
