//! Why a CNI command failed: the spec's codes (1 to 11, 50 for STATUS)
//! and meshplane's (100 and up: the spec reserves 0 to 99), each with a
//! message a user can act on.

use serde::{Deserialize, Serialize};

/// A failed CNI command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Failure {
    /// An unsupported `cniVersion` (code 1).
    #[error(
        "CNI version {0} is not supported: meshplane supports 0.4.0, 1.0.0, 1.1.0 (set \"cniVersion\": \"1.0.0\" in the conflist)"
    )]
    Version(String),
    /// A field or argument meshplane does not take (code 2).
    #[error("{key}: {why}")]
    Unsupported {
        /// The key (`ipam`, `IP=…`).
        key: String,
        /// Why, and what to do.
        why: String,
    },
    /// A missing or malformed `CNI_*` variable (code 4).
    #[error("{var}: {why}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        why: String,
    },
    /// An I/O error (code 5).
    #[error("{0}")]
    Io(String),
    /// The network configuration does not decode (code 6).
    #[error("the network configuration is not valid JSON: {0}")]
    Decode(String),
    /// The network configuration is wrong (code 7).
    #[error("{0}")]
    Config(String),
    /// The node is not there, or could not do it now (code 11: try again
    /// later).
    #[error("{0}")]
    Later(String),
    /// The service does not exist (code 100).
    #[error(
        "service {0:?} does not exist (meshplane service ls on a manager lists them; the conflist's \"service\" or MESHPLANE_SERVICE= names it)"
    )]
    UnknownService(String),
    /// The service's network has no free address (code 101).
    #[error("network {0} has no free address left for another task")]
    NetworkFull(String),
    /// The network namespace is unusable (code 102).
    #[error("network namespace {netns}: {why}")]
    Netns {
        /// Its path.
        netns: String,
        /// What is wrong.
        why: String,
    },
    /// The interface name is taken in the namespace (code 103).
    #[error("an interface {ifname} already exists in {netns}")]
    Ifname {
        /// The name.
        ifname: String,
        /// The namespace.
        netns: String,
    },
    /// CHECK: no task for the container (code 104).
    #[error("no task for container {0}")]
    NoTask(String),
    /// CHECK: the interface differs from the task (code 105).
    #[error("{0}")]
    Mismatch(String),
    /// The node refuses CNI requests (code 106).
    #[error("{0}")]
    Refused(String),
}

/// The code of every failed STATUS, whatever the cause (the spec's "the
/// plugin is not available": it could not serve an ADD now). The message
/// is the cause's.
pub const STATUS_CODE: u32 = 50;

impl Failure {
    /// Its code in the error object (of any command but STATUS:
    /// [`STATUS_CODE`]).
    pub fn code(&self) -> u32 {
        match self {
            Failure::Version(_) => 1,
            Failure::Unsupported { .. } => 2,
            Failure::Env { .. } => 4,
            Failure::Io(_) => 5,
            Failure::Decode(_) => 6,
            Failure::Config(_) => 7,
            Failure::Later(_) => 11,
            Failure::UnknownService(_) => 100,
            Failure::NetworkFull(_) => 101,
            Failure::Netns { .. } => 102,
            Failure::Ifname { .. } => 103,
            Failure::NoTask(_) => 104,
            Failure::Mismatch(_) => 105,
            Failure::Refused(_) => 106,
        }
    }
}
