//! The one schema of a node's statistics, shared by everything that
//! writes or reads them: the node produces it from the dataplane's
//! counters (`node::counters`), writes it to the stats file and answers the
//! admin API's `stats` and `conntrack` with it; the CLI (`stats`, `lb ls`,
//! `conntrack ls`), the lab and the metrics endpoint read it back into the
//! same structs. No field has a default: a missing or renamed field is an
//! error where it is read, never a silent 0.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// A node's dataplane counters: the stats file, and the admin API's
/// `stats` answer under `dataplane`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeStats {
    /// The version of the tables the node published last.
    pub(crate) tables_version: u64,
    /// Every worker's last published counters.
    pub(crate) workers: Vec<WorkerStats>,
}

/// One worker's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkerStats {
    /// The tables version the worker uses.
    pub(crate) tables_version: u64,
    /// Per I/O port: the port's own counters.
    pub(crate) ports: Vec<PortStats>,
    /// Frames dropped, by reason (reasons with none are left out).
    pub(crate) drops: BTreeMap<String, u64>,
    /// Frames passed to the kernel.
    pub(crate) passed: u64,
    /// Frames for a port this worker has no I/O for.
    pub(crate) unbound: u64,
    /// Connection-table entries in use.
    pub(crate) conntrack_entries: u64,
    /// Connections balanced (over the services).
    pub(crate) new_connections: u64,
    /// Frames handed to worker 0 (connection state).
    pub(crate) handed_off: u64,
    /// Frames worker 0 took from the others.
    pub(crate) handed_in: u64,
    /// Frames dropped: worker 0's inbox was full.
    pub(crate) handoff_full: u64,
    /// Rounds that received frames.
    pub(crate) busy_rounds: u64,
    /// Times the worker slept waiting for frames.
    pub(crate) idle_waits: u64,
    /// Per service of the tables in use.
    pub(crate) services: Vec<ServiceStats>,
    /// The pipeline's counters per tables port (frames and bytes).
    pub(crate) traffic: Vec<Traffic>,
}

/// The pipeline's counters of one tables port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Traffic {
    /// The tables port.
    pub(crate) port: String,
    /// Frames received.
    pub(crate) rx_packets: u64,
    /// Bytes received.
    pub(crate) rx_bytes: u64,
    /// Frames sent.
    pub(crate) tx_packets: u64,
    /// Bytes sent.
    pub(crate) tx_bytes: u64,
}

/// An I/O port's own counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortStats {
    /// The tables port it serves.
    pub(crate) name: String,
    /// Frames received.
    pub(crate) rx: u64,
    /// Frames sent.
    pub(crate) tx: u64,
    /// Frames not sent: the transmit ring was full.
    pub(crate) tx_full: u64,
    /// Frames received too large for a buffer.
    pub(crate) rx_oversize: u64,
    /// I/O errors.
    pub(crate) errors: u64,
}

/// A service's counters in one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceStats {
    /// The service.
    pub(crate) name: String,
    /// Packets balanced.
    pub(crate) packets: u64,
    /// Bytes balanced.
    pub(crate) bytes: u64,
    /// Connections scheduled.
    pub(crate) new_connections: u64,
    /// Per backend, in the tables' order.
    pub(crate) backends: Vec<BackendStats>,
}

/// A backend's counters in one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendStats {
    /// Its address.
    pub(crate) ip: Ipv4Addr,
    /// Its port.
    pub(crate) port: u16,
    /// Its weight (0: draining).
    pub(crate) weight: u32,
    /// Packets balanced to it.
    pub(crate) packets: u64,
    /// Bytes balanced to it.
    pub(crate) bytes: u64,
    /// Connections scheduled to it.
    pub(crate) new_connections: u64,
    /// Connections to it tracked now.
    pub(crate) active: u32,
}

/// Gossip's counters and view (the control plane's part of `stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GossipStats {
    /// The members gossip sees.
    pub(crate) members: Vec<String>,
    /// Packets sent.
    pub(crate) sent: u64,
    /// Packets received and accepted.
    pub(crate) received: u64,
    /// Packets dropped: too short.
    pub(crate) rejected_short: u64,
    /// Packets dropped: sealed with a key this node does not have.
    pub(crate) rejected_unknown_key: u64,
    /// Packets dropped: their tag did not verify.
    pub(crate) rejected_bad_tag: u64,
    /// Packets dropped: opened but not decodable.
    pub(crate) rejected_undecodable: u64,
}

impl GossipStats {
    /// Packets rejected, for any reason.
    pub(crate) fn rejected(&self) -> u64 {
        self.rejected_short + self.rejected_unknown_key + self.rejected_bad_tag + self.rejected_undecodable
    }
}

/// The admin API's `stats` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AdminStats {
    /// The dataplane's counters.
    pub(crate) dataplane: NodeStats,
    /// Gossip's (none before the node is in a cluster).
    pub(crate) gossip: Option<GossipStats>,
}

/// One direction of a tracked connection (the admin API's `conntrack`
/// answer is a list of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConntrackEntry {
    /// The worker whose table holds it.
    pub(crate) worker: usize,
    /// `tcp`, `udp` or `other`.
    pub(crate) proto: String,
    /// Source IP:PORT.
    pub(crate) src: String,
    /// Destination IP:PORT.
    pub(crate) dst: String,
    /// `forward` or `reply`.
    pub(crate) direction: String,
    /// The service (none if the tables no longer have it).
    pub(crate) service: Option<String>,
    /// The backend IP:PORT (empty if unknown).
    pub(crate) backend: String,
    /// `udp`, `syn_recv`, `established`, `fin_wait` or `close`.
    pub(crate) state: String,
    /// Seconds until it expires.
    pub(crate) expires_in_s: u64,
}

/// Reads a typed answer back from the JSON the control plane carries.
pub(crate) fn from_value<T: serde::de::DeserializeOwned>(what: &str, v: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("the node's {what} answer does not match this CLI's schema: {e}"))
}

/// The JSON the control plane carries for a typed value.
pub(crate) fn to_value<T: Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_or_missing_counter_is_an_error_not_a_zero() {
        let ok = serde_json::json!({ "name": "uplink", "rx": 1, "tx": 2, "tx_full": 0, "rx_oversize": 0, "errors": 0 });
        assert!(serde_json::from_value::<PortStats>(ok.clone()).is_ok());
        let renamed = serde_json::json!({ "name": "uplink", "rx_frames": 1, "tx": 2, "tx_full": 0, "rx_oversize": 0, "errors": 0 });
        assert!(serde_json::from_value::<PortStats>(renamed).is_err());
        let missing = serde_json::json!({ "name": "uplink", "rx": 1, "tx": 2, "tx_full": 0, "rx_oversize": 0 });
        assert!(serde_json::from_value::<PortStats>(missing).is_err());
    }
}
