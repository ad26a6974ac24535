//! Replaying datagrams as UDP, byte for byte, to each destination that is to have them.
//!
//! Each destination has its own task, socket and bounded queue. A destination whose port is
//! closed or unreachable fails fast (errors counted) and holds back no one. A slow one (paced,
//! or a full socket) fills its queue; a batch then waits for room for up to [`SUBMIT_WAIT`],
//! which slows the agents down through their windows (acknowledgements wait for every
//! destination), and after that is dropped for that destination alone, counted. Within a
//! destination, datagrams leave in the order batches were submitted, and a connection submits
//! its batches in the agent's order.
//!
//! Each destination socket is *connected*, so the kernel reports ICMP port-unreachable back as
//! an error on the next send, which is counted and logged (rate-limited). Datagrams leave from
//! the sink's own address: sFlow collectors identify agents by the address inside the datagram.
//!
//! **Routes.** A destination may filter (`agents`, `sites`: `runtime::route`). A batch is
//! matched once, before any queue: each datagram's header is read once, and each filtered
//! destination gets the list of the datagrams it takes (one allocation per batch and filtered
//! destination, none per datagram); unfiltered destinations take the batch whole, and when no
//! destination filters nothing is parsed. A destination whose share is empty is not woken.
//! Datagrams left out are counted per destination; those no destination takes are counted as
//! `unmatched` and logged at most once a minute. Routes are swapped whole on reload and read
//! once per batch, so a new filter applies from the next batch.
//!
//! **Ends.** At a destination's `not-after` its task discards what is queued (counted as
//! `expired`), logs it once, and ends; the others carry on. There is no spool here: what was
//! queued for it is gone.
//!
//! **Hard caps.** With `--replay-max-pps` or `--replay-max-bps` set (both off by default), each
//! destination sends at most that many datagrams and bytes a second, live traffic included (a
//! token bucket with a small burst). Catch-up traffic is paced before it gets here, on each
//! agent's connection ([`crate::catch_up`]), so one agent's backlog does not queue in front
//! of another agent's live traffic.
//!
//! **Completion.** [`Replay::submit`] returns a [`Replaying`] that completes once each
//! destination has sent its share of the batch (or dropped it, counted) and everything the
//! same connection queued there before: the ingress acknowledges a batch to its agent only
//! then, so an acknowledged batch has left the sink, and so has every batch before it. Each
//! destination numbers what is queued to it (a ticket, taken in queue order) and says how far
//! it has got; a batch waits for its tickets, and an ended destination counts as done.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use proto::pb;
use proto::sflow::parse_header;
use runtime::ratelimit::RateLimit;
use runtime::reload::Swap;
use runtime::route::Route;
use runtime::udp::{self, Buffers};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::ForwardConfig;
use crate::metrics::{DestinationMetrics, Metrics};

/// How long a batch waits for room in a destination's queue before that destination drops
/// it: far longer than a paced destination needs to make room, far shorter than an agent's
/// patience.
pub const SUBMIT_WAIT: Duration = Duration::from_secs(5);

/// Longest a destination's task sleeps towards its `not-after` before looking at the clock
/// again (a wall-clock step, a reloaded `not-after`, is then seen within this).
const END_CHECK: Duration = Duration::from_secs(60);

/// The replay side: hand it batches; it fans them out.
#[derive(Debug)]
pub struct Replay {
    destinations: Vec<Destination>,
    metrics: Arc<Metrics>,
    unmatched: RateLimit,
}

#[derive(Debug)]
struct Destination {
    state: Arc<DestinationState>,
    queue: mpsc::Sender<Job>,
    /// Tickets handed out: jobs queued so far. Taken under this lock together with the
    /// queueing itself, so tickets follow queue order.
    queued: Mutex<u64>,
    full: RateLimit,
    behind: RateLimit,
}

/// What a destination's task, its submitters, reload and status share.
#[derive(Debug)]
pub(crate) struct DestinationState {
    /// As configured (`HOST:PORT`): the `destination` label, and the key of reloads.
    pub(crate) name: String,
    /// Where it resolved.
    pub(crate) addr: SocketAddr,
    route: Swap<Route>,
    /// Wakes the task when the route changes (a reloaded `not-after`).
    route_changed: Notify,
    /// The ticket of the last job the task is done with.
    done: AtomicU64,
    /// The task has ended (its `not-after`): nothing more is sent; every ticket is done.
    ended: AtomicBool,
    progress: Notify,
    pub(crate) metrics: DestinationMetrics,
}

/// Which datagrams of a batch a destination takes.
#[derive(Debug)]
enum Share {
    All,
    /// Indices into the batch, ascending.
    Only(Vec<u32>),
}

/// A batch (or a share of one) queued for a destination.
#[derive(Debug)]
struct Job {
    replaying: Arc<Replaying>,
    share: Share,
    ticket: u64,
}

/// Hard caps per destination; 0 means no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// Datagrams a second.
    pub max_pps: u64,
    /// Bytes (UDP payload) a second.
    pub max_bps: u64,
}

/// A batch being replayed; complete when every destination is done with its share.
#[derive(Debug)]
pub struct Replaying {
    batch: pb::Batch,
    /// (destination, ticket) pairs to wait for; set before [`Replay::submit`] returns.
    waits: OnceLock<Vec<(Arc<DestinationState>, u64)>>,
}

/// One connection's place in each destination's queue: the ticket of the last job it queued
/// there, so that a batch of it with nothing for a destination still completes only after
/// its earlier batches have left there.
#[derive(Debug, Default)]
pub(crate) struct Lane {
    last: Mutex<Vec<u64>>,
}

impl Lane {
    fn last(&self, destination: usize) -> u64 {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.get(destination).copied().unwrap_or(0)
    }

    fn queued(&self, destination: usize, ticket: u64) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() <= destination {
            last.resize(destination + 1, 0);
        }
        last[destination] = ticket;
    }
}

impl Replaying {
    /// Waits until every destination has sent (or dropped) its share of the batch, and what
    /// the same connection queued there before.
    pub async fn finished(&self) {
        for (destination, ticket) in self.waits.get().into_iter().flatten() {
            destination.reached(*ticket).await;
        }
    }

    /// Whether [`finished`](Self::finished) would return at once.
    pub fn is_finished(&self) -> bool {
        self.waits
            .get()
            .into_iter()
            .flatten()
            .all(|(destination, ticket)| destination.is_done(*ticket))
    }
}

// === impl DestinationState ===

impl DestinationState {
    /// The route in force.
    pub(crate) fn route(&self) -> Arc<Route> {
        self.route.get()
    }

    /// Whether the destination's task has ended (its `not-after` came).
    pub(crate) fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Puts `route` in force from the next batch, and tells the task (its end may have moved).
    pub(crate) fn set_route(&self, route: Route) {
        self.metrics
            .not_after
            .set(route.not_after().map_or(0, |end| end.unix_seconds()));
        self.route.set(route);
        self.route_changed.notify_one();
    }

    fn is_done(&self, ticket: u64) -> bool {
        self.ended() || self.done.load(Ordering::Acquire) >= ticket
    }

    async fn reached(&self, ticket: u64) {
        loop {
            if self.is_done(ticket) {
                return;
            }
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done(ticket) {
                return;
            }
            notified.await;
        }
    }

    fn advance(&self, ticket: u64) {
        self.done.store(ticket, Ordering::Release);
        self.progress.notify_waiters();
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.progress.notify_waiters();
    }
}

/// What came of queueing a job.
enum Queued {
    Ticket(u64),
    /// The queue stayed full for [`SUBMIT_WAIT`].
    Full,
    /// The destination has ended.
    Ended,
}

impl Destination {
    async fn queue(&self, replaying: Arc<Replaying>, share: Share) -> Queued {
        use mpsc::error::TrySendError;
        let permit = match self.queue.try_reserve() {
            Ok(permit) => permit,
            Err(TrySendError::Closed(())) => return Queued::Ended,
            Err(TrySendError::Full(())) => {
                match tokio::time::timeout(SUBMIT_WAIT, self.queue.reserve()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Queued::Ended,
                    Err(_) => return Queued::Full,
                }
            }
        };
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        *queued += 1;
        let ticket = *queued;
        permit.send(Job {
            replaying,
            share,
            ticket,
        });
        Queued::Ticket(ticket)
    }

    fn warn_if_behind(&self) {
        if self.queue.capacity() < self.queue.max_capacity() / 2
            && let Some(more) = self.behind.check()
        {
            tracing::warn!(
                destination = %self.state.addr,
                queued_batches = self.queue.max_capacity() - self.queue.capacity(),
                earlier_warnings_not_logged = more,
                "replay to this destination is falling behind (a slow socket, or the --replay-max-pps / --replay-max-bps cap): agents are slowed down, and drop what their backlogs cannot hold"
            );
        }
    }

    fn dropped(&self, n: u64) {
        self.state.metrics.queue_drops.inc_by(n);
        if let Some(more) = self.full.check() {
            tracing::warn!(
                destination = %self.state.addr,
                dropped_datagrams = n,
                earlier_drops_not_logged = more,
                "replay queue full for too long: destination cannot keep up, datagrams dropped"
            );
        }
    }
}

// === impl Replay ===

impl Replay {
    /// Resolves and connects one socket per destination and starts their tasks in `tasks`;
    /// a destination whose `not-after` has passed is skipped (with a warning). Dropping the
    /// `Replay` lets the tasks finish what is queued and end.
    ///
    /// # Errors
    ///
    /// When a destination does not resolve, or its socket cannot be made.
    pub async fn start(
        forward: &[ForwardConfig],
        queue: usize,
        send_buffer: usize,
        pace: Pace,
        metrics: Arc<Metrics>,
        tasks: &mut JoinSet<()>,
    ) -> Result<Self, crate::Error> {
        let mut destinations = Vec::with_capacity(forward.len());
        for target in forward {
            if let Some(end) = target.route.not_after()
                && target.route.expired(SystemTime::now())
            {
                tracing::warn!(
                    destination = %target.addr,
                    not_after = end.as_str(),
                    "destination's not-after has passed: not replaying to it (the others run)"
                );
                continue;
            }
            let (addr, socket) = connect(&target.addr, send_buffer).await?;
            let (tx, rx) = mpsc::channel(queue);
            let state = Arc::new(DestinationState {
                name: target.addr.clone(),
                addr,
                route: Swap::new(Route::default()),
                route_changed: Notify::new(),
                done: AtomicU64::new(0),
                ended: AtomicBool::new(false),
                progress: Notify::new(),
                metrics: metrics.for_destination(&target.addr),
            });
            state.set_route(target.route.clone());
            tasks.spawn(send_loop(state.clone(), socket, rx, pace));
            tracing::info!(
                destination = %addr,
                filter = target.route.describe(),
                not_after = target.route.not_after().map_or("none", |end| end.as_str()),
                max_pps = pace.max_pps,
                max_bytes_per_second = pace.max_bps,
                "replaying to destination"
            );
            destinations.push(Destination {
                state,
                queue: tx,
                queued: Mutex::new(0),
                full: RateLimit::new(Duration::from_secs(10)),
                behind: RateLimit::new(Duration::from_secs(60)),
            });
        }
        Ok(Self {
            destinations,
            metrics,
            unmatched: RateLimit::new(Duration::from_secs(60)),
        })
    }

    /// The destinations' shared state, for status and reload (holding it keeps no queue
    /// open).
    pub(crate) fn states(&self) -> Vec<Arc<DestinationState>> {
        self.destinations.iter().map(|d| d.state.clone()).collect()
    }

    /// Queues `batch`, carried by the relay agent `site` on the connection of `lane`, for each
    /// destination its share. A full queue is waited on (the agents' windows make that the
    /// backpressure that slows them down), for at most [`SUBMIT_WAIT`]; a destination whose
    /// queue stays full that long drops the batch (counted, logged).
    pub(crate) async fn submit(&self, batch: pb::Batch, site: &str, lane: &Lane) -> Arc<Replaying> {
        let replaying = Arc::new(Replaying {
            batch,
            waits: OnceLock::new(),
        });
        let shares = self.shares(&replaying.batch, site);
        let mut waits = Vec::with_capacity(self.destinations.len());
        for (i, (dest, share)) in self.destinations.iter().zip(shares).enumerate() {
            let ticket = match share {
                None => None,
                Some(Share::Only(ref only)) if only.is_empty() => None,
                Some(share) => {
                    dest.warn_if_behind();
                    let n = match &share {
                        Share::All => replaying.batch.datagrams.len(),
                        Share::Only(only) => only.len(),
                    };
                    match dest.queue(replaying.clone(), share).await {
                        Queued::Ticket(ticket) => Some(ticket),
                        Queued::Full => {
                            dest.dropped(n as u64);
                            None
                        }
                        Queued::Ended => None,
                    }
                }
            };
            // Nothing queued here: done once this connection's earlier batches are.
            let ticket = match ticket {
                Some(ticket) => {
                    lane.queued(i, ticket);
                    ticket
                }
                None => lane.last(i),
            };
            if !dest.state.is_done(ticket) {
                waits.push((dest.state.clone(), ticket));
            }
        }
        let _ = replaying.waits.set(waits);
        replaying
    }

    /// Each destination's share of `batch` (`None` for a destination that has ended), with
    /// the datagrams left out counted per destination, and those no destination takes as
    /// unmatched.
    fn shares(&self, batch: &pb::Batch, site: &str) -> Vec<Option<Share>> {
        let now = SystemTime::now();
        let routes: Vec<Option<Arc<Route>>> = self
            .destinations
            .iter()
            .map(|d| {
                let route = d.state.route();
                (!d.state.ended() && !route.expired(now)).then_some(route)
            })
            .collect();
        let n = batch.datagrams.len();
        let live = || routes.iter().flatten();
        if !live().any(|route| route.is_filtered()) {
            if routes.iter().all(Option::is_none) {
                self.count_unmatched(n as u64, site);
            }
            return routes
                .iter()
                .map(|r| r.as_ref().map(|_| Share::All))
                .collect();
        }
        // Matched once per datagram and route, on headers read once.
        let headers: Vec<_> = batch
            .datagrams
            .iter()
            .map(|d| parse_header(&d.payload))
            .collect();
        let mut taken = (!live().any(|route| !route.is_filtered())).then(|| vec![false; n]);
        let mut shares = Vec::with_capacity(routes.len());
        for (dest, route) in self.destinations.iter().zip(&routes) {
            let Some(route) = route else {
                shares.push(None);
                continue;
            };
            if !route.is_filtered() {
                shares.push(Some(Share::All));
                continue;
            }
            let only: Vec<u32> = (0..n)
                .filter(|&i| route.matches(headers[i].as_ref(), Some(site)))
                .map(|i| i as u32)
                .collect();
            if let Some(taken) = &mut taken {
                for &i in &only {
                    taken[i as usize] = true;
                }
            }
            dest.state.metrics.filtered.inc_by((n - only.len()) as u64);
            shares.push(Some(if only.len() == n {
                Share::All
            } else {
                Share::Only(only)
            }));
        }
        if let Some(taken) = taken {
            let unmatched = taken.iter().filter(|&&t| !t).count() as u64;
            self.count_unmatched(unmatched, site);
        }
        shares
    }

    fn count_unmatched(&self, n: u64, site: &str) {
        if n == 0 {
            return;
        }
        self.metrics.datagrams_unmatched.inc_by(n);
        if let Some(more) = self.unmatched.check() {
            tracing::warn!(
                site,
                datagrams = n,
                earlier_batches_not_logged = more,
                "datagrams taken by no destination (filters, or every not-after passed): dropped"
            );
        }
    }
}

/// Resolves `target` and connects a UDP socket to it.
async fn connect(
    target: &str,
    send_buffer: usize,
) -> Result<(SocketAddr, UdpSocket), crate::Error> {
    let addr = tokio::net::lookup_host(target)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| crate::Error::Destination(target.into(), "does not resolve".into()))?;
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let socket = udp::bind(
        local,
        Buffers {
            recv: None,
            send: Some(send_buffer),
        },
    )
    .and_then(UdpSocket::from_std)
    .map_err(|e| crate::Error::Destination(target.into(), e.to_string()))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| crate::Error::Destination(target.into(), e.to_string()))?;
    Ok((addr, socket))
}

/// A token bucket of datagrams and bytes, refilled continuously.
#[derive(Debug)]
struct Bucket {
    pace: Pace,
    datagrams: f64,
    bytes: f64,
    burst_datagrams: f64,
    burst_bytes: f64,
    at: Instant,
}

impl Bucket {
    fn new(pace: Pace) -> Self {
        // Room for a few milliseconds of the pace (the timer's granularity), no more: a
        // collector's default socket buffer holds about 90 datagrams of 1,400 bytes.
        let burst_datagrams = (pace.max_pps as f64 / 250.0).max(16.0);
        let burst_bytes = (pace.max_bps as f64 / 250.0).max(2.0 * 65_535.0);
        Self {
            pace,
            datagrams: burst_datagrams,
            bytes: burst_bytes,
            burst_datagrams,
            burst_bytes,
            at: Instant::now(),
        }
    }

    /// Waits until the first of `datagrams` may go, then takes the tokens of as many as fit
    /// now, and returns how many (at least one).
    async fn take_many(&mut self, datagrams: &[&[u8]]) -> usize {
        self.take(datagrams[0].len()).await;
        let mut n = 1;
        while let Some(next) = datagrams.get(n) {
            let len = next.len() as f64;
            let fits = (self.pace.max_pps == 0 || self.datagrams >= 1.0)
                && (self.pace.max_bps == 0 || self.bytes >= len);
            if !fits {
                break;
            }
            self.datagrams -= 1.0;
            self.bytes -= len;
            n += 1;
        }
        n
    }

    /// Waits until one datagram of `len` bytes may go, and takes its tokens.
    async fn take(&mut self, len: usize) {
        loop {
            let now = Instant::now();
            let elapsed = now.duration_since(self.at).as_secs_f64();
            self.at = now;
            self.datagrams =
                (self.datagrams + elapsed * self.pace.max_pps as f64).min(self.burst_datagrams);
            self.bytes = (self.bytes + elapsed * self.pace.max_bps as f64).min(self.burst_bytes);
            let need_datagrams = if self.pace.max_pps == 0 {
                0.0
            } else {
                (1.0 - self.datagrams) / self.pace.max_pps as f64
            };
            let need_bytes = if self.pace.max_bps == 0 {
                0.0
            } else {
                (len as f64 - self.bytes) / self.pace.max_bps as f64
            };
            let wait = need_datagrams.max(need_bytes);
            if wait <= 0.0 {
                self.datagrams -= 1.0;
                self.bytes -= len as f64;
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// Why a destination's task stops before its queue closes.
enum Stop {
    /// Its `not-after` came; `unsent` datagrams of the job in hand were not sent.
    Ended { unsent: usize },
    /// Its socket failed; `unsent` datagrams of the jobs in hand were not sent.
    Failed { unsent: usize },
}

/// A destination's task: sends each job's datagrams in queue order, until the queue closes
/// (the sink stops) or the destination's `not-after` comes.
async fn send_loop(
    state: Arc<DestinationState>,
    socket: UdpSocket,
    mut queue: mpsc::Receiver<Job>,
    pace: Pace,
) {
    let mut sender = Sender {
        state: &state,
        socket,
        bucket: (pace.max_pps > 0 || pace.max_bps > 0).then(|| Bucket::new(pace)),
        out: udp::SendBatch::new(udp::SEND_BATCH),
        errors: RateLimit::new(Duration::from_secs(10)),
    };
    let mut jobs: Vec<Job> = Vec::new();
    loop {
        let route = state.route();
        let wake = route
            .remaining(SystemTime::now())
            .map(|left| Instant::now() + left.min(END_CHECK));
        let job = tokio::select! {
            biased;
            () = sleep_until(wake) => None,
            () = state.route_changed.notified() => None,
            job = queue.recv() => match job {
                Some(job) => Some(job),
                None => break,
            },
        };
        if state.route().expired(SystemTime::now()) {
            let unsent = job.as_ref().map_or(0, Job::len);
            end(&state, &mut queue, Stop::Ended { unsent });
            return;
        }
        let Some(job) = job else { continue };
        // Unpaced, what else is queued goes in the same system calls: with many agents each
        // batch may hold one datagram, and one call per batch (each waking the receiver)
        // would cost far more than the datagrams themselves.
        let (mut taken, mut ticket) = (job.len(), job.ticket);
        jobs.push(job);
        while sender.bucket.is_none() && taken < udp::SEND_BATCH {
            let Ok(next) = queue.try_recv() else { break };
            (taken, ticket) = (taken + next.len(), next.ticket);
            jobs.push(next);
        }
        match sender.send(&jobs).await {
            Ok(()) => state.advance(ticket),
            Err(stop) => {
                end(&state, &mut queue, stop);
                return;
            }
        }
        jobs.clear();
    }
    tracing::debug!(destination = %state.addr, "replay task finished");
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Ends a destination: discards what is queued for it (counted as `expired`, or as
/// `destination_error` when its socket failed), marks it ended (so no batch waits on it),
/// and says so once.
fn end(state: &DestinationState, queue: &mut mpsc::Receiver<Job>, stop: Stop) {
    queue.close();
    let (unsent, counter, why) = match stop {
        Stop::Ended { unsent } => (unsent, &state.metrics.expired, "its not-after has come"),
        Stop::Failed { unsent } => (unsent, &state.metrics.errors, "its socket failed"),
    };
    let mut discarded = unsent as u64;
    while let Ok(job) = queue.try_recv() {
        discarded += job.len() as u64;
    }
    counter.inc_by(discarded);
    state.end();
    let route = state.route();
    tracing::info!(
        destination = %state.addr,
        not_after = route.not_after().map_or("none", |end| end.as_str()),
        discarded_datagrams = discarded,
        reason = why,
        "replay to destination stopped: its queue is discarded; the other destinations carry on"
    );
}

impl Job {
    /// Datagrams in the job.
    fn len(&self) -> usize {
        match &self.share {
            Share::All => self.replaying.batch.datagrams.len(),
            Share::Only(only) => only.len(),
        }
    }
}

/// A destination's socket, pace and error log.
struct Sender<'a> {
    state: &'a DestinationState,
    socket: UdpSocket,
    bucket: Option<Bucket>,
    out: udp::SendBatch,
    errors: RateLimit,
}

impl Sender<'_> {
    /// Sends the jobs' datagrams in order, as many at a time as the pace allows (all when
    /// unpaced), in one system call per `udp::SEND_BATCH`; a paced job stops at the
    /// destination's end.
    async fn send(&mut self, jobs: &[Job]) -> Result<(), Stop> {
        let mut datagrams: Vec<&[u8]> = Vec::with_capacity(jobs.iter().map(Job::len).sum());
        for job in jobs {
            let batch = &job.replaying.batch.datagrams;
            match &job.share {
                Share::All => datagrams.extend(batch.iter().map(|d| &d.payload[..])),
                Share::Only(only) => {
                    datagrams.extend(only.iter().map(|&i| &batch[i as usize].payload[..]));
                }
            }
        }
        let mut next = 0;
        while next < datagrams.len() {
            let allowed = match &mut self.bucket {
                Some(bucket) => {
                    let allowed = bucket.take_many(&datagrams[next..]).await;
                    if self.state.route().expired(SystemTime::now()) {
                        return Err(Stop::Ended {
                            unsent: datagrams.len() - next,
                        });
                    }
                    allowed
                }
                None => datagrams.len() - next,
            };
            if let Err(sent) = self.send_group(&datagrams[next..next + allowed]).await {
                return Err(Stop::Failed {
                    unsent: datagrams.len() - next - sent,
                });
            }
            next += allowed;
        }
        Ok(())
    }

    /// Sends `group`, waiting for room in the socket buffer; a datagram the socket refuses is
    /// counted, logged (rate-limited) and skipped. When the socket fails, the error is how
    /// many of the group were dealt with before.
    async fn send_group(&mut self, group: &[&[u8]]) -> Result<(), usize> {
        let (socket, metrics) = (&self.socket, &self.state.metrics);
        let mut done = 0;
        while done < group.len() {
            let rest = &group[done..];
            match socket.try_io(Interest::WRITABLE, || self.out.send(socket, rest)) {
                Ok(n) => {
                    metrics.replayed.inc_by(n as u64);
                    metrics
                        .bytes
                        .inc_by(rest[..n].iter().map(|d| d.len() as u64).sum());
                    done += n;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    // The socket buffer is full: wait for room, lose nothing.
                    if let Err(error) = socket.writable().await {
                        tracing::warn!(destination = %self.state.addr, %error, "replay socket failed");
                        return Err(done);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // This datagram was refused (port unreachable reported back, too
                    // large): count it, skip it, send the rest.
                    metrics.errors.inc();
                    if let Some(more) = self.errors.check() {
                        tracing::warn!(
                            destination = %self.state.addr,
                            %error,
                            len = rest[0].len(),
                            earlier_errors_not_logged = more,
                            "replay to destination failed; datagram dropped"
                        );
                    }
                    done += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::forward;
    use std::net::IpAddr;

    /// A datagram from sFlow agent `agent`, numbered `n`.
    fn sflow(agent: &str, n: u32) -> pb::Datagram {
        let mut payload = proto::sflow::Header {
            sequence: n,
            ..proto::sflow::Header::from_agent(agent.parse::<IpAddr>().unwrap())
        }
        .to_bytes();
        payload.extend_from_slice(&n.to_be_bytes());
        pb::Datagram {
            payload: payload.into(),
            ..Default::default()
        }
    }

    fn batch(datagrams: Vec<pb::Datagram>) -> pb::Batch {
        pb::Batch {
            datagrams,
            ..Default::default()
        }
    }

    /// A collector on loopback, and the replay `entry` (an inline table without `addr`).
    fn collector(entry: &str) -> (std::net::UdpSocket, ForwardConfig) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let entry = forward::parse(&format!("{{ addr = \"{addr}\"{entry} }}")).unwrap();
        (socket, entry)
    }

    /// What arrived at `socket` so far.
    fn arrived(socket: &std::net::UdpSocket) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        std::iter::from_fn(|| socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())).collect()
    }

    #[tokio::test]
    async fn each_destination_gets_its_share_in_order_and_the_rest_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let (by_site, site_entry) = collector(", sites = [\"site-a\"]");
        let (by_agent, agent_entry) =
            collector(", agents = [\"10.1.0.0/16\", \"!10.1.0.9\", \"2001:db8::/32\"]");
        let mut tasks = JoinSet::new();
        let replay = Replay::start(
            &[site_entry, agent_entry],
            16,
            1 << 20,
            Pace::default(),
            metrics.clone(),
            &mut tasks,
        )
        .await
        .unwrap();
        let agents = ["10.1.0.1", "10.1.0.9", "2001:db8::7", "192.0.2.1"];
        let lane = Lane::default();
        let sent: Vec<pb::Datagram> = (0..40).map(|n| sflow(agents[n % 4], n as u32)).collect();
        let not_sflow = pb::Datagram {
            payload: vec![1, 2, 3].into(),
            ..Default::default()
        };
        let mut all = sent.clone();
        all.push(not_sflow);
        replay
            .submit(batch(all), "site-b", &lane)
            .await
            .finished()
            .await;
        replay
            .submit(batch(sent.clone()), "site-a", &lane)
            .await
            .finished()
            .await;

        let bytes = |pick: &dyn Fn(usize) -> bool| -> Vec<Vec<u8>> {
            (0..40)
                .filter(|&n| pick(n))
                .map(|n| sent[n].payload.to_vec())
                .collect()
        };
        let agent_share = bytes(&|n| n % 4 == 0 || n % 4 == 2);
        let want_by_agent = [agent_share.clone(), agent_share].concat();
        assert_eq!(arrived(&by_agent), want_by_agent);
        assert_eq!(arrived(&by_site), bytes(&|_| true), "site-a's batch only");
        let states = replay.states();
        assert_eq!(states[0].metrics.filtered.get(), 41);
        assert_eq!(states[1].metrics.filtered.get(), 21 + 20);
        // From site-b: 10.1.0.9, 192.0.2.1 and the datagram that is not sFlow; from site-a:
        // none (the site destination takes all).
        assert_eq!(metrics.datagrams_unmatched.get(), 21);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_with_nothing_for_a_destination_completes_after_the_lanes_earlier_ones() {
        let metrics = Arc::new(Metrics::default());
        let (slow, slow_entry) = collector(", agents = [\"10.0.0.0/8\"]");
        let (_fast, fast_entry) = collector("");
        let pace = Pace {
            max_pps: 100,
            max_bps: 0,
        };
        let mut tasks = JoinSet::new();
        let replay = Replay::start(
            &[slow_entry, fast_entry],
            16,
            1 << 20,
            pace,
            metrics,
            &mut tasks,
        )
        .await
        .unwrap();
        let lane = Lane::default();
        let first = replay
            .submit(
                batch((0..50).map(|n| sflow("10.0.0.1", n)).collect()),
                "s",
                &lane,
            )
            .await;
        let second = replay
            .submit(batch(vec![sflow("192.0.2.1", 0)]), "s", &lane)
            .await;
        second.finished().await;
        // The slow destination's share of the first batch has left by then.
        assert_eq!(replay.states()[0].metrics.replayed.get(), 50);
        first.finished().await;
        assert_eq!(arrived(&slow).len(), 50);
        // Another connection's batch with nothing for the slow destination waits for nothing
        // there.
        let busy = replay
            .submit(
                batch((0..50).map(|n| sflow("10.0.0.1", n)).collect()),
                "s",
                &lane,
            )
            .await;
        let other = replay
            .submit(batch(vec![sflow("192.0.2.1", 1)]), "s", &Lane::default())
            .await;
        let slow_state = &replay.states()[0];
        let waits_on = |r: &Replaying| {
            let waits = r.waits.get().unwrap();
            waits.iter().any(|(d, _)| Arc::ptr_eq(d, slow_state))
        };
        assert!(waits_on(&busy));
        assert!(!waits_on(&other));
        other.finished().await;
        busy.finished().await;
        assert_eq!(slow_state.metrics.replayed.get(), 100);
    }

    #[tokio::test]
    async fn at_its_not_after_a_destination_discards_its_queue_and_the_others_carry_on() {
        let metrics = Arc::new(Metrics::default());
        let end = time::OffsetDateTime::now_utc() + Duration::from_millis(600);
        let end = end
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let (ending, ending_entry) = collector(&format!(", not-after = \"{end}\""));
        let (other, other_entry) = collector("");
        // 50 a second: the queue outlasts the not-after.
        let pace = Pace {
            max_pps: 50,
            max_bps: 0,
        };
        let mut tasks = JoinSet::new();
        let replay = Replay::start(
            &[ending_entry, other_entry],
            64,
            1 << 20,
            pace,
            metrics,
            &mut tasks,
        )
        .await
        .unwrap();
        let lane = Lane::default();
        let started = std::time::Instant::now();
        let mut last = None;
        for b in 0..4 {
            let datagrams = (0..20).map(|n| sflow("10.0.0.1", b * 20 + n)).collect();
            last = Some(replay.submit(batch(datagrams), "s", &lane).await);
        }
        // Completes (the ended destination counts as done) once the other has sent all 80.
        last.unwrap().finished().await;
        let states = replay.states();
        assert!(states[0].ended());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500), "{took:?}");
        let sent = arrived(&ending).len() as u64;
        assert!(sent > 0 && sent < 80, "{sent}");
        assert_eq!(states[0].metrics.expired.get(), 80 - sent);
        assert_eq!(arrived(&other).len(), 80);
        // Later batches skip it.
        replay
            .submit(batch(vec![sflow("10.0.0.1", 99)]), "s", &lane)
            .await
            .finished()
            .await;
        assert_eq!(arrived(&ending).len(), 0);
        assert_eq!(arrived(&other).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn paced_groups_hold_the_burst_then_the_rate() {
        let pace = Pace {
            max_pps: 1_000,
            max_bps: 0,
        };
        let mut bucket = Bucket::new(pace);
        let payload = [0u8; 1_400];
        let datagrams: Vec<&[u8]> = vec![&payload[..]; 100];
        let start = Instant::now();
        // The burst (16 datagrams) goes at once, in one group.
        assert_eq!(bucket.take_many(&datagrams).await, 16);
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Then the pace: 84 more at 1,000 a second take about 84 ms.
        let mut sent = 16;
        while sent < datagrams.len() {
            sent += bucket.take_many(&datagrams[sent..]).await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(83) && took <= Duration::from_millis(90),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_pace_limits_groups_by_size() {
        let pace = Pace {
            max_pps: 0,
            max_bps: 1_000_000,
        };
        let mut bucket = Bucket::new(pace);
        // The byte burst is two maximum datagrams (131,070 bytes): 93 of 1,400 bytes fit.
        let payload = [0u8; 1_400];
        let datagrams: Vec<&[u8]> = vec![&payload[..]; 200];
        assert_eq!(bucket.take_many(&datagrams).await, 93);
    }
}
