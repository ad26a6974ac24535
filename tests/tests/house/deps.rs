//! The unused-dependency check of `house.rs`: which entries of a `Cargo.toml` the crate's
//! sources never name.
//!
//! A dependency counts as used where its crate name (the key in `Cargo.toml`, `-` → `_`; with
//! `package = …` the key is the name the code uses) appears as `name::`, `use name`, `name!`,
//! `extern crate name`, or as a serde path string (`with = "name"`). Comments do not count.
//! `[dependencies]` must be used in the crate's product code: `src/` outside `#[cfg(test)]`
//! items and the files of `#[cfg(test)] mod name;`. `[dev-dependencies]` must be used in test
//! code: that `#[cfg(test)]` code, `tests/`, `benches/` and `examples/`.
//! `[build-dependencies]` must be used in `build.rs`. It reads text, not a parsed crate: it
//! does not know a crate whose library name differs from its key, and none is used here.
//! Code generated at build time (in `OUT_DIR`) is not read: a dependency used only there is
//! named, with the reason, in `[package.metadata.cargo-machete] ignored` (cargo-machete's
//! key, so that tool agrees).

use std::path::Path;

/// A crate's source text, sorted by where a dependency must be used.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    /// `src/`, outside test code.
    pub(crate) product: String,
    /// `#[cfg(test)]` code in `src/`, `tests/`, `benches/`, `examples/`.
    pub(crate) test: String,
    /// `build.rs`.
    pub(crate) build: String,
}

impl Sources {
    /// Reads the crate in `dir`. Comments are dropped.
    pub(crate) fn read(dir: &Path) -> Self {
        let mut sources = Self::default();
        let mut src = Vec::new();
        rust_files(&dir.join("src"), &mut src);
        // Files that are `#[cfg(test)] mod name;` of the file that declares them.
        let mut test_files = Vec::new();
        let mut split = Vec::new();
        for file in &src {
            let code = strip_comments(&std::fs::read_to_string(file).expect("read a source"));
            let (product, test, test_mods) = split_test_code(&code);
            let module_dir = module_dir(file);
            test_files.extend(test_mods.iter().flat_map(|m| {
                [
                    module_dir.join(format!("{m}.rs")),
                    module_dir.join(m).join("mod.rs"),
                ]
            }));
            split.push((file.clone(), product, test));
        }
        for (file, product, test) in split {
            let in_test_module = test_files
                .iter()
                .any(|t| file == *t || file.starts_with(t.with_extension("")));
            if in_test_module {
                sources.test += &product;
            } else {
                sources.product += &product;
            }
            sources.test += &test;
        }
        let mut tests = Vec::new();
        for sub in ["tests", "benches", "examples"] {
            rust_files(&dir.join(sub), &mut tests);
        }
        for file in tests {
            sources.test += &strip_comments(&std::fs::read_to_string(file).expect("read a test"));
        }
        if let Ok(build) = std::fs::read_to_string(dir.join("build.rs")) {
            sources.build = strip_comments(&build);
        }
        sources
    }
}

/// Every `.rs` file under `dir`, recursively (none when it does not exist).
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.map(|e| e.expect("list a folder").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Where the modules that `file` declares live: next to it for `lib.rs`, `main.rs` and
/// `mod.rs`, else in the folder named after it.
fn module_dir(file: &Path) -> std::path::PathBuf {
    let parent = file.parent().expect("a file in a folder");
    match file.file_stem().and_then(|s| s.to_str()) {
        Some("lib" | "main" | "mod") => parent.to_owned(),
        _ => file.with_extension(""),
    }
}

/// Problems with the dependencies of `manifest` (the text of a `Cargo.toml` at `label`),
/// one message each; empty when every dependency is used where its section says.
pub(crate) fn unused(label: &str, manifest: &str, sources: &Sources) -> Vec<String> {
    let manifest: toml::Table = manifest
        .parse()
        .unwrap_or_else(|e| panic!("{label} does not parse: {e}"));
    let ignored: Vec<&str> = manifest
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("cargo-machete"))
        .and_then(|m| m.get("ignored"))
        .and_then(|i| i.as_array())
        .map(|i| i.iter().filter_map(|name| name.as_str()).collect())
        .unwrap_or_default();
    let mut tables = vec![(String::new(), &manifest)];
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        for (cfg, table) in targets {
            if let Some(table) = table.as_table() {
                tables.push((format!("target.{cfg}."), table));
            }
        }
    }
    let mut problems = Vec::new();
    for (prefix, table) in tables {
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            let Some(deps) = table.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for (key, spec) in deps {
                if ignored.contains(&key.as_str()) {
                    continue;
                }
                let name = key.replace('-', "_");
                let package = spec
                    .get("package")
                    .and_then(|p| p.as_str())
                    .map(|p| format!(" (package {p})"))
                    .unwrap_or_default();
                let entry = format!("{label}: [{prefix}{section}] `{key}`{package}");
                let (code, place) = match section {
                    "dependencies" => (&sources.product, "src/ outside test code"),
                    "dev-dependencies" => (
                        &sources.test,
                        "tests/, benches/, examples/ or #[cfg(test)] code",
                    ),
                    _ => (&sources.build, "build.rs"),
                };
                if uses(code, &name) {
                    continue;
                }
                let hint = if section == "dependencies" && uses(&sources.test, &name) {
                    "; it is used only in tests: move it to [dev-dependencies]"
                } else {
                    "; remove it"
                };
                problems.push(format!(
                    "{entry} is not used in {place} (no `{name}::`, `use {name}`, `{name}!` or \
                     `extern crate {name}`){hint}"
                ));
            }
        }
    }
    problems
}

/// Whether `code` names the crate `name`: `name::`, `use name`, `name!`, `extern crate name`,
/// or a serde path string `"name"`.
pub(crate) fn uses(code: &str, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    code.match_indices(name).any(|(at, _)| {
        let before = &code[..at];
        let after = &code[at + name.len()..];
        if before.chars().next_back().is_some_and(ident) || after.starts_with(ident) {
            return false;
        }
        // `std::time::…` is not the crate `time`; `::time::…` is.
        let inside_a_path = before
            .strip_suffix("::")
            .and_then(|path| path.chars().next_back())
            .is_some_and(|c| ident(c) || c == '>');
        if inside_a_path {
            return false;
        }
        let before = before.trim_end();
        after.starts_with("::")
            || after.starts_with('!')
            || (before.ends_with('"') && after.starts_with('"'))
            || ends_with_word(before, "use")
            || before.ends_with("extern crate")
    })
}

fn ends_with_word(text: &str, word: &str) -> bool {
    text.strip_suffix(word).is_some_and(|rest| {
        !rest
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// `code` with its comments (line, block, doc) replaced by spaces; string and character
/// literals are kept.
pub(crate) fn strip_comments(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    for token in Lexer::new(code) {
        match token {
            Token::Comment(text) => {
                out.extend(text.chars().map(|c| if c == '\n' { c } else { ' ' }))
            }
            Token::Literal(text) | Token::Other(text) => out.push_str(text),
        }
    }
    out
}

/// Splits comment-free `code` into (product, test, names of `#[cfg(test)] mod name;`): an
/// item under `#[cfg(test)]` is test code, to the end of its braces or its `;`.
pub(crate) fn split_test_code(code: &str) -> (String, String, Vec<String>) {
    const CFG_TEST: &str = "#[cfg(test)]";
    let (mut product, mut test, mut modules) = (String::new(), String::new(), Vec::new());
    let mut rest = code;
    while let Some(at) = rest.find(CFG_TEST) {
        product.push_str(&rest[..at]);
        let item = &rest[at..];
        let end = item_end(item, CFG_TEST.len());
        let (item, after) = item.split_at(end);
        let declaration = item[CFG_TEST.len()..].trim();
        if let Some(name) = declaration
            .strip_prefix("mod ")
            .or_else(|| declaration.strip_prefix("pub mod "))
            .and_then(|d| d.strip_suffix(';'))
        {
            modules.push(name.trim().to_owned());
        }
        test.push_str(item);
        rest = after;
    }
    product.push_str(rest);
    (product, test, modules)
}

/// The length of the item that starts at `from` in `code`: up to its `;` at the top level, or
/// to the brace that closes its first block.
fn item_end(code: &str, from: usize) -> usize {
    let mut depth = 0usize;
    let mut lexer = Lexer::new(code);
    lexer.at = from;
    while let Some(token) = lexer.next() {
        let Token::Other(text) = token else { continue };
        match text {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return lexer.at;
                }
            }
            ";" if depth == 0 => return lexer.at,
            _ => {}
        }
    }
    code.len()
}

/// A token of Rust source as far as the checks need it.
enum Token<'a> {
    /// `// …`, `/* … */` (nested).
    Comment(&'a str),
    /// A string, byte string, raw string or character literal.
    Literal(&'a str),
    /// Anything else, a character at a time.
    Other(&'a str),
}

struct Lexer<'a> {
    code: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    fn new(code: &'a str) -> Self {
        Self { code, at: 0 }
    }

    fn take(&mut self, len: usize) -> &'a str {
        let text = &self.code[self.at..self.at + len];
        self.at += len;
        text
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let rest = &self.code[self.at..];
        let first = rest.chars().next()?;
        if rest.starts_with("//") {
            let len = rest.find('\n').unwrap_or(rest.len());
            return Some(Token::Comment(self.take(len)));
        }
        if rest.starts_with("/*") {
            let (mut depth, mut i) = (0usize, 0);
            while i < rest.len() {
                if rest[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if rest[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += rest[i..].chars().next().map_or(1, char::len_utf8);
                }
            }
            return Some(Token::Comment(self.take(i)));
        }
        // Raw strings: r"…", r#"…"#, br#"…"#.
        let raw = rest.strip_prefix('b').unwrap_or(rest);
        if let Some(hashes_on) = raw.strip_prefix('r') {
            let hashes = hashes_on.len() - hashes_on.trim_start_matches('#').len();
            if hashes_on[hashes..].starts_with('"') {
                let close = format!("\"{}", "#".repeat(hashes));
                let open = rest.len() - hashes_on.len() + hashes + 1;
                let len = rest[open..]
                    .find(&close)
                    .map_or(rest.len(), |i| open + i + close.len());
                return Some(Token::Literal(self.take(len)));
            }
        }
        let quoted = rest.strip_prefix('b').unwrap_or(rest);
        if quoted.starts_with('"') {
            let open = rest.len() - quoted.len() + 1;
            let mut chars = rest[open..].char_indices();
            let mut len = rest.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => {
                        len = open + i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            return Some(Token::Literal(self.take(len)));
        }
        if quoted.starts_with('\'') {
            // A character literal ('x', '\n', '\u{7f}', b'x'), or else a lifetime.
            let open = rest.len() - quoted.len() + 1;
            let body = &rest[open..];
            let len = if let Some(escaped) = body.strip_prefix('\\') {
                escaped.find('\'').map(|i| open + 1 + i + 1)
            } else {
                body.chars()
                    .next()
                    .filter(|c| body[c.len_utf8()..].starts_with('\''))
                    .map(|c| open + c.len_utf8() + 1)
            };
            if let Some(len) = len {
                return Some(Token::Literal(self.take(len)));
            }
        }
        Some(Token::Other(self.take(first.len_utf8())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
[package]
name = "relay-example"

[dependencies]
bytes = "1"
unused-thing = "1"
proto = { package = "relay-proto", path = "../proto" }
humantime-serde = "1"

[dev-dependencies]
tempfile = "3"
"#;

    fn sources(product: &str, test: &str) -> Sources {
        let (product, mut in_src_tests, _) = split_test_code(&strip_comments(product));
        in_src_tests += test;
        Sources {
            product,
            test: in_src_tests,
            build: String::new(),
        }
    }

    #[test]
    fn a_used_an_unused_and_a_renamed_dependency() {
        let product = r#"
use bytes::Bytes;
// unused_thing::call() in a comment does not count
/// Nor in a doc comment: unused_thing::call()
fn f() -> Bytes { proto::wire::encode(); Bytes::new() }
#[derive(serde::Deserialize)]
struct S { #[serde(with = "humantime_serde")] d: std::time::Duration }
"#;
        let problems = unused(
            "example/Cargo.toml",
            MANIFEST,
            &sources(product, "fn t() { tempfile::tempdir(); }"),
        );
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with(
                "example/Cargo.toml: [dependencies] `unused-thing` is not used in src/"
            ),
            "{problems:#?}"
        );
    }

    #[test]
    fn the_package_name_of_a_renamed_dependency_does_not_count() {
        let product = "fn f() { relay_proto::wire::encode(); bytes::Bytes::new(); unused_thing::x(); humantime_serde::x() }";
        let problems = unused("c/Cargo.toml", MANIFEST, &sources(product, "use tempfile;"));
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains("[dependencies] `proto` (package relay-proto) is not used"),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_dependency_used_only_in_cfg_test_code_belongs_in_dev_dependencies() {
        let product = r#"
use bytes::Bytes;
fn f() { proto::x(); humantime_serde::x(); }
#[cfg(test)]
mod tests {
    fn t() { let c = '}'; unused_thing::x(); tempfile::tempdir(); }
}
"#;
        let problems = unused("c/Cargo.toml", MANIFEST, &sources(product, ""));
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains("`unused-thing` is not used")
                && problems[0].ends_with("move it to [dev-dependencies]"),
            "{problems:#?}"
        );
    }

    #[test]
    fn an_unused_dev_dependency_is_reported() {
        let product = "fn f() { proto::x(); bytes::x(); unused_thing::x(); humantime_serde::x() }";
        let problems = unused("c/Cargo.toml", MANIFEST, &sources(product, "fn t() {}"));
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0]
                .starts_with("c/Cargo.toml: [dev-dependencies] `tempfile` is not used in tests/"),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_dependency_of_generated_code_is_named_in_the_metadata() {
        let manifest =
            format!("{MANIFEST}\n[package.metadata.cargo-machete]\nignored = [\"unused-thing\"]\n");
        let product = "fn f() { proto::x(); bytes::x(); humantime_serde::x() }";
        let problems = unused(
            "c/Cargo.toml",
            &manifest,
            &sources(product, "use tempfile;"),
        );
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn names_count_only_as_whole_paths() {
        assert!(uses("use tokio::net;", "tokio"));
        assert!(uses("pub use bytes;", "bytes"));
        assert!(uses("extern crate zstd;", "zstd"));
        assert!(uses("x = format_thing!(1)", "format_thing"));
        assert!(!uses("relay_sink::run()", "sink"));
        assert!(!uses("std::time::Duration", "time"));
        assert!(!uses("<T as Trait>::time::x()", "time"));
        assert!(uses("(::time::Date::MIN)", "time"));
        assert!(!uses("let sink = 1; sink.run()", "sink"));
        assert!(!uses("fn reuse_sink() {}", "sink"));
    }

    #[test]
    fn cfg_test_modules_declared_by_name_are_found() {
        let (product, test, modules) = split_test_code(
            "mod a;\n#[cfg(test)]\nmod tests;\nfn b() {}\n#[cfg(test)]\nfn c() { { } }\nfn d() {}",
        );
        assert_eq!(modules, ["tests"]);
        assert!(
            product.contains("mod a;") && product.contains("fn b()") && product.contains("fn d()")
        );
        assert!(test.contains("fn c() { { } }") && !test.contains("fn d"));
    }
}
