//! Policy in the sidecar: the current revision (compiled by `nexus-policy`), its runtime
//! data (open executions, revocations), the reload loop that swaps in a new revision only
//! once it compiles and its tests pass, and the input document of each request.

pub mod input;
#[cfg(test)]
mod input_props;
pub mod runtime;

pub use runtime::{Loaded, PolicyRuntime};
