//! An impairment proxy for the path between agent and sink: this kernel has no netem qdisc, so
//! loss, delay, jitter, reordering, duplication and cuts are made here, in the test process.
//!
//! [`UdpProxy`] relays datagrams between clients and one upstream address (both directions),
//! impairing each datagram on its own: QUIC sees a lossy, jittery, reordering path. Jitter
//! varies the delay without reordering (as a queue on the path does); reordering is its own
//! setting. [`TcpProxy`]
//! relays TCP connections with a delay and can cut the path (a blackhole: nothing passes, the
//! connections stay open, as when a link goes down), for gRPC.
//!
//! Settings ([`Impairment`]) can change while traffic flows. Every proxy runs on its own
//! runtime thread and stops when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// What the proxy does to traffic. All probabilities are 0.0..=1.0.
#[derive(Debug, Clone, Default)]
pub struct Impairment {
    /// Probability that a datagram is dropped (UDP only).
    pub loss: f64,
    /// Base one-way delay.
    pub delay: Duration,
    /// Each datagram's delay is `delay ± jitter`, uniformly, but never so little that it
    /// would overtake the one before (UDP; TCP uses `delay`).
    pub jitter: Duration,
    /// Probability that a datagram is held back by an extra `delay + jitter`, so that later
    /// ones overtake it (UDP only).
    pub reorder: f64,
    /// Probability that a datagram is sent twice (UDP only).
    pub duplicate: f64,
    /// Nothing passes, in either direction, until this instant.
    pub cut_until: Option<Instant>,
}

impl Impairment {
    fn is_cut(&self) -> bool {
        self.cut_until.is_some_and(|until| Instant::now() < until)
    }
}

/// Counters of what a proxy did, for tests to check that the impairment happened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Datagrams (UDP) or chunks (TCP) that passed.
    pub passed: u64,
    /// Dropped by `loss` or a cut.
    pub dropped: u64,
    /// Held back to be overtaken.
    pub reordered: u64,
    /// Sent twice.
    pub duplicated: u64,
}

#[derive(Debug, Default)]
struct State {
    impairment: Mutex<Impairment>,
    tally: Mutex<Tally>,
}

impl State {
    fn count(&self, f: impl FnOnce(&mut Tally)) {
        f(&mut self.tally.lock().unwrap());
    }
}

/// The handle a test keeps: change the impairment, read the tally, stop by dropping.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Where clients connect (instead of the upstream).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the impairment.
    pub fn set(&self, impairment: Impairment) {
        *self.state.impairment.lock().unwrap() = impairment;
    }

    /// Cuts the path for `duration` from now.
    pub fn cut_for(&self, duration: Duration) {
        self.state.impairment.lock().unwrap().cut_until = Some(Instant::now() + duration);
    }

    /// Ends a cut now.
    pub fn heal(&self) {
        self.state.impairment.lock().unwrap().cut_until = None;
    }

    /// What the proxy has done so far.
    pub fn tally(&self) -> Tally {
        *self.state.tally.lock().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A proxy's runtime and its shared state, set to `impairment`.
fn prepare(impairment: Impairment) -> (tokio::runtime::Runtime, Arc<State>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("proxy runtime");
    let state = Arc::new(State {
        impairment: Mutex::new(impairment),
        tally: Mutex::default(),
    });
    (runtime, state)
}

/// A UDP impairment proxy in front of `upstream`.
pub struct UdpProxy;

impl UdpProxy {
    /// Starts relaying from a new loopback port to `upstream`.
    ///
    /// # Panics
    ///
    /// When sockets cannot be bound.
    pub fn start(upstream: SocketAddr, impairment: Impairment) -> Proxy {
        let (runtime, state) = prepare(impairment);
        let listen = runtime
            .block_on(UdpSocket::bind(SocketAddr::new(upstream.ip(), 0)))
            .expect("bind proxy");
        let addr = listen.local_addr().unwrap();
        runtime.spawn(udp_front(Arc::new(listen), upstream, state.clone()));
        Proxy {
            addr,
            state,
            runtime: Some(runtime),
        }
    }
}

/// Datagrams from clients: each client gets its own upstream socket, whose replies go back
/// to that client through the front socket.
async fn udp_front(front: Arc<UdpSocket>, upstream: SocketAddr, state: Arc<State>) {
    let mut clients: HashMap<SocketAddr, Lane> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        let lane = match clients.entry(client) {
            std::collections::hash_map::Entry::Occupied(lane) => lane.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let Ok(socket) = UdpSocket::bind(SocketAddr::new(upstream.ip(), 0)).await else {
                    continue;
                };
                if socket.connect(upstream).await.is_err() {
                    continue;
                }
                let socket = Arc::new(socket);
                let back = Lane::new(state.clone(), Out::To(front.clone(), client));
                tokio::spawn(udp_back(socket.clone(), back));
                slot.insert(Lane::new(state.clone(), Out::Connected(socket)))
            }
        };
        lane.push(buf[..n].to_vec());
    }
}

async fn udp_back(upstream: Arc<UdpSocket>, mut lane: Lane) {
    let mut buf = vec![0u8; 65_536];
    loop {
        // An ICMP error from the upstream (sink restarting) is not the end.
        let Ok(n) = upstream.recv(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        lane.push(buf[..n].to_vec());
    }
}

/// Where a lane's datagrams go.
#[derive(Clone)]
enum Out {
    Connected(Arc<UdpSocket>),
    To(Arc<UdpSocket>, SocketAddr),
}

impl Out {
    async fn send(&self, datagram: &[u8]) {
        let _ = match self {
            Self::Connected(socket) => socket.send(datagram).await,
            Self::To(socket, to) => socket.send_to(datagram, *to).await,
        };
    }
}

/// One direction of one UDP flow. Datagrams leave in the order they came, each after its
/// delay: jitter varies the delay as a queue would, without reordering (a datagram never
/// leaves before the one ahead of it). Those picked for reordering are held back by an extra
/// `delay + jitter`, so that later ones overtake them.
struct Lane {
    state: Arc<State>,
    fifo: mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>)>,
    last_due: tokio::time::Instant,
    out: Out,
}

impl Lane {
    fn new(state: Arc<State>, out: Out) -> Self {
        let (fifo, mut queue) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let sender = out.clone();
        tokio::spawn(async move {
            while let Some((due, datagram)) = queue.recv().await {
                tokio::time::sleep_until(due).await;
                sender.send(&datagram).await;
            }
        });
        Self {
            state,
            fifo,
            last_due: tokio::time::Instant::now(),
            out,
        }
    }

    /// Drops, delays, holds back or duplicates one datagram, then sends it.
    fn push(&mut self, datagram: Vec<u8>) {
        let impairment = self.state.impairment.lock().unwrap().clone();
        let mut rng = rand::rng();
        if impairment.is_cut() || rng.random_bool(impairment.loss.clamp(0.0, 1.0)) {
            self.state.count(|t| t.dropped += 1);
            return;
        }
        let jitter = impairment.jitter.as_secs_f64();
        let delay = (impairment.delay.as_secs_f64() + rng.random_range(-jitter..=jitter)).max(0.0);
        let now = tokio::time::Instant::now();
        self.state.count(|t| t.passed += 1);
        if rng.random_bool(impairment.reorder.clamp(0.0, 1.0)) {
            self.state.count(|t| t.reordered += 1);
            let held = Duration::from_secs_f64(delay + impairment.delay.as_secs_f64() + jitter);
            let out = self.out.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(now + held).await;
                out.send(&datagram).await;
            });
            return;
        }
        let due = (now + Duration::from_secs_f64(delay)).max(self.last_due);
        self.last_due = due;
        if rng.random_bool(impairment.duplicate.clamp(0.0, 1.0)) {
            self.state.count(|t| t.duplicated += 1);
            let _ = self.fifo.send((due, datagram.clone()));
        }
        let _ = self.fifo.send((due, datagram));
    }
}

/// A TCP proxy in front of `upstream`: `delay` on every chunk, and cuts.
pub struct TcpProxy;

impl TcpProxy {
    /// Starts relaying from a new loopback port to `upstream`.
    ///
    /// # Panics
    ///
    /// When the listener cannot be bound.
    pub fn start(upstream: SocketAddr, impairment: Impairment) -> Proxy {
        let (runtime, state) = prepare(impairment);
        let listener = runtime
            .block_on(TcpListener::bind(SocketAddr::new(upstream.ip(), 0)))
            .expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let accept_state = state.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, state.clone()));
                    pump(server_read, client_write, state).await;
                });
            }
        });
        Proxy {
            addr,
            state,
            runtime: Some(runtime),
        }
    }
}

/// Copies one direction: chunks are stamped when read and written `delay` later, in order;
/// during a cut nothing is written (and, the queue being bounded, soon nothing read).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(64);
    let writer_state = state.clone();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            loop {
                let cut = writer_state.impairment.lock().unwrap().cut_until;
                match cut {
                    Some(until) if Instant::now() < until => {
                        tokio::time::sleep(until - Instant::now()).await;
                    }
                    _ => break,
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            writer_state.count(|t| t.passed += 1);
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = state.impairment.lock().unwrap().delay;
        if tx
            .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
