//! The link check of `house.rs`: the relative links of a markdown file, and the anchors its
//! headings get on GitHub.

/// The targets of the links in `markdown` (`[text](target)` and `[label]: target`), outside
/// fenced code blocks and code spans, each with its line number (from 1).
pub(crate) fn targets(markdown: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in prose_lines(markdown) {
        let line = without_code_spans(line);
        let trimmed = line.trim_start();
        let definition = trimmed
            .strip_prefix('[')
            .and_then(|t| t.split_once("]: "))
            .map(|(_, target)| target);
        if let Some(target) = definition {
            found.push((
                number,
                target.split_whitespace().next().unwrap_or("").to_owned(),
            ));
            continue;
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let target = match rest.strip_prefix('<') {
                Some(angled) => angled.split('>').next().unwrap_or(""),
                None => rest.split([')', ' ']).next().unwrap_or(""),
            };
            found.push((number, target.to_owned()));
        }
    }
    found
}

/// The anchors GitHub gives the headings of `markdown` (ATX headings, outside fenced code):
/// see [`slug`]; a repeated one gets `-1`, `-2`, ….
pub(crate) fn anchors(markdown: &str) -> Vec<String> {
    let mut anchors: Vec<String> = Vec::new();
    for (_, line) in prose_lines(markdown) {
        let trimmed = line.trim_start();
        let level = trimmed.len() - trimmed.trim_start_matches('#').len();
        if !(1..=6).contains(&level) || !trimmed[level..].starts_with(' ') {
            continue;
        }
        let text = trimmed[level..].trim().trim_end_matches('#').trim_end();
        let base = slug(&link_texts(text));
        let mut anchor = base.clone();
        let mut n = 0;
        while anchors.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        anchors.push(anchor);
    }
    anchors
}

/// GitHub's anchor for a heading's text: lowercase, spaces to `-`, every other character but
/// letters, digits, `-` and `_` dropped.
pub(crate) fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// `[text](target)` → `text`, as GitHub renders a heading before making its anchor.
fn link_texts(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some((inside, after)) = rest[open + 1..].split_once("](") else {
            break;
        };
        let Some(close) = after.find(')') else { break };
        out.push_str(&rest[..open]);
        out.push_str(inside);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The lines of `markdown` outside fenced code blocks (``` or ~~~), numbered from 1.
fn prose_lines(markdown: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fence: Option<&str> = None;
    markdown.lines().enumerate().filter_map(move |(i, line)| {
        let trimmed = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => {
                fence = Some(m);
                None
            }
            (Some(open), Some(m)) if open == m => {
                fence = None;
                None
            }
            (Some(_), _) => None,
            (None, None) => Some((i + 1, line)),
        }
    })
}

/// `line` with its code spans (`` `…` ``) blanked out.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('`') {
        let ticks = rest[open..].len() - rest[open..].trim_start_matches('`').len();
        let fence = &rest[open..open + ticks];
        let after = &rest[open + ticks..];
        let Some(close) = after.find(fence) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&" ".repeat(ticks * 2 + close));
        rest = &after[close + ticks..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_slugs() {
        assert_eq!(slug("Quick start"), "quick-start");
        assert_eq!(
            slug("`--ssh-hex`: compatibility with the ssh pipe"),
            "--ssh-hex-compatibility-with-the-ssh-pipe"
        );
        assert_eq!(
            slug("Metrics, certificate reload and thread options (both daemons)"),
            "metrics-certificate-reload-and-thread-options-both-daemons"
        );
        assert_eq!(
            slug("The spool: surviving outages & restarts"),
            "the-spool-surviving-outages--restarts"
        );
        assert_eq!(slug("snake_case и Ünïcode"), "snake_case-и-ünïcode");
    }

    #[test]
    fn anchors_skip_code_and_number_repeats() {
        let md = "# Title\n\n```sh\n# not a heading\n```\n## Part\n## Part\n### [Linked](x.md) heading ##\n#nospace\n";
        assert_eq!(anchors(md), ["title", "part", "part-1", "linked-heading"]);
    }

    #[test]
    fn targets_outside_code() {
        let md = "See [a](docs/a.md#x) and [b](<b c.md>), `[not](code.md)`.\n\
                  ```\n[nor](fenced.md)\n```\n[ref]: https://example.com \"t\"\n\
                  [c](../c.md \"title\")";
        let found: Vec<_> = targets(md).into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            found,
            ["docs/a.md#x", "b c.md", "https://example.com", "../c.md"]
        );
        assert_eq!(targets(md)[3].0, 6);
    }
}
