//! Running a deployment's programs as deployed: under a temporary root with the files, owners
//! and modes the deployment gives them, as its user, and a whole example site relaying end
//! to end.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use relay_tests::netns::is_root;
use relay_tests::procfs::Proc;
use relay_tests::{
    Daemon, Pki, UdpCapture, agent_listen_addr, bin, datagrams, field, path, send_paced, start_sink,
};

use proto::sflow::parse_header;
use runtime::route::{Route, RouteConfig};
use time::format_description::well_known::Rfc3339;

use super::config::{installed_as, toml_table};
use super::{deploy, read, system_tool};

// === Running as deployed ===

/// The user a program runs as (as root only; otherwise it runs as the test's user).
#[derive(Debug, Clone)]
pub(super) struct RunAs {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) groups: Vec<u32>,
}

/// How a deployment file starts a program.
#[derive(Debug)]
pub(super) struct Launch {
    /// The file it comes from, for messages.
    pub(super) what: String,
    /// The command, with paths as deployed.
    pub(super) exec: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) user: Option<RunAs>,
    pub(super) umask: Option<String>,
    /// Folders the deployment makes writable for its user, with their modes.
    pub(super) writable: Vec<(String, u32)>,
}

impl Launch {
    /// The path after `--config`.
    pub(super) fn config(&self) -> &str {
        let at = self
            .exec
            .iter()
            .position(|a| a == "--config")
            .unwrap_or_else(|| panic!("{}: no --config in {:?}", self.what, self.exec));
        &self.exec[at + 1]
    }
}

/// A temporary file system root holding a deployment's files at their deployed paths.
pub(super) struct Root {
    pub(super) dir: tempfile::TempDir,
    /// As root, files are owned as the deployment says; otherwise by the test's user.
    pub(super) chown: bool,
}

impl Root {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            dir,
            chown: is_root(),
        }
    }

    /// Where the deployed absolute path `abs` is under this root.
    pub(super) fn at(&self, abs: &str) -> PathBuf {
        assert!(abs.starts_with('/'), "not absolute: {abs}");
        self.dir.path().join(abs.trim_start_matches('/'))
    }

    /// `s` with a deployed absolute path moved under this root; other strings unchanged.
    pub(super) fn reroot(&self, s: &str) -> String {
        if s.starts_with('/') {
            path(&self.at(s))
        } else {
            s.to_owned()
        }
    }

    /// Makes the parent folders of `abs` (mode 0755, root's).
    pub(super) fn parents(&self, abs: &str) {
        let parent = self.at(abs).parent().unwrap().to_owned();
        fs::create_dir_all(&parent).unwrap();
    }

    pub(super) fn own(&self, p: &Path, mode: u32, owner: (u32, u32)) {
        if self.chown {
            std::os::unix::fs::chown(p, Some(owner.0), Some(owner.1)).unwrap();
        }
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    pub(super) fn dir(&self, abs: &str, mode: u32, owner: (u32, u32)) {
        let p = self.at(abs);
        fs::create_dir_all(&p).unwrap();
        self.own(&p, mode, owner);
    }

    pub(super) fn file(&self, abs: &str, contents: &[u8], mode: u32, owner: (u32, u32)) {
        self.parents(abs);
        let p = self.at(abs);
        fs::write(&p, contents).unwrap();
        self.own(&p, mode, owner);
    }

    pub(super) fn copy(&self, from: &Path, abs: &str, mode: u32, owner: (u32, u32)) {
        self.file(abs, &fs::read(from).unwrap(), mode, owner);
    }

    /// Installs the workspace binary named like `abs` (`/usr/local/bin/relay-sink`) there.
    pub(super) fn install_binary(&self, abs: &str) {
        self.parents(abs);
        let name = Path::new(abs).file_name().unwrap().to_str().unwrap();
        let built = bin(name);
        assert!(built.is_file(), "{abs} is not a workspace binary");
        link_or_copy(&built, &self.at(abs));
    }

    /// Starts `launch` from this root: its binary and every absolute argument under it, its
    /// environment only (and systemd's PATH), its umask, and, as root, its user with no new
    /// privileges and no capabilities.
    pub(super) fn start(&self, launch: &Launch) -> Daemon {
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
pub(super) fn assert_runs_as(daemon: &Daemon, launch: &Launch) {
    let (Some(user), true) = (&launch.user, is_root()) else {
        return;
    };
    let process = Proc::of(daemon.pid());
    let line = |key: &str| process.status_field(key.trim_end_matches(':'));
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

pub(super) fn link_or_copy(from: &Path, to: &Path) {
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap();
    }
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The table's string values with deployed absolute paths moved under `root`.
pub(super) fn reroot_config(root: &Root, value: &mut toml::Value) {
    match value {
        toml::Value::String(s) => *s = root.reroot(s),
        toml::Value::Array(items) => items.iter_mut().for_each(|v| reroot_config(root, v)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| reroot_config(root, v)),
        _ => {}
    }
}

pub(super) fn set(table: &mut toml::Table, key: &str, value: impl Into<toml::Value>) {
    table.insert(key.to_owned(), value.into());
}

pub(super) fn the_str<'a>(table: &'a toml::Table, key: &str) -> &'a str {
    table
        .get(key)
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("no string {key}"))
}

pub(super) fn port_of(addr: &str) -> u16 {
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
/// The example agent configuration, rerooted, with `sinks` as its two sinks' addresses; its
/// spool directory; and each sink's route, as the example gives it. A consultant's `not-after`
/// that has passed by the time the test runs is moved a day ahead (the example's date is an
/// example), so the site relays to both.
fn example_agent_config(root: &Root, sinks: [SocketAddr; 2]) -> (String, String, Vec<Route>) {
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
    let mut routes = Vec::new();
    for (entry, addr) in entries.iter_mut().zip(sinks) {
        let entry = entry.as_table_mut().unwrap();
        set(entry, "addr", addr.to_string());
        let mut route: RouteConfig = toml::Value::Table(entry.clone()).try_into().unwrap();
        let ended = (Route::try_from(&route).expect("the example's route"))
            .expired(std::time::SystemTime::now());
        if ended {
            let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
            let tomorrow = tomorrow.format(&Rfc3339).unwrap();
            set(entry, "not-after", tomorrow.clone());
            route.not_after = Some(tomorrow);
        }
        routes.push(Route::try_from(&route).expect("the example's route"));
    }
    let mut value = toml::Value::Table(config);
    reroot_config(root, &mut value);
    (toml::to_string(&value).unwrap(), spool, routes)
}

/// Sends numbered datagrams from three sFlow agents (one inside the example consultant's
/// `agents`, one it excludes, one outside) to `agent`, and checks that each capture gets the
/// share its sink's route passes, byte for byte and in order. The first capture's route is
/// the company's own: everything.
fn relay_and_check(agent: SocketAddr, captures: &[(&UdpCapture, &Route)], tag: u8) {
    const AGENTS: [[u8; 4]; 3] = [[10, 1, 0, 1], [10, 1, 0, 99], [192, 0, 2, 7]];
    let mut sent = datagrams(1_500, tag, u64::from(tag));
    for (i, datagram) in sent.iter_mut().enumerate() {
        // The agent address of an IPv4 sFlow v5 header.
        datagram[8..12].copy_from_slice(&AGENTS[i % AGENTS.len()]);
    }
    send_paced(agent, &sent, 32, || captures[0].0.len());
    for (capture, route) in captures {
        let share: Vec<Vec<u8>> = (sent.iter())
            .filter(|d| route.matches(parse_header(d).as_ref(), None))
            .cloned()
            .collect();
        assert!(!share.is_empty());
        capture.assert_exactly(&share);
    }
}

/// The example site: a sink and an agent from `sink` and `agent`, with the example
/// configurations installed where deploy/README.md installs them and the certificates made by
/// relay-certs where the configurations name them; and the consultant's sink of the agent's
/// second `[[sink]]` entry, with its own CA. Relays datagrams to both, then stops both.
pub(super) fn run_example_site(root: &Root, sink: &Launch, agent: &Launch) {
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
    let (config, spool, routes) = example_agent_config(root, [sink_addr, consultant_addr]);
    assert!(
        !routes[0].is_filtered() && routes[1].is_filtered(),
        "{routes:?}"
    );
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

    relay_and_check(
        agent_addr,
        &[(&capture, &routes[0]), (&consultant_capture, &routes[1])],
        0xE1,
    );

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
