//! Automatic renewal of the agent's certificate over the sink's enrollment port.
//!
//! A certificate renews when its sink says where: `--renew-from HOST:PORT`, or the
//! `agent.renew` file `relay-agent enroll` writes next to the certificate (`<cert>.renew`).
//! One task per certificate file (sinks that share the files share the task):
//!
//! - It renews at two thirds of the certificate's lifetime, give or take a thirtieth (so a
//!   fleet enrolled together does not renew together), authenticated by the certificate it
//!   holds, for the same name and with the same key, so that only the certificate file
//!   changes, atomically.
//! - A failure is retried with backoff (5 s, doubling, at most 15 min, never past the
//!   expiry); a refusal (revoked, not allowed) is logged as an error each time and retried
//!   the same way, in case it is lifted. A certificate that has expired cannot renew: the task
//!   says to enroll again and stops.
//! - The new certificate is put in use by the certificate reload every link already has
//!   (`runtime::reload`, prompted as by SIGHUP): connections open go on, the next ones use it.
//!
//! Metrics: `relay_agent_certificate_renewals_total{outcome}` and
//! `relay_agent_certificate_next_renewal_timestamp_seconds{cert}`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus::{GaugeVec, IntCounterVec};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::enroll::{self, EnrollError, RenewFrom};

/// First retry delay after a failed renewal.
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// One certificate that renews, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Renewal {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) from: RenewFrom,
}

/// The renewal metrics.
#[derive(Debug, Clone)]
pub(crate) struct RenewMetrics {
    outcomes: IntCounterVec,
    next: GaugeVec,
}

/// How a renewal attempt ended, as the `outcome` label.
const OUTCOMES: [&str; 4] = ["renewed", "refused", "failed", "expired"];

impl RenewMetrics {
    pub(crate) fn register(registry: &prometheus::Registry) -> Self {
        let outcomes = runtime::observe::counter_vec(
            registry,
            "relay_agent_certificate_renewals_total",
            "Renewals of the agent's certificate over the sink's enrollment port, by outcome (renewed, refused, failed, expired).",
            &["outcome"],
        );
        for outcome in OUTCOMES {
            outcomes.with_label_values(&[outcome]);
        }
        let next = runtime::observe::float_gauge_vec(
            registry,
            "relay_agent_certificate_next_renewal_timestamp_seconds",
            "When the certificate in this file is next renewed (or retried), Unix seconds.",
            &["cert"],
        );
        Self { outcomes, next }
    }
}

/// The renewals of `sinks`' certificates: those with `renew_from` given, else with an
/// `agent.renew` file next to the certificate; one per certificate file.
///
/// # Errors
///
/// An `agent.renew` file that exists but does not read.
pub(crate) fn plan(
    sinks: &[crate::config::SinkConfig],
    renew_from: Option<&str>,
) -> Result<Vec<Renewal>, String> {
    let mut plans: Vec<Renewal> = Vec::new();
    for sink in sinks {
        if plans.iter().any(|p| p.cert == sink.cert) {
            continue;
        }
        let from = match renew_from {
            Some(addr) => Some(RenewFrom {
                renew_from: addr.to_owned(),
                server_name: sink.server_name.clone(),
            }),
            None => read_renew_file(&sink.cert.with_extension("renew"))?,
        };
        if let Some(from) = from {
            plans.push(Renewal {
                ca: sink.ca.clone(),
                cert: sink.cert.clone(),
                key: sink.key.clone(),
                from,
            });
        }
    }
    Ok(plans)
}

fn read_renew_file(path: &Path) -> Result<Option<RenewFrom>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// When a certificate valid from `not_before` to `not_after` renews: at two thirds of its
/// lifetime, moved by `jitter` (-1 to 1) thirtieths of it.
pub(crate) fn due(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    jitter: f64,
) -> OffsetDateTime {
    let lifetime = not_after - not_before;
    not_before + lifetime * (2.0 / 3.0) + lifetime * (jitter.clamp(-1.0, 1.0) / 30.0)
}

/// Renews `renewal`'s certificate until `token` is cancelled.
pub(crate) async fn run(renewal: Renewal, metrics: RenewMetrics, token: CancellationToken) {
    let label = renewal.cert.display().to_string();
    let next = metrics.next.with_label_values(&[&label]);
    let mut retry = RETRY_MIN;
    let mut failed_at: Option<OffsetDateTime> = None;
    loop {
        let held = match Held::read(&renewal) {
            Ok(held) => held,
            Err(error) => {
                tracing::error!(cert = %label, %error, "cannot read the certificate to renew; trying again in a minute");
                failed_at = Some(OffsetDateTime::now_utc());
                if sleep_or_stop(Duration::from_secs(60), &token).await {
                    return;
                }
                continue;
            }
        };
        let info = held.identity.info().clone();
        let mut at = due(
            info.not_before,
            info.not_after,
            rand::random_range(-1.0..=1.0),
        );
        if let Some(failed) = failed_at {
            at = at.max(failed + retry).min(info.not_after);
        }
        next.set(at.unix_timestamp() as f64);
        let wait = (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        if sleep_or_stop(wait.unsigned_abs(), &token).await {
            return;
        }
        if OffsetDateTime::now_utc() >= info.not_after {
            metrics.outcomes.with_label_values(&["expired"]).inc();
            tracing::error!(cert = %label, expired = %certs::inspect::rfc3339(info.not_after), "the certificate has expired and cannot renew: enroll again with a new token (relay-agent enroll)");
            return;
        }
        let attempted = tokio::select! {
            attempted = attempt(&renewal, &held) => attempted,
            () = token.cancelled() => return,
        };
        match attempted {
            Ok(not_after) => {
                metrics.outcomes.with_label_values(&["renewed"]).inc();
                tracing::info!(cert = %label, agent = held.identity.name(), until = %not_after, "certificate renewed; the next connections use it");
                (retry, failed_at) = (RETRY_MIN, None);
                if let Err(error) = runtime::reload::prompt() {
                    tracing::error!(%error, "cannot prompt the certificate reload; the new certificate is used from the next reload poll");
                }
            }
            Err(error) => {
                let refused = matches!(error, EnrollError::Refused(_));
                let outcome = if refused { "refused" } else { "failed" };
                metrics.outcomes.with_label_values(&[outcome]).inc();
                let expires = certs::inspect::rfc3339(info.not_after);
                if refused {
                    tracing::error!(cert = %label, %error, %expires, "certificate renewal refused; the certificate in use stays until it expires");
                } else {
                    tracing::warn!(cert = %label, %error, %expires, retry_in = ?retry, "certificate renewal failed; retrying");
                }
                failed_at = Some(OffsetDateTime::now_utc());
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Sleeps `wait`; `true` when `token` was cancelled first.
async fn sleep_or_stop(wait: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = token.cancelled() => true,
    }
}

/// The certificate held now, with its key and CA.
struct Held {
    ca: certs::TrustAnchors,
    identity: certs::Identity,
    key_pem: String,
}

impl Held {
    fn read(renewal: &Renewal) -> Result<Self, String> {
        let ca = certs::TrustAnchors::load(&renewal.ca).map_err(|e| e.to_string())?;
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        // Each file read once: the key is needed as text too, for the signing request.
        let key_pem = read(&renewal.key)?;
        let identity = certs::Identity::from_pem(
            &read(&renewal.cert)?,
            &key_pem,
            &renewal.cert.display().to_string(),
            &renewal.key.display().to_string(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            ca,
            identity,
            key_pem,
        })
    }
}

/// One renewal: asks, checks the answer, writes the certificate file.
async fn attempt(renewal: &Renewal, held: &Held) -> Result<String, EnrollError> {
    let issued = enroll::renew(&renewal.from, &held.ca, &held.identity, &held.key_pem).await?;
    enroll::store_renewed(
        &renewal.cert,
        &issued,
        &held.ca,
        &held.key_pem,
        held.identity.name(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_give_or_take_a_thirtieth() {
        let start = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let end = start + time::Duration::days(30);
        assert_eq!(due(start, end, 0.0), start + time::Duration::days(20));
        assert_eq!(due(start, end, 1.0), start + time::Duration::days(21));
        assert_eq!(due(start, end, -1.0), start + time::Duration::days(19));
        assert_eq!(due(start, end, 7.0), start + time::Duration::days(21));
    }
}
