//! The demo's throwaway PKI: a CA, a sink certificate for `localhost` (and 127.0.0.1, ::1)
//! and an agent certificate, made with `relay_certs` on first run and reused after.

use std::path::Path;

use certs::store::{self, Secrecy};
use certs::{Ca, Leaf, Role};

/// Makes the demo PKI unless it is there already.
pub(crate) fn ensure(dir: &Path) -> Result<(), String> {
    if dir.join("ca.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let ca = Ca::generate("sflow-relay demo CA", 30).map_err(|e| e.to_string())?;
    let mut sink = Leaf::new(Role::Sink, "localhost", 30);
    sink.ips = vec![
        "127.0.0.1".parse().expect("valid"),
        "::1".parse().expect("valid"),
    ];
    let sink = ca.issue(&sink).map_err(|e| e.to_string())?;
    let agent = ca
        .issue(&Leaf::new(Role::Agent, "demo-agent", 30))
        .map_err(|e| e.to_string())?;
    let files = [
        ("localhost.pem", sink.cert_pem.as_str(), Secrecy::Public),
        ("localhost.key", sink.key_pem.as_str(), Secrecy::Private),
        ("demo-agent.pem", agent.cert_pem.as_str(), Secrecy::Public),
        ("demo-agent.key", agent.key_pem.as_str(), Secrecy::Private),
        ("ca.key", &ca.key_pem(), Secrecy::Private),
        // Last: its presence marks a complete set.
        ("ca.pem", ca.cert_pem(), Secrecy::Public),
    ];
    for (name, pem, secrecy) in files {
        store::write(&dir.join(name), pem.as_bytes(), secrecy).map_err(|e| e.to_string())?;
    }
    Ok(())
}
