//! Each sink's route over time: the table the batcher reads (which datagrams each sink
//! takes), the end of a sink's feed at its `not-after`, and the routes read again from the
//! config file on SIGHUP and every reload poll.
//!
//! What a route matches is `runtime::route`'s; how the batcher applies the table is
//! `batch`'s. Ending a feed closes the sink's link, throws away its backlog, removes its spool
//! folder and logs one INFO line; the other sinks carry on untouched. A reload changes the
//! `agents` and `not-after` of the sinks the agent runs; adding or removing a `[[sink]]`
//! entry, or starting a feed that has ended, takes a restart (and says so).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use runtime::reload::{Prompt, Reload};
use runtime::route::Route;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::backlog::Backlog;
use crate::batch::Routes;
use crate::config::{Config, SinkConfig, Source};
use crate::metrics::{InUse, SinkMetrics};

/// The longest a feed's end is waited for in one sleep: the wall clock it is set in may be
/// stepped meanwhile, so the time left is worked out again at least this often.
const RECHECK: Duration = Duration::from_secs(60);

/// The routes of the sinks the agent runs, shared by the batcher (reading), the feeds'
/// ends and the reload (writing).
pub(crate) type Table = Arc<watch::Sender<Routes>>;

/// A new table with each sink's configured route.
pub(crate) fn table(sinks: &[SinkConfig]) -> Table {
    let routes = sinks.iter().map(|sink| Some(sink.route.clone())).collect();
    Arc::new(watch::Sender::new(Arc::new(routes)))
}

/// Leaves out of `config` the sinks whose `not-after` has already passed, each with a
/// warning, and removes their spool folders (what they hold was for a feed that has ended).
///
/// # Errors
///
/// When no sink is left.
pub(crate) fn skip_ended(config: &mut Config, now: SystemTime) -> Result<(), crate::Error> {
    let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(&mut config.sinks)
        .into_iter()
        .partition(|sink| sink.route.expired(now));
    for sink in &ended {
        let not_after = sink.route.not_after().map_or("", |end| end.as_str());
        let spool = config
            .spool_dir
            .as_deref()
            .map(|dir| spool_dir(dir, &sink.addr));
        let removed = spool.as_deref().is_some_and(remove_spool);
        tracing::warn!(sink = %sink.addr, not_after, spool_removed = removed, "this sink's feed ended before start-up (not-after): skipped; the other sinks run");
    }
    config.sinks = running;
    if config.sinks.is_empty() {
        return Err(crate::Error::Config(
            "every [[sink]]".into(),
            "not-after has passed: no sink is left to relay to".into(),
        ));
    }
    Ok(())
}

/// A sink's folder in the spool directory: its address, made safe as a file name.
pub(crate) fn spool_dir(spool: &Path, addr: &str) -> PathBuf {
    let name: String = addr
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    spool.join(name)
}

/// Removes a spool folder; whether there was one to remove (a failure is logged).
fn remove_spool(dir: &Path) -> bool {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            tracing::error!(spool = %dir.display(), %error, "cannot remove the spool folder of a sink whose feed has ended");
            false
        }
    }
}

/// What ending one sink's feed takes away.
pub(crate) struct Feed {
    /// The sink's place in the table.
    pub(crate) index: usize,
    /// The sink's address, for the log.
    pub(crate) addr: String,
    /// The link task (send, resend, reconnect).
    pub(crate) link: AbortHandle,
    /// The intake task (batcher → backlog).
    pub(crate) intake: AbortHandle,
    pub(crate) backlog: Arc<Backlog>,
    /// The sink's spool folder, when there is a spool.
    pub(crate) spool_dir: Option<PathBuf>,
    pub(crate) metrics: Arc<SinkMetrics>,
    /// Set once the feed has ended (readiness leaves the sink out then).
    pub(crate) ended: Arc<AtomicBool>,
}

/// Waits for the sink's `not-after` (as the table has it, reloads included) and ends its
/// feed then. Runs until then, or until aborted at shutdown.
pub(crate) async fn end_at_not_after(feed: Feed, table: Table) {
    let mut routes = table.subscribe();
    loop {
        let route = routes.borrow_and_update()[feed.index].clone();
        let Some(route) = route else { return };
        let end = route.not_after().map_or(0, |end| end.unix_seconds());
        feed.metrics.not_after.set(end);
        match route.remaining(SystemTime::now()) {
            Some(left) if left.is_zero() => break end_feed(&feed, &route, &table),
            Some(left) => {
                tokio::select! {
                    () = tokio::time::sleep(left.min(RECHECK)) => {}
                    changed = routes.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if routes.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Ends a sink's feed: out of the table (the batcher stops making its batches), its link
/// closed, its backlog and spool folder thrown away; one INFO line.
fn end_feed(feed: &Feed, route: &Route, table: &Table) {
    table.send_modify(|routes| Arc::make_mut(routes)[feed.index] = None);
    feed.intake.abort();
    feed.link.abort();
    feed.ended.store(true, Ordering::Relaxed);
    let (batches, datagrams) = feed.backlog.discard();
    let spool_removed = feed.spool_dir.as_deref().is_some_and(remove_spool);
    feed.metrics.set_transport(InUse::None);
    tracing::info!(
        sink = %feed.addr,
        not_after = route.not_after().map_or("", |end| end.as_str()),
        discarded_batches = batches,
        discarded_datagrams = datagrams,
        spool_removed,
        "this sink's feed has ended (not-after): link closed, backlog and spool removed; the other sinks carry on"
    );
}

/// The sinks' routes, read again from the config file.
pub(crate) struct RoutesReload {
    /// The command line and config file; `None` without a file (nothing to reload).
    pub(crate) source: Option<Source>,
    /// The address of each sink in the table, in its order.
    pub(crate) addrs: Vec<String>,
    pub(crate) table: Table,
    /// What was said last (an error, or what takes a restart), so a poll does not repeat it.
    said: BTreeSet<String>,
}

impl RoutesReload {
    /// A reload of the routes in `table`, whose sinks are `addrs`, from `source`.
    pub(crate) fn new(source: Option<Source>, addrs: Vec<String>, table: Table) -> Self {
        Self {
            source,
            addrs,
            table,
            said: BTreeSet::new(),
        }
    }

    /// Logs `line` at WARN unless the last check said it already (always on SIGHUP).
    fn say(&self, next: &mut BTreeSet<String>, prompt: Prompt, sink: &str, line: String) {
        if prompt.forced() || !self.said.contains(&line) {
            tracing::warn!(sink, prompt = prompt.as_str(), "{line}");
        }
        next.insert(line);
    }

    /// Puts the new routes of the sinks that run in the table; what takes a restart is said.
    fn apply(&mut self, config: &Config, prompt: Prompt) {
        let mut said = BTreeSet::new();
        let now = SystemTime::now();
        let mut changed = Vec::new();
        let mut restart = Vec::new();
        self.table.send_if_modified(|routes| {
            let routes = Arc::make_mut(routes);
            for (index, addr) in self.addrs.iter().enumerate() {
                let new = config.sinks.iter().find(|sink| &sink.addr == addr);
                match (new, &routes[index]) {
                    (None, _) => restart.push((addr.clone(), "this [[sink]] entry is no longer in the configuration file: removing a sink takes a restart; it is relayed to as before")),
                    (Some(new), None) if !new.route.expired(now) => restart.push((addr.clone(), "this sink's feed has ended (not-after); starting it again takes a restart")),
                    (Some(new), Some(old)) if *old != new.route => {
                        routes[index] = Some(new.route.clone());
                        changed.push(new);
                    }
                    _ => {}
                }
            }
            !changed.is_empty()
        });
        for sink in config
            .sinks
            .iter()
            .filter(|s| !self.addrs.contains(&s.addr))
        {
            if !sink.route.expired(now) {
                restart.push((
                    sink.addr.clone(),
                    "a new [[sink]] entry in the configuration file: adding a sink takes a restart",
                ));
            }
        }
        for (sink, line) in restart {
            self.say(&mut said, prompt, &sink, line.to_owned());
        }
        for sink in changed {
            tracing::info!(
                sink = %sink.addr,
                prompt = prompt.as_str(),
                route = %sink.route.describe(),
                not_after = sink.route.not_after().map_or("", |end| end.as_str()),
                "sink route reloaded: it applies from the next batch"
            );
        }
        self.said = said;
    }
}

impl Reload for RoutesReload {
    /// Reads the config file again; the routes that changed apply from the next batch. A
    /// file that no longer reads is refused (the routes in use stay).
    fn check(&mut self, prompt: Prompt) {
        let Some(source) = &self.source else { return };
        match source.read() {
            Ok(config) => self.apply(&config, prompt),
            Err(error) => {
                let line = format!(
                    "configuration file {}: {error}; the sinks' routes in use stay",
                    source.file.display()
                );
                if prompt.forced() || !self.said.contains(&line) {
                    tracing::error!(prompt = prompt.as_str(), "{line}");
                }
                self.said = BTreeSet::from([line]);
            }
        }
    }
}
