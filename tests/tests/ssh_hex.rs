//! `--ssh-hex`: the hex-lines-over-ssh protocol, end to end through real pipes and UDP
//! sockets, against the Python port of the original script and through a real sshd; and
//! what each end says about it: malformed lines, cut sFlow datagrams, and its counts when a
//! signal stops it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use std::net::SocketAddr;

use relay_tests::{
    Daemon, UdpCapture, WAIT, bin, datagrams_up_to, field, free_udp_port, path, pipe, send_paced,
    wait_udp_bound,
};
use serde_json::Value;

const N: usize = 5_000;

fn python_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/sflow_fwd.py")
}

fn relay(name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin(name));
    cmd.arg("--ssh-hex").args(args).env("RUST_LOG", "info");
    cmd
}

fn python(args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(python_script()).args(args);
    cmd
}

/// Where a relay's ssh-hex collector started with `-p 0` receives: the `listen` field of its
/// first log line, in JSON or in text.
fn reported_collector(collector: &Daemon) -> SocketAddr {
    let line = collector.wait_for_line("ssh-hex: writing received datagrams", WAIT);
    let listen = match serde_json::from_str::<Value>(&line) {
        Ok(event) => field(&event, "listen").to_owned(),
        Err(_) => line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .unwrap_or_default()
            .to_owned(),
    };
    listen
        .parse()
        .unwrap_or_else(|_| panic!("no listen address in {line:?}"))
}

/// Where `left`, the collector side, receives: `Told` the port it was given (the Python
/// script must be), or the port it `Reported` (a relay binary started with `-p 0`).
enum Collector {
    Told(SocketAddr),
    Reported,
}

/// Sends `N` datagrams of up to `max_len` bytes into `left`'s UDP port and checks they come
/// out of `right` byte-identical and in order.
fn check(
    left: Command,
    right: Command,
    collector: Collector,
    capture: &UdpCapture,
    max_len: usize,
) {
    let (left, _right) = pipe(left, right);
    let collector = match collector {
        Collector::Told(addr) => {
            wait_udp_bound(addr);
            addr
        }
        Collector::Reported => reported_collector(&left),
    };
    let sent = datagrams_up_to(N, 0x5A, max_len as u64, max_len);
    assert_eq!(sent.iter().map(Vec::len).max(), Some(max_len));
    send_paced(collector, &sent, 32, || capture.len());
    capture.assert_exactly(&sent);
}

#[test]
fn python_collector_to_relay_server() {
    let capture = UdpCapture::bind();
    let collector = free_udp_port();
    let port = collector.port().to_string();
    let cap_port = capture.addr().port().to_string();
    check(
        python(&["-c", "127.0.0.1", "-p", &port]),
        relay("relay-sink", &["-s", "127.0.0.1", "-p", &cap_port]),
        Collector::Told(collector),
        &capture,
        2_048,
    );
}

#[test]
fn relay_collector_to_python_server() {
    let capture = UdpCapture::bind();
    let cap_port = capture.addr().port().to_string();
    check(
        relay("relay-agent", &["-c", "127.0.0.1", "-p", "0"]),
        python(&["-s", "127.0.0.1", "-p", &cap_port]),
        Collector::Reported,
        &capture,
        2_048,
    );
}

#[test]
fn relay_collector_to_relay_server_up_to_65507_bytes() {
    let capture = UdpCapture::bind();
    let cap_port = capture.addr().port().to_string();
    check(
        relay("relay-agent", &["-c", "127.0.0.1", "-p", "0"]),
        relay("relay-sink", &["-s", "127.0.0.1", "-p", &cap_port]),
        Collector::Reported,
        &capture,
        65_507,
    );
}

#[test]
fn malformed_lines_are_reported_with_their_numbers_and_skipped() {
    let capture = UdpCapture::bind();
    let cap_port = capture.addr().port().to_string();
    let good: Vec<Vec<u8>> = (0..200u32)
        .map(|i| [&i.to_be_bytes()[..], &[0xAB; 100][..]].concat())
        .collect();
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut input = String::new();
    let mut bad_lines = Vec::new();
    let mut line = 0;
    let mut push = |text: String, bad: bool, input: &mut String| {
        line += 1;
        if bad {
            bad_lines.push(line);
        }
        input.push_str(&text);
    };
    for (i, d) in good.iter().enumerate() {
        match i % 8 {
            0 => push(format!("{}\n", hex(d).to_uppercase()), false, &mut input),
            1 => push(format!("{}\r\n", hex(d)), false, &mut input),
            2 => push(format!("  {}\t\n", hex(d)), false, &mut input),
            _ => push(format!("{}\n", hex(d)), false, &mut input),
        }
        match i % 20 {
            3 => push("abc\n".into(), true, &mut input),
            7 => push("01zz02\n".into(), true, &mut input),
            11 => push("\n".into(), false, &mut input),
            13 => push(format!("{}\n", "ab".repeat(100_000)), true, &mut input),
            17 => push("\r\n".into(), false, &mut input),
            _ => {}
        }
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &input).unwrap();
    let mut cmd = relay(
        "relay-sink",
        &["-s", "127.0.0.1", "-p", &cap_port, "--log-format", "json"],
    );
    cmd.stdin(std::fs::File::open(file.path()).unwrap())
        .stdout(Stdio::piped());
    let mut sink = Daemon::start("relay-sink", cmd);
    let status = sink.wait_exit(WAIT);
    assert!(status.success(), "exit status 0 at end of input: {status}");
    assert!(capture.wait_until(WAIT, |r| r.len() >= good.len()));
    assert_eq!(
        capture.received(),
        good,
        "every good datagram arrives, in order"
    );
    let reported: Vec<u64> = sink
        .events()
        .iter()
        .filter(|e| relay_tests::message(e) == "malformed line skipped")
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(
        reported, bad_lines,
        "each bad line reported with its number"
    );
    let reasons: Vec<String> = sink
        .events()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("odd number of hex digits")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not a hex digit")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("longer than the largest datagram")),
        "{reasons:?}"
    );
}

/// The agent's collector applies `--accept` and `--allow-sources` as its relay does: with its
/// defaults, what is not sFlow stays out (and is logged); with a source list, only those
/// sources get through; with `--accept any`, everything does.
#[test]
fn the_agent_collector_writes_only_what_its_options_admit() {
    let garbage: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 1 + usize::from(i) * 7]).collect();
    let sflow = datagrams_up_to(200, 0x5B, 3, 1_400);
    for (extra, outsider, admitted) in [
        (&[][..], "127.0.0.1:0", "sflow"),
        (
            &["--allow-sources", "127.0.0.1"][..],
            "127.0.0.2:0",
            "sflow from 127.0.0.1",
        ),
        (&["--accept", "any"][..], "127.0.0.1:0", "everything"),
    ] {
        let capture = UdpCapture::bind();
        let cap_port = capture.addr().port().to_string();
        let listen = ["-c", "127.0.0.1", "-p", "0", "--log-format", "json"];
        let args = [&listen[..], extra].concat();
        let (agent, _sink) = pipe(
            relay("relay-agent", &args),
            relay("relay-sink", &["-s", "127.0.0.1", "-p", &cap_port]),
        );
        let collector = reported_collector(&agent);
        // Garbage first (and, with a source list, valid sFlow from outside it), then the
        // sFlow: once the sFlow is in, whatever of the rest was admitted is in before it.
        let socket = std::net::UdpSocket::bind(outsider).unwrap();
        let unwanted = if extra.is_empty() || admitted == "everything" {
            garbage.clone()
        } else {
            datagrams_up_to(50, 0x5C, 4, 1_400)
        };
        for d in &unwanted {
            socket.send_to(d, collector).unwrap();
        }
        send_paced(collector, &sflow, 32, || capture.len());
        let expected = if admitted == "everything" {
            [unwanted.clone(), sflow.clone()].concat()
        } else {
            sflow.clone()
        };
        capture.assert_exactly(&expected);
        if admitted != "everything" {
            let dropped = agent.wait_for("ssh-hex: datagram dropped");
            let reason = field(&dropped, "reason");
            assert!(
                ["version", "too_short", "source_not_allowed"].contains(&reason),
                "{admitted}: {dropped}"
            );
            assert_eq!(
                agent.count("ssh-hex: datagram dropped"),
                1,
                "{admitted}: rate-limited"
            );
        }
    }
}

#[test]
fn collector_exits_non_zero_as_soon_as_stdout_closes() {
    let mut cmd = relay("relay-agent", &["-c", "127.0.0.1", "-p", "0"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take()); // the reader (ssh) is gone, and no sFlow arrives
    let mut agent = Daemon::adopt("relay-agent", child);
    let status = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(1), "non-zero, so systemd restarts it");
    let output = agent.lines().join("\n");
    assert!(
        output.contains("stdout closed") && output.contains("ssh session ended"),
        "{output}"
    );
}

/// An sFlow v5 datagram (agent 192.0.2.7, sub-agent 0) numbered `sequence`, carrying
/// `samples` flow samples of 1,000 bytes each (opaque here; walked by their lengths).
fn sflow_with_samples(sequence: u32, samples: u32) -> Vec<u8> {
    let mut d = Vec::new();
    for word in [
        5,
        1,
        u32::from_be_bytes([192, 0, 2, 7]),
        0,
        sequence,
        10_000 + sequence,
        samples,
    ] {
        d.extend_from_slice(&word.to_be_bytes());
    }
    for s in 0..samples {
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&992u32.to_be_bytes());
        d.extend((0..992u32).map(|i| (i ^ s ^ sequence) as u8));
    }
    d
}

/// A number field of a log event.
fn number(event: &Value, name: &str) -> u64 {
    event[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name} in {event}"))
}

/// Sends `signal` (TERM, INT) to `daemon` and waits for its exit.
fn signal(daemon: &mut Daemon, signal: &str) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &daemon.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal}");
    daemon.wait_exit(WAIT)
}

/// The original script's collector cuts a 3,028-byte datagram to 2,048 bytes; `relay-sink
/// --ssh-hex -s` sends it on as it is, warns that it was cut, and counts it in the summary it
/// logs when SIGTERM stops it (status 0).
#[test]
fn a_datagram_cut_by_the_python_collector_is_counted_and_warned_about_by_the_sink() {
    let capture = UdpCapture::bind();
    let collector = free_udp_port();
    let port = collector.port().to_string();
    let cap_port = capture.addr().port().to_string();
    let (_python, mut sink) = pipe(
        python(&["-c", "127.0.0.1", "-p", &port]),
        relay(
            "relay-sink",
            &["-s", "127.0.0.1", "-p", &cap_port, "--log-format", "json"],
        ),
    );
    wait_udp_bound(collector);
    // Two whole datagrams around one of three samples (3,028 bytes), which arrives cut.
    let sent = [
        sflow_with_samples(1, 1),
        sflow_with_samples(2, 3),
        sflow_with_samples(3, 2),
    ];
    assert_eq!(sent[1].len(), 3_028);
    send_paced(collector, &sent, 1, || capture.len());
    let expected = [sent[0].clone(), sent[1][..2_048].to_vec(), sent[2].clone()];
    capture.assert_exactly(&expected);

    let warning = sink.wait_for("sflow datagram truncated");
    assert_eq!(field(&warning, "sflow_agent"), "192.0.2.7");
    assert_eq!(
        (number(&warning, "sequence"), number(&warning, "len")),
        (2, 2_048)
    );
    assert_eq!(sink.count("sflow datagram truncated"), 1);

    let status = signal(&mut sink, "TERM");
    assert_eq!(status.code(), Some(0), "SIGTERM ends it with status 0");
    let summary = sink.wait_for("ssh-hex: stopped");
    assert_eq!(number(&summary, "datagrams"), 3, "{summary}");
    assert_eq!(number(&summary, "truncated"), 1, "{summary}");
    assert_eq!(number(&summary, "malformed"), 0, "{summary}");
}

/// SIGTERM or SIGINT stops `relay-agent --ssh-hex` with status 0 and its counts, after the
/// last line it wrote is whole: the server behind it then reads the end of its input, sends
/// everything and exits 0 with the same count. And `relay-sink --ssh-hex` as a collector
/// stops the same way.
#[test]
fn both_ends_stop_on_sigterm_and_sigint_with_status_0_and_their_counts() {
    for (collector_bin, sig) in [
        ("relay-agent", "TERM"),
        ("relay-agent", "INT"),
        ("relay-sink", "INT"),
    ] {
        let capture = UdpCapture::bind();
        let cap_port = capture.addr().port().to_string();
        let (mut left, mut right) = pipe(
            relay(
                collector_bin,
                &["-c", "127.0.0.1", "-p", "0", "--log-format", "json"],
            ),
            relay(
                "relay-sink",
                &["-s", "127.0.0.1", "-p", &cap_port, "--log-format", "json"],
            ),
        );
        let collector = reported_collector(&left);
        let sent = datagrams_up_to(50, 0x5D, 5, 1_400);
        send_paced(collector, &sent, 8, || capture.len());
        capture.assert_exactly(&sent);

        let status = signal(&mut left, sig);
        assert_eq!(status.code(), Some(0), "{collector_bin}, SIG{sig}: status");
        let summary = left.wait_for("ssh-hex: stopped");
        assert_eq!(
            number(&summary, "datagrams"),
            50,
            "{collector_bin}: {summary}"
        );
        assert_eq!(number(&summary, "refused"), 0, "{collector_bin}: {summary}");
        let shutdown = left.wait_for("shutting down");
        assert_eq!(field(&shutdown, "signal"), format!("SIG{sig}"));

        let status = right.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0), "the server at the end of its input");
        let end = right.wait_for("ssh-hex: end of input");
        assert_eq!(number(&end, "datagrams"), 50, "{end}");
        assert_eq!(number(&end, "malformed"), 0, "{end}");
        assert_eq!(capture.len(), 50, "nothing more, nothing cut");
    }
}

/// sshd on an ephemeral loopback port with throwaway host and user keys, as root.
struct Sshd {
    _dir: tempfile::TempDir,
    _daemon: Daemon,
    port: u16,
    key: PathBuf,
}

impl Sshd {
    /// `Err(reason)` when sshd cannot run here.
    fn start() -> Result<Self, String> {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("no sshd installed (Debian package openssh-server)")?;
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("sshd with a throwaway config needs root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let d = dir.path();
        for (file, kind) in [("host_key", "ed25519"), ("user_key", "ed25519")] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(d.join(file))
                .status()
                .map_err(|e| format!("ssh-keygen: {e}"))?;
            if !ok.success() {
                return Err("ssh-keygen failed".into());
            }
        }
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys"))
            .map_err(|e| e.to_string())?;
        let port = relay_tests::free_tcp_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\n",
            path(&d.join("host_key")),
            path(&d.join("authorized_keys")),
            path(&d.join("sshd.pid")),
        );
        std::fs::write(d.join("sshd_config"), config).map_err(|e| e.to_string())?;
        std::fs::create_dir_all("/run/sshd").map_err(|e| e.to_string())?;
        let mut cmd = Command::new(sshd);
        cmd.args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut daemon = Daemon::start("sshd", cmd);
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if !daemon.is_running() {
                return Err(format!("sshd exited: {}", daemon.lines().join("\n")));
            }
            if std::time::Instant::now() > deadline {
                return Err("sshd did not start listening".into());
            }
            // Polling the port: sshd -D says nothing when it listens.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            key: d.join("user_key"),
            _dir: dir,
            _daemon: daemon,
            port,
        })
    }

    /// `ssh root@127.0.0.1 REMOTE` through this sshd.
    fn ssh(&self, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(&self.key)
        .args(["-p", &self.port.to_string(), "root@127.0.0.1", remote]);
        cmd
    }
}

#[test]
fn relay_to_relay_through_a_real_ssh_session() {
    let sshd = match Sshd::start() {
        Ok(sshd) => sshd,
        Err(reason) => {
            println!("SKIPPED relay_to_relay_through_a_real_ssh_session: {reason}");
            return;
        }
    };
    let capture = UdpCapture::bind();
    // The article's usage: `relay-agent --ssh-hex | ssh user@analyzer 'relay-sink --ssh-hex -s 127.0.0.1'`.
    let remote = format!(
        "{} --ssh-hex -s 127.0.0.1 -p {}",
        path(&bin("relay-sink")),
        capture.addr().port()
    );
    check(
        relay("relay-agent", &["-c", "127.0.0.1", "-p", "0"]),
        sshd.ssh(&remote),
        Collector::Reported,
        &capture,
        65_507,
    );
}
