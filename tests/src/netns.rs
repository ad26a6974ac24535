//! Network namespaces a test makes for itself, joined to the host by a veth pair, with
//! nftables rules inside: the real way to put an agent behind a firewall that drops UDP.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); [`Netns::create`] says why when it
//! cannot, so a test can skip with that reason. Everything is removed on drop.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A namespace and the veth pair that joins it to the host: `host_addr` on the host's end,
/// `ns_addr` inside, one /30 of 10.100.0.0/16 (unique per process and namespace).
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_if: String,
    /// The host's end of the veth pair.
    pub host_addr: Ipv4Addr,
    /// The namespace's end.
    pub ns_addr: Ipv4Addr,
    /// The name of the namespace's end of the veth pair (for a capture inside it).
    pub ns_if: String,
}

const TABLE: &str = "sflow_relay_test";

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Makes a namespace, or says why it cannot.
    pub fn create() -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if !is_root() {
            return Err("needs root (network namespaces and nftables)".into());
        }
        for tool in ["ip", "nft"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Err(format!(
                    "`{tool}` is not installed (tests/run.sh installs it as root)"
                ));
            }
        }
        let id = (std::process::id() * 16 + NEXT.fetch_add(1, Ordering::Relaxed)) % 16_384;
        let base = u32::from(Ipv4Addr::new(10, 100, 0, 0)) + id * 4;
        let ns = Self {
            name: format!("sfr-test-{id}"),
            host_if: format!("sfr{id}h"),
            host_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
            ns_if: format!("sfr{id}n"),
        };
        // Left over from a run that was killed: remove first.
        let _ = run(&["ip", "link", "del", &ns.host_if]);
        let _ = run(&["ip", "netns", "del", &ns.name]);
        let peer = ns.ns_if.clone();
        let host_cidr = format!("{}/30", ns.host_addr);
        let ns_cidr = format!("{}/30", ns.ns_addr);
        run(&["ip", "netns", "add", &ns.name])?;
        run(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        run(&["ip", "link", "set", &peer, "netns", &ns.name])?;
        run(&["ip", "addr", "add", &host_cidr, "dev", &ns.host_if])?;
        run(&["ip", "link", "set", &ns.host_if, "up"])?;
        run(&["ip", "-n", &ns.name, "addr", "add", &ns_cidr, "dev", &peer])?;
        run(&["ip", "-n", &ns.name, "link", "set", &peer, "up"])?;
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Drops every UDP datagram leaving the namespace for `port`, as a firewall that lets no
    /// UDP out would.
    pub fn block_udp_out(&self, port: u16) {
        let rules = format!(
            "table inet {TABLE} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    udp dport {port} drop\n  }}\n}}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        assert!(child.wait().expect("nft").success(), "nft rejected {rules}");
    }

    /// Removes the rules of [`block_udp_out`](Self::block_udp_out).
    pub fn unblock(&self) {
        run(&[
            "ip", "netns", "exec", &self.name, "nft", "delete", "table", "inet", TABLE,
        ])
        .expect("remove nft table");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Whether this process runs as root (effective user 0).
pub fn is_root() -> bool {
    // The effective user, as /proc tells it: no libc call needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}
