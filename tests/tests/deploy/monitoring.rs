//! The monitoring files: `deploy/prometheus` (the scrape configuration, the alert rules and
//! their unit tests) and `deploy/grafana` (the dashboard and its provisioning files), checked
//! with promtool and against each other.
//!
//! - `promtool check config`, `check rules` and `test rules` pass; every alert has a unit
//!   test that fires it and one that keeps it quiet, and its firing tests fail when the
//!   alert's expression never fires.
//! - The scrape jobs scrape the ports the example configurations give `metrics-listen`, and
//!   the sink's `/metrics/sflow` as a job of its own.
//! - Every PromQL expression of the dashboard (its panels' and its variables' series) parses,
//!   with Grafana's variables replaced; the dashboard has what Grafana needs to load it; the
//!   dashboard and the alerts use only metrics the programs export.
//! - The provisioning files load the dashboard from where deploy/README.md installs it, from
//!   the data source it names.
//!
//! YAML is read with PyYAML from the deploy tools' virtual environment ([`PyTools`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use relay_tests::prometheus;
use serde_json::{Value, json};

use super::{PyTools, deploy, output_text, read, require, workspace};

/// What Grafana's built-in interval variables stand for when an expression is checked.
const GRAFANA_INTERVALS: [&str; 3] = ["__rate_interval", "__interval", "__range"];

// === Reading the files ===

/// A YAML file as JSON, read by PyYAML.
fn yaml(tools: &PyTools, path: &Path) -> Value {
    tools.python_json(
        "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        &[],
        read(path).as_bytes(),
    )
}

fn dashboard() -> Value {
    let path = deploy("grafana/sflow-relay.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

fn string<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

/// The alerting rules of a rule file, by name.
fn alerts(rules: &Value) -> BTreeMap<String, Value> {
    let mut found = BTreeMap::new();
    for group in array(&rules["groups"], "groups") {
        for rule in array(&group["rules"], "rules") {
            if let Some(name) = rule["alert"].as_str() {
                assert!(
                    found.insert(name.to_owned(), rule.clone()).is_none(),
                    "alert {name} is defined twice"
                );
            }
        }
    }
    found
}

/// Metric names of the relay (`relay_agent_…`, `relay_sink_…`) and of the interface export
/// (`sflow_if_…`) that a PromQL expression names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            ["relay_agent_", "relay_sink_", "sflow_if_"]
                .iter()
                .any(|p| t.starts_with(p))
        })
        .map(str::to_owned)
        .collect()
}

/// Whether docs/metrics.md lists `name`: as it is, or as a family of both daemons
/// (`…_sflow_datagrams_total` for `relay_agent_sflow_datagrams_total`).
fn documented(docs: &str, name: &str) -> bool {
    let family = name
        .strip_prefix("relay_agent")
        .or_else(|| name.strip_prefix("relay_sink"));
    docs.contains(&format!("`{name}`"))
        || family.is_some_and(|rest| docs.contains(&format!("`…{rest}`")))
}

/// Fails when a metric named in `exprs` is not in docs/metrics.md (the relay's own, and the
/// interface export's `sflow_if_…`).
fn assert_exported(what: &str, exprs: &[String]) {
    let docs = read(&workspace().join("docs/metrics.md"));
    let unknown: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|name| !documented(&docs, name))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} uses metrics that no program exports (not in docs/metrics.md, nor the \
         interface metrics of --sflow-metrics): {unknown:?}"
    );
}

// === promtool ===

fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run promtool {args:?}: {e}"))
}

/// Checks PromQL expressions with `promtool check rules`, as recording rules
/// `dashboard:check_N` of one rule file (JSON, which is YAML).
///
/// # Errors
///
/// promtool's output, with the expressions numbered, when any does not parse.
fn check_promql(exprs: &[String]) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, expr)| json!({"record": format!("dashboard:check_{i}"), "expr": expr}))
        .collect();
    let file = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.path().join("rules.yml"), file.to_string()).expect("write rules");
    let out = promtool(dir.path(), &["check", "rules", "rules.yml"]);
    if out.status.success() {
        return Ok(());
    }
    let numbered: Vec<String> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| format!("  dashboard:check_{i}: {e}"))
        .collect();
    Err(format!("{}\n{}", output_text(&out), numbered.join("\n")))
}

// === Grafana ===

/// Every expression of the dashboard: each target's `expr` (in rows too) and the series
/// selector of each `label_values(SELECTOR, label)` variable, as Grafana has them.
fn dashboard_exprs(dash: &Value) -> Vec<String> {
    fn walk(panels: &Value, found: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                found.push(string(&target["expr"], "a target's expr").to_owned());
            }
            walk(&panel["panels"], found);
        }
    }
    let mut found = Vec::new();
    walk(&dash["panels"], &mut found);
    for var in array(&dash["templating"]["list"], "templating.list") {
        if var["type"] == "query" {
            let query = string(&var["query"]["query"], "a query variable's query");
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector.trim())
                .unwrap_or_else(|| panic!("variable query {query:?} is not label_values(…)"));
            found.push(inner.to_owned());
        }
    }
    found
}

/// `expr` with Grafana's variables replaced by values PromQL accepts: the interval ones by
/// `5m`, a custom variable by its current value, a query variable by `.*` (all). Panics on a
/// variable the dashboard does not define.
fn substitute(dash: &Value, expr: &str) -> String {
    let mut values: Vec<(String, String)> = GRAFANA_INTERVALS
        .iter()
        .map(|v| ((*v).to_owned(), "5m".to_owned()))
        .collect();
    for var in array(&dash["templating"]["list"], "templating.list") {
        let name = string(&var["name"], "a variable's name").to_owned();
        let value = match var["type"].as_str() {
            Some("custom") => string(&var["current"]["value"], "current value").to_owned(),
            Some("query") => ".*".to_owned(),
            _ => continue,
        };
        values.push((name, value));
    }
    // Longest first, so that `$agents` is never read as `$agent` and `s`.
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = expr.to_owned();
    for (name, value) in &values {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !out.contains('$'),
        "{expr:?} uses a variable the dashboard does not define (after substitution: {out:?})"
    );
    out
}

// === Prometheus: configuration, rules, unit tests ===

#[test]
fn the_configuration_the_rules_and_their_unit_tests_pass_promtool() {
    let Some(()) = require(prometheus::installed()) else {
        return;
    };
    let dir = deploy("prometheus");
    for args in [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = promtool(&dir, &args);
        let text = output_text(&out);
        assert!(out.status.success(), "promtool {}: {text}", args.join(" "));
        eprintln!("promtool {}: {}", args.join(" "), text.trim());
    }
    // The configuration loads its rule file (a path relative to it).
    let out = output_text(&promtool(&dir, &["check", "config", "prometheus.yml"]));
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
}

#[test]
fn every_alert_has_a_severity_a_summary_and_tests_that_fire_it_and_keep_it_quiet() {
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    let rules = yaml(&tools, &deploy("prometheus/alerts.yml"));
    let tests = yaml(&tools, &deploy("prometheus/alerts.test.yml"));
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 9, "{:?}", alerts.keys());
    assert_eq!(
        array(&tests["rule_files"], "rule_files"),
        &[json!("alerts.yml")]
    );
    // Per alert: (a case expects it to fire, a case expects it quiet).
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for test in array(&tests["tests"], "tests") {
        for case in array(&test["alert_rule_test"], "alert_rule_test") {
            let name = string(&case["alertname"], "alertname");
            assert!(alerts.contains_key(name), "{test}: no alert {name}");
            let fires = !case["exp_alerts"].as_array().is_none_or(Vec::is_empty);
            let seen = cases.entry(name.to_owned()).or_default();
            if fires {
                seen.0 = true;
            } else {
                seen.1 = true;
            }
        }
    }
    for (name, rule) in &alerts {
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description"] {
            let text = rule["annotations"][annotation].as_str().unwrap_or_default();
            assert!(!text.trim().is_empty(), "{name} has no {annotation}");
        }
        assert_eq!(
            cases.get(name),
            Some(&(true, true)),
            "{name} needs a unit test that fires it and one that keeps it quiet \
             (fires, quiet) in alerts.test.yml"
        );
    }
    let exprs: Vec<String> = alerts
        .values()
        .map(|r| string(&r["expr"], "expr").to_owned())
        .collect();
    assert_exported("alerts.yml", &exprs);
}

/// The unit tests see each alert: with its expression replaced by one that never fires,
/// `promtool test rules` fails, naming it.
#[test]
fn each_alerts_firing_tests_fail_when_it_never_fires() {
    let Some(()) = require(prometheus::installed()) else {
        return;
    };
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    let rules = yaml(&tools, &deploy("prometheus/alerts.yml"));
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::copy(
        deploy("prometheus/alerts.test.yml"),
        dir.path().join("alerts.test.yml"),
    )
    .expect("copy the tests");
    let run = |rules: &Value| {
        std::fs::write(dir.path().join("alerts.yml"), rules.to_string()).expect("write");
        promtool(dir.path(), &["test", "rules", "alerts.test.yml"])
    };
    // The rules as read, written back as JSON, pass: the copy is faithful.
    let out = run(&rules);
    assert!(out.status.success(), "{}", output_text(&out));
    for name in alerts(&rules).keys() {
        let mut broken = rules.clone();
        for group in broken["groups"].as_array_mut().expect("groups") {
            for rule in group["rules"].as_array_mut().expect("rules") {
                if rule["alert"] == name.as_str() {
                    rule["expr"] = json!("vector(1) > 2");
                }
            }
        }
        let out = run(&broken);
        let text = output_text(&out);
        assert!(
            !out.status.success() && text.contains(&format!("alertname: {name}")),
            "{name} never firing went unnoticed by alerts.test.yml: {text}"
        );
    }
}

#[test]
fn the_scrape_jobs_scrape_the_documented_ports_and_paths() {
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    let config = yaml(&tools, &deploy("prometheus/prometheus.yml"));
    assert_eq!(
        array(&config["rule_files"], "rule_files"),
        &[json!("alerts.yml")]
    );
    // The ports of the example configurations' metrics-listen (commented out there).
    let port = |file: &str| {
        let text = read(&deploy(file));
        let line = text
            .lines()
            .find(|l| l.trim_start_matches('#').starts_with("metrics-listen"))
            .unwrap_or_else(|| panic!("{file} has no metrics-listen"));
        let addr = line.split('"').nth(1).expect("a quoted address");
        addr.rsplit_once(':').expect("host:port").1.to_owned()
    };
    let (agent, sink) = (
        port("config/agent.example.toml"),
        port("config/sink.example.toml"),
    );
    let expected = [
        ("sflow-relay-agent", "/metrics", &agent),
        ("sflow-relay-sink", "/metrics", &sink),
        ("sflow-relay-interfaces", "/metrics/sflow", &sink),
    ];
    let jobs = array(&config["scrape_configs"], "scrape_configs");
    assert_eq!(jobs.len(), expected.len(), "{jobs:?}");
    let down = read(&deploy("prometheus/alerts.yml"));
    for (job, (name, path, port)) in jobs.iter().zip(expected) {
        assert_eq!(job["job_name"], name, "{job}");
        assert_eq!(job["metrics_path"], path, "{job}");
        for group in array(&job["static_configs"], "static_configs") {
            for target in array(&group["targets"], "targets") {
                let target = string(target, "target");
                assert!(target.ends_with(&format!(":{port}")), "{name}: {target}");
            }
        }
        assert!(
            down.contains(name),
            "alerts.yml's SflowRelayDown does not name job {name}"
        );
    }
    // The interfaces: their own interval, and a sample_limit above the sink's own cap on
    // series (--sflow-metrics-max-series, 100,000), so that the cap decides.
    let interfaces = &jobs[2];
    assert!(interfaces["scrape_interval"].is_string(), "{interfaces}");
    let limit = interfaces["sample_limit"].as_u64().unwrap_or_default();
    assert!(limit > 100_000, "sample_limit {limit}");
}

// === Grafana ===

#[test]
fn every_dashboard_expression_parses() {
    let Some(()) = require(prometheus::installed()) else {
        return;
    };
    // The check itself rejects what does not parse, and a variable left in.
    let broken = check_promql(&["sum(rate(relay_sink_datagrams_received_total[5m])".into()]);
    assert!(broken.is_err(), "a missing parenthesis passed");
    let left_in = check_promql(&["rate(relay_sink_datagrams_received_total[$x])".into()]);
    assert!(left_in.is_err(), "a Grafana variable passed as PromQL");

    let dash = dashboard();
    let exprs: Vec<String> = dashboard_exprs(&dash)
        .iter()
        .map(|e| substitute(&dash, e))
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    if let Err(problems) = check_promql(&exprs) {
        panic!("dashboard expressions that do not parse: {problems}");
    }
    eprintln!("{} dashboard expressions parse", exprs.len());
}

#[test]
fn the_dashboard_has_what_grafana_needs_and_shows_the_relay_and_the_interfaces() {
    let dash = dashboard();
    assert_eq!(dash["title"], "sflow-relay");
    let uid = string(&dash["uid"], "uid");
    assert!(
        (1..=40).contains(&uid.len())
            && uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)),
        "uid {uid:?}"
    );
    assert!(dash["schemaVersion"].as_u64().is_some(), "schemaVersion");
    let vars: BTreeMap<&str, &Value> = array(&dash["templating"]["list"], "templating.list")
        .iter()
        .map(|v| (string(&v["name"], "name"), v))
        .collect();
    assert_eq!(vars["DS_PROMETHEUS"]["type"], "datasource");
    assert_eq!(vars["DS_PROMETHEUS"]["query"], "prometheus");
    for name in ["site", "agent"] {
        assert_eq!(vars[name]["type"], "query", "variable {name}");
    }

    let panels = array(&dash["panels"], "panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let title = string(&panel["title"], "title");
        assert!(ids.insert(panel["id"].as_u64().expect("id")), "{title}: id");
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_u64().expect("x"), pos["w"].as_u64().expect("w"));
        assert!(
            x + w <= 24 && pos["h"].as_u64().is_some_and(|h| h > 0),
            "{title}: {pos}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["type"].is_string(), "{title}: type");
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = array(&panel["targets"], "targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for target in targets {
            assert!(
                refs.insert(string(&target["refId"], "refId")),
                "{title}: refId"
            );
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            exprs.push(string(&target["expr"], "expr").to_owned());
        }
    }
    assert_exported("sflow-relay.json", &exprs);
    // What the issue asks it to show: rates in and out, drops by reason, sFlow loss per hop,
    // the link's transport, certificate expiry; utilisation, errors, discards.
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for name in [
        "relay_agent_datagrams_received_total",
        "relay_sink_datagrams_replayed_total",
        "relay_agent_datagrams_dropped_total",
        "relay_sink_datagrams_dropped_total",
        "relay_agent_sflow_sequence_gaps_total",
        "relay_sink_sflow_sequence_gaps_total",
        "relay_agent_transport",
        "relay_agent_certificate_expiry_seconds",
        "relay_sink_certificate_expiry_seconds",
        "sflow_if_in_octets_total",
        "sflow_if_out_octets_total",
        "sflow_if_speed_bps",
        "sflow_if_in_errors_total",
        "sflow_if_out_errors_total",
        "sflow_if_in_discards_total",
        "sflow_if_out_discards_total",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

/// The `install` line of deploy/README.md that copies `file`: its destination.
fn installed_to(readme: &str, file: &str) -> String {
    let line = readme
        .lines()
        .find(|l| l.starts_with("install ") && l.contains(file))
        .unwrap_or_else(|| panic!("deploy/README.md does not install {file}"));
    let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
    (*words.last().expect("a destination")).to_owned()
}

#[test]
fn the_provisioning_files_load_the_dashboard_from_where_the_readme_installs_it() {
    let Some(tools) = require(PyTools::find()) else {
        return;
    };
    let readme = read(&deploy("README.md"));
    let dashboards = yaml(
        &tools,
        &deploy("grafana/provisioning/dashboards/sflow-relay.yml"),
    );
    let sources = yaml(
        &tools,
        &deploy("grafana/provisioning/datasources/sflow-relay.yml"),
    );
    assert_eq!(dashboards["apiVersion"], 1);
    assert_eq!(sources["apiVersion"], 1);

    // The provider reads the folder the README copies the dashboard into.
    let providers = array(&dashboards["providers"], "providers");
    assert_eq!(providers.len(), 1, "{providers:?}");
    assert_eq!(providers[0]["type"], "file");
    let folder = string(&providers[0]["options"]["path"], "options.path");
    let dest = installed_to(&readme, "deploy/grafana/sflow-relay.json");
    let dest = dest.strip_suffix("/sflow-relay.json").unwrap_or(&dest);
    assert_eq!(
        dest.trim_end_matches('/'),
        folder,
        "provider path vs README"
    );
    // The provisioning files go where Grafana reads them.
    for kind in ["dashboards", "datasources"] {
        let file = format!("deploy/grafana/provisioning/{kind}/sflow-relay.yml");
        let dest = installed_to(&readme, &file);
        assert!(
            dest.starts_with(&format!("/etc/grafana/provisioning/{kind}/")),
            "{file} installed to {dest}"
        );
    }

    // The dashboard's data source variable starts on the provisioned Prometheus, whose
    // minimum interval is prometheus.yml's scrape interval.
    let sources = array(&sources["datasources"], "datasources");
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0]["type"], "prometheus");
    let dash = dashboard();
    let ds = array(&dash["templating"]["list"], "templating.list")
        .iter()
        .find(|v| v["name"] == "DS_PROMETHEUS")
        .expect("DS_PROMETHEUS");
    assert_eq!(ds["current"]["value"], sources[0]["uid"]);
    assert_eq!(ds["current"]["text"], sources[0]["name"]);
    let config = yaml(&tools, &deploy("prometheus/prometheus.yml"));
    assert_eq!(
        sources[0]["jsonData"]["timeInterval"],
        config["global"]["scrape_interval"]
    );
}
