//! nexus-gateway: the control plane. It holds every sidecar's control stream, stores
//! revocations, executions, anomaly signals and execution records (sqlx: SQLite by
//! default, PostgreSQL for several replicas), pushes each change to every sidecar and
//! measures when all of them acknowledged it, judges anomaly signals with a Rego
//! revocation policy, and serves the operators' admin API.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod baselines;
pub mod changes;
pub mod config;
pub mod control;
pub mod hub;
pub mod metrics;
pub mod rates;
pub mod registry;
pub mod replicas;
pub mod server;
pub mod signals;
pub mod store;
pub mod webhook;
