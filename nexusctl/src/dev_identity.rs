//! placeholder: written by the dev-identity helper
