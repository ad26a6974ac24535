//! Certificate reload, per sink: each sink's CA, certificate and key files are checked again on
//! SIGHUP and every `--cert-reload-interval`, and a new valid set is used from that link's next
//! connection. When the checks run is `runtime::reload`'s; what a file set must satisfy is
//! `certs::Reloader`'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use runtime::reload::{Prompt, Reload};

use crate::transport;

/// One sink's certificate files and the credentials its link connects with.
pub(crate) struct SinkReload {
    /// The sink's address, for the log.
    pub(crate) sink: String,
    /// The files, and what was read from them last.
    pub(crate) reloader: certs::Reloader,
    /// What the link's next connection uses.
    pub(crate) credentials: Arc<transport::Credentials>,
    /// The QUIC transport settings a new client configuration is built with.
    pub(crate) transport: Arc<quinn::TransportConfig>,
    /// The certificate's expiry (Unix seconds), for the metrics.
    pub(crate) certificate_not_after: Arc<AtomicI64>,
}

impl Reload for SinkReload {
    /// Checks the files; a new valid set is used from the link's next connection.
    fn check(&mut self, prompt: Prompt) {
        let checked = if prompt.forced() {
            self.reloader.force().map(Some)
        } else {
            self.reloader.check()
        };
        let loaded = match checked {
            Ok(Some(loaded)) => loaded,
            Ok(None) => return,
            Err(error) => {
                tracing::error!(sink = %self.sink, prompt = prompt.as_str(), %error, "certificate reload refused: the certificate in use stays");
                return;
            }
        };
        if let Err(error) = self.credentials.replace(&loaded, &self.transport) {
            tracing::error!(sink = %self.sink, %error, "certificate reload refused: the certificate in use stays");
            return;
        }
        let info = loaded.identity.info();
        self.certificate_not_after
            .store(info.not_after.unix_timestamp(), Ordering::Relaxed);
        tracing::info!(
            sink = %self.sink,
            prompt = prompt.as_str(),
            identity = loaded.identity.name(),
            serial = %info.serial,
            expires = %certs::inspect::rfc3339(info.not_after),
            "certificates reloaded: the next connection to the sink uses them"
        );
    }
}
