//! The repository's markdown: every relative link reaches a file, every `#anchor` a
//! heading (GitHub's slugs), and the README keeps its front-door commands.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nexus_tests::repo_root;

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !(name.starts_with('.') || name == "target" || name == "node_modules") {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// The text outside fenced code blocks and inline code spans, line by line.
fn prose(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut kept = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                kept.push(c);
            }
        }
        out.push((n + 1, kept));
    }
    out
}

/// `[text](target)` targets of a line.
fn links(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        out.push(target);
        rest = &after[end..];
    }
    out
}

/// GitHub's heading anchors: lowercase, punctuation dropped (except `-` and `_`),
/// spaces to `-`, repeats numbered.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let Some(heading) = line.strip_prefix('#').filter(|_| !fenced) else {
            continue;
        };
        let title = heading.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 1;
        while seen.contains(&unique) {
            unique = format!("{slug}-{n}");
            n += 1;
        }
        seen.insert(unique);
    }
    seen
}

#[test]
fn every_markdown_link_reaches_its_file_and_heading() {
    let root = repo_root();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        for (line, prose) in prose(&text) {
            for target in links(&prose) {
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let dest = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().expect("dir").join(path)
                };
                let shown = format!(
                    "{}:{line}: {target}",
                    file.strip_prefix(&root).unwrap_or(file).display()
                );
                if !dest.exists() {
                    broken.push(format!("{shown} (no such file)"));
                    continue;
                }
                if !dest.canonicalize().is_ok_and(|d| d.starts_with(&root)) {
                    broken.push(format!("{shown} (outside the repository)"));
                    continue;
                }
                if let Some(anchor) = anchor {
                    let ok = dest.extension().is_some_and(|e| e == "md")
                        && anchors(&std::fs::read_to_string(&dest).unwrap_or_default())
                            .contains(anchor);
                    if !ok {
                        broken.push(format!("{shown} (no heading with that anchor)"));
                    }
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_the_front_door() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    for must in [
        "cargo build --bins && target/debug/nexusctl up",
        "scripts/test.sh",
        "docs/deployment.md",
        "docs/configuration.md",
        "docs/threat-model.md",
        "docs/opa-compatibility.md",
        "docs/sandbox.md",
        "docs/benchmarks.md",
    ] {
        assert!(readme.contains(must), "README.md lacks `{must}`");
    }
    assert!(
        readme.lines().count() < 200,
        "the README is the front door; reference material goes to docs/"
    );
}

#[test]
fn slugs_follow_github() {
    let a = anchors("# A b\n## 4. Operating: the toolbox\n## A b\n```\n# not\n```\n");
    assert!(a.contains("a-b") && a.contains("a-b-1"), "{a:?}");
    assert!(a.contains("4-operating-the-toolbox"), "{a:?}");
    assert!(!a.contains("not"));
    assert_eq!(links("see [x](a.md#b) and [y](c)"), ["a.md#b", "c"]);
}
