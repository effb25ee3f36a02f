//! Policy errors that point at the file, line and column to fix.

use std::fmt;

/// A location in a policy or data file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// File path as loaded (relative to the policy folder when loaded from one).
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub col: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// Why a policy folder or a single evaluation could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file could not be read.
    #[error("{file}: cannot read: {reason}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        reason: String,
    },
    /// A Rego file does not parse or compile.
    #[error("{location}: {message}")]
    Rego {
        /// Where.
        location: Location,
        /// regorus's message.
        message: String,
    },
    /// A Rego error without a location (rare).
    #[error("{0}")]
    RegoUnlocated(String),
    /// A data file is not valid JSON/YAML, or conflicts with another.
    #[error("{file}: {message}")]
    Data {
        /// The file.
        file: String,
        /// What is wrong (with line and column where the parser gives them).
        message: String,
    },
    /// The decision rule named in config does not exist in the policy.
    #[error("decision rule `{rule}` is not defined by any policy file: {message}")]
    NoDecisionRule {
        /// The configured rule.
        rule: String,
        /// regorus's message.
        message: String,
    },
    /// Loading, testing or compiling a revision did not finish within a limit (time or
    /// memory), so the revision is refused.
    #[error("{dir}: {step} did not finish within {limit}: {message}")]
    Limit {
        /// The policy folder.
        dir: String,
        /// What was running: the test (rule and file), the rule being compiled.
        step: String,
        /// The limit that stopped it, with its config field.
        limit: String,
        /// What happened.
        message: String,
    },
    /// The engine failed where it should not (a regorus panic, caught): the revision is
    /// refused, the process goes on.
    #[error("the policy engine failed: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
    /// A policy folder's tests failed, so the revision is refused.
    #[error("{failed} policy test(s) failed: {names}")]
    TestsFailed {
        /// How many.
        failed: usize,
        /// Which, comma-separated.
        names: String,
    },
}

impl PolicyError {
    /// The location, if the error has one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Rego { location, .. } => Some(location),
            _ => None,
        }
    }

    /// Converts a regorus error (formatted `--> file:line:col ... error: message`).
    pub fn from_regorus(error: &anyhow::Error) -> Self {
        let text = format!("{error:#}");
        match parse_regorus_location(&text) {
            Some((location, message)) => Self::Rego { location, message },
            None => Self::RegoUnlocated(text.trim().to_string()),
        }
    }
}

/// Splits regorus's error text into a location and the message after `error:`.
fn parse_regorus_location(text: &str) -> Option<(Location, String)> {
    let arrow = text.find("--> ")?;
    let rest = &text[arrow + 4..];
    let line_end = rest.find('\n').unwrap_or(rest.len());
    let spec = rest.get(..line_end)?.trim();
    let mut parts = spec.rsplitn(3, ':');
    let col = parts.next()?.parse().ok()?;
    let line = parts.next()?.parse().ok()?;
    let file = parts.next()?.to_string();
    let message = text
        .rfind("error: ")
        .map(|i| text[i + 7..].trim().to_string())
        .unwrap_or_else(|| text.trim().to_string());
    Some((Location { file, line, col }, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_regorus_locations() {
        let text = "\n--> policies/x.rego:5:1\n  |\n5 | }\n  | ^\nerror: expecting expression";
        let (loc, msg) = parse_regorus_location(text).unwrap();
        assert_eq!(loc.to_string(), "policies/x.rego:5:1");
        assert_eq!(msg, "expecting expression");
    }
}
