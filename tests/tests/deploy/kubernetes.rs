//! The kustomizations under `deploy/kubernetes`: rendered and validated against the
//! Kubernetes schemas, and each one's sink run end to end as its pod would run it.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_tests::netns::is_root;
use relay_tests::{
    Pki, Transport, UdpCapture, WAIT, datagrams, field, http, metrics_addr, send_paced,
    start_agent_over, wait_until,
};
use serde_json::Value;

use super::config::toml_table;
use super::container::Image;
use super::running::{Launch, Root, RunAs, assert_runs_as, port_of, reroot_config, set, the_str};
use super::{
    KUBERNETES_VERSIONS, PyTools, deploy, output_text, read, require, system_tool, workspace,
};

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
            let what = format!("{here}: {probe} {path} to answer 200");
            wait_until(&what, WAIT, || {
                let status = http::get(endpoint, path).map(|r| r.status).unwrap_or(0);
                (status == 200).then_some(())
            });
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
            // Intentional: time for a duplicate to show up before the comparison.
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(capture.tagged(tag), sent, "{here}: over {transport:?}");
            assert!(agent.terminate().success());
        }
        assert!(sink.terminate().success(), "{here}: the sink stops cleanly");
    }
}
