//! Reading docs/deployment.md as a runbook: its fenced blocks, the commands of its `sh`
//! blocks (continuations joined, comments dropped), the `text` blocks that show what a
//! command prints, and the markers that scope a block to one overlay or skip it.

/// One fenced block.
#[derive(Debug, Clone)]
pub struct Block {
    /// 1-based line of the opening fence.
    pub line: usize,
    /// The info string (`sh`, `text`, ...).
    pub lang: String,
    /// The contents, the fence's indentation removed.
    pub text: String,
    /// The `<!-- rehearsal: ... -->` marker right before the block, if any.
    pub marker: Option<String>,
    /// True when only blank lines separate this block from the previous one.
    pub follows_previous: bool,
}

/// The fenced blocks of a markdown document, in order.
pub fn blocks(markdown: &str) -> Vec<Block> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out: Vec<Block> = Vec::new();
    let mut i = 0;
    let mut last_end: Option<usize> = None;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            let indent = lines[i].len() - trimmed.len();
            let start = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                let l = lines[i];
                body.push(if l.len() >= indent && l[..indent].trim().is_empty() {
                    &l[indent..]
                } else {
                    l.trim_start()
                });
                i += 1;
            }
            let marker = lines[..start]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| {
                    l.trim()
                        .strip_prefix("<!-- rehearsal:")
                        .and_then(|m| m.strip_suffix("-->"))
                        .map(|m| m.trim().to_string())
                });
            let follows_previous = last_end
                .is_some_and(|end| lines[end + 1..start].iter().all(|l| l.trim().is_empty()));
            out.push(Block {
                line: start + 1,
                lang: lang.trim().to_string(),
                text: body.join("\n"),
                marker,
                follows_previous,
            });
            last_end = Some(i);
        }
        i += 1;
    }
    out
}

/// One command of an `sh` block: its text (continuations joined) and its line.
#[derive(Debug, Clone)]
pub struct Command {
    /// The command line.
    pub text: String,
    /// Its first line in the document.
    pub line: usize,
}

/// The commands of an `sh` block starting at document line `first_line` (the fence).
pub fn commands(block: &str, fence_line: usize) -> Vec<Command> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (n, raw) in block.lines().enumerate() {
        let line = strip_comment(raw);
        if current.is_empty() {
            if line.trim().is_empty() {
                continue;
            }
            start = fence_line + 1 + n;
        }
        if let Some(cont) = line.trim_end().strip_suffix('\\') {
            current.push_str(cont.trim());
            current.push(' ');
            continue;
        }
        current.push_str(line.trim());
        out.push(Command {
            text: current.trim().to_string(),
            line: start,
        });
        current.clear();
    }
    if !current.trim().is_empty() {
        out.push(Command {
            text: current.trim().to_string(),
            line: start,
        });
    }
    out
}

/// The line without a shell comment (`#` at the start of a word, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev_space => return &line[..i],
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Splits a command line into words as a POSIX shell would for simple commands: single
/// and double quotes and backslash escapes; no expansion. `Err` names what is not
/// supported (so the runbook keeps kubectl lines simple).
pub fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                word.push(n);
                            }
                        }
                        '$' | '`' => return Err(format!("expansion in `{line}`")),
                        _ => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '$' | '`' | ';' | '&' | '>' | '<' | '|' | '(' | ')' => {
                return Err(format!("shell syntax `{c}` in `{line}`"));
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

/// Splits `a | b` at pipes outside quotes.
pub fn pipeline(line: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut quote: Option<char> = None;
    let mut start = 0;
    let bytes: Vec<char> = line.chars().collect();
    let mut offset = 0;
    for (i, c) in bytes.iter().enumerate() {
        match (quote, *c) {
            (None, '\'' | '"') => quote = Some(*c),
            (Some(q), c) if c == q => quote = None,
            (None, '|') if bytes.get(i + 1) != Some(&'|') && (i == 0 || bytes[i - 1] != '|') => {
                parts.push(line[start..offset].trim().to_string());
                start = offset + 1;
            }
            _ => {}
        }
        offset += c.len_utf8();
    }
    parts.push(line[start..].trim().to_string());
    parts
}

/// Whether every line of `expected` appears, in order, among the lines of `output`; `...`
/// in an expected line matches any text within the line.
pub fn output_matches(expected: &str, output: &str) -> Result<(), String> {
    let mut lines = output.lines();
    for want in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !lines.any(|line| line_matches(want, line.trim())) {
            return Err(format!("expected a line like `{want}`"));
        }
    }
    Ok(())
}

fn line_matches(want: &str, line: &str) -> bool {
    let parts: Vec<&str> = want.split("...").collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return line == want;
    }
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[test]
fn runbook_reading_rules() {
    let md = "intro\n\n<!-- rehearsal: skip (why) -->\n```sh\nkubectl a \\\n  --b 'c d' # note\n# only a comment\necho x\n```\n```text\nx\n```\n\n   ```sh\n   one\n   ```\n";
    let b = blocks(md);
    assert_eq!(b.len(), 3);
    assert_eq!(b[0].marker.as_deref(), Some("skip (why)"));
    assert!(b[1].follows_previous);
    assert_eq!(b[2].text, "one");
    let c = commands(&b[0].text, b[0].line);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].text, "kubectl a --b 'c d'");
    assert_eq!(c[0].line, 5);
    assert_eq!(words(&c[0].text).unwrap(), ["kubectl", "a", "--b", "c d"]);
    assert!(words("a $(b)").is_err());
    assert_eq!(pipeline("a 'x|y' | b"), ["a 'x|y'", "b"]);
    assert!(output_matches("ex-...", "ex-0193abc\n").is_ok());
    assert!(output_matches("...is revoked...", "{\"reasons\":[\"w is revoked\"]}").is_ok());
    assert!(
        output_matches(
            "revoked ... at revision ...; acknowledged by all 2 sidecars in ... ms",
            "revoked x at revision 3; acknowledged by all 2 sidecars in 4.2 ms"
        )
        .is_ok()
    );
    assert!(output_matches("...is revoked...", "allowed").is_err());
    assert!(output_matches("ex-...", "error: ex-1").is_err());
}
