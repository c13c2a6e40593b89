//! The cluster's desired state and the commands that change it.
//!
//! This is the Raft state machine's content (issue 6 puts it behind
//! openraft): [`ClusterState::apply`] is deterministic — the same commands
//! in the same order give the same state on every manager — and a command
//! that fails validation changes nothing and says why.
//!
//! Allocation, as Swarm does it: VNIs from 4096 up, addresses from a
//! network's subnet (lowest free, skipping the network and broadcast
//! addresses and the gateway), published ports chosen or the lowest free in
//! 30000–32767, MACs derived from addresses (02:42 + the IPv4 address).

use crate::pki::ClusterCa;
use core::net::{IpAddr, Ipv4Addr, SocketAddr};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::tables::Subnet;
use meshplane_dataplane::tables::services::{MeshMode, Proto};
use meshplane_dataplane::wire::MacAddr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

/// First VNI allocated to a network (Swarm's range starts at 4096).
pub const FIRST_VNI: u32 = 4096;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The range published ports are auto-assigned from.
pub const PUBLISHED_RANGE: core::ops::RangeInclusive<u16> = 30000..=32767;
/// A network's MTU unless given: a 1500-byte underlay minus VXLAN's 50
/// (less if a node's underlay carries less).
pub const DEFAULT_MTU: u16 = 1450;
/// What VXLAN adds to a network's packets on the underlay (outer IPv4,
/// UDP, VXLAN and the inner Ethernet header): a network's MTU is at most
/// the smallest underlay MTU of the cluster's nodes minus this.
pub const VXLAN_OVERHEAD: u16 = meshplane_dataplane::tables::VXLAN_OVERHEAD;
/// A node's underlay MTU when its state entry predates the field.
pub const DEFAULT_UNDERLAY_MTU: u16 = 1500;
/// The smallest underlay MTU a node may have: a 68-byte network MTU (the
/// IPv4 minimum) inside VXLAN.
pub const MIN_UNDERLAY_MTU: u16 = 68 + VXLAN_OVERHEAD;
/// The data-path (VXLAN) port unless `cluster init --data-path-port` says.
pub const DEFAULT_DATA_PATH_PORT: u16 = meshplane_dataplane::wire::vxlan::DEFAULT_PORT;

fn default_underlay_mtu() -> u16 {
    DEFAULT_UNDERLAY_MTU
}

fn default_data_path_port() -> u16 {
    DEFAULT_DATA_PATH_PORT
}

/// True if `port` may be the cluster's data-path port: Docker's rule for
/// `swarm init --data-path-port`, 1024 to 49151, or 4789 (IANA's VXLAN
/// port); below 1024 are system ports, above 49151 the ephemeral range.
pub fn valid_data_path_port(port: u16) -> bool {
    port == DEFAULT_DATA_PATH_PORT || (1024..=49151).contains(&port)
}

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs Raft and takes writes.
    Manager,
    /// Runs tasks only.
    Worker,
}

/// Whether a node takes tasks (Swarm's availability).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes new tasks.
    Active,
    /// Keeps its tasks, takes no new ones.
    Pause,
    /// Its tasks are drained: weight 0 in every balancer.
    Drain,
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Its name (unique).
    pub id: String,
    /// Management address (Raft, admin API).
    pub mgmt: SocketAddr,
    /// Data-path address (VXLAN, published ports).
    pub data_ip: Ipv4Addr,
    /// MAC of its data-path NIC.
    pub data_mac: MacAddr,
    /// Manager or worker.
    pub role: Role,
    /// Active, paused or drained.
    pub availability: Availability,
    /// The id of its key ([`crate::pki::key_id`]), recorded when it joins:
    /// a certificate for another key (a removed node's, or one issued
    /// before the name was given to a new node) is refused.
    #[serde(default)]
    pub key_id: Option<String>,
    /// The MTU of its data-path NIC (the underlay): read from the NIC
    /// when the node starts, or `--data-path-mtu`; 1500 in a state older
    /// than the field.
    #[serde(default = "default_underlay_mtu")]
    pub underlay_mtu: u16,
}

/// An overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Its name (unique).
    pub name: String,
    /// VXLAN network identifier (allocated).
    pub vni: u32,
    /// Subnet.
    pub subnet: Subnet,
    /// Gateway address (default: the subnet's last host address).
    pub gateway: Ipv4Addr,
    /// MTU of the tasks' interfaces.
    pub mtu: u16,
    /// Each node's own address in the network (allocated when the network
    /// first has a published service): the routing mesh's source in `nat`
    /// mode and the node's identity in `preserve-source` returns.
    pub node_ips: BTreeMap<String, Ipv4Addr>,
    /// Internal (Docker's `--internal`): no way out of the cluster's
    /// networks for its tasks.
    #[serde(default)]
    pub internal: bool,
}

/// A published port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The port on every node's data address.
    pub port: u16,
    /// How the routing mesh forwards it.
    pub mode: MeshMode,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Its name (unique).
    pub name: String,
    /// The network of its tasks.
    pub network: String,
    /// TCP or UDP.
    pub protocol: Proto,
    /// Its VIP in the network (allocated) and port: 0 for every TCP and
    /// UDP port, untranslated (Swarm's VIPs); `None` in dnsrr mode (and
    /// for services created before every vip-mode service had a VIP).
    pub vip: Option<(Ipv4Addr, u16)>,
    /// The port its tasks listen on.
    pub target_port: u16,
    /// Published ports.
    pub published: Vec<Published>,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// How its tasks are reached: through a VIP, or by DNS round robin.
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// Its health check, if it has one: each task's node runs it, and a
    /// task that has not passed it yet or fails it is no backend and no
    /// DNS answer ([`Task::health`]).
    #[serde(default)]
    pub health: Option<HealthCheck>,
}

/// The longest health check interval, timeout or start period: an hour.
pub const MAX_HEALTH_MS: u64 = 3_600_000;
/// The most consecutive failures a health check may wait for.
pub const MAX_HEALTH_RETRIES: u32 = 100;
/// The longest HTTP path a health check may request.
pub const MAX_HEALTH_PATH: usize = 1024;

/// A service's health check (Docker's `HEALTHCHECK` options): the task's
/// node probes the task's target port from inside the task's network
/// namespace every `interval_ms`, each probe given `timeout_ms`; `retries`
/// consecutive failures make the task unhealthy, one success healthy;
/// failures in the first `start_period_ms` after the node starts checking
/// a starting task do not count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What a probe does.
    pub probe: Probe,
    /// Time between the starts of two probes (1 ms to 1 h).
    pub interval_ms: u64,
    /// Time a probe may take (1 ms to 1 h, at most the interval).
    pub timeout_ms: u64,
    /// Consecutive failures that make a task unhealthy (1 to 100).
    pub retries: u32,
    /// Time after the start during which failures do not count (0 to 1 h).
    pub start_period_ms: u64,
}

/// What a health probe does, on the task's own address and target port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A TCP connection is accepted.
    Tcp,
    /// An HTTP/1.1 `GET path` is answered with a 2xx or 3xx status (as
    /// `curl -f` in a Docker `HEALTHCHECK`).
    Http {
        /// The path requested (starts with '/').
        path: String,
    },
}

impl HealthCheck {
    /// Checked: durations within 1 h (interval and timeout above 0, the
    /// timeout at most the interval), retries 1 to 100, an HTTP path
    /// starting with '/' of visible ASCII.
    pub fn validate(&self) -> Result<(), StateError> {
        use StateError as E;
        let in_range = |ms: u64| (1..=MAX_HEALTH_MS).contains(&ms);
        if !in_range(self.interval_ms) {
            return Err(E::HealthInterval(self.interval_ms));
        }
        if !in_range(self.timeout_ms) {
            return Err(E::HealthTimeout(self.timeout_ms));
        }
        if self.timeout_ms > self.interval_ms {
            return Err(E::HealthTimeoutAboveInterval { timeout_ms: self.timeout_ms, interval_ms: self.interval_ms });
        }
        if self.start_period_ms > MAX_HEALTH_MS {
            return Err(E::HealthStartPeriod(self.start_period_ms));
        }
        if !(1..=MAX_HEALTH_RETRIES).contains(&self.retries) {
            return Err(E::HealthRetries(self.retries));
        }
        if let Probe::Http { path } = &self.probe {
            let visible = path.bytes().all(|b| b.is_ascii_graphic());
            if !path.starts_with('/') || !visible || path.len() > MAX_HEALTH_PATH {
                return Err(E::HealthPath(path.clone()));
            }
        }
        Ok(())
    }
}

/// A task's health as its node's checks found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskHealth {
    /// Not checked: its service has no health check (or was given one
    /// after the task started and no probe has answered yet). Serving.
    #[default]
    #[serde(rename = "none")]
    Unchecked,
    /// Its service has a check that has not passed yet. Not serving.
    Starting,
    /// The last probe passed. Serving.
    Healthy,
    /// `retries` probes in a row failed. Not serving.
    Unhealthy,
}

impl TaskHealth {
    /// Whether a task in this health may take new connections and be
    /// answered by DNS (a task that is not checked, or passed its check).
    pub fn serves(self) -> bool {
        matches!(self, TaskHealth::Unchecked | TaskHealth::Healthy)
    }

    /// Its name as the CLI shows it (`-` for a task that is not checked).
    pub fn name(self) -> &'static str {
        match self {
            TaskHealth::Unchecked => "-",
            TaskHealth::Starting => "starting",
            TaskHealth::Healthy => "healthy",
            TaskHealth::Unhealthy => "unhealthy",
        }
    }
}

/// What a `service update` does to the service's health check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthUpdate {
    /// Leaves it as it is.
    #[default]
    Keep,
    /// Sets (or replaces) it. Tasks keep their health until their node's
    /// next probe answers (a task not checked before stays serving until
    /// then, so that adding a check does not empty the balancers).
    Set(HealthCheck),
    /// Removes it: every task of the service is unchecked (serving).
    Remove,
}

/// How a service's tasks are reached (Docker's `--endpoint-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// Through a VIP the balancers spread over its tasks.
    #[default]
    Vip,
    /// DNS round robin: its name answers with its tasks' addresses; no VIP,
    /// no routing mesh.
    Dnsrr,
}

/// A task: a service's endpoint on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Its id (unique; also its port's name on its node).
    pub id: String,
    /// Its service.
    pub service: String,
    /// The node it runs on.
    pub node: String,
    /// Its address (allocated from the service's network).
    pub ip: Ipv4Addr,
    /// Its MAC (derived from the address).
    pub mac: MacAddr,
    /// Balancing weight (0: drained).
    pub weight: u32,
    /// The network namespace of the task's port, if the node makes it.
    #[serde(default)]
    pub netns: Option<String>,
    /// Its health: starting when attached to a service with a health
    /// check, then as its node's checks find it (`SetTaskHealth`);
    /// unchecked for a service without one (and in a state older than
    /// the field).
    #[serde(default)]
    pub health: TaskHealth,
    /// The container the task is (a CNI attachment, or a process attached
    /// by `task attach --pid`): its node detaches the task when the
    /// container's namespace goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
}

/// The container a task is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    /// Its id (`CNI_CONTAINERID`, Docker's id): `[A-Za-z0-9][A-Za-z0-9_.-]*`,
    /// at most 256 bytes.
    pub id: String,
    /// The CNI attachment, if a runtime attached it through CNI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniAttachment>,
    /// The inode of its network namespace when it was attached (a
    /// `/proc/PID` namespace with another inode is another process's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_ino: Option<u64>,
    /// A name to show (the runtime's container name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A CNI attachment: the network (the conflist's name) and the interface
/// in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    /// The conflist's `name`.
    pub network: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl ContainerRef {
    /// The longest container id.
    pub const MAX_ID: usize = 256;

    /// Checks its fields (the id's characters and length, the CNI
    /// network's and interface's, the name's).
    pub fn check(&self) -> Result<(), StateError> {
        let bad = |why: String| Err(StateError::BadContainer(why));
        let id_ok = |v: &str, max: usize| {
            !v.is_empty()
                && v.len() <= max
                && v.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        };
        if !id_ok(&self.id, Self::MAX_ID) {
            return bad(format!(
                "container id {:?}: [A-Za-z0-9][A-Za-z0-9_.-]*, at most {} bytes",
                self.id,
                Self::MAX_ID
            ));
        }
        if let Some(c) = &self.cni {
            if !id_ok(&c.network, 128) {
                return bad(format!("CNI network {:?}: [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 bytes", c.network));
            }
            let ifname_ok = !c.ifname.is_empty()
                && c.ifname.len() <= 15
                && c.ifname != "."
                && c.ifname != ".."
                && c.ifname.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
            if !ifname_ok {
                return bad(format!("interface name {:?}: 1 to 15 bytes, no '/', ':' or whitespace", c.ifname));
            }
        }
        if let Some(n) = &self.name
            && (n.is_empty() || n.len() > 253 || !n.bytes().all(|b| b.is_ascii_graphic()))
        {
            return bad(format!("container name {n:?}: 1 to 253 visible ASCII characters"));
        }
        Ok(())
    }

    /// The same attachment: the same id, and the same CNI network and
    /// interface (or neither a CNI attachment).
    pub fn same_attachment(&self, other: &ContainerRef) -> bool {
        self.id == other.id && self.cni == other.cni
    }
}

/// A request to publish a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The port, or `None` for the lowest free in 30000–32767.
    pub port: Option<u16>,
    /// The mode.
    pub mode: MeshMode,
}

/// A change to the state: a Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A node joins (or comes back with new addresses).
    AddNode(Node),
    /// A node leaves; its tasks go with it.
    RemoveNode {
        /// The node.
        id: String,
    },
    /// A node's role changes (`node promote`, `node demote`): the node
    /// renews its certificate for the new role and starts or stops Raft.
    SetRole {
        /// The node.
        id: String,
        /// The new role.
        role: Role,
    },
    /// A node's availability changes.
    SetAvailability {
        /// The node.
        id: String,
        /// The new availability.
        availability: Availability,
    },
    /// A network is created.
    CreateNetwork {
        /// Its name.
        name: String,
        /// Its subnet.
        subnet: Subnet,
        /// Its gateway (default: the last host address).
        gateway: Option<Ipv4Addr>,
        /// Its MTU (default 1450, or less if a node's underlay carries
        /// less).
        mtu: Option<u16>,
        /// Internal: its tasks have no egress.
        #[serde(default)]
        internal: bool,
    },
    /// A network with no services is removed.
    RemoveNetwork {
        /// Its name.
        name: String,
    },
    /// A service is created.
    CreateService {
        /// Its name.
        name: String,
        /// Its tasks' network.
        network: String,
        /// TCP or UDP.
        protocol: Proto,
        /// A VIP on this port (allocated from the network), if any.
        vip_port: Option<u16>,
        /// The tasks' port.
        target_port: u16,
        /// Ports to publish.
        publish: Vec<PublishRequest>,
        /// Scheduler.
        scheduler: Scheduler,
        /// VIP (default) or DNS round robin.
        #[serde(default)]
        endpoint_mode: EndpointMode,
        /// Its health check, if any.
        #[serde(default)]
        health: Option<HealthCheck>,
    },
    /// A service's scheduler, published ports or health check change (its
    /// VIP, network and tasks stay; connections in flight keep their
    /// backends).
    UpdateService {
        /// Its name.
        name: String,
        /// A new scheduler.
        scheduler: Option<Scheduler>,
        /// Ports to publish.
        publish_add: Vec<PublishRequest>,
        /// Published ports to withdraw.
        publish_rm: Vec<u16>,
        /// The health check set, removed or kept.
        #[serde(default)]
        health: HealthUpdate,
    },
    /// A service and its tasks are removed.
    RemoveService {
        /// Its name.
        name: String,
    },
    /// A task of a service is placed on a node.
    AttachTask {
        /// The task's id.
        id: String,
        /// Its service.
        service: String,
        /// Its node.
        node: String,
        /// Its weight.
        weight: u32,
        /// The network namespace the node puts the task's port in (none:
        /// the port is made for an interface someone else wires up).
        #[serde(default)]
        netns: Option<String>,
        /// The container the task is, if it is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<ContainerRef>,
    },
    /// A task's weight changes (0 drains it).
    SetWeight {
        /// The task.
        id: String,
        /// The new weight.
        weight: u32,
    },
    /// A task is removed.
    DetachTask {
        /// The task.
        id: String,
    },
    /// A task's health as its node's checks found it (the node proposes
    /// transitions only; the same health again changes nothing).
    SetTaskHealth {
        /// The task.
        task: String,
        /// Starting, healthy or unhealthy.
        health: TaskHealth,
    },
    /// The cluster CA (at `cluster init`), or its new join secrets (token
    /// rotation: the caller draws them, so every manager applies the same).
    SetCa(ClusterCa),
    /// The cluster's data-path (VXLAN) UDP port (`cluster init
    /// --data-path-port`): only before any node is in the state.
    SetDataPathPort {
        /// The port.
        port: u16,
    },
    /// A new gossip key (the caller draws it, and the time): it becomes
    /// the current key (members seal with it once they all have it), the
    /// current one becomes the previous one (it still opens until retired)
    /// and any older one is dropped. Refused unless its id is above the
    /// current key's (ids only grow: a key id below the newest one a
    /// member holds is a retired key).
    RotateGossipKey {
        /// The key's id (one more than the current one's).
        id: u32,
        /// The key.
        key: [u8; 32],
        /// When the leader drew it, milliseconds since the Unix epoch (the
        /// rotation schedule counts from it).
        #[serde(default)]
        at_ms: u64,
    },
    /// The previous gossip key is retired (after the grace period that
    /// lets every member have the current one): packets under it are
    /// refused from then on. Refused for the current key; nothing changes
    /// if the key is gone already.
    RetireGossipKey {
        /// The key's id.
        id: u32,
    },
}

impl Command {
    /// For a command only the cluster writes (its CA and join secrets,
    /// the data-path port at init, the gossip keys): its name, as in its
    /// JSON. The admin API's raw `Write` refuses them.
    pub fn internal(&self) -> Option<&'static str> {
        match self {
            Command::SetCa(_) => Some("SetCa"),
            Command::SetDataPathPort { .. } => Some("SetDataPathPort"),
            Command::RotateGossipKey { .. } => Some("RotateGossipKey"),
            Command::RetireGossipKey { .. } => Some("RetireGossipKey"),
            _ => None,
        }
    }
}

/// What a [`StateError`] names: a node, a network, a service or a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A node.
    Node,
    /// A network.
    Network,
    /// A service.
    Service,
    /// A task.
    Task,
}

impl core::fmt::Display for Kind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Kind::Node => "node",
            Kind::Network => "network",
            Kind::Service => "service",
            Kind::Task => "task",
        })
    }
}

/// Why a command was refused (it crosses the wire in Raft's answers and
/// the admin API's, typed).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum StateError {
    /// A name already taken.
    #[error("{kind} {name:?} already exists")]
    Exists {
        /// Node, network, service or task.
        kind: Kind,
        /// The name.
        name: String,
    },
    /// A name that does not exist.
    #[error("no {kind} {name:?}")]
    Unknown {
        /// Node, network, service or task.
        kind: Kind,
        /// The name.
        name: String,
    },
    /// Two networks' subnets overlap.
    #[error("subnet {subnet} overlaps network {other:?} ({other_subnet})")]
    SubnetOverlap {
        /// The requested subnet.
        subnet: Subnet,
        /// The network it overlaps.
        other: String,
        /// That network's subnet.
        other_subnet: Subnet,
    },
    /// A subnet too small to hold a gateway and a task.
    #[error("subnet {0} is too small (at most /29)")]
    SubnetTooSmall(Subnet),
    /// The gateway is not a host address of the subnet.
    #[error("gateway {gateway} is not a host address of {subnet}")]
    BadGateway {
        /// The gateway.
        gateway: Ipv4Addr,
        /// The subnet.
        subnet: Subnet,
    },
    /// An MTU below IPv4's minimum.
    #[error("mtu {0} is below 68 (the IPv4 minimum)")]
    BadMtu(u16),
    /// A network MTU larger than a node's underlay carries inside VXLAN.
    #[error(
        "mtu {mtu} is too large: node {node:?}'s underlay MTU is {underlay_mtu}, so a network's MTU is at most {} (VXLAN takes {VXLAN_OVERHEAD})",
        .underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
    )]
    MtuAboveUnderlay {
        /// The requested MTU.
        mtu: u16,
        /// The node with the smallest underlay MTU.
        node: String,
        /// Its underlay MTU.
        underlay_mtu: u16,
    },
    /// A node whose underlay cannot carry a network's packets.
    #[error(
        "node {node:?}'s underlay MTU {underlay_mtu} is too small for network {network:?} (mtu {mtu} needs an underlay of {} with VXLAN): raise the node's MTU (--data-path-mtu, the NIC's) or remove the network",
        u32::from(*.mtu) + u32::from(VXLAN_OVERHEAD)
    )]
    UnderlayTooSmall {
        /// The node.
        node: String,
        /// Its underlay MTU.
        underlay_mtu: u16,
        /// The network.
        network: String,
        /// The network's MTU.
        mtu: u16,
    },
    /// A node's underlay MTU below what VXLAN needs.
    #[error("node {node:?}'s underlay MTU {mtu} is below {MIN_UNDERLAY_MTU} (68 inside VXLAN's {VXLAN_OVERHEAD})")]
    BadUnderlayMtu {
        /// The node.
        node: String,
        /// Its underlay MTU.
        mtu: u16,
    },
    /// A data-path port outside Docker's rule.
    #[error("data-path port {0} is not allowed: 1024 to 49151, or 4789")]
    BadDataPathPort(u16),
    /// The data-path port changed once nodes are in the cluster.
    #[error("the data-path port is chosen at cluster init, before any node joins")]
    DataPathPortFixed,
    /// Every address of a subnet is in use.
    #[error("network {0:?} has no free address left")]
    SubnetExhausted(String),
    /// Every VNI is in use.
    #[error("no VNI left")]
    VnisExhausted,
    /// A published port someone else has.
    #[error("port {port}/{} is already published by service {by:?}", proto_name(.protocol))]
    PortTaken {
        /// The port.
        port: u16,
        /// The protocol.
        protocol: Proto,
        /// The service that has it.
        by: String,
    },
    /// No free port left in 30000–32767.
    #[error("no free port left in 30000-32767")]
    PortsExhausted,
    /// A port of 0.
    #[error("port 0 is not a port")]
    PortZero,
    /// A service with neither a VIP nor a published port.
    #[error("service {0:?} needs a vip port or a published port")]
    Unreachable(String),
    /// A `dnsrr` service given a VIP port.
    #[error(
        "service {0:?}: --vip-port needs --endpoint-mode vip (dnsrr answers DNS with the tasks' addresses and has no VIP)"
    )]
    DnsrrVip(String),
    /// A `dnsrr` service published through the routing mesh.
    #[error(
        "service {0:?}: endpoint mode dnsrr cannot be published through the routing mesh: it has no VIP (as in Swarm); use --endpoint-mode vip, or --publish mode=host,PUB:TARGET"
    )]
    DnsrrPublished(String),
    /// A network still used by services.
    #[error("network {network:?} is used by service {service:?}")]
    NetworkInUse {
        /// The network.
        network: String,
        /// A service on it.
        service: String,
    },
    /// A subnet in an address range a network cannot use.
    #[error("subnet {subnet} overlaps {range} ({what}): a network cannot use it")]
    SubnetReserved {
        /// The requested subnet.
        subnet: Subnet,
        /// The range it overlaps.
        range: Subnet,
        /// What the range is for.
        what: String,
    },
    /// A network's subnet and a node's data address, one inside the other.
    #[error(
        "subnet {subnet} holds node {node:?}'s data address {ip}: a node's underlay cannot be inside an overlay network"
    )]
    SubnetHoldsNode {
        /// The network's subnet.
        subnet: Subnet,
        /// The node.
        node: String,
        /// Its data address.
        ip: Ipv4Addr,
    },
    /// Two nodes with the same management address (gossip tells nodes
    /// apart by it).
    #[error("management address {ip} is node {other:?}'s")]
    MgmtAddressTaken {
        /// The address.
        ip: IpAddr,
        /// The node that has it.
        other: String,
    },
    /// A task id a node keeps for its own ports.
    #[error("task name {0:?} is reserved (\"uplink\" and \"mp-host\" are a node's own ports)")]
    ReservedTaskName(String),
    /// A data-path port in the range published ports are chosen from.
    #[error("data-path port {0} is in the range published ports are chosen from (30000-32767)")]
    DataPathPortPublished(u16),
    /// A published port the cluster itself uses.
    #[error("port {port} is the cluster's {what} port: it cannot be published")]
    PortReserved {
        /// The port.
        port: u16,
        /// Management, gossip or data path.
        what: String,
    },
    /// Two nodes with the same data address.
    #[error("data address {ip} is node {other:?}'s")]
    DataAddressTaken {
        /// The address.
        ip: Ipv4Addr,
        /// The node that has it.
        other: String,
    },
    /// A port to withdraw that the service does not publish.
    #[error("service {service:?} does not publish port {port}")]
    NotPublished {
        /// The service.
        service: String,
        /// The port.
        port: u16,
    },
    /// `SetCa` with another CA than the cluster's.
    #[error("the cluster already has another CA")]
    CaChanged,
    /// A gossip key whose id is not above the current key's.
    #[error("gossip key {id} is not newer than the current key {current}")]
    StaleGossipKey {
        /// The new key's id.
        id: u32,
        /// The current key's id.
        current: u32,
    },
    /// Retiring the gossip key that seals.
    #[error("gossip key {0} is the current key: rotate first")]
    RetiringCurrentGossipKey(u32),
    /// A name that cannot be a port or map key.
    #[error("{kind} name {name:?}: 1 to {max} characters, letters, digits, '-', '_' and '.'")]
    BadName {
        /// Node, network, service or task.
        kind: Kind,
        /// The name.
        name: String,
        /// The longest allowed for its kind.
        max: usize,
    },
    /// A health check interval out of range.
    #[error("health check interval {0} ms: more than 0 and at most 1h")]
    HealthInterval(u64),
    /// A health check timeout out of range.
    #[error("health check timeout {0} ms: more than 0 and at most 1h")]
    HealthTimeout(u64),
    /// A health check timeout longer than its interval.
    #[error("health check timeout {timeout_ms} ms is longer than its interval {interval_ms} ms")]
    HealthTimeoutAboveInterval {
        /// The timeout.
        timeout_ms: u64,
        /// The interval.
        interval_ms: u64,
    },
    /// A health check start period out of range.
    #[error("health check start period {0} ms: at most 1h")]
    HealthStartPeriod(u64),
    /// A health check's retries out of range.
    #[error("health check retries {0}: 1 to 100")]
    HealthRetries(u32),
    /// An HTTP health check path that is not a path.
    #[error("health check path {0:?}: starts with '/', visible ASCII only (no spaces), at most 1024 bytes")]
    HealthPath(String),
    /// A task's health set while its service has no health check.
    #[error("task {task:?}: service {service:?} has no health check")]
    NoHealthCheck {
        /// The task.
        task: String,
        /// Its service.
        service: String,
    },
    /// A task's health set to "none" (that is for services without a check).
    #[error("task {0:?}: a checked task is starting, healthy or unhealthy, not none")]
    HealthUnchecked(String),
    /// A task's network namespace that is neither a namespace name nor a
    /// process's namespace.
    #[error(
        "task namespace {0:?}: a name of 1 to 64 letters, digits, '_', '.' and '-' (not starting with '-' or '.'), /var/run/netns/NAME, /run/netns/NAME, /proc/PID/ns/net or an absolute path to a namespace file (a runtime's bind mount)"
    )]
    BadNetns(String),
    /// A task's container reference that is not valid.
    #[error("{0}")]
    BadContainer(String),
    /// A container (attachment) that already is a task on the node.
    #[error("container {container} is already task {task} on node {node}")]
    ContainerAttached {
        /// The task it is.
        task: String,
        /// The container (and its CNI attachment).
        container: String,
        /// The node.
        node: String,
    },
    /// A container attached without a namespace.
    #[error("task {0:?}: a container's task needs its network namespace")]
    ContainerWithoutNetns(String),
}

/// A task's network namespace, validated ([`TaskNetns::parse`]): what a
/// node may move a task's port into and configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskNetns {
    /// A named namespace (`ip netns`): `/var/run/netns/NAME`.
    Named(String),
    /// The namespace of process `PID`: `/proc/PID/ns/net`.
    Process(u32),
    /// Any other namespace file (a runtime's bind mount, such as
    /// podman's `/run/netns/netns-UUID` under another directory): an
    /// absolute path the node checks is a network namespace.
    File(String),
}

impl TaskNetns {
    /// Longest namespace name.
    pub const MAX_NAME: usize = 64;

    /// The longest namespace file path.
    pub const MAX_PATH: usize = 1024;

    /// Parses a task's `--netns`: a name (`[A-Za-z0-9_.-]{1,64}`, not
    /// starting with '-' or '.'), `/var/run/netns/NAME` or
    /// `/run/netns/NAME` (the name), `/proc/PID/ns/net`, or another
    /// absolute path of visible ASCII (no empty, `.` or `..` component, at
    /// most 1024 bytes, not under `/proc/`: `/proc/self` would be the
    /// node's); anything else is refused (it would reach `ip` as an
    /// option, or another namespace than meant).
    pub fn parse(s: &str) -> Result<TaskNetns, StateError> {
        let bad = || StateError::BadNetns(s.to_owned());
        let named = |n: &str| {
            let ok = !n.is_empty()
                && n.len() <= Self::MAX_NAME
                && !n.starts_with(['-', '.'])
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if ok { Ok(TaskNetns::Named(n.to_owned())) } else { Err(bad()) }
        };
        if !s.starts_with('/') {
            return named(s);
        }
        if let Some(n) = s.strip_prefix("/var/run/netns/").or_else(|| s.strip_prefix("/run/netns/"))
            && !n.contains('/')
        {
            return named(n);
        }
        let Some(pid) = s.strip_prefix("/proc/").map(|r| r.strip_suffix("/ns/net")) else {
            let ok = s.len() <= Self::MAX_PATH
                && s.bytes().all(|b| b.is_ascii_graphic())
                && s.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..");
            return if ok { Ok(TaskNetns::File(s.to_owned())) } else { Err(bad()) };
        };
        let pid = pid.ok_or_else(bad)?;
        // Digits only (no sign, no spaces), a pid that can exist (> 0).
        if pid.is_empty() || pid.len() > 10 || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match pid.parse::<u32>() {
            Ok(p) if p > 0 => Ok(TaskNetns::Process(p)),
            _ => Err(bad()),
        }
    }

    /// The namespace's file: `/var/run/netns/NAME`, `/proc/PID/ns/net` or
    /// the path given.
    pub fn path(&self) -> String {
        match self {
            TaskNetns::Named(n) => format!("/var/run/netns/{n}"),
            TaskNetns::Process(p) => format!("/proc/{p}/ns/net"),
            TaskNetns::File(f) => f.clone(),
        }
    }
}

impl core::fmt::Display for TaskNetns {
    /// The normalised form the state keeps: the name, `/proc/PID/ns/net`
    /// or the path.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TaskNetns::Named(n) => f.write_str(n),
            TaskNetns::Process(p) => write!(f, "/proc/{p}/ns/net"),
            TaskNetns::File(p) => f.write_str(p),
        }
    }
}

/// The cluster's desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Nodes by id.
    pub nodes: BTreeMap<String, Node>,
    /// Networks by name.
    pub networks: BTreeMap<String, Network>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Tasks by id.
    pub tasks: BTreeMap<String, Task>,
    /// The cluster CA (key and join secrets): on managers only; what
    /// workers and the admin API get has it removed
    /// ([`ClusterState::redacted`]).
    #[serde(default)]
    pub ca: Option<ClusterCa>,
    /// The gossip keys: the current one first, then the previous one
    /// until it is retired.
    #[serde(default)]
    pub gossip_keys: Vec<GossipKey>,
    /// The data-path (VXLAN) UDP port every node uses (`cluster init
    /// --data-path-port`); 4789 in a state older than the field.
    #[serde(default = "default_data_path_port")]
    pub data_path_port: u16,
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            nodes: BTreeMap::new(),
            networks: BTreeMap::new(),
            services: BTreeMap::new(),
            tasks: BTreeMap::new(),
            ca: None,
            gossip_keys: Vec::new(),
            data_path_port: DEFAULT_DATA_PATH_PORT,
        }
    }
}

/// A gossip key of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKey {
    /// Its id (ids only grow).
    pub id: u32,
    /// The key (XChaCha20-Poly1305's 256 bits).
    pub key: [u8; 32],
    /// When it was drawn (the `RotateGossipKey`'s time), milliseconds since
    /// the Unix epoch; 0 for a key of a state older than the field.
    #[serde(default)]
    pub added_ms: u64,
}

/// The MAC derived from an address: 02:42 and the four octets (as Docker
/// does).
pub fn mac_for(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

/// The longest task id: a service's name (at most 15 characters), a dot
/// and five digits, so that every `SERVICE.N` a node gives a container
/// fits. A task id names no interface (a task's port is named by a hash
/// of it, `mpt` and 8 hex digits), so it need not fit in 15 bytes.
pub const MAX_TASK_ID: usize = 21;

fn check_name(kind: Kind, name: &str) -> Result<(), StateError> {
    let max = if kind == Kind::Task { MAX_TASK_ID } else { crate::pki::MAX_NAME };
    if crate::pki::valid_name_up_to(name, max) {
        Ok(())
    } else {
        Err(StateError::BadName { kind, name: name.to_owned(), max })
    }
}

/// The ports of a `CreateService`.
struct ServicePorts<'a> {
    vip_port: Option<u16>,
    target_port: u16,
    publish: &'a [PublishRequest],
}

/// How a `CreateService`'s tasks are reached and checked.
struct ServiceHow<'a> {
    scheduler: Scheduler,
    endpoint_mode: EndpointMode,
    health: Option<&'a HealthCheck>,
}

fn unknown(kind: Kind, name: &str) -> StateError {
    StateError::Unknown { kind, name: name.to_owned() }
}

fn proto_name(p: &Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// The host addresses of a subnet: network and broadcast addresses excluded.
fn hosts(s: Subnet) -> core::ops::RangeInclusive<u32> {
    let base = u32::from(s.addr);
    let size = 1u64 << (32 - u32::from(s.prefix));
    base + 1..=(u64::from(base) + size - 2) as u32
}

/// Address ranges no network may overlap: they are not unicast host
/// addresses, or (link-local) a node's own links use them (the host
/// link's default 169.254.77.0/30).
const RESERVED_RANGES: [(Subnet, &str); 4] = [
    (Subnet { addr: Ipv4Addr::new(0, 0, 0, 0), prefix: 8 }, "\"this network\""),
    (Subnet { addr: Ipv4Addr::new(127, 0, 0, 0), prefix: 8 }, "loopback"),
    (Subnet { addr: Ipv4Addr::new(169, 254, 0, 0), prefix: 16 }, "link-local, the nodes' host links"),
    (Subnet { addr: Ipv4Addr::new(224, 0, 0, 0), prefix: 3 }, "multicast and reserved"),
];

fn overlaps(a: Subnet, b: Subnet) -> bool {
    a.contains(b.addr) || b.contains(a.addr)
}

impl ClusterState {
    /// An empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a command: the state changes, or nothing changes and the
    /// error says why.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), StateError> {
        let mut next = self.clone();
        next.apply_in_place(cmd)?;
        *self = next;
        Ok(())
    }

    /// The state without secrets (the CA's key and join secrets): what
    /// workers and the admin API are given.
    pub fn redacted(&self) -> ClusterState {
        ClusterState { ca: None, ..self.clone() }
    }

    fn apply_in_place(&mut self, cmd: &Command) -> Result<(), StateError> {
        match cmd {
            Command::AddNode(n) => self.add_node(n),
            Command::RemoveNode { id } => self.remove_node(id),
            Command::SetRole { id, role } => {
                let n = self.nodes.get_mut(id).ok_or_else(|| unknown(Kind::Node, id))?;
                n.role = *role;
                Ok(())
            }
            Command::SetAvailability { id, availability } => {
                let n = self.nodes.get_mut(id).ok_or_else(|| unknown(Kind::Node, id))?;
                n.availability = *availability;
                Ok(())
            }
            Command::CreateNetwork { name, subnet, gateway, mtu, internal } => {
                self.create_network(name, *subnet, *gateway, *mtu, *internal)
            }
            Command::RemoveNetwork { name } => self.remove_network(name),
            Command::CreateService {
                name,
                network,
                protocol,
                vip_port,
                target_port,
                publish,
                scheduler,
                endpoint_mode,
                health,
            } => {
                let ports = ServicePorts { vip_port: *vip_port, target_port: *target_port, publish };
                let how = ServiceHow { scheduler: *scheduler, endpoint_mode: *endpoint_mode, health: health.as_ref() };
                self.create_service(name, network, *protocol, ports, how)
            }
            Command::UpdateService { name, scheduler, publish_add, publish_rm, health } => {
                self.update_service(name, *scheduler, publish_add, publish_rm, health)
            }
            Command::RemoveService { name } => {
                self.services.remove(name).ok_or_else(|| unknown(Kind::Service, name))?;
                self.tasks.retain(|_, t| t.service != *name);
                Ok(())
            }
            Command::AttachTask { id, service, node, weight, netns, container } => {
                self.attach_task(id, service, node, *weight, netns.clone(), container.clone())
            }
            Command::SetWeight { id, weight } => {
                let t = self.tasks.get_mut(id).ok_or_else(|| unknown(Kind::Task, id))?;
                t.weight = *weight;
                Ok(())
            }
            Command::DetachTask { id } => {
                self.tasks.remove(id).ok_or_else(|| unknown(Kind::Task, id))?;
                Ok(())
            }
            Command::SetTaskHealth { task, health } => self.set_task_health(task, *health),
            Command::SetCa(ca) => self.set_ca(ca),
            Command::SetDataPathPort { port } => {
                if !valid_data_path_port(*port) {
                    return Err(StateError::BadDataPathPort(*port));
                }
                if !self.nodes.is_empty() && *port != self.data_path_port {
                    return Err(StateError::DataPathPortFixed);
                }
                self.data_path_port = *port;
                Ok(())
            }
            Command::RotateGossipKey { id, key, at_ms } => {
                if let Some(current) = self.gossip_keys.first()
                    && *id <= current.id
                {
                    return Err(StateError::StaleGossipKey { id: *id, current: current.id });
                }
                // The current key first; one previous key kept.
                self.gossip_keys.insert(0, GossipKey { id: *id, key: *key, added_ms: *at_ms });
                self.gossip_keys.truncate(2);
                Ok(())
            }
            Command::RetireGossipKey { id } => {
                if self.gossip_keys.first().is_some_and(|k| k.id == *id) {
                    return Err(StateError::RetiringCurrentGossipKey(*id));
                }
                self.gossip_keys.retain(|k| k.id != *id);
                Ok(())
            }
        }
    }

    /// `AddNode`: a node joins, or comes back with new addresses.
    fn add_node(&mut self, n: &Node) -> Result<(), StateError> {
        check_name(Kind::Node, &n.id)?;
        // A name is one node's: another key under it is another node.
        if let Some(old) = self.nodes.get(&n.id)
            && old.key_id.is_some()
            && old.key_id != n.key_id
        {
            return Err(StateError::Exists { kind: Kind::Node, name: n.id.clone() });
        }
        if let Some(other) = self.nodes.values().find(|o| o.data_ip == n.data_ip && o.id != n.id) {
            return Err(StateError::DataAddressTaken { ip: n.data_ip, other: other.id.clone() });
        }
        // Refused rather than joined with a blackhole: every network's
        // packets must fit this node's underlay inside VXLAN.
        if n.underlay_mtu < MIN_UNDERLAY_MTU {
            return Err(StateError::BadUnderlayMtu { node: n.id.clone(), mtu: n.underlay_mtu });
        }
        if let Some(nw) = self.networks.values().find(|nw| nw.mtu > n.underlay_mtu - VXLAN_OVERHEAD) {
            return Err(StateError::UnderlayTooSmall {
                node: n.id.clone(),
                underlay_mtu: n.underlay_mtu,
                network: nw.name.clone(),
                mtu: nw.mtu,
            });
        }
        self.nodes.insert(n.id.clone(), n.clone());
        self.allocate_node_ips()
    }

    /// `RemoveNode`: the node, its tasks and its network addresses go.
    fn remove_node(&mut self, id: &str) -> Result<(), StateError> {
        self.nodes.remove(id).ok_or_else(|| unknown(Kind::Node, id))?;
        self.tasks.retain(|_, t| t.node != *id);
        for nw in self.networks.values_mut() {
            nw.node_ips.remove(id);
        }
        Ok(())
    }

    /// The node with the smallest underlay MTU (the first by name among
    /// equals), if any: what bounds every network's MTU.
    pub fn smallest_underlay(&self) -> Option<&Node> {
        self.nodes.values().min_by_key(|n| n.underlay_mtu)
    }

    /// The largest network MTU every node carries: the smallest underlay
    /// MTU minus VXLAN's overhead (`None` without nodes; a node that joins
    /// later is checked against the networks then).
    pub fn max_network_mtu(&self) -> Option<u16> {
        self.smallest_underlay().map(|n| n.underlay_mtu.saturating_sub(VXLAN_OVERHEAD))
    }

    /// `CreateNetwork`: checked (name, subnet size and overlap, gateway,
    /// MTU against every node's underlay), with the lowest free VNI.
    fn create_network(
        &mut self,
        name: &str,
        subnet: Subnet,
        gateway: Option<Ipv4Addr>,
        mtu: Option<u16>,
        internal: bool,
    ) -> Result<(), StateError> {
        use StateError as E;
        check_name(Kind::Network, name)?;
        if self.networks.contains_key(name) {
            return Err(E::Exists { kind: Kind::Network, name: name.to_owned() });
        }
        if subnet.prefix > 29 {
            return Err(E::SubnetTooSmall(subnet));
        }
        if let Some(o) = self.networks.values().find(|o| overlaps(o.subnet, subnet)) {
            return Err(E::SubnetOverlap { subnet, other: o.name.clone(), other_subnet: o.subnet });
        }
        let h = hosts(subnet);
        let gw = gateway.unwrap_or(Ipv4Addr::from(*h.end()));
        if !h.contains(&u32::from(gw)) {
            return Err(E::BadGateway { gateway: gw, subnet });
        }
        let max = self.max_network_mtu();
        let mtu = mtu.unwrap_or_else(|| max.map_or(DEFAULT_MTU, |m| m.min(DEFAULT_MTU)));
        if mtu < 68 {
            return Err(E::BadMtu(mtu));
        }
        if max.is_some_and(|m| mtu > m)
            && let Some(n) = self.smallest_underlay()
        {
            return Err(E::MtuAboveUnderlay { mtu, node: n.id.clone(), underlay_mtu: n.underlay_mtu });
        }
        let vni =
            (FIRST_VNI..=MAX_VNI).find(|v| self.networks.values().all(|o| o.vni != *v)).ok_or(E::VnisExhausted)?;
        let nw = Network { name: name.to_owned(), vni, subnet, gateway: gw, mtu, node_ips: BTreeMap::new(), internal };
        self.networks.insert(name.to_owned(), nw);
        Ok(())
    }

    /// `RemoveNetwork`: only a network no service uses.
    fn remove_network(&mut self, name: &str) -> Result<(), StateError> {
        if let Some(s) = self.services.values().find(|s| s.network == *name) {
            return Err(StateError::NetworkInUse { network: name.to_owned(), service: s.name.clone() });
        }
        self.networks.remove(name).ok_or_else(|| unknown(Kind::Network, name))?;
        Ok(())
    }

    /// `CreateService`: checked (name, network, ports, reachable), its
    /// published ports and VIP allocated.
    fn create_service(
        &mut self,
        name: &str,
        network: &str,
        protocol: Proto,
        ports: ServicePorts<'_>,
        how: ServiceHow<'_>,
    ) -> Result<(), StateError> {
        use StateError as E;
        let ServiceHow { scheduler, endpoint_mode, health } = how;
        check_name(Kind::Service, name)?;
        if self.services.contains_key(name) {
            return Err(E::Exists { kind: Kind::Service, name: name.to_owned() });
        }
        if !self.networks.contains_key(network) {
            return Err(unknown(Kind::Network, network));
        }
        let ServicePorts { vip_port, target_port, publish } = ports;
        if target_port == 0 || vip_port == Some(0) || publish.iter().any(|p| p.port == Some(0)) {
            return Err(E::PortZero);
        }
        match endpoint_mode {
            EndpointMode::Dnsrr if vip_port.is_some() => return Err(E::DnsrrVip(name.to_owned())),
            // Host-mode ports need no VIP: allowed with dnsrr, as in Swarm.
            EndpointMode::Dnsrr if publish.iter().any(|p| p.mode != MeshMode::Host) => {
                return Err(E::DnsrrPublished(name.to_owned()));
            }
            _ => {}
        }
        if let Some(h) = health {
            h.validate()?;
        }
        let mut published = Vec::new();
        for req in publish {
            published.push(self.allocate_published(name, protocol, req, &published)?);
        }
        // Every vip-mode service has a VIP, as in Swarm: on `--vip-port`
        // only (translated to the target port), else on every TCP and UDP
        // port, untranslated (port 0).
        let vip = match endpoint_mode {
            EndpointMode::Vip => Some((self.allocate_ip(network)?, vip_port.unwrap_or(0))),
            EndpointMode::Dnsrr => None,
        };
        let svc = Service {
            name: name.to_owned(),
            network: network.to_owned(),
            protocol,
            vip,
            target_port,
            published,
            scheduler,
            endpoint_mode,
            health: health.cloned(),
        };
        self.services.insert(name.to_owned(), svc);
        self.allocate_node_ips()
    }

    /// `UpdateService`: ports withdrawn, then ports published, then the
    /// scheduler and the health check; the service must stay reachable.
    fn update_service(
        &mut self,
        name: &str,
        scheduler: Option<Scheduler>,
        publish_add: &[PublishRequest],
        publish_rm: &[u16],
        health: &HealthUpdate,
    ) -> Result<(), StateError> {
        use StateError as E;
        // Out of the map while it changes: its own old ports do not count
        // as taken by another service.
        let svc0 = self.services.get(name).ok_or_else(|| unknown(Kind::Service, name))?;
        if svc0.endpoint_mode == EndpointMode::Dnsrr && publish_add.iter().any(|p| p.mode != MeshMode::Host) {
            return Err(E::DnsrrPublished(name.to_owned()));
        }
        let mut svc = self.services.remove(name).ok_or_else(|| unknown(Kind::Service, name))?;
        for p in publish_rm {
            if !svc.published.iter().any(|x| x.port == *p) {
                return Err(E::NotPublished { service: name.to_owned(), port: *p });
            }
        }
        svc.published.retain(|x| !publish_rm.contains(&x.port));
        if publish_add.iter().any(|p| p.port == Some(0)) {
            return Err(E::PortZero);
        }
        for req in publish_add {
            let p = self.allocate_published(name, svc.protocol, req, &svc.published)?;
            svc.published.push(p);
        }
        if svc.endpoint_mode == EndpointMode::Vip && svc.vip.is_none() && svc.published.is_empty() {
            return Err(E::Unreachable(name.to_owned()));
        }
        if let Some(s) = scheduler {
            svc.scheduler = s;
        }
        match health {
            HealthUpdate::Keep => {}
            HealthUpdate::Set(h) => {
                h.validate()?;
                svc.health = Some(h.clone());
            }
            HealthUpdate::Remove => {
                svc.health = None;
                for t in self.tasks.values_mut().filter(|t| t.service == name) {
                    t.health = TaskHealth::Unchecked;
                }
            }
        }
        self.services.insert(name.to_owned(), svc);
        self.allocate_node_ips()
    }

    /// `SetTaskHealth`: a checked task's health (the same again is no
    /// change).
    fn set_task_health(&mut self, task: &str, health: TaskHealth) -> Result<(), StateError> {
        let t = self.tasks.get_mut(task).ok_or_else(|| unknown(Kind::Task, task))?;
        if self.services.get(&t.service).is_none_or(|s| s.health.is_none()) {
            return Err(StateError::NoHealthCheck { task: task.to_owned(), service: t.service.clone() });
        }
        if health == TaskHealth::Unchecked {
            return Err(StateError::HealthUnchecked(task.to_owned()));
        }
        t.health = health;
        Ok(())
    }

    /// `AttachTask`: checked (name, service, node), its address allocated
    /// in the service's network and its MAC derived from it.
    fn attach_task(
        &mut self,
        id: &str,
        service: &str,
        node: &str,
        weight: u32,
        netns: Option<String>,
        container: Option<ContainerRef>,
    ) -> Result<(), StateError> {
        check_name(Kind::Task, id)?;
        let netns = netns.map(|n| TaskNetns::parse(&n).map(|t| t.to_string())).transpose()?;
        if self.tasks.contains_key(id) {
            return Err(StateError::Exists { kind: Kind::Task, name: id.to_owned() });
        }
        if let Some(c) = &container {
            c.check()?;
            if netns.is_none() {
                return Err(StateError::ContainerWithoutNetns(id.to_owned()));
            }
            if let Some(t) = self.container_task(node, c) {
                let what = match &c.cni {
                    Some(a) => format!("{}/{} (CNI network {})", c.id, a.ifname, a.network),
                    None => c.id.clone(),
                };
                return Err(StateError::ContainerAttached {
                    task: t.id.clone(),
                    container: what,
                    node: node.to_owned(),
                });
            }
        }
        let s = self.services.get(service).ok_or_else(|| unknown(Kind::Service, service))?;
        if !self.nodes.contains_key(node) {
            return Err(unknown(Kind::Node, node));
        }
        let network = s.network.to_owned();
        let health = if s.health.is_some() { TaskHealth::Starting } else { TaskHealth::Unchecked };
        let ip = self.allocate_ip(&network)?;
        let task = Task {
            id: id.to_owned(),
            service: service.to_owned(),
            node: node.to_owned(),
            ip,
            mac: mac_for(ip),
            weight,
            netns,
            health,
            container,
        };
        self.tasks.insert(id.to_owned(), task);
        Ok(())
    }

    /// The task on `node` that is container attachment `c` (the same id
    /// and CNI attachment), if there is one.
    pub fn container_task(&self, node: &str, c: &ContainerRef) -> Option<&Task> {
        self.tasks.values().find(|t| t.node == node && t.container.as_ref().is_some_and(|x| x.same_attachment(c)))
    }

    /// `SetCa`: the cluster's CA, or its new join secrets (never another CA).
    fn set_ca(&mut self, ca: &ClusterCa) -> Result<(), StateError> {
        if let Some(old) = &self.ca
            && old.fingerprint() != ca.fingerprint()
        {
            return Err(StateError::CaChanged);
        }
        self.ca = Some(ca.clone());
        Ok(())
    }

    /// A published port for service `name` (`req.port`, or the lowest free
    /// in 30000–32767), not taken by another service of the same protocol
    /// nor in `mine` (the ports the service publishes already).
    fn allocate_published(
        &self,
        name: &str,
        protocol: Proto,
        req: &PublishRequest,
        mine: &[Published],
    ) -> Result<Published, StateError> {
        let taken = |p: u16| {
            self.services
                .values()
                .find(|s| s.name != name && s.protocol == protocol && s.published.iter().any(|x| x.port == p))
                .map(|s| s.name.clone())
                .or_else(|| mine.iter().any(|x| x.port == p).then(|| name.to_owned()))
        };
        let port = match req.port {
            Some(p) => {
                if let Some(by) = taken(p) {
                    return Err(StateError::PortTaken { port: p, protocol, by });
                }
                p
            }
            None => PUBLISHED_RANGE.clone().find(|&p| taken(p).is_none()).ok_or(StateError::PortsExhausted)?,
        };
        Ok(Published { port, mode: req.mode })
    }

    /// What the cluster itself uses port `p` of `protocol` for on the
    /// nodes' addresses (a published port there would take its traffic),
    /// if anything: management (TCP), gossip (its default port, both),
    /// data path (UDP).
    fn cluster_port(&self, p: u16, protocol: Proto) -> Option<&'static str> {
        let tcp = protocol == Proto::Tcp;
        if !tcp && p == self.data_path_port {
            Some("data-path (VXLAN)")
        } else if p == crate::GOSSIP_PORT {
            Some("gossip")
        } else if tcp && (p == crate::MANAGEMENT_PORT || self.nodes.values().any(|n| n.mgmt.port() == p)) {
            Some("management")
        } else {
            None
        }
    }

    /// Checks made when a command is proposed (`Control::write`), not when
    /// it is applied: a log written before them replays as it did, so
    /// every node's state stays the same, while a new command that would
    /// cut a node off (not merely fail) is refused. The state is not
    /// changed.
    pub fn admit(&self, cmd: &Command) -> Result<(), StateError> {
        use StateError as E;
        let reserved_port = |port: u16, protocol: Proto| match self.cluster_port(port, protocol) {
            Some(what) => Err(E::PortReserved { port, what: what.to_owned() }),
            None => Ok(()),
        };
        match cmd {
            Command::AddNode(n) => {
                if let Some(other) = self.nodes.values().find(|o| o.mgmt.ip() == n.mgmt.ip() && o.id != n.id) {
                    return Err(E::MgmtAddressTaken { ip: n.mgmt.ip(), other: other.id.clone() });
                }
                if let Some(nw) = self.networks.values().find(|nw| nw.subnet.contains(n.data_ip)) {
                    return Err(E::SubnetHoldsNode { subnet: nw.subnet, node: n.id.clone(), ip: n.data_ip });
                }
            }
            Command::CreateNetwork { subnet, .. } => {
                if let Some(&(range, what)) = RESERVED_RANGES.iter().find(|(r, _)| overlaps(*r, *subnet)) {
                    return Err(E::SubnetReserved { subnet: *subnet, range, what: what.to_owned() });
                }
                if let Some(n) = self.nodes.values().find(|n| subnet.contains(n.data_ip)) {
                    return Err(E::SubnetHoldsNode { subnet: *subnet, node: n.id.clone(), ip: n.data_ip });
                }
            }
            Command::AttachTask { id, .. }
                if id == "uplink" || id == meshplane_dataplane::tables::egress::DEFAULT_HOST_PORT =>
            {
                return Err(E::ReservedTaskName(id.clone()));
            }
            Command::CreateService { protocol, publish, .. } => {
                for port in publish.iter().filter_map(|r| r.port) {
                    reserved_port(port, *protocol)?;
                }
            }
            Command::UpdateService { name, publish_add, .. } => {
                if let Some(s) = self.services.get(name) {
                    for port in publish_add.iter().filter_map(|r| r.port) {
                        reserved_port(port, s.protocol)?;
                    }
                }
            }
            Command::SetDataPathPort { port } if PUBLISHED_RANGE.contains(port) => {
                // Published ports chosen for services come from there.
                return Err(E::DataPathPortPublished(*port));
            }
            _ => {}
        }
        Ok(())
    }

    /// Every address of `network` in use: gateway, VIPs, tasks, node addresses.
    fn used_ips(&self, network: &str) -> Vec<u32> {
        let mut used = Vec::new();
        if let Some(nw) = self.networks.get(network) {
            used.push(u32::from(nw.gateway));
            used.extend(nw.node_ips.values().map(|ip| u32::from(*ip)));
        }
        for s in self.services.values().filter(|s| s.network == network) {
            if let Some((ip, _)) = s.vip {
                used.push(u32::from(ip));
            }
        }
        for t in self.tasks.values() {
            if self.services.get(&t.service).is_some_and(|s| s.network == network) {
                used.push(u32::from(t.ip));
            }
        }
        used
    }

    /// The lowest free host address of `network` (what the next task gets).
    pub fn allocate_ip(&self, network: &str) -> Result<Ipv4Addr, StateError> {
        let nw = self.networks.get(network).ok_or_else(|| unknown(Kind::Network, network))?;
        let used = self.used_ips(network);
        hosts(nw.subnet)
            .find(|a| !used.contains(a))
            .map(Ipv4Addr::from)
            .ok_or_else(|| StateError::SubnetExhausted(network.into()))
    }

    /// Gives every node an address in every network that has a published
    /// service (the routing mesh needs one per node).
    fn allocate_node_ips(&mut self) -> Result<(), StateError> {
        let meshed: Vec<String> = self
            .networks
            .keys()
            .filter(|n| self.services.values().any(|s| s.network == **n && !s.published.is_empty()))
            .cloned()
            .collect();
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        for net in meshed {
            for node in &nodes {
                if self.networks.get(&net).is_some_and(|nw| !nw.node_ips.contains_key(node)) {
                    let ip = self.allocate_ip(&net)?;
                    if let Some(nw) = self.networks.get_mut(&net) {
                        nw.node_ips.insert(node.clone(), ip);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod netns_tests {
    use super::*;

    #[test]
    fn task_namespaces_are_names_or_namespace_files() {
        let ok = |s: &str| TaskNetns::parse(s).map(|t| t.to_string());
        for (given, kept) in [
            ("mp-lab-t1", "mp-lab-t1"),
            ("a", "a"),
            ("web_1.ns", "web_1.ns"),
            ("9", "9"),
            ("/var/run/netns/mp-t1", "mp-t1"),
            ("/run/netns/mp-t1", "mp-t1"),
            ("/proc/1234/ns/net", "/proc/1234/ns/net"),
            ("/proc/0042/ns/net", "/proc/42/ns/net"),
            ("/run/user/1000/netns/netns-6f1c", "/run/user/1000/netns/netns-6f1c"),
            ("/var/run/netns/a/b", "/var/run/netns/a/b"),
            ("/etc/passwd", "/etc/passwd"),
        ] {
            assert_eq!(ok(given).as_deref(), Ok(kept), "{given}");
        }
        assert_eq!(ok(&"x".repeat(64)), Ok("x".repeat(64)));
        let long = "x".repeat(65);
        let under_run = format!("/run/netns/{long}");
        for bad in [
            "",
            "-all",
            "--help",
            ".",
            "..",
            ".hidden",
            "a b",
            "a\tb",
            "../x",
            "a/b",
            "x;reboot",
            "/var/run/netns/",
            "/var/run/netns/../x",
            "/run/netns/-all",
            "/proc/12x/ns/net",
            "/proc//ns/net",
            "/proc/0/ns/net",
            "/proc/-1/ns/net",
            "/proc/+1/ns/net",
            "/proc/ 1/ns/net",
            "/proc/self/ns/net",
            "/proc/1/ns/mnt",
            "/proc/1/ns/net/",
            "/proc/99999999999/ns/net",
            "/proc/1/../1/ns/net",
            "relative/path",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/a b",
            "/",
            "/x/",
            "/proc/self/task/1/ns/net",
            "/proc/1/task/1/ns/net",
            "/run/netns/x\u{e9}",
            "netns\u{e9}",
            &long,
            &under_run,
        ] {
            assert_eq!(TaskNetns::parse(bad), Err(StateError::BadNetns(bad.to_owned())), "{bad:?}");
        }
        assert_eq!(TaskNetns::parse("/proc/7/ns/net").map(|t| t.path()), Ok("/proc/7/ns/net".to_owned()));
        assert_eq!(TaskNetns::parse("/run/netns/t").map(|t| t.path()), Ok("/var/run/netns/t".to_owned()));
        assert_eq!(TaskNetns::parse("/x/y"), Ok(TaskNetns::File("/x/y".into())));
        let very_long = format!("/{}", "x".repeat(TaskNetns::MAX_PATH));
        assert_eq!(TaskNetns::parse(&very_long), Err(StateError::BadNetns(very_long.clone())));
        let msg = StateError::BadNetns("a b".into()).to_string();
        assert!(msg.contains("/proc/PID/ns/net") && msg.contains("1 to 64"), "{msg}");
    }

    /// A cluster with network `app`, service `web` and node `n1`.
    fn cluster() -> ClusterState {
        let mut st = ClusterState::new();
        st.apply(&Command::AddNode(Node {
            id: "n1".into(),
            role: Role::Manager,
            mgmt: "198.18.1.1:2377".parse().expect("addr"),
            data_ip: Ipv4Addr::new(198, 18, 0, 1),
            data_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            availability: Availability::Active,
            key_id: None,
            underlay_mtu: 1500,
        }))
        .expect("node");
        st.apply(&Command::CreateNetwork {
            name: "app".into(),
            subnet: "198.19.0.0/24".parse().expect("subnet"),
            gateway: None,
            mtu: None,
            internal: false,
        })
        .expect("network");
        st.apply(&Command::CreateService {
            name: "web".into(),
            network: "app".into(),
            protocol: Proto::Tcp,
            vip_port: Some(80),
            target_port: 8080,
            publish: Vec::new(),
            scheduler: Scheduler::Rr,
            endpoint_mode: EndpointMode::Vip,
            health: None,
        })
        .expect("service");
        st
    }

    fn dnsrr(name: &str, vip_port: Option<u16>, publish: Vec<PublishRequest>) -> Command {
        Command::CreateService {
            name: name.into(),
            network: "app".into(),
            protocol: Proto::Tcp,
            vip_port,
            target_port: 5432,
            publish,
            scheduler: Scheduler::Rr,
            endpoint_mode: EndpointMode::Dnsrr,
            health: None,
        }
    }

    #[test]
    fn a_dnsrr_service_has_no_vip_and_no_published_port() {
        let mut st = cluster();
        st.apply(&dnsrr("db", None, vec![])).expect("a dnsrr service needs neither");
        assert_eq!((st.services["db"].vip, st.services["db"].endpoint_mode), (None, EndpointMode::Dnsrr));
        let e = st.apply(&dnsrr("db2", Some(5432), vec![])).expect_err("a VIP port");
        assert!(e.to_string().contains("--vip-port needs --endpoint-mode vip"), "{e}");
        let p = PublishRequest { port: Some(30432), mode: MeshMode::Nat };
        let e = st.apply(&dnsrr("db3", None, vec![p])).expect_err("published");
        assert!(e.to_string().contains("cannot be published through the routing mesh"), "{e}");
        let add = Command::UpdateService {
            name: "db".into(),
            scheduler: None,
            publish_add: vec![p],
            publish_rm: vec![],
            health: Default::default(),
        };
        let e = st.apply(&add).expect_err("published later");
        assert!(e.to_string().contains("cannot be published"), "{e}");
        assert!(st.services.contains_key("db"), "a refused update keeps the service");
        // A command written before endpoint modes existed reads as vip.
        let old = r#"{"CreateService":{"name":"w","network":"app","protocol":"tcp","vip_port":80,"target_port":80,"publish":[],"scheduler":"rr"}}"#;
        match serde_json::from_str::<Command>(old) {
            Ok(Command::CreateService { endpoint_mode, .. }) => assert_eq!(endpoint_mode, EndpointMode::Vip),
            other => panic!("{other:?}"),
        }
    }

    fn attach(id: &str, netns: &str) -> Command {
        Command::AttachTask {
            id: id.into(),
            service: "web".into(),
            node: "n1".into(),
            weight: 1,
            netns: Some(netns.into()),
            container: None,
        }
    }

    #[test]
    fn attach_task_refuses_a_bad_namespace_and_keeps_a_normalised_one() {
        let mut st = cluster();
        let before = st.clone();
        for bad in ["-all", "a b", "../x", "/a/../b", "/proc/12x/ns/net"] {
            assert_eq!(st.apply(&attach("web.1", bad)), Err(StateError::BadNetns(bad.into())), "{bad}");
            assert_eq!(st, before, "a refused command changes nothing");
        }
        st.apply(&attach("web.1", "/var/run/netns/mp-t1")).expect("a namespace file");
        st.apply(&attach("web.2", "/proc/4321/ns/net")).expect("a process's namespace");
        assert_eq!(st.tasks["web.1"].netns.as_deref(), Some("mp-t1"));
        assert_eq!(st.tasks["web.2"].netns.as_deref(), Some("/proc/4321/ns/net"));
    }

    fn container(id: &str, cni: Option<(&str, &str)>) -> ContainerRef {
        ContainerRef {
            id: id.into(),
            cni: cni.map(|(network, ifname)| CniAttachment { network: network.into(), ifname: ifname.into() }),
            netns_ino: Some(4026532000),
            name: None,
        }
    }

    fn attach_container(id: &str, netns: &str, c: ContainerRef) -> Command {
        match attach(id, netns) {
            Command::AttachTask { id, service, node, weight, netns, .. } => {
                Command::AttachTask { id, service, node, weight, netns, container: Some(c) }
            }
            other => other,
        }
    }

    #[test]
    fn a_container_is_one_task_per_node_and_attachment() {
        let mut st = cluster();
        let c = container("3f2a9c1b", Some(("web-net", "eth0")));
        st.apply(&attach_container("web.1", "/run/user/0/netns/x", c.clone())).expect("attached");
        assert_eq!(st.tasks["web.1"].container.as_ref(), Some(&c));
        assert_eq!(st.tasks["web.1"].netns.as_deref(), Some("/run/user/0/netns/x"));
        let before = st.clone();
        let again = st.apply(&attach_container("web.2", "/proc/9/ns/net", c.clone()));
        assert_eq!(
            again,
            Err(StateError::ContainerAttached {
                task: "web.1".into(),
                container: "3f2a9c1b/eth0 (CNI network web-net)".into(),
                node: "n1".into()
            })
        );
        assert_eq!(st, before);
        // Another interface of the same container, or the same id without
        // CNI, is another attachment.
        st.apply(&attach_container("web.2", "/proc/9/ns/net", container("3f2a9c1b", Some(("web-net", "eth1")))))
            .expect("another interface");
        st.apply(&attach_container("web.3", "/proc/9/ns/net", container("3f2a9c1b", None))).expect("by pid");
        let msg = st.apply(&attach_container("web.4", "/proc/9/ns/net", container("3f2a9c1b", None)));
        assert!(matches!(msg, Err(StateError::ContainerAttached { ref task, .. }) if task == "web.3"), "{msg:?}");
        assert_eq!(st.container_task("n1", &c).map(|t| t.id.as_str()), Some("web.1"));
        assert_eq!(st.container_task("n2", &c), None);
    }

    #[test]
    fn bad_containers_are_refused_and_old_tasks_load() {
        let mut st = cluster();
        let before = st.clone();
        for c in [
            container("", None),
            container("-x", None),
            container("a b", None),
            container(&"a".repeat(257), None),
            container("ok", Some(("web net", "eth0"))),
            container("ok", Some(("web-net", "eth 0"))),
            container("ok", Some(("web-net", ".."))),
            container("ok", Some(("web-net", "a/b"))),
            container("ok", Some(("web-net", "sixteen-bytes-xx"))),
            ContainerRef { name: Some("two words".into()), ..container("ok", None) },
        ] {
            let r = st.apply(&attach_container("web.1", "/proc/9/ns/net", c.clone()));
            assert!(matches!(r, Err(StateError::BadContainer(_))), "{c:?}: {r:?}");
            assert_eq!(st, before);
        }
        let no_netns = match attach_container("web.1", "x", container("ok", None)) {
            Command::AttachTask { id, service, node, weight, container, .. } => {
                Command::AttachTask { id, service, node, weight, netns: None, container }
            }
            other => other,
        };
        assert_eq!(st.apply(&no_netns), Err(StateError::ContainerWithoutNetns("web.1".into())));
        let old = r#"{"id":"web.1","service":"web","node":"n1","ip":"198.19.0.1","mac":"02:42:c6:13:00:01","weight":1,"netns":"t1"}"#;
        let t: Task = serde_json::from_str(old).expect("a task without a container loads");
        assert_eq!(t.container, None);
        assert!(!serde_json::to_string(&t).expect("json").contains("container"), "none: not written");
    }
}
