//! When to re-read certificate files: at once on SIGHUP, and every `--cert-reload-interval`
//! (a renewed certificate from cert-manager or a cron job is then picked up without anyone
//! sending a signal). What to do with the files is the caller's: `certs::reload` checks them,
//! and each binary has a [`Reload`] type that swaps its TLS configurations (the agent one per
//! sink, the sink one for its certificate, allow-list and revocation list together).
//!
//! Files are polled, not watched with inotify: a Kubernetes secret volume replaces its files
//! through a symlink swap that file watches miss, and a poll every few seconds costs nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::duration;

/// Default interval between checks of the certificate files.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// Certificate reload options, the same on both binaries (flags and config keys).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReloadOptions {
    /// Check the CA, certificate and key files this often and use them once they change
    /// (a bad set is refused, the old one stays); 0s checks only on SIGHUP. [default: 30s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub cert_reload_interval: Option<Duration>,
}

impl ReloadOptions {
    /// The poll interval; `None` for SIGHUP only.
    pub fn interval(&self) -> Option<Duration> {
        let interval = self.cert_reload_interval.unwrap_or(DEFAULT_INTERVAL);
        (!interval.is_zero()).then_some(interval)
    }
}

/// What prompted a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt {
    /// SIGHUP: the operator asks for it.
    Signal,
    /// The poll interval came round.
    Poll,
}

impl Prompt {
    /// As a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "SIGHUP",
            Self::Poll => "file check",
        }
    }

    /// Whether every file is read again, changed or not (SIGHUP), rather than only the
    /// changed ones (a poll).
    pub fn forced(self) -> bool {
        self == Self::Signal
    }
}

/// Files checked again on SIGHUP and every poll interval, and what is done with a new set.
pub trait Reload: Send + 'static {
    /// Checks the files once; a new valid set is put in use, a bad one refused (the set in
    /// use stays). Logs either way: this runs in a task of its own, with no caller to tell.
    fn check(&mut self, prompt: Prompt);
}

/// Two kinds of files (say, certificates and the configuration file), checked in turn.
impl<A: Reload, B: Reload> Reload for (A, B) {
    fn check(&mut self, prompt: Prompt) {
        self.0.check(prompt);
        self.1.check(prompt);
    }
}

/// Several sets of files (the agent's, one per sink), checked in turn.
impl<R: Reload> Reload for Vec<R> {
    fn check(&mut self, prompt: Prompt) {
        for reload in self {
            reload.check(prompt);
        }
    }
}

/// Takes over SIGHUP (whose default action would end the process) and checks `reload` on each
/// one and every `interval`, until `token` is cancelled. Spawn it early: a SIGHUP that comes
/// before it runs ends the process.
///
/// # Errors
///
/// When the signal handler cannot be installed.
pub fn spawn(
    interval: Option<Duration>,
    token: CancellationToken,
    mut reload: impl Reload,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        let mut ticker = interval.map(|every| {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        loop {
            let poll = async {
                match &mut ticker {
                    Some(ticker) => {
                        ticker.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let prompt = tokio::select! {
                () = token.cancelled() => return,
                got = hangups.recv() => match got {
                    Some(()) => Prompt::Signal,
                    None => return,
                },
                () = poll => Prompt::Poll,
            };
            reload.check(prompt);
        }
    }))
}

/// Prompts the reload of this process now, as a SIGHUP does (for a process that has just
/// replaced its own certificate file, say). Needs [`spawn`]'s handler in place.
///
/// # Errors
///
/// When the signal cannot be sent.
pub fn prompt() -> std::io::Result<()> {
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).map_err(std::io::Error::from)
}

/// A value swapped whole while readers take it (a TLS configuration): readers get the one
/// current when they ask and keep it as long as they need it.
#[derive(Debug)]
pub struct Swap<T>(std::sync::RwLock<std::sync::Arc<T>>);

impl<T> Swap<T> {
    /// Holds `value`.
    pub fn new(value: T) -> Self {
        Self(std::sync::RwLock::new(std::sync::Arc::new(value)))
    }

    /// The current value.
    pub fn get(&self) -> std::sync::Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the value; readers holding the old one keep it.
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(value);
    }
}
