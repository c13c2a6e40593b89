//! The names of one node's networks, compiled from the cluster state (by
//! the control plane) and handed to the DNS server with each publication.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// How a service's name answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// With its VIP.
    #[default]
    Vip,
    /// With its serving tasks' addresses (DNS round robin).
    Dnsrr,
}

/// The names a node serves: those of every network in which it has a
/// task (a task only ever asks its own node).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    /// By network.
    pub networks: Vec<NetZone>,
}

/// One network's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetZone {
    /// The network's name (`SERVICE.NETWORK`).
    pub name: String,
    /// Its VXLAN network identifier (the node's DNS port for the network
    /// follows from it).
    pub vni: u32,
    /// Its gateway address (the tasks' resolver; never an upstream).
    pub gateway: Ipv4Addr,
    /// Its subnet (address, prefix): the reverse space it owns.
    pub subnet: (Ipv4Addr, u8),
    /// An internal network (nothing is forwarded from it).
    pub internal: bool,
    /// Its services.
    pub services: Vec<SvcRec>,
    /// Its tasks.
    pub tasks: Vec<TaskRec>,
}

/// A service's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvcRec {
    /// Its name.
    pub name: String,
    /// VIP or DNS round robin.
    pub mode: Mode,
    /// Its VIP, if it has one.
    pub vip: Option<Ipv4Addr>,
    /// Its ports for SRV records (`_PORT._PROTO.SERVICE`).
    #[serde(default)]
    pub ports: Vec<SrvPort>,
}

/// A port of a service, as SRV records name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrvPort {
    /// The port in the name (`_PORT`): the VIP's, or the tasks'.
    pub port: u16,
    /// UDP (`_udp`), else TCP (`_tcp`).
    pub udp: bool,
    /// The port the tasks listen on (the records' port).
    pub target: u16,
}

/// A task's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRec {
    /// Its name (the task id).
    pub name: String,
    /// Its service.
    pub service: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Balanced to now (a live node, weight > 0, not drained): the tasks
    /// `tasks.SERVICE` and a dnsrr name answer with.
    pub serving: bool,
}
