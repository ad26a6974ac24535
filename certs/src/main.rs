//! `relay-certs`: make the relay's private CA and the agents' and sinks' certificates.
//!
//! Usage: `relay-certs init`, then `relay-certs issue --role sink --name sink.example.com` and
//! `relay-certs issue --role agent --name site-a`; `relay-certs show FILE` to inspect;
//! `relay-certs revoke --cert FILE` to add a certificate to `crl.pem`.
//!
//! Without moving keys: `relay-certs request --name site-b --out DIR` at the site (the key
//! stays there), `relay-certs sign --csr site-b.csr` at the CA (no key is read or written).
//! `relay-certs init-issuer` makes an issuing CA under the root, so the root's key can stay
//! offline; a folder holding `issuer.pem` and `issuer.key` issues and signs as that CA, and its
//! certificates are written as chains.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use relay_certs::issue::files;
use relay_certs::store::{self, Secrecy};
use relay_certs::{Ca, CertInfo, Leaf, Role, Validity, request, revocation};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Make and inspect the certificates of sflow-relay's private CA.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new CA: DIR/ca.pem (give to agents and sinks), DIR/ca.key (keep offline, 0600)
    /// and DIR/crl.pem (an empty revocation list, for the sinks' --crl).
    Init(InitArgs),
    /// Make an issuing CA signed by the root in DIR, so the root's key can stay offline:
    /// OUT/issuer.pem, OUT/issuer.key (0600), OUT/ca.pem (the root) and OUT/crl.pem.
    InitIssuer(InitIssuerArgs),
    /// Issue a certificate signed by the CA in DIR: OUT/NAME.pem and OUT/NAME.key (0600).
    Issue(IssueArgs),
    /// At the site: make a key and a signing request, OUT/NAME.key (0600, stays here) and
    /// OUT/NAME.csr (send it to the CA for `relay-certs sign`).
    Request(RequestArgs),
    /// At the CA: issue an agent certificate for a signing request, NAME.pem next to it. The
    /// name comes from the request; what else it asks for is refused with the reason.
    Sign(SignArgs),
    /// Print a one-time enrollment token for an agent named NAME: signed by the CA in DIR,
    /// valid for --ttl, for one key, at a sink serving enrollment under this CA's root
    /// (`relay-agent enroll --token …`). The token goes to stdout, what it allows to stderr.
    Token(TokenArgs),
    /// Revoke a certificate: add it to DIR/crl.pem (created if missing), re-signed by the CA
    /// with the next CRL number. Give the file to sinks as --crl; they reload it like their
    /// certificates.
    Revoke(RevokeArgs),
    /// Print each certificate's subject, names, usage and expiry (every one of a chain).
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The CA folder that signs the token: an issuing CA's (issuer.pem, issuer.key) or the
    /// root's (ca.pem, ca.key).
    #[arg(long, default_value = "pki")]
    dir: PathBuf,
    /// The name the token allows (the agent certificate's common name).
    #[arg(long)]
    name: String,
    /// How long the token may be used, at most 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
}

#[derive(Debug, clap::Args)]
struct InitIssuerArgs {
    /// Folder holding the root CA (ca.pem and ca.key).
    #[arg(long, default_value = "pki")]
    dir: PathBuf,
    /// The issuing CA's common name.
    #[arg(long)]
    name: String,
    /// Folder for the issuing CA's files [default: DIR/issuer].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Validity in days (no longer than the root's).
    #[arg(long, default_value_t = 1825)]
    days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct RequestArgs {
    /// agent (sinks are issued with `relay-certs issue --role sink`).
    #[arg(long, value_enum, default_value = "agent")]
    role: RoleArg,
    /// The agent's name: the common name of the certificate asked for.
    #[arg(long)]
    name: String,
    /// Folder for the key and the request.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct SignArgs {
    /// The signing request (PEM or DER), from `relay-certs request` or any PKCS#10 tool.
    #[arg(long, value_name = "FILE")]
    csr: PathBuf,
    /// Folder of the CA that signs: a root (ca.pem, ca.key) or an issuing CA (issuer.pem,
    /// issuer.key).
    #[arg(long, default_value = "pki")]
    dir: PathBuf,
    /// Validity in days (no longer than the CA's).
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// The certificate file to write [default: NAME.pem next to the request].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Overwrite an existing certificate file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Folder for the CA files.
    #[arg(long, default_value = "pki")]
    dir: PathBuf,
    /// The CA's common name [default: "sflow-relay CA" and a random suffix, so that two
    /// organisations' CAs never share a name].
    #[arg(long)]
    name: Option<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// agent (TLS client, clientAuth) or sink (TLS server, serverAuth).
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Common name: the agent's identity, or the sink's DNS name.
    #[arg(long)]
    name: String,
    /// An extra DNS name for a sink (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// An IP address for a sink reached by address (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    ips: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Folder of the CA: a root (ca.pem, ca.key) or an issuing CA (issuer.pem, issuer.key;
    /// the certificate is then written as a chain).
    #[arg(long, default_value = "pki")]
    dir: PathBuf,
    /// Folder for the new files (default: the CA folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct RevokeArgs {
    /// The certificate to revoke (PEM), e.g. pki/site-a.pem.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "serial",
        conflicts_with = "serial"
    )]
    cert: Option<PathBuf>,
    /// Or its serial number in hex, with or without colons, as `relay-certs show` prints it.
    #[arg(long, value_name = "HEX")]
    serial: Option<String>,
    /// Days until the list's nextUpdate (when a fresh list is due). Sinks keep using a list
    /// past that date: it is advice to other readers, not an expiry.
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// Folder of the CA that issued the certificate (root or issuing CA); the list is
    /// DIR/crl.pem.
    #[arg(long, default_value = "pki")]
    dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// PEM certificate files (a chain file shows each of its certificates, leaf first).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Agent,
    Sink,
}

fn main() {
    let cli = Cli::parse();
    let done = match cli.command {
        Command::Init(args) => init(args),
        Command::InitIssuer(args) => init_issuer(args),
        Command::Issue(args) => issue(args),
        Command::Request(args) => make_request(args),
        Command::Sign(args) => sign(args),
        Command::Token(args) => token(&args),
        Command::Revoke(args) => revoke(args),
        Command::Show(args) => show(&args.files),
    };
    if let Err(e) = done {
        eprintln!("relay-certs: error: {e:#}");
        std::process::exit(1);
    }
}

/// `relay-certs init`: a new CA key and self-signed certificate in `--dir`.
fn init(args: InitArgs) -> anyhow::Result<()> {
    let InitArgs {
        dir,
        name,
        days,
        force,
    } = args;
    let name = name.unwrap_or_else(|| format!("sflow-relay CA {:08x}", rand::random::<u32>()));
    let ca = Ca::generate(&name, days)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert, key, crl) = (
        dir.join(files::ROOT_CERT),
        dir.join(files::ROOT_KEY),
        dir.join(files::CRL),
    );
    store::refuse_overwrite(&[&cert, &key, &crl], force)?;
    store::write(&key, ca.key_pem().as_bytes(), Secrecy::Private)?;
    store::write(&cert, ca.cert_pem().as_bytes(), Secrecy::Public)?;
    store::write(&crl, ca.empty_crl(CRL_DAYS)?.as_bytes(), Secrecy::Public)?;
    println!(
        "wrote {}, {} and {} (empty revocation list)",
        cert.display(),
        key.display(),
        crl.display()
    );
    Ok(())
}

/// Days until an empty list's nextUpdate, as `revoke --days`' default.
const CRL_DAYS: u32 = 30;

/// `relay-certs init-issuer`: an issuing CA under the root in `--dir`, in a folder of its own.
fn init_issuer(args: InitIssuerArgs) -> anyhow::Result<()> {
    let InitIssuerArgs {
        dir,
        name,
        out,
        days,
        force,
    } = args;
    if dir.join(files::ISSUER_CERT).exists() {
        bail!(
            "{} holds an issuing CA; give the root's folder (made by `relay-certs init`)",
            dir.display()
        );
    }
    let root_pem = read_ca_file(&dir, files::ROOT_CERT)?;
    let root = Ca::from_pem(&root_pem, &read_ca_file(&dir, files::ROOT_KEY)?)?;
    if let Err(reason) = root.may_sign_issuer() {
        bail!("{} {reason}", dir.join(files::ROOT_CERT).display());
    }
    let issuer = Ca::generate_issuer(&root, &name, days)
        .with_context(|| format!("cannot make an issuing CA under {}", dir.display()))?;
    let out = out.unwrap_or_else(|| dir.join("issuer"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let [cert, key, root_copy, crl] = [
        files::ISSUER_CERT,
        files::ISSUER_KEY,
        files::ROOT_CERT,
        files::CRL,
    ]
    .map(|f| out.join(f));
    store::refuse_overwrite(&[&cert, &key, &root_copy, &crl], force)?;
    store::write(&key, issuer.key_pem().as_bytes(), Secrecy::Private)?;
    store::write(&cert, issuer.cert_pem().as_bytes(), Secrecy::Public)?;
    store::write(&root_copy, root_pem.as_bytes(), Secrecy::Public)?;
    store::write(
        &crl,
        crl_file(&issuer, &issuer.empty_crl(CRL_DAYS)?).as_bytes(),
        Secrecy::Public,
    )?;
    let info = CertInfo::from_pem(issuer.cert_pem())?;
    println!(
        "wrote {} (issuing CA {}, signed by {}, expires {}), {}, {} (the root) and {}",
        cert.display(),
        info.subject,
        info.issuer,
        relay_certs::inspect::rfc3339(info.not_after),
        key.display(),
        root_copy.display(),
        crl.display()
    );
    Ok(())
}

/// `relay-certs issue`: a key and a certificate for an agent or a sink, signed by the CA.
fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let IssueArgs {
        role,
        name,
        dns,
        ips,
        days,
        dir,
        out,
        force,
    } = args;
    if let Err(reason) = request::check_name(&name) {
        bail!("--name {name:?} {reason}");
    }
    let ca = load_ca(&dir)?;
    let role = match role {
        RoleArg::Agent => Role::Agent,
        RoleArg::Sink => Role::Sink,
    };
    let mut leaf = Leaf::new(role, name.clone(), days);
    leaf.dns = dns;
    leaf.ips = ips;
    let issued = ca.issue(&leaf)?;
    let out = out.unwrap_or(dir);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let (cert, key) = (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}.key")),
    );
    store::refuse_overwrite(&[&cert, &key], force)?;
    store::write(&key, issued.key_pem.as_bytes(), Secrecy::Private)?;
    let chain = ca.leaf_chain(&issued.cert_pem);
    store::write(&cert, chain.as_bytes(), Secrecy::Public)?;
    println!(
        "wrote {} ({} certificate{}) and {}",
        cert.display(),
        role.as_str(),
        if ca.is_issuer() {
            ", followed by the issuing CA's"
        } else {
            ""
        },
        key.display()
    );
    Ok(())
}

/// `relay-certs request`: a key and a signing request, made where the key is used.
fn make_request(args: RequestArgs) -> anyhow::Result<()> {
    let RequestArgs {
        role,
        name,
        out,
        force,
    } = args;
    if let RoleArg::Sink = role {
        bail!(
            "--role sink: requests are for agents only; a sink's names are what agents verify, \
             so the CA operator issues it: `relay-certs issue --role sink --name NAME`"
        );
    }
    let made = request::make(&name)?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let (key, csr) = (
        out.join(format!("{name}.key")),
        out.join(format!("{name}.csr")),
    );
    store::refuse_overwrite(&[&key, &csr], force)?;
    store::write(&key, made.key_pem.as_bytes(), Secrecy::Private)?;
    store::write(&csr, made.csr_pem.as_bytes(), Secrecy::Public)?;
    println!(
        "wrote {} (keep it here) and {} (send it to the CA: relay-certs sign --csr {}.csr)",
        key.display(),
        csr.display(),
        name
    );
    Ok(())
}

/// `relay-certs sign`: an agent certificate for a signing request. Reads no key but the CA's,
/// writes none.
fn sign(args: SignArgs) -> anyhow::Result<()> {
    let SignArgs {
        csr,
        dir,
        days,
        out,
        force,
    } = args;
    let bytes = std::fs::read(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
    let ca = load_ca(&dir)?;
    let signed = ca
        .sign_request(&bytes, Validity::Days(days))
        .with_context(|| csr.display().to_string())?;
    let out = out.unwrap_or_else(|| csr.with_file_name(format!("{}.pem", signed.name)));
    store::refuse_overwrite(&[&out], force)?;
    store::write(&out, signed.chain_pem.as_bytes(), Secrecy::Public)?;
    println!(
        "wrote {}: agent certificate CN={}, serial {}, expires {}{}",
        out.display(),
        signed.name,
        signed.serial,
        relay_certs::inspect::rfc3339(signed.not_after),
        if ca.is_issuer() {
            ", followed by the issuing CA's certificate"
        } else {
            ""
        }
    );
    Ok(())
}

/// `relay-certs revoke`: the certificate's serial added to the CA's `crl.pem`, re-signed.
fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let ca = load_ca(&args.dir)?;
    let (serial, what) = revoked_serial(args.cert.as_deref(), args.serial.as_deref())?;
    let path = args.dir.join("crl.pem");
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let crl = ca
        .revoke(previous.as_deref(), &serial, args.days)
        .with_context(|| path.display().to_string())?;
    store::write(&path, crl_file(&ca, &crl.pem).as_bytes(), Secrecy::Public)?;
    println!(
        "{} {what}: wrote {} (CRL number {}, {} revoked, next update {})",
        if crl.already_listed {
            "already revoked:"
        } else {
            "revoked"
        },
        path.display(),
        crl.number,
        crl.entries,
        relay_certs::inspect::rfc3339(crl.next_update),
    );
    Ok(())
}

/// The serial number to revoke, from `--cert FILE` or `--serial HEX`, and how to name it.
fn revoked_serial(cert: Option<&Path>, serial: Option<&str>) -> anyhow::Result<(Vec<u8>, String)> {
    match (cert, serial) {
        (Some(cert), _) => {
            let pem = std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?;
            let info = CertInfo::from_pem(&pem).with_context(|| cert.display().to_string())?;
            let serial = revocation::serial_of(&pem)?;
            let what = format!(
                "{} ({}, serial {})",
                cert.display(),
                info.subject,
                info.serial
            );
            Ok((serial, what))
        }
        (None, Some(hex)) => Ok((
            revocation::parse_serial(hex).map_err(anyhow::Error::msg)?,
            format!("serial {hex}"),
        )),
        (None, None) => bail!("give --cert FILE or --serial HEX"),
    }
}

/// `relay-certs show`: each certificate's subject, names, usage and expiry; every
/// certificate of a chain file, in its order.
fn show(paths: &[PathBuf]) -> anyhow::Result<()> {
    for (i, file) in paths.iter().enumerate() {
        let pem = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{}: not PEM: {e}", file.display()))?;
        if chain.is_empty() {
            bail!(
                "{}: no certificate found (expected a PEM \"CERTIFICATE\" block)",
                file.display()
            );
        }
        for (n, der) in chain.iter().enumerate() {
            let info = CertInfo::from_der(der).with_context(|| file.display().to_string())?;
            if i > 0 || n > 0 {
                println!();
            }
            print!("file:         {}", file.display());
            if chain.len() > 1 {
                let what = if n == 0 { "the leaf" } else { "a CA" };
                print!(" (certificate {} of {}: {what})", n + 1, chain.len());
            }
            println!("\n{info}");
        }
    }
    Ok(())
}

/// `relay-certs token`: a one-time token on stdout, what it allows on stderr.
fn token(args: &TokenArgs) -> anyhow::Result<()> {
    let ca = load_ca(&args.dir)?;
    let root_pem = ca.root_pem().unwrap_or(ca.cert_pem());
    let root =
        CertificateDer::from_pem_slice(root_pem.as_bytes()).context("the root CA certificate")?;
    let fingerprint = relay_certs::token::fingerprint(&root);
    let ttl = time::Duration::try_from(args.ttl).context("--ttl")?;
    let token = relay_certs::token::mint(&ca, fingerprint, &args.name, ttl)?;
    let (allowed, _) = relay_certs::token::parse(&token)?;
    eprintln!(
        "token for one agent certificate named {:?}, for one key, until {}, at a sink under root {}",
        allowed.name,
        relay_certs::inspect::rfc3339(allowed.not_after),
        relay_certs::token::fingerprint_display(&fingerprint)
    );
    println!("{token}");
    Ok(())
}

/// What `crl.pem` holds: the list, and for an issuing CA its certificate after it, so that a
/// sink that trusts only the root can check who signed the list.
fn crl_file(ca: &Ca, crl_pem: &str) -> String {
    if ca.is_issuer() {
        format!("{crl_pem}{}", ca.cert_pem())
    } else {
        crl_pem.to_owned()
    }
}

/// The CA of `dir`: its issuing CA when it holds one, else its root.
fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    Ca::load_dir(dir).map_err(|e| match e {
        relay_certs::Error::Read { path, source } => anyhow::anyhow!(
            "cannot read {}: {source} (run `relay-certs init --dir {}` first)",
            path.display(),
            dir.display()
        ),
        other => other.into(),
    })
}

/// A file of the CA folder `dir`, as text.
fn read_ca_file(dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (run `relay-certs init --dir {}` first)",
            path.display(),
            dir.display()
        )
    })
}
