//! The sink's TLS configurations, and their reload: the certificate files and the
//! authorization files (allow-list, CRL) are checked again on SIGHUP and every
//! `--cert-reload-interval`; a new valid set is used for new connections, and a changed
//! allow-list or CRL also closes the open connections it no longer admits. The destinations'
//! routes are reloaded at the same moments, from the config file ([`forward`]).
//!
//! When the checks run is `runtime::reload`'s; what a file set must satisfy is
//! `certs::Reloader`'s and `authz::PolicyFiles`'. The agent's counterpart is
//! `relay_agent::reload::SinkReload`, one per sink.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use runtime::reload::{Prompt, Reload, Swap};

use crate::{Shared, admission, authz, status};

pub(crate) mod forward;

/// The sink's TLS configurations, from one checked set of files.
pub(crate) struct Tls {
    /// For the QUIC endpoint.
    pub(crate) quic: quinn::ServerConfig,
    /// For the gRPC listener.
    pub(crate) grpc: rustls::ServerConfig,
}

/// Why the TLS configurations could not be built from a set of certificates.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// The certificates, key or CRLs do not make a rustls configuration.
    #[error(transparent)]
    Certs(#[from] certs::Error),
    /// rustls's configuration does not suit QUIC (no TLS 1.3 cipher suite QUIC can use).
    #[error(transparent)]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

impl Tls {
    /// Both configurations from `loaded`, with the CRLs of `revocation`.
    pub(crate) fn build(
        loaded: &certs::Loaded,
        transport: &Arc<quinn::TransportConfig>,
        revocation: &certs::Revocation,
    ) -> Result<Self, TlsError> {
        // An agent that offers compression gets it, against the stream's history if it offers
        // that; an older agent (one-shot zstd, or plain ALPN only) is served as before.
        let server = |alpn: &[&[u8]]| {
            certs::server_config_with_crls(&loaded.ca, &loaded.identity, alpn, revocation)
        };
        let tls = server(proto::RELAY_ALPNS)?;
        let grpc = server(&[proto::GRPC_ALPN])?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut quic = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        quic.transport_config(transport.clone());
        Ok(Self { quic, grpc })
    }
}

/// The sink's certificate and authorization files, and where a new set is put in use.
pub(crate) struct SinkReload {
    /// The certificate files, and what was read from them last.
    pub(crate) reloader: certs::Reloader,
    /// The allow-list and CRL files.
    pub(crate) policy_files: authz::PolicyFiles,
    /// The certificates in use (rebuilt into the TLS configurations with a new policy).
    pub(crate) current: certs::Loaded,
    /// The QUIC transport settings new configurations are built with.
    pub(crate) transport: Arc<quinn::TransportConfig>,
    /// Takes the new QUIC configuration.
    pub(crate) endpoint: quinn::Endpoint,
    /// Takes the new gRPC configuration.
    pub(crate) grpc_tls: Arc<Swap<rustls::ServerConfig>>,
    /// Shows the certificate's expiry.
    pub(crate) status: Arc<status::SinkStatus>,
    /// Takes the new policy; its open connections are checked against it.
    pub(crate) shared: Arc<Shared>,
    /// The destinations' routes, when they came from a config file.
    pub(crate) forward: Option<forward::ForwardReload>,
    /// The enrollment port's configuration, when it is served.
    pub(crate) enroll_tls: Option<EnrollTls>,
}

/// Where the enrollment port's TLS configuration is put in use, and the root it serves.
pub(crate) struct EnrollTls {
    pub(crate) swap: Arc<Swap<rustls::ServerConfig>>,
    pub(crate) root: rustls::pki_types::CertificateDer<'static>,
}

impl Reload for SinkReload {
    fn check(&mut self, prompt: Prompt) {
        if let Some(forward) = &mut self.forward {
            forward.check(prompt);
        }
        let certificates = match self.reloader_check(prompt) {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::error!(prompt = prompt.as_str(), %error, "certificate reload refused: the certificate in use stays");
                None
            }
        };
        let policy = match self.policy_files.check(prompt.forced()) {
            Ok(policy) => policy,
            Err(error) => {
                tracing::error!(prompt = prompt.as_str(), %error, "authorization reload refused: the allow-list and revocation list in use stay");
                None
            }
        };
        if certificates.is_none() && policy.is_none() {
            return;
        }
        if !self.swap_tls(certificates.as_ref(), policy.as_ref()) {
            return;
        }
        if let Some(loaded) = certificates {
            self.certificates_in_use(prompt, loaded);
        }
        if let Some(policy) = policy {
            self.policy_in_use(prompt, policy);
        }
    }
}

impl SinkReload {
    /// Every certificate file read again on SIGHUP; on a poll, only when one changed.
    fn reloader_check(&mut self, prompt: Prompt) -> Result<Option<certs::Loaded>, certs::Error> {
        if prompt.forced() {
            self.reloader.force().map(Some)
        } else {
            self.reloader.check()
        }
    }

    /// Builds the TLS configurations from the new certificates and revocation list (or those
    /// in use) and puts them in use for new connections; `false` (logged) when they cannot
    /// be built, and the configurations in use stay.
    fn swap_tls(
        &self,
        certificates: Option<&certs::Loaded>,
        policy: Option<&authz::Policy>,
    ) -> bool {
        let loaded = certificates.unwrap_or(&self.current);
        let revocation = policy.map_or_else(
            || self.shared.policy.get().revocation.clone(),
            |p| p.revocation.clone(),
        );
        match Tls::build(loaded, &self.transport, &revocation) {
            Ok(tls) => {
                self.endpoint.set_server_config(Some(tls.quic));
                self.grpc_tls.set(tls.grpc);
                if let Some(enroll) = &self.enroll_tls {
                    match certs::enroll_tls::enrollment_server_config(
                        &loaded.ca,
                        &enroll.root,
                        &loaded.identity,
                    ) {
                        Ok(config) => enroll.swap.set(config),
                        Err(error) => {
                            tracing::error!(%error, "the enrollment port keeps its certificate: the new one does not make its configuration");
                        }
                    }
                }
                true
            }
            Err(error) => {
                tracing::error!(%error, "certificate reload refused: the certificate in use stays");
                false
            }
        }
    }

    /// Records and logs the new certificates, now in the TLS configurations.
    fn certificates_in_use(&mut self, prompt: Prompt, loaded: certs::Loaded) {
        let info = loaded.identity.info();
        self.status
            .certificate_not_after
            .store(info.not_after.unix_timestamp(), Ordering::Relaxed);
        tracing::info!(
            prompt = prompt.as_str(),
            identity = loaded.identity.name(),
            serial = %info.serial,
            expires = %certs::inspect::rfc3339(info.not_after),
            "certificates reloaded: new connections use them"
        );
        self.current = loaded;
    }

    /// Puts the new policy in force, and closes the open connections it no longer admits.
    fn policy_in_use(&self, prompt: Prompt, policy: authz::Policy) {
        tracing::info!(
            prompt = prompt.as_str(),
            revoked = policy.revocation.len(),
            allowed_agents = policy
                .allowed_count()
                .map_or_else(|| "any".into(), |n| n.to_string()),
            "agent authorization reloaded: applies to new and open connections"
        );
        let shared = &self.shared;
        shared.policy.set(policy);
        for (connection, kind) in shared.agents.close_unauthorized(&shared.policy.get()) {
            admission::closed_by_policy(shared, &connection, kind);
        }
    }
}
