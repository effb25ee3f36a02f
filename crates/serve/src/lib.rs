//! One accept/serve module for every Nexus listener (the sidecar's inbound, outbound and
//! admin listeners and its in-pod report socket; the gateway's control, admin and webhook
//! listeners; nexusctl's console and demo data API): a connection
//! cap per listener, a header-read timeout and a bounded request head, and a graceful
//! drain. On drain a listener stops accepting, HTTP/1 connections close after their
//! in-flight request, HTTP/2 peers get GOAWAY, and [`Drain::finished`] completes once
//! every connection has ended. [`shutdown`] runs the whole SIGTERM sequence.
//!
//! *linkerd2-proxy `linkerd/app/core/src/serve.rs` and its `drain` crate.*
#![forbid(unsafe_code)]

mod accept;
mod drain;
mod shutdown;
pub mod workers;

pub use accept::{
    ConnLimits, DEFAULT_MAX_CONNECTIONS, Listener, Slot, accept, accept_into, accept_with_slot,
    http_server, serve_connection,
};
pub use drain::{Drain, Readiness, Watch};
pub use shutdown::{ShutdownTiming, Signals, Stopped, shutdown};
pub use workers::Workers;
