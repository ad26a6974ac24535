//! `relay-agent enroll`: obtain this site's certificate from a sink with a one-time token,
//! the private key made here and never sent.
//!
//! 1. The token is read (not verified: that is the sink's job) for the name it allows and
//!    the fingerprint of the root CA the sink must present.
//! 2. The key is made, or the one a previous run left is taken again: it is written (mode
//!    0600) before anything is sent, so a run killed while waiting for the answer leaves it,
//!    and the next run with the same token gets the certificate the sink issues again for
//!    that key, where a new key would be refused.
//! 3. The connection to the sink's enrollment port trusts only the root the token names
//!    (`certs::enroll_tls::pinned_client_config`): another sink fails before a byte of the
//!    request is sent.
//! 4. The answer is checked (the root's fingerprint, the certificate's name and key, its chain
//!    to the root) and written: `ca.pem`, `agent.pem` (the chain), next to `agent.key`, each
//!    atomically; and `agent.renew`, which tells the running agent where to renew.
//!
//! Run again after success, it says so and does nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::store::{self, Secrecy};
use hyper_util::rt::TokioIo;
use proto::enroll_pb::enrollment_client::EnrollmentClient;
use proto::enroll_pb::{EnrollRequest, Issued, RenewRequest};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// The files `enroll` writes in its folder.
pub const CA_FILE: &str = "ca.pem";
/// The certificate chain.
pub const CERT_FILE: &str = "agent.pem";
/// The private key (0600).
pub const KEY_FILE: &str = "agent.key";
/// Where to renew: the sink's enrollment address and name (TOML).
pub const RENEW_FILE: &str = "agent.renew";

/// How long a connection and call to the enrollment port may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `relay-agent enroll`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// The sink's enrollment address (its --enroll-listen), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub sink: String,
    /// The one-time token (`relay-certs token`), or @FILE to read it from a file.
    #[arg(long, value_name = "TOKEN")]
    pub token: String,
    /// The folder to write ca.pem, agent.pem and agent.key to (created, mode 0700).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The name the sink's certificate must carry. [default: the host of --sink]
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
}

/// Where an enrolled agent renews (written next to its certificate as `agent.renew`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RenewFrom {
    /// The sink's enrollment address, HOST:PORT.
    pub renew_from: String,
    /// The name its certificate carries.
    pub server_name: String,
}

/// Why enrolling failed, in words for the operator.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// What the user gave cannot work.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{0}")]
    Files(String),
    /// The sink could not be reached, or the TLS handshake failed.
    #[error("cannot reach the sink's enrollment port {addr}: {reason}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The sink refused.
    #[error("the sink refused: {0}")]
    Refused(String),
    /// The sink's answer does not hold what was asked for.
    #[error("the sink's answer is not usable: {0}")]
    Answer(String),
}

/// What `enroll` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// A certificate was obtained and written.
    Done {
        /// The agent's name.
        name: String,
        /// Its end of validity (RFC 3339).
        not_after: String,
    },
    /// The folder already holds a valid certificate for the token's name.
    Already {
        /// The agent's name.
        name: String,
        /// Its end of validity (RFC 3339).
        not_after: String,
    },
}

/// Runs `relay-agent enroll`.
///
/// # Errors
///
/// As [`EnrollError`]: each says what to do.
pub async fn enroll(args: &EnrollArgs) -> Result<Enrolled, EnrollError> {
    let text = token_text(&args.token)?;
    let (token, _) =
        certs::token::parse(&text).map_err(|e| EnrollError::Usage(format!("--token: {e}")))?;
    let name = token.name.clone();
    let (host, _) = split_host(&args.sink)?;
    let server_name = args.server_name.clone().unwrap_or(host);
    let dir = &args.dir;
    if let Some(done) = already(dir, &name, &token.root_fingerprint)? {
        return Ok(done);
    }
    create_dir(dir)?;
    let key_pem = key(dir)?;
    let request = certs::request::with_key(&key_pem, &name)
        .map_err(|e| EnrollError::Usage(format!("cannot make the signing request: {e}")))?;
    let tls = certs::enroll_tls::pinned_client_config(token.root_fingerprint)
        .map_err(|e| EnrollError::Usage(e.to_string()))?;
    let mut client = connect(&args.sink, &server_name, tls).await?;
    let call = client.enroll(EnrollRequest {
        token: text,
        csr_der: csr_der(&request.csr_pem)?.into(),
    });
    let issued = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| EnrollError::Connect {
            addr: args.sink.clone(),
            reason: format!("no answer in {CALL_TIMEOUT:?}"),
        })?
        .map_err(|status| EnrollError::Refused(status.message().to_owned()))?
        .into_inner();
    let not_after = store_issued(dir, &issued, &key_pem, &name, Some(&token.root_fingerprint))?;
    let renew = RenewFrom {
        renew_from: args.sink.clone(),
        server_name,
    };
    let renew_text = toml::to_string(&renew).map_err(|e| EnrollError::Files(e.to_string()))?;
    write(
        &dir.join(RENEW_FILE),
        renew_text.as_bytes(),
        Secrecy::Public,
    )?;
    Ok(Enrolled::Done { name, not_after })
}

/// The token given, or read from `@FILE`, trimmed.
fn token_text(given: &str) -> Result<String, EnrollError> {
    match given.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file)
            .map(|t| t.trim().to_owned())
            .map_err(|e| EnrollError::Usage(format!("--token @{file}: {e}"))),
        None => Ok(given.trim().to_owned()),
    }
}

/// `HOST:PORT` (or `[V6]:PORT`) split; the host without brackets.
fn split_host(addr: &str) -> Result<(String, u16), EnrollError> {
    let bad = || EnrollError::Usage(format!("--sink {addr:?} is not HOST:PORT"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// The folder's certificate, when it is already a valid one for `name` under the root the
/// token names.
fn already(
    dir: &Path,
    name: &str,
    root_fingerprint: &[u8; 32],
) -> Result<Option<Enrolled>, EnrollError> {
    let (cert, ca) = (dir.join(CERT_FILE), dir.join(CA_FILE));
    if !cert.exists() {
        return Ok(None);
    }
    let files = certs::TlsFiles {
        ca: ca.clone(),
        cert: cert.clone(),
        key: dir.join(KEY_FILE),
    };
    let (_, loaded, chained) = certs::Reloader::open(files, certs::Role::Agent).map_err(|e| {
        EnrollError::Files(format!(
            "{} holds a certificate that cannot be used ({e}); remove it, or enroll into another --dir",
            dir.display()
        ))
    })?;
    let info = loaded.identity.info();
    let root = std::fs::read(&ca).unwrap_or_default();
    let root_matches = CertificateDer::from_pem_slice(&root)
        .is_ok_and(|der| certs::token::fingerprint(&der) == *root_fingerprint);
    if info.name() != Some(name) || !chained || !root_matches {
        return Err(EnrollError::Files(format!(
            "{} already holds a certificate for {:?} under another CA or name; enroll into another --dir",
            dir.display(),
            info.name().unwrap_or("?")
        )));
    }
    Ok(Some(Enrolled::Already {
        name: name.to_owned(),
        not_after: certs::inspect::rfc3339(info.not_after),
    }))
}

fn create_dir(dir: &Path) -> Result<(), EnrollError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| EnrollError::Files(format!("cannot create {}: {e}", dir.display())))
}

/// The key in the folder, or a new one written there first.
fn key(dir: &Path) -> Result<String, EnrollError> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            tracing::info!(key = %path.display(), "using the key a previous run made");
            Ok(pem)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key_pem = certs::request::new_key()
                .map_err(|e| EnrollError::Usage(format!("cannot make a key: {e}")))?;
            write(&path, key_pem.as_bytes(), Secrecy::Private)?;
            Ok(key_pem)
        }
        Err(e) => Err(EnrollError::Files(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn write(path: &Path, contents: &[u8], secrecy: Secrecy) -> Result<(), EnrollError> {
    store::write(path, contents, secrecy).map_err(|e| EnrollError::Files(e.to_string()))
}

fn csr_der(pem: &str) -> Result<Vec<u8>, EnrollError> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.as_ref().to_vec())
        .map_err(|e| EnrollError::Usage(format!("signing request: {e}")))
}

/// Checks an answer against the key and the name asked for (and the root the token names,
/// when enrolling), then writes `ca.pem` and `agent.pem`; returns the end of validity.
pub(crate) fn store_issued(
    dir: &Path,
    issued: &Issued,
    key_pem: &str,
    name: &str,
    root_fingerprint: Option<&[u8; 32]>,
) -> Result<String, EnrollError> {
    let root = CertificateDer::from_pem_slice(issued.root_pem.as_bytes())
        .map_err(|e| EnrollError::Answer(format!("root certificate: {e}")))?;
    if let Some(expected) = root_fingerprint
        && certs::token::fingerprint(&root) != *expected
    {
        return Err(EnrollError::Answer(
            "its root CA is not the one the token names".into(),
        ));
    }
    let anchors = certs::TrustAnchors::from_pem(&issued.root_pem, "the answer's root")
        .map_err(|e| EnrollError::Answer(e.to_string()))?;
    let not_after = check_answer(issued, &anchors, key_pem, name)?;
    write(
        &dir.join(CA_FILE),
        issued.root_pem.as_bytes(),
        Secrecy::Public,
    )?;
    write(
        &dir.join(CERT_FILE),
        issued.chain_pem.as_bytes(),
        Secrecy::Public,
    )?;
    Ok(not_after)
}

/// Checks a renewal's answer against the agent's CA file, key and name, then replaces the
/// certificate file `cert` (atomically); returns the end of validity.
pub(crate) fn store_renewed(
    cert: &Path,
    issued: &Issued,
    ca: &certs::TrustAnchors,
    key_pem: &str,
    name: &str,
) -> Result<String, EnrollError> {
    let not_after = check_answer(issued, ca, key_pem, name)?;
    write(cert, issued.chain_pem.as_bytes(), Secrecy::Public)?;
    Ok(not_after)
}

/// The answer's chain is for `key_pem` and `name`, and leads to `ca` as an agent's
/// certificate; its end of validity.
fn check_answer(
    issued: &Issued,
    ca: &certs::TrustAnchors,
    key_pem: &str,
    name: &str,
) -> Result<String, EnrollError> {
    let identity = certs::Identity::from_pem(&issued.chain_pem, key_pem, "the answer", KEY_FILE)
        .map_err(|e| EnrollError::Answer(e.to_string()))?;
    if identity.name() != name {
        return Err(EnrollError::Answer(format!(
            "the certificate is for {:?}, not {name:?}",
            identity.name()
        )));
    }
    certs::check_chain(ca, &identity, certs::Role::Agent)
        .map_err(|e| EnrollError::Answer(e.to_string()))?;
    Ok(certs::inspect::rfc3339(identity.info().not_after))
}

/// A gRPC client of the enrollment port at `addr` (HOST:PORT), TLS by `tls`, the sink's
/// certificate checked for `server_name`.
///
/// # Errors
///
/// When the address does not resolve, or the connection or the TLS handshake fails.
pub async fn connect(
    addr: &str,
    server_name: &str,
    tls: rustls::ClientConfig,
) -> Result<EnrollmentClient<Channel>, EnrollError> {
    let failed = |reason: String| EnrollError::Connect {
        addr: addr.to_owned(),
        reason,
    };
    let remote: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| failed(e.to_string()))?
        .next()
        .ok_or_else(|| failed("the name resolves to no address".into()))?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| EnrollError::Usage(format!("{server_name:?} is not a valid server name")))?;
    let tls = TlsConnector::from(std::sync::Arc::new(tls));
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, name) = (tls.clone(), name.clone());
        async move {
            let tcp = TcpStream::connect(remote).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{remote}"))
        .map_err(|e| failed(e.to_string()))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .map_err(|e| failed(runtime::grpc::error_chain(&e)))?;
    Ok(EnrollmentClient::new(channel))
}

/// Asks `renew_from` for a new certificate for `identity`'s name and key (the key kept: the
/// certificate file alone changes, atomically).
pub(crate) async fn renew(
    renew: &RenewFrom,
    ca: &certs::TrustAnchors,
    identity: &certs::Identity,
    key_pem: &str,
) -> Result<Issued, EnrollError> {
    let name = identity.name().to_owned();
    let request = certs::request::with_key(key_pem, &name)
        .map_err(|e| EnrollError::Usage(format!("cannot make the signing request: {e}")))?;
    let tls = certs::enroll_tls::renewal_client_config(ca, identity)
        .map_err(|e| EnrollError::Usage(e.to_string()))?;
    let mut client = connect(&renew.renew_from, &renew.server_name, tls).await?;
    let call = client.renew(RenewRequest {
        csr_der: csr_der(&request.csr_pem)?.into(),
    });
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| EnrollError::Connect {
            addr: renew.renew_from.clone(),
            reason: format!("no answer in {CALL_TIMEOUT:?}"),
        })?
        .map(tonic::Response::into_inner)
        .map_err(|status| EnrollError::Refused(status.message().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_addresses_split_into_host_and_port() {
        assert_eq!(
            split_host("sink.example.com:6344").unwrap(),
            ("sink.example.com".into(), 6344)
        );
        assert_eq!(split_host("[::1]:6344").unwrap(), ("::1".into(), 6344));
        assert!(split_host("sink.example.com").is_err());
        assert!(split_host(":6344").is_err());
    }

    #[test]
    fn the_renew_file_reads_back() {
        let renew = RenewFrom {
            renew_from: "sink.example.com:6344".into(),
            server_name: "sink.example.com".into(),
        };
        let text = toml::to_string(&renew).unwrap();
        assert!(
            text.contains("renew-from = \"sink.example.com:6344\""),
            "{text}"
        );
        assert_eq!(toml::from_str::<RenewFrom>(&text).unwrap(), renew);
    }
}
