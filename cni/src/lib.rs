//! meshplane's CNI plugin without I/O (issue 20, `docs/cni-design.md`):
//! what a container runtime hands the plugin (the network configuration on
//! stdin, the `CNI_*` environment; CNI spec 0.4.0 to 1.1.0), which service
//! a container joins ([`conf::service`]), and what the plugin prints (the
//! ADD result, error objects, VERSION's answer: [`result`]), with the
//! spec's error codes and meshplane's own ([`failure`]). The binary and
//! its talk with the node come later (not built yet).

pub mod conf;
pub mod failure;
pub mod result;

/// The CNI spec versions the plugin speaks.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
