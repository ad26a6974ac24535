//! House checks, as tests: the two ends share only the contract (neither depends on the
//! other), no dependency is unused, every relative link of the manual and the docs resolves,
//! and every option the programs print in `--help` is in docs/options.md.
//!
//! Each failure says what is wrong and where: which dependency in which `Cargo.toml`, which
//! link in which file and line, which option of which program.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use relay_tests::bin;
use serde_json::Value;

#[path = "house/deps.rs"]
mod deps;
#[path = "house/links.rs"]
mod links;

/// The top of the workspace.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The workspace's members, as folders relative to its top.
fn members() -> Vec<String> {
    let manifest: toml::Table = read(&root().join("Cargo.toml"))
        .parse()
        .expect("Cargo.toml");
    manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .map(|m| m.as_str().expect("a member folder").to_owned())
        .collect()
}

// === the ends ===

/// The workspace packages `from` depends on, directly or not, through normal and build
/// dependencies (what `cargo tree -e normal,build` shows of them), each with the path that
/// leads to it. `metadata` is `cargo metadata --no-deps`'s.
fn dependency_paths(metadata: &Value, from: &str) -> HashMap<String, Vec<String>> {
    let packages: HashMap<&str, Vec<&str>> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().expect("a dependency's package"))
                .collect();
            (p["name"].as_str().expect("a package name"), deps)
        })
        .collect();
    assert!(packages.contains_key(from), "no package {from}");
    let mut paths = HashMap::from([(from.to_owned(), vec![from.to_owned()])]);
    let mut queue = VecDeque::from([from]);
    while let Some(name) = queue.pop_front() {
        let here = paths[name].clone();
        // Registry crates are not listed; none of them depends on ours.
        for &dep in packages.get(name).into_iter().flatten() {
            if !paths.contains_key(dep) {
                let mut path = here.clone();
                path.push(dep.to_owned());
                paths.insert(dep.to_owned(), path);
                queue.push_back(dep);
            }
        }
    }
    paths
}

#[test]
fn neither_end_depends_on_the_other() {
    // --no-deps: one end could reach the other only through the workspace's own crates, and
    // without the registry's crates this runs offline with nothing downloaded.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--no-deps",
        ])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
    let mut problems = Vec::new();
    for (from, to) in [("relay-agent", "relay-sink"), ("relay-sink", "relay-agent")] {
        if let Some(path) = dependency_paths(&metadata, from).get(to) {
            problems.push(format!("{from} depends on {to}: {}", path.join(" -> ")));
        }
    }
    // The check itself sees dependencies: the demo uses both ends.
    let demo = dependency_paths(&metadata, "relay-demo");
    assert!(demo.contains_key("relay-agent") && demo.contains_key("relay-sink"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// === unused dependencies ===

#[test]
fn every_dependency_is_used() {
    let mut problems = Vec::new();
    for member in members() {
        let dir = root().join(&member);
        let label = format!("{member}/Cargo.toml");
        let manifest = read(&dir.join("Cargo.toml"));
        problems.extend(deps::unused(&label, &manifest, &deps::Sources::read(&dir)));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// === links ===

/// The manual and the reference: README.md, SECURITY.md, deploy/README.md and docs/*.md.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut all = vec![
        root.join("README.md"),
        root.join("SECURITY.md"),
        root.join("deploy/README.md"),
    ];
    all.extend(docs);
    all
}

/// What is wrong with the link `target` in `file` (line `line`), if anything.
fn broken(file: &Path, line: usize, target: &str) -> Option<String> {
    let external = target.contains("://") || target.starts_with("mailto:");
    if external {
        return None;
    }
    let name = file.strip_prefix(root()).unwrap_or(file).display();
    let at = format!("{name}:{line}: link `{target}`");
    let (path, fragment) = match target.split_once('#') {
        Some((path, fragment)) => (path, Some(fragment)),
        None => (target, None),
    };
    let resolved = if path.is_empty() {
        file.to_owned()
    } else {
        file.parent().expect("a folder").join(path)
    };
    if target.is_empty() || !resolved.exists() {
        let shown = resolved.strip_prefix(root()).unwrap_or(&resolved);
        return Some(format!("{at}: no file {}", shown.display()));
    }
    let fragment = fragment.filter(|_| resolved.extension().is_some_and(|e| e == "md"))?;
    let anchors = links::anchors(&read(&resolved));
    (!anchors.iter().any(|a| a == fragment)).then(|| {
        format!(
            "{at}: {} has no heading with the anchor #{fragment}",
            resolved.strip_prefix(root()).unwrap_or(&resolved).display()
        )
    })
}

#[test]
fn every_relative_link_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in documents() {
        for (line, target) in links::targets(&read(&file)) {
            checked += 1;
            problems.extend(broken(&file, line, &target));
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser right?"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_broken_link_and_a_missing_heading_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("other.md"), "# Other page\n## A part\n").unwrap();
    let file = dir.path().join("page.md");
    let page = "[ok](other.md#a-part) [self](#the-page) [gone](missing.md) [nope](other.md#b-part)\n# The page\n";
    std::fs::write(&file, page).unwrap();
    let problems: Vec<String> = links::targets(page)
        .into_iter()
        .filter_map(|(line, target)| broken(&file, line, &target))
        .collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains("link `missing.md`: no file"),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains("link `other.md#b-part`")
            && problems[1].contains("no heading with the anchor #b-part"),
        "{problems:#?}"
    );
}

// === options ===

/// The long options (`--name`) in `text`.
fn long_options(text: &str) -> BTreeSet<String> {
    let mut options = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let preceded_by_word = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '-');
        let name: String = rest[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if !preceded_by_word && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            options.insert(format!("--{}", name.trim_end_matches('-')));
        }
        rest = &rest[at + 2 + name.len()..];
    }
    options
}

/// `PROGRAM ARGS --help`'s output.
fn help(program: &str, args: &[&str]) -> String {
    let out = Command::new(bin(program))
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} --help failed");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The subcommands listed under `Commands:` in a clap help text, but `help`.
fn subcommands(help: &str) -> Vec<String> {
    help.split_once("Commands:\n")
        .map(|(_, rest)| {
            rest.lines()
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| *c != "help")
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_option_in_help_is_in_the_options_page() {
    let documented = long_options(&read(&root().join("docs/options.md")));
    let mut commands: Vec<Vec<String>> = ["relay-agent", "relay-sink", "relay-demo", "relay-certs"]
        .iter()
        .map(|p| vec![p.to_string()])
        .collect();
    let certs = subcommands(&help("relay-certs", &[]));
    assert!(certs.len() >= 4, "relay-certs' subcommands: {certs:?}");
    commands.extend(certs.into_iter().map(|c| vec!["relay-certs".to_owned(), c]));
    let mut problems = Vec::new();
    for command in commands {
        let (program, args) = command.split_first().expect("a program");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let printed = long_options(&help(program, &args));
        assert!(
            printed.contains("--help"),
            "{command:?} --help: {printed:?}"
        );
        for option in printed.difference(&documented) {
            if option != "--help" && option != "--version" {
                problems.push(format!(
                    "`{}` prints {option} in --help; docs/options.md does not name it",
                    command.join(" ")
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn long_options_are_read_from_text() {
    let found =
        long_options("  -l, --listen <ADDR>\n --grpc-listen ADDR|off, `--ssh-hex`. a--b ---x --9");
    let found: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(found, ["--grpc-listen", "--listen", "--ssh-hex"]);
}
