//! Compiling the cluster state and live membership into one node's
//! dataplane tables (`TablesSpec`, which the dataplane validates and turns
//! into lookup structures; Maglev rings are built there, on the control
//! side of the swap).
//!
//! What a node gets: the cluster's data-path port and its own underlay
//! MTU, every other node as an underlay neighbour (with its own data MAC,
//! right on one L2 segment; a managed node replaces it with its kernel's
//! next hop toward that peer, `src/node/underlay.rs`), every network (its
//! VNI, subnet, gateway, MTU, whether it is internal, and this node's
//! address in it), a port per local task (named after the
//! task), every task as an endpoint — local ones on their port, remote
//! ones behind their node's VTEP, and only on nodes that are up — the
//! other nodes' addresses in each network as endpoints, and every service
//! with its tasks on live nodes as backends (weight 0 on drained nodes;
//! none that is starting or failing its health check).
//!
//! Who serves is decided in one place, [`serving`], for the balancers and
//! for DNS ([`zone`]) alike, so that a name never answers with a task the
//! balancers leave out, nor the other way round.

use crate::state::{Availability, ClusterState, EndpointMode, Task, mac_for};
use meshplane_dataplane::tables::services::{BackendSpec, BackendState, MeshMode, PublishedSpec, ServiceSpec};
use meshplane_dataplane::tables::{EndpointSpec, NeighbourSpec, NetworkSpec, NodeSpec, PortSpec, TablesSpec};
use meshplane_dns::zone::{Mode, NetZone, SrvPort, SvcRec, TaskRec, Zone};
use thiserror::Error;

/// Why a node's tables could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CompileError {
    /// The node is not in the state.
    #[error("no node {0:?} in the cluster state")]
    UnknownNode(String),
}

/// The tables of node `me`, with `up(node)` telling which nodes gossip says
/// are alive (tasks on other nodes are left out, so no balancer sends to
/// them), at snapshot `version`.
pub fn compile(
    state: &ClusterState,
    me: &str,
    up: &dyn Fn(&str) -> bool,
    version: u64,
) -> Result<TablesSpec, CompileError> {
    let node = state.nodes.get(me).ok_or_else(|| CompileError::UnknownNode(me.to_owned()))?;
    let alive = |n: &str| n == me || up(n);
    let neighbours =
        state.nodes.values().filter(|n| n.id != me).map(|n| NeighbourSpec { ip: n.data_ip, mac: n.data_mac }).collect();
    let (ports, endpoints) = ports_and_endpoints(state, me, &alive);
    Ok(TablesSpec {
        version,
        node: NodeSpec {
            data_ip: node.data_ip,
            data_mac: node.data_mac,
            vxlan_port: state.data_path_port,
            underlay_mtu: node.underlay_mtu,
            ttl: 64,
            next_hop_mac: None,
            neighbours,
            reset_closed_ports: false,
            egress: None,
            mesh_addrs: Vec::new(),
        },
        networks: networks(state, me),
        ports,
        endpoints,
        services: services(state, me, &alive),
    })
}

/// Every network, with this node's address in it.
fn networks(state: &ClusterState, me: &str) -> Vec<NetworkSpec> {
    state
        .networks
        .values()
        .map(|nw| NetworkSpec {
            name: nw.name.clone(),
            vni: nw.vni,
            subnet: nw.subnet,
            gateway_ip: nw.gateway,
            gateway_mac: mac_for(nw.gateway),
            mtu: Some(nw.mtu),
            node_ip: nw.node_ips.get(me).copied(),
            internal: nw.internal,
            dns_port: None,
        })
        .collect()
}

/// A port per local task; every task as an endpoint (local ones on their
/// port, remote ones behind their node's VTEP if it is alive), and the
/// other live nodes' addresses in each network.
fn ports_and_endpoints(
    state: &ClusterState,
    me: &str,
    alive: &dyn Fn(&str) -> bool,
) -> (Vec<PortSpec>, Vec<EndpointSpec>) {
    let net_of = |service: &str| state.services.get(service).map(|s| s.network.clone());
    let mut ports = Vec::new();
    let mut endpoints = Vec::new();
    for t in state.tasks.values() {
        let Some(network) = net_of(&t.service) else { continue };
        if t.node == me {
            ports.push(PortSpec { name: t.id.clone(), network: network.clone() });
            endpoints.push(EndpointSpec { network, ip: t.ip, mac: t.mac, port: Some(t.id.clone()), vtep: None });
        } else if alive(&t.node)
            && let Some(n) = state.nodes.get(&t.node)
        {
            endpoints.push(EndpointSpec { network, ip: t.ip, mac: t.mac, port: None, vtep: Some(n.data_ip) });
        }
    }
    for nw in state.networks.values() {
        for (id, ip) in &nw.node_ips {
            if id != me
                && alive(id)
                && let Some(n) = state.nodes.get(id)
            {
                endpoints.push(EndpointSpec {
                    network: nw.name.clone(),
                    ip: *ip,
                    mac: mac_for(*ip),
                    port: None,
                    vtep: Some(n.data_ip),
                });
            }
        }
    }
    (ports, endpoints)
}

/// What a task is to the balancers and to DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// A backend taking new connections, and in DNS answers.
    Yes,
    /// A backend at weight 0: its connections go on, it takes no new ones
    /// (a drained node's task, or weight 0); not in DNS answers.
    Draining,
    /// No backend at all and not in DNS answers: on a node that is down
    /// (or not in the state), or starting or failing its health check
    /// (its connections are balanced again on their next packet).
    No,
}

/// The one predicate of who serves (`alive`: whether a node is up): the
/// balancers' backends and DNS's answers both come from it.
pub fn serving(state: &ClusterState, t: &Task, alive: &dyn Fn(&str) -> bool) -> Serving {
    let Some(node) = state.nodes.get(&t.node) else { return Serving::No };
    if !alive(&t.node) || !t.health.serves() {
        Serving::No
    } else if node.availability == Availability::Drain || t.weight == 0 {
        Serving::Draining
    } else {
        Serving::Yes
    }
}

/// Every service balanced through a VIP (`dnsrr` services have no VIP and
/// no routing mesh: DNS answers with their tasks), with its serving tasks
/// as backends ([`serving`]: weight 0 and draining on drained nodes); and
/// for a service with `mode=host` ports and a task on this node (`me`), a
/// service `NAME@host` of those ports alone, in `preserve-source` mode, to
/// this node's own serving tasks (Swarm's host-mode publishing).
fn services(state: &ClusterState, me: &str, alive: &dyn Fn(&str) -> bool) -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    for s in state.services.values() {
        let backends = |local_only: bool| -> Vec<BackendSpec> {
            state
                .tasks
                .values()
                .filter(|t| t.service == s.name && (!local_only || t.node == me))
                .filter_map(|t| match serving(state, t, alive) {
                    Serving::Yes => Some(BackendSpec { ip: t.ip, weight: t.weight, state: BackendState::Active }),
                    Serving::Draining => Some(BackendSpec { ip: t.ip, weight: 0, state: BackendState::Draining }),
                    Serving::No => None,
                })
                .collect()
        };
        let (host, mesh): (Vec<&crate::state::Published>, Vec<_>) =
            s.published.iter().partition(|p| p.mode == MeshMode::Host);
        let spec = |name: String, vip: Option<(std::net::Ipv4Addr, u16)>, published: Vec<PublishedSpec>, backends| {
            ServiceSpec {
                name,
                protocol: s.protocol,
                network: s.network.clone(),
                vip: vip.map(|(ip, _)| ip),
                port: vip.map(|(_, p)| p),
                target_port: Some(s.target_port),
                published,
                scheduler: s.scheduler,
                maglev_size: meshplane_dataplane::tables::maglev::DEFAULT_SIZE,
                backends,
            }
        };
        if s.endpoint_mode == EndpointMode::Vip && (s.vip.is_some() || !mesh.is_empty()) {
            let published = mesh.iter().map(|p| PublishedSpec { port: p.port, mode: p.mode }).collect();
            out.push(spec(s.name.clone(), s.vip, published, backends(false)));
        }
        let local = if host.is_empty() { Vec::new() } else { backends(true) };
        if !local.is_empty() {
            let published =
                host.iter().map(|p| PublishedSpec { port: p.port, mode: MeshMode::PreserveSource }).collect();
            out.push(spec(format!("{}@host", s.name), None, published, local));
        }
    }
    out
}

/// A service's ports as SRV records name them: its target port, and a
/// VIP port mapped to it (`--vip-port`), in its protocol.
fn srv_ports(s: &crate::state::Service) -> Vec<SrvPort> {
    let udp = s.protocol == meshplane_dataplane::tables::services::Proto::Udp;
    let mut ports = vec![SrvPort { port: s.target_port, udp, target: s.target_port }];
    if let Some((_, p)) = s.vip
        && p != 0
        && p != s.target_port
    {
        ports.push(SrvPort { port: p, udp, target: s.target_port });
    }
    ports
}

/// The names node `me` serves (`up(node)`: which nodes gossip says are
/// alive): every network in which it has a task, with the network's
/// services and tasks. A task is serving (in `tasks.SERVICE` and a dnsrr
/// name's answer) when the balancers send new connections to it
/// ([`serving`]: on a live node that is not drained, with a weight above
/// 0, not starting or failing its health check). Pure, as `compile` is.
pub fn zone(state: &ClusterState, me: &str, up: &dyn Fn(&str) -> bool) -> Zone {
    let alive = |n: &str| n == me || up(n);
    let local: std::collections::BTreeSet<&str> = state
        .tasks
        .values()
        .filter(|t| t.node == me)
        .filter_map(|t| state.services.get(&t.service).map(|s| s.network.as_str()))
        .collect();
    let networks = state
        .networks
        .values()
        .filter(|nw| local.contains(nw.name.as_str()))
        .map(|nw| {
            let services = state.services.values().filter(|s| s.network == nw.name);
            NetZone {
                name: nw.name.clone(),
                vni: nw.vni,
                gateway: nw.gateway,
                subnet: (nw.subnet.addr, nw.subnet.prefix),
                internal: nw.internal,
                services: services
                    .clone()
                    .map(|s| SvcRec {
                        name: s.name.clone(),
                        mode: if s.endpoint_mode == EndpointMode::Dnsrr { Mode::Dnsrr } else { Mode::Vip },
                        vip: s.vip.map(|(ip, _)| ip),
                        ports: srv_ports(s),
                    })
                    .collect(),
                tasks: state
                    .tasks
                    .values()
                    .filter(|t| services.clone().any(|s| s.name == t.service))
                    .map(|t| TaskRec {
                        name: t.id.clone(),
                        service: t.service.clone(),
                        ip: t.ip,
                        serving: serving(state, t, &alive) == Serving::Yes,
                    })
                    .collect(),
            }
        })
        .collect();
    Zone { networks }
}
