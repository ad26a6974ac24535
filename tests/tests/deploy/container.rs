//! The Dockerfile, read with BuildKit's parser, and an end-to-end relay run as the image's
//! default command runs it.

use std::path::Path;
use std::process::Command;

use relay_tests::netns::is_root;
use relay_tests::{bin, path};
use serde_json::Value;

use super::config::toml_table;
use super::running::{Launch, Root, RunAs, run_example_site};
use super::systemd::Unit;
use super::{PyTools, deploy, output_text, read, require, run_with_input, system_tool, workspace};

// === The Dockerfile ===

/// What the image runs: read from deploy/container/Dockerfile with BuildKit's parser.
pub(super) struct Image {
    pub(super) stages: Vec<Vec<Value>>,
    /// Files the final stage copies in, by their path in the image.
    pub(super) files: Vec<String>,
    /// `USER` of the final stage: (uid, gid).
    pub(super) user: (u32, u32),
    pub(super) cmd: Vec<String>,
    pub(super) env: Vec<(String, String)>,
}

impl Image {
    pub(super) fn read(tools: &PyTools) -> Self {
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
    pub(super) fn binary(&self, image_path: &str) -> String {
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
