//! Reloading the destinations' routes: on SIGHUP and each reload poll, the `[[forward]]`
//! entries of the config file are read again, and the `agents`, `sites` and `not-after` of
//! each destination running now (matched by `addr`) are put in force from its next batch. A
//! destination whose route did not change is not touched.
//!
//! What a reload cannot do, and says so (once per change, not at every poll): add or remove a
//! destination, or bring back one that has ended (both need a restart). A file that does not
//! read, or an entry that does not check, is refused whole: the routes in use stay.

use std::path::PathBuf;
use std::sync::Arc;

use runtime::reload::Prompt;

use crate::config::forward;
use crate::replay::DestinationState;

/// The config file the destinations came from, and the destinations.
pub(crate) struct ForwardReload {
    file: PathBuf,
    /// Every `addr` configured at start, running or not (skipped as ended, or ended since).
    started: Vec<String>,
    /// The destinations that were started.
    destinations: Vec<Arc<DestinationState>>,
    /// What was last said of the file (an error, entries a restart would add or remove), so
    /// that a poll repeats nothing the log already says.
    last_said: Option<String>,
}

impl ForwardReload {
    /// Reloads the destinations' routes from `file`; `started` lists every configured
    /// address.
    pub(crate) fn new(
        file: PathBuf,
        started: Vec<String>,
        destinations: Vec<Arc<DestinationState>>,
    ) -> Self {
        Self {
            file,
            started,
            destinations,
            last_said: None,
        }
    }

    /// Reads the file again and applies what changed; logs what it did or refused.
    pub(crate) fn check(&mut self, prompt: Prompt) {
        let entries = match forward::read_file(&self.file) {
            Ok(entries) => entries,
            Err(error) => {
                if self.say(prompt, &error) {
                    tracing::error!(prompt = prompt.as_str(), %error, "forward reload refused: the routes in use stay");
                }
                return;
            }
        };
        let added: Vec<&str> = (entries.iter().map(|e| e.addr.as_str()))
            .filter(|addr| !self.started.iter().any(|s| s == addr))
            .collect();
        let removed: Vec<&str> = (self.started.iter().map(String::as_str))
            .filter(|addr| !entries.iter().any(|e| e.addr == *addr))
            .collect();
        let mut restart = Vec::new();
        if !added.is_empty() {
            restart.push(format!("added {}", added.join(", ")));
        }
        if !removed.is_empty() {
            restart.push(format!("removed {}", removed.join(", ")));
        }
        for entry in &entries {
            let Some(destination) = self.destinations.iter().find(|d| d.name == entry.addr) else {
                continue;
            };
            if *destination.route() == entry.route {
                continue;
            }
            if destination.ended() {
                restart.push(format!("{} has ended", entry.addr));
                continue;
            }
            destination.set_route(entry.route.clone());
            tracing::info!(
                prompt = prompt.as_str(),
                destination = %entry.addr,
                filter = entry.route.describe(),
                not_after = entry.route.not_after().map_or("none", |end| end.as_str()),
                "destination route reloaded: applies from the next batch"
            );
        }
        let restart = restart.join("; ");
        if !restart.is_empty() && self.say(prompt, &restart) {
            tracing::warn!(
                prompt = prompt.as_str(),
                changes = restart,
                "forward destinations added, removed or ended need a restart of the sink; the routes of the others are reloaded"
            );
        }
        if restart.is_empty() {
            self.last_said = None;
        }
    }

    /// Whether to log `what`: on SIGHUP always, on a poll when it was not the last thing said.
    fn say(&mut self, prompt: Prompt, what: &str) -> bool {
        let new = self.last_said.as_deref() != Some(what);
        self.last_said = Some(what.to_owned());
        new || prompt.forced()
    }
}
