//! The binary's view of the one statistics schema: the dataplane's part
//! (`meshplane_dataplane::report`: workers, ports, services, connections)
//! and the control plane's (`meshplane_control::rpc::AdminStats`, with
//! gossip), and the reading of a typed answer from the JSON the admin API
//! carries. Nothing here defines a counter: a renamed or missing field is
//! an error where it is read (the schema refuses unknown fields and has no
//! defaults), never a silent 0.

pub(crate) use meshplane_control::rpc::{AdminStats, HealthStats};
pub(crate) use meshplane_dataplane::report::{
    BackendStats, ConntrackEntry, NodeStats, PortStats, ServiceStats, Traffic, WorkerStats,
};

/// Reads a typed answer back from the JSON the control plane carries.
pub(crate) fn from_value<T: serde::de::DeserializeOwned>(what: &str, v: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("the node's {what} answer does not match this CLI's schema: {e}"))
}
