//! `relay-certs`: make the relay's private CA and the agents' and sinks' certificates.
//!
//! Usage: `relay-certs init`, then `relay-certs issue --role sink --name sink.example.com` and
//! `relay-certs issue --role agent --name site-a`; `relay-certs show FILE` to inspect;
//! `relay-certs revoke --cert FILE` to add a certificate to `crl.pem`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use relay_certs::store::{self, Secrecy};
use relay_certs::{Ca, CertInfo, Leaf, Role, revocation};

/// Make and inspect the certificates of sflow-relay's private CA.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new CA: DIR/ca.pem (give to agents and sinks) and DIR/ca.key (keep offline, 0600).
    Init(InitArgs),
    /// Issue a certificate signed by the CA in DIR: OUT/NAME.pem and OUT/NAME.key (0600).
    Issue(IssueArgs),
    /// Revoke a certificate: add it to DIR/crl.pem (created if missing), re-signed by the CA
    /// with the next CRL number. Give the file to sinks as --crl; they reload it like their
    /// certificates.
    Revoke(RevokeArgs),
    /// Print a certificate's subject, names, usage and expiry.
    Show(ShowArgs),
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
    /// Folder holding ca.pem and ca.key.
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
    /// Folder holding ca.pem and ca.key; the list is DIR/crl.pem.
    #[arg(long, default_value = "pki")]
    dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// PEM certificate files.
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
        Command::Issue(args) => issue(args),
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
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    store::refuse_overwrite(&[&cert, &key], force)?;
    store::write(&key, ca.key_pem().as_bytes(), Secrecy::Private)?;
    store::write(&cert, ca.cert_pem().as_bytes(), Secrecy::Public)?;
    println!("wrote {} and {}", cert.display(), key.display());
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
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("--name {name:?} cannot be used as a file name");
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
    store::write(&cert, issued.cert_pem.as_bytes(), Secrecy::Public)?;
    println!(
        "wrote {} ({} certificate) and {}",
        cert.display(),
        role.as_str(),
        key.display()
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
    store::write(&path, crl.pem.as_bytes(), Secrecy::Public)?;
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

/// `relay-certs show`: each certificate's subject, names, usage and expiry.
fn show(files: &[PathBuf]) -> anyhow::Result<()> {
    for (i, file) in files.iter().enumerate() {
        let pem = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let info = CertInfo::from_pem(&pem).with_context(|| file.display().to_string())?;
        if i > 0 {
            println!();
        }
        println!("file:         {}\n{info}", file.display());
    }
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (run `relay-certs init --dir {}` first)",
                path.display(),
                dir.display()
            )
        })
    };
    Ok(Ca::from_pem(&read("ca.pem")?, &read("ca.key")?)?)
}
