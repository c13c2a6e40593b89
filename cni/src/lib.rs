//! meshplane's CNI plugin without I/O (issue 20, `docs/cni-design.md`):
//! what a container runtime hands the plugin (the network configuration on
//! stdin, the `CNI_*` environment; CNI spec 0.4.0 to 1.1.0), which service
//! a container joins ([`conf::service`]), and what the plugin prints (the
//! ADD result, error objects, VERSION's answer: [`result`]), with the
//! spec's error codes and meshplane's own ([`failure`]), and what the
//! plugin and the node say over the admin socket ([`proto`]).

pub mod conf;
pub mod failure;
pub mod proto;
pub mod result;

/// The CNI spec versions the plugin speaks.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
