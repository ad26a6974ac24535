//! Letting an authenticated agent in, or not: the authorization in force (revocation,
//! allow-list, [`crate::authz`]), the per-identity connection limit, and `--max-connections`
//! for all connections; and closing the open connections a reload no longer authorizes.
//!
//! What this does not do: check certificates (rustls did, in the handshake), or log the lines
//! itself ([`crate::refusal`] words and rate-limits every refusal alike).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::Shared;
use crate::labels::{LOG_TARGET, RefusalKind, Transport};
use crate::refusal::{self, Refused};
use crate::status::{Connection, Registered};

/// Checks an authenticated agent against the authorization in force and the per-identity
/// connection limit, and registers its connection if it passes. A refusal is counted and
/// logged (rate-limited, as handshake refusals are) with the agent's name, which the CA
/// vouches for.
pub(crate) fn admit(
    shared: &Shared,
    transport: Transport,
    remote: SocketAddr,
    chain: Option<&[CertificateDer<'_>]>,
) -> Result<Registered, RefusalKind> {
    let agent: Arc<str> = chain
        .and_then(certs::load::peer_name)
        .unwrap_or_else(|| "unnamed".into())
        .into();
    let cert = chain
        .and_then(|chain| chain.first())
        .and_then(|leaf| certs::CertInfo::from_der(leaf).ok());
    let subject = cert.as_ref().map(|c| c.subject.clone());
    let admitted = shared
        .policy
        .get()
        .check(&agent, cert.as_ref())
        .and_then(|()| {
            shared.agents.connect(
                agent.clone(),
                remote,
                transport,
                cert,
                shared.config.max_connections_per_agent,
            )
        });
    if let Err(kind) = admitted {
        refusal::refused(
            shared,
            &Refused {
                transport,
                remote,
                kind,
                agent: Some(&agent),
                presented_subject: subject.as_deref(),
                reason: &kind.words(),
                message: "agent refused: not authorized",
            },
        );
    }
    admitted
}

/// Counts and logs the closing of a live connection whose agent a reload has revoked or taken
/// off the allow-list (not rate-limited: one line per connection an operator's change ends).
pub(crate) fn closed_by_policy(shared: &Shared, connection: &Connection, kind: RefusalKind) {
    shared.metrics.closed(kind).inc();
    tracing::warn!(
        target: LOG_TARGET,
        security_event = "agent_disconnected",
        agent = %connection.agent,
        remote = %connection.remote(),
        transport = connection.transport().as_str(),
        kind = kind.as_str(),
        reason = kind.words(),
        "agent disconnected: no longer authorized"
    );
}

/// Counts and logs (at most one line a second, with the count held back) a connection refused
/// because `--max-connections` are open.
pub(crate) fn over_limit(shared: &Shared, transport: Transport, remote: SocketAddr) {
    shared.metrics.connections_refused_max.inc();
    if let Some(more) = shared.limits_log.check() {
        tracing::warn!(
            target: LOG_TARGET,
            security_event = "connection_limit",
            %remote,
            transport = transport.as_str(),
            reason = "max_connections",
            max_connections = shared.config.max_connections,
            earlier_refusals_not_logged = more,
            "connection refused: --max-connections reached"
        );
    }
}
