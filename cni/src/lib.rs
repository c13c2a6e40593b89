//! meshplane's CNI plugin (issue 20, `docs/cni-design.md`): what a
//! container runtime hands the plugin (the network configuration on
//! stdin, the `CNI_*` environment; CNI spec 0.4.0 to 1.1.0), which service
//! a container joins ([`conf::service`]), what the plugin prints (the ADD
//! result, error objects, VERSION's answer: [`result`]), with the spec's
//! error codes and meshplane's own ([`failure`]), and what the plugin and
//! the node say over the admin socket ([`proto`]).
//!
//! All of it is free of I/O but [`plugin`], the plugin's whole run (the
//! `meshplane-cni` binary is its `main`): one request to the node over
//! its admin socket with a deadline, and [`spool`], where a DEL that
//! found no node waits for it (the node reads the same files).

pub mod conf;
pub mod failure;
pub mod plugin;
pub mod proto;
pub mod result;
pub mod spool;

/// The CNI spec versions the plugin speaks.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
