//! The Nexus gateway (control plane). The control stream arrives with the gateway issue.
