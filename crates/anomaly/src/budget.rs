//! Declared budgets: ceilings a plugin's binding carries (`data.nexus.bindings[ID].budgets`,
//! docs/anomaly.md), checked from the first request with no warm-up. A budget is a
//! declaration by the operator, not something the watch learns, so a plugin that is
//! hostile from its start cannot make it its own baseline.
//!
//! The binding shape (the registry of issue 17 builds the same shape):
//!
//! ```yaml
//! bindings:
//!   spiffe://nexus.local/ns/plugins/sa/flood-model:
//!     clauses: [c-flood-17, c-flood-18]
//!     budgets:
//!       requests_per_s: 100         # over any budget rate window (anomaly.budget.rate_window)
//!       egress_bytes: 67108864      # bytes the workload takes out per `window`
//!       distinct_clauses: 4         # different clauses named per `window`
//!       window: 10s
//! ```
//!
//! A binding that is a plain list of clauses (the older shape) carries no budget. A
//! binding object whose `budgets` is missing, zero or malformed is a load error naming
//! the binding and the field.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

/// Distinct clauses per window are tracked up to this many per workload (fixed memory);
/// a budget must stay below it.
pub const MAX_DISTINCT_CLAUSES: u32 = 64;

/// One workload's ceilings.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    /// Requests per second, measured over the detectors' `budget.rate_window`.
    pub requests_per_s: f64,
    /// Bytes the workload takes out (its egress, as the watch counts it) per `window`.
    pub egress_bytes: u64,
    /// Different clauses the workload names per `window`.
    pub distinct_clauses: u32,
    /// The window of `egress_bytes` and `distinct_clauses`.
    pub window: Duration,
}

/// Budgets by workload (SPIFFE ID).
pub type Budgets = HashMap<String, Budget>;

/// A binding whose budget cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum BudgetError {
    /// `data.nexus.bindings` is not an object of bindings.
    #[error("data.nexus.bindings must be an object mapping SPIFFE IDs to bindings")]
    NotAnObject,
    /// A binding is neither a list of clauses nor an object with `clauses` and `budgets`.
    #[error(
        "binding {binding}: {message} (a binding is a list of clauses, or {{clauses: [...], budgets: {{requests_per_s, egress_bytes, distinct_clauses, window}}}}; see docs/anomaly.md)"
    )]
    Binding {
        /// The binding's SPIFFE ID.
        binding: String,
        /// What is wrong.
        message: String,
    },
}

fn err(binding: &str, message: impl Into<String>) -> BudgetError {
    BudgetError::Binding {
        binding: binding.to_string(),
        message: message.into(),
    }
}

/// Reads the budgets of every binding in `bindings` (the value at
/// `data.nexus.bindings`; `Null` when there is none). Checks every binding's shape.
pub fn from_bindings(bindings: &Value) -> Result<Budgets, BudgetError> {
    let mut out = Budgets::new();
    let map = match bindings {
        Value::Null => return Ok(out),
        Value::Object(map) => map,
        _ => return Err(BudgetError::NotAnObject),
    };
    for (id, binding) in map {
        match binding {
            Value::Array(_) => {}
            Value::Object(fields) => {
                for key in fields.keys() {
                    if key != "clauses" && key != "budgets" {
                        return Err(err(id, format!("unknown field `{key}`")));
                    }
                }
                match fields.get("clauses") {
                    Some(Value::Array(list)) if list.iter().all(Value::is_string) => {}
                    Some(_) => return Err(err(id, "`clauses` must be a list of clause names")),
                    None => return Err(err(id, "`clauses` is missing")),
                }
                let budgets = fields.get("budgets").ok_or_else(|| {
                    err(
                        id,
                        "`budgets` is missing: every binding object declares its ceilings",
                    )
                })?;
                out.insert(id.clone(), budget(id, budgets)?);
            }
            _ => return Err(err(id, "not a list or an object")),
        }
    }
    Ok(out)
}

fn budget(id: &str, v: &Value) -> Result<Budget, BudgetError> {
    let Value::Object(fields) = v else {
        return Err(err(id, "`budgets` must be an object"));
    };
    for key in fields.keys() {
        if !matches!(
            key.as_str(),
            "requests_per_s" | "egress_bytes" | "distinct_clauses" | "window"
        ) {
            return Err(err(id, format!("unknown budget `budgets.{key}`")));
        }
    }
    let field = |name: &str| {
        fields
            .get(name)
            .ok_or_else(|| err(id, format!("`budgets.{name}` is missing")))
    };
    let requests_per_s = field("requests_per_s")?
        .as_f64()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| err(id, "`budgets.requests_per_s` must be a number above 0"))?;
    let egress_bytes = field("egress_bytes")?
        .as_u64()
        .filter(|b| *b > 0)
        .ok_or_else(|| err(id, "`budgets.egress_bytes` must be a whole number above 0"))?;
    let distinct_clauses = field("distinct_clauses")?
        .as_u64()
        .filter(|n| *n > 0 && *n < u64::from(MAX_DISTINCT_CLAUSES))
        .ok_or_else(|| {
            err(
                id,
                format!(
                    "`budgets.distinct_clauses` must be a whole number from 1 to {}",
                    MAX_DISTINCT_CLAUSES - 1
                ),
            )
        })? as u32;
    let window = field("window")?
        .as_str()
        .and_then(|s| humantime::parse_duration(s).ok())
        .filter(|w| *w >= Duration::from_millis(100) && *w <= Duration::from_secs(3600))
        .ok_or_else(|| {
            err(
                id,
                "`budgets.window` must be a duration from 100ms to 1h, e.g. \"10s\"",
            )
        })?;
    Ok(Budget {
        requests_per_s,
        egress_bytes,
        distinct_clauses,
        window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";

    fn with(budgets: Value) -> Value {
        json!({ ID: {"clauses": ["c-1"], "budgets": budgets} })
    }

    #[test]
    fn reads_budgets_and_accepts_plain_lists() {
        let b = from_bindings(&json!({
            ID: {"clauses": ["c-1"], "budgets": {"requests_per_s": 100, "egress_bytes": 1024, "distinct_clauses": 4, "window": "10s"}},
            "spiffe://x/y": ["c-2"],
        }))
        .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[ID].requests_per_s, 100.0);
        assert_eq!(b[ID].window, Duration::from_secs(10));
        assert!(from_bindings(&Value::Null).unwrap().is_empty());
    }

    #[test]
    fn missing_zero_or_malformed_budgets_name_the_binding_and_field() {
        let good = json!({"requests_per_s": 100, "egress_bytes": 1024, "distinct_clauses": 4, "window": "10s"});
        let cases = [
            (json!({ID: {"clauses": ["c-1"]}}), "`budgets` is missing"),
            (
                with(json!({"egress_bytes": 1, "distinct_clauses": 1, "window": "1s"})),
                "requests_per_s` is missing",
            ),
            (
                with(
                    json!({"requests_per_s": 0, "egress_bytes": 1, "distinct_clauses": 1, "window": "1s"}),
                ),
                "requests_per_s` must be",
            ),
            (
                with(
                    json!({"requests_per_s": 1, "egress_bytes": -5, "distinct_clauses": 1, "window": "1s"}),
                ),
                "egress_bytes` must be",
            ),
            (
                with(
                    json!({"requests_per_s": 1, "egress_bytes": 1, "distinct_clauses": 0, "window": "1s"}),
                ),
                "distinct_clauses` must be",
            ),
            (
                with(
                    json!({"requests_per_s": 1, "egress_bytes": 1, "distinct_clauses": 1, "window": "soon"}),
                ),
                "window` must be",
            ),
            (
                with(
                    json!({"requests_per_s": "lots", "egress_bytes": 1, "distinct_clauses": 1, "window": "1s"}),
                ),
                "requests_per_s` must be",
            ),
            (with(json!([1, 2])), "must be an object"),
            (
                with(
                    json!({"requests_per_s": 1, "egress_bytes": 1, "distinct_clauses": 1, "window": "1s", "rps": 3}),
                ),
                "unknown budget",
            ),
            (
                json!({ID: {"clauses": "c-1", "budgets": good}}),
                "`clauses` must be",
            ),
            (json!({ID: 7}), "not a list or an object"),
        ];
        for (bindings, want) in cases {
            let e = from_bindings(&bindings).unwrap_err().to_string();
            assert!(e.contains(ID) && e.contains(want), "{want}: {e}");
        }
        assert_eq!(from_bindings(&json!([])), Err(BudgetError::NotAnObject));
    }
}
