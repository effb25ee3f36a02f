//! What nexusctl writes to the terminal: every field that comes from the gateway (or
//! any other peer) is shown with its control and bidirectional-formatting characters
//! escaped, so a reason or a signal kind cannot move the cursor, recolour the terminal,
//! reverse the text that follows (U+202E) or forge extra lines. And a reader that goes
//! away (`nexusctl status | head`) ends the command quietly, not with a panic.

use std::borrow::Cow;
use std::io::Write;

/// Whether `c` must not reach a terminal as is: C0/C1 controls and DEL, and the
/// invisible formatting characters that reorder or hide text (bidi embeddings,
/// overrides and isolates, marks, zero-width characters, the BOM).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `text` fit for a terminal: unsafe characters as `\u{…}` (`\n`, `\r`, `\t` as such),
/// backslashes doubled so an escape cannot be forged.
pub fn safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| unsafe_char(c) || c == '\\') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Pretty JSON whose strings carry no unsafe character raw: serde_json already escapes
/// C0 controls; the others (which can only occur inside strings) become `\uXXXX`.
pub fn json_pretty(value: &serde_json::Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    json_escape_rest(&text)
}

/// Compact JSON, as [`json_pretty`].
pub fn json_line(value: &serde_json::Value) -> String {
    json_escape_rest(&value.to_string())
}

fn json_escape_rest(text: &str) -> String {
    // ASCII controls inside strings are escaped by serde_json already; outside strings
    // they are the pretty printer's own newlines and indentation.
    let escape = |c: char| !c.is_ascii() && unsafe_char(c);
    if !text.chars().any(escape) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escape(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes to stdout; a closed reader ends the process quietly (exit 0), any other
/// write error with a message (exit 1).
pub fn write_out(args: std::fmt::Arguments<'_>, newline: bool) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if let Err(error) = result {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("nexusctl: cannot write to stdout: {error}");
        std::process::exit(1);
    }
}

/// `println!` that survives a closed pipe (see [`write_out`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::term::write_out(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::term::write_out(format_args!($($arg)*), true) };
}

/// `print!` that survives a closed pipe (see [`write_out`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::term::write_out(format_args!($($arg)*), false) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_overrides_are_escaped() {
        assert_eq!(safe("plain reason"), "plain reason");
        assert_eq!(
            safe("a\u{1b}[31mred\u{202e}txt\nforged line\\u{1b}"),
            "a\\u{1b}[31mred\\u{202e}txt\\nforged line\\\\u{1b}"
        );
        assert_eq!(
            safe("\u{9b}31m\u{2066}x\u{feff}"),
            "\\u{9b}31m\\u{2066}x\\u{feff}"
        );
        let v = serde_json::json!({"reason": "x\u{202e}y\u{1b}z"});
        let text = json_line(&v);
        assert_eq!(text, "{\"reason\":\"x\\u202ey\\u001bz\"}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
        let pretty = json_pretty(&v);
        assert!(pretty.contains("\n") && !pretty.contains('\u{202e}'));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&pretty).unwrap(),
            v
        );
    }
}
