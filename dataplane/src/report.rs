//! The one schema of a node's statistics, shared by everything that
//! writes or reads them: the node produces it from its workers' counters,
//! writes it to the stats file and answers the admin API's `stats` (under
//! `dataplane`, beside the control plane's gossip counters) and
//! `conntrack` with it; the CLI (`stats`, `lb ls`, `conntrack ls`), the lab
//! and the metrics endpoint read it back into the same structs. No field
//! has a default and unknown fields are refused: a missing or renamed
//! field is an error where it is read, never a silent 0.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// A node's dataplane counters: the stats file, and the admin API's
/// `stats` answer under `dataplane`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStats {
    /// The version of the tables the node published last.
    pub tables_version: u64,
    /// Every worker's last published counters.
    pub workers: Vec<WorkerStats>,
    /// The embedded DNS server's counters (`None`: DNS is off, or static
    /// mode).
    pub dns: Option<DnsReport>,
}

/// The embedded DNS server's counters (`src/node/dns.rs`), node-wide.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsReport {
    /// Queries received over UDP (everything with a DNS header).
    pub queries_udp: u64,
    /// Queries received over TCP.
    pub queries_tcp: u64,
    /// Answers with records (NOERROR).
    pub noerror: u64,
    /// NOERROR without records: a name of ours without the type asked.
    pub nodata: u64,
    /// NXDOMAIN.
    pub nxdomain: u64,
    /// SERVFAIL (a forward that failed, over the cap, or from an internal
    /// network).
    pub servfail: u64,
    /// FORMERR (a malformed query).
    pub formerr: u64,
    /// NOTIMP (an opcode other than QUERY).
    pub notimp: u64,
    /// REFUSED (a class other than IN).
    pub refused: u64,
    /// BADVERS (EDNS version above 0).
    pub badvers: u64,
    /// Any other result (an upstream's YXDOMAIN, NOTAUTH, …, passed on).
    pub other: u64,
    /// UDP answers cut to fit, with TC set.
    pub truncated: u64,
    /// Queries forwarded upstream (names not the cluster's).
    pub forwarded: u64,
    /// Upstream tries that timed out.
    pub forward_timeouts: u64,
    /// Upstream tries that failed otherwise (socket errors, SERVFAIL or
    /// REFUSED from the upstream, no upstream at all).
    pub forward_errors: u64,
    /// Queries not forwarded: too many in flight (node or network cap).
    pub forward_over_cap: u64,
    /// TCP connections accepted.
    pub tcp_conns: u64,
    /// TCP connections refused: too many open.
    pub tcp_refused: u64,
    /// Datagrams too short for a DNS header, and responses sent to us
    /// (ignored).
    pub ignored: u64,
    /// Networks served now (a listener pair each).
    pub networks: u64,
}

/// One worker's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerStats {
    /// The tables version the worker uses.
    pub tables_version: u64,
    /// Per I/O port: the port's own counters.
    pub ports: Vec<PortStats>,
    /// Frames dropped, by reason (reasons with none are left out).
    pub drops: BTreeMap<String, u64>,
    /// Frames passed to the kernel.
    pub passed: u64,
    /// Frames for a port this worker has no I/O for.
    pub unbound: u64,
    /// Connection-table entries in use.
    pub conntrack_entries: u64,
    /// Connection-table entries made unconfirmed: TCP segments without SYN
    /// of connections the table did not know (a restart, or spoofed).
    pub conntrack_unconfirmed: u64,
    /// Unconfirmed entries a reply from the backend confirmed.
    pub conntrack_confirmed: u64,
    /// New connections the flood guard refused (`--max-new-conns-per-sec`):
    /// dropped, also under the drop reason `new_conn_rate_limited`.
    pub conntrack_guarded: u64,
    /// Live entries evicted to make room.
    pub conntrack_evicted: u64,
    /// ICMP fragmentation-needed the routing mesh sent to clients (those
    /// the rate limit refused: the drop reason `icmp_rate_limited`).
    pub mesh_frag_needed: u64,
    /// Routing-mesh SYNs and SYN-ACKs whose MSS was clamped to the network
    /// MTU − 40.
    pub mesh_mss_clamped: u64,
    /// Egress: tasks' connections out of the cluster through this node.
    pub egress: crate::lb::egress::EgressStats,
    /// Connections balanced (over the services).
    pub new_connections: u64,
    /// Frames handed to worker 0 (connection state).
    pub handed_off: u64,
    /// Frames worker 0 took from the others.
    pub handed_in: u64,
    /// Frames dropped: worker 0's inbox was full.
    pub handoff_full: u64,
    /// Rounds that received frames.
    pub busy_rounds: u64,
    /// Times the worker slept waiting for frames.
    pub idle_waits: u64,
    /// Times the worker yielded its core while it spun for the next frame
    /// (`node run --spin-us`).
    #[serde(default)]
    pub spin_yields: u64,
    /// Per service of the tables in use.
    pub services: Vec<ServiceStats>,
    /// The pipeline's counters per tables port (frames and bytes).
    pub traffic: Vec<Traffic>,
}

/// The pipeline's counters of one tables port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// The tables port.
    pub port: String,
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// An I/O port's own counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortStats {
    /// The tables port it serves.
    pub name: String,
    /// Frames received.
    pub rx: u64,
    /// Frames sent.
    pub tx: u64,
    /// Frames not sent: the transmit ring was full.
    pub tx_full: u64,
    /// Frames received too large for a buffer.
    pub rx_oversize: u64,
    /// I/O errors.
    pub errors: u64,
    /// Frames received with a virtio-net header that does not fit them
    /// (TAP): dropped.
    pub rx_bad_offload: u64,
    /// Super-frames cut into segments in software for this port.
    pub tx_segmented: u64,
    /// Segments coalesced into super-frames for this port (GRO).
    pub tx_coalesced: u64,
    /// Frames the kernel dropped before the port read them (AF_XDP: rx
    /// ring full, no fill buffer).
    pub rx_kernel_dropped: u64,
}

/// A service's counters in one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStats {
    /// The service.
    pub name: String,
    /// Packets balanced.
    pub packets: u64,
    /// Bytes balanced.
    pub bytes: u64,
    /// Connections scheduled.
    pub new_connections: u64,
    /// Per backend, in the tables' order.
    pub backends: Vec<BackendStats>,
}

/// A backend's counters in one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendStats {
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its port.
    pub port: u16,
    /// Its weight (0: draining).
    pub weight: u32,
    /// Packets balanced to it.
    pub packets: u64,
    /// Bytes balanced to it.
    pub bytes: u64,
    /// Connections scheduled to it.
    pub new_connections: u64,
    /// Connections to it tracked now.
    pub active: u32,
}

/// One direction of a tracked connection (the admin API's `conntrack`
/// answer is a list of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConntrackEntry {
    /// The worker whose table holds it.
    pub worker: usize,
    /// `tcp`, `udp` or `other`.
    pub proto: String,
    /// Source IP:PORT.
    pub src: String,
    /// Destination IP:PORT.
    pub dst: String,
    /// `forward` or `reply`.
    pub direction: String,
    /// The service (none if the tables no longer have it; `egress` for a
    /// task's connection out of the cluster).
    pub service: Option<String>,
    /// The backend IP:PORT (empty if unknown).
    pub backend: String,
    /// `udp`, `syn_recv`, `established`, `fin_wait`, `close`,
    /// `unconfirmed` or `icmp`.
    pub state: String,
    /// Seconds until it expires.
    pub expires_in_s: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_or_missing_counter_is_an_error_not_a_zero() {
        let ok = serde_json::json!({ "name": "uplink", "rx": 1, "tx": 2, "tx_full": 0, "rx_oversize": 0, "errors": 0, "rx_bad_offload": 0, "tx_segmented": 0, "tx_coalesced": 0, "rx_kernel_dropped": 0 });
        assert!(serde_json::from_value::<PortStats>(ok.clone()).is_ok());
        let renamed = serde_json::json!({ "name": "uplink", "rx_frames": 1, "tx": 2, "tx_full": 0, "rx_oversize": 0, "errors": 0, "rx_bad_offload": 0, "tx_segmented": 0, "tx_coalesced": 0, "rx_kernel_dropped": 0 });
        assert!(serde_json::from_value::<PortStats>(renamed).is_err());
        let missing = serde_json::json!({ "name": "uplink", "rx": 1, "tx": 2, "tx_full": 0, "rx_oversize": 0, "errors": 0, "rx_bad_offload": 0 });
        assert!(serde_json::from_value::<PortStats>(missing).is_err());
    }
}
