//! Panic isolation at the nexus-policy boundary: regorus panics on some inputs (a slice
//! out of bounds in `regex.template_match`, for one); no such panic may reach a caller.
//! Every load, compile, evaluation and test run goes through `catch`, which turns a
//! panic into an error (a deny for a decision) naming what panicked.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `f`; a panic becomes `Err("the policy engine panicked: ...")`.
///
/// `AssertUnwindSafe` is sound here: what `f` touches is either dropped with the panic
/// (a fresh VM, a cloned engine) or immutable shared state (compiled programs, data).
pub(crate) fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_panic(f).and_then(|r| r)
}

/// Runs `f`; a panic becomes `Err(message)` (counted and logged).
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => Ok(result),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            crate::metrics::count_panic();
            tracing::error!(panic = %what, "the policy engine panicked; the evaluation is an error (deny)");
            Err(format!(
                "the policy engine panicked (a regorus bug; denied): {what}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_an_error_and_is_counted() {
        let before = crate::metrics::counters().panics;
        let r: Result<(), String> = super::catch(|| panic!("boom"));
        assert!(
            r.unwrap_err()
                .contains("panicked (a regorus bug; denied): boom")
        );
        assert!(crate::metrics::counters().panics > before);
    }
}
