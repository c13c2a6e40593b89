//! Services in the tables: the declarative form (TOML `[[service]]`), its
//! validation, and the compiled form the packet path reads.
//!
//! A service has an internal virtual IP (a VIP:port in a network, balanced
//! to the service's tasks in that network), published ports on this node's
//! data-path address (the routing mesh, in `nat` or `preserve-source`
//! mode), or both.

use super::maglev::{self, Maglev, MaglevBackend};
use super::{FlatMap, NetId, Network, TablesError, invalid};
use crate::wire::MacAddr;
use crate::wire::ipv4::protocol;
use core::net::Ipv4Addr;
use serde::Deserialize;

/// A service as the tables file declares it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Name (unique).
    pub name: String,
    /// `tcp` or `udp`.
    pub protocol: Proto,
    /// The network of the service's tasks (and of its VIP); for published
    /// ports, the ingress network, in which this node has an address
    /// (`node_ip`).
    pub network: String,
    /// The virtual IP, in the network's subnet, not an endpoint's or the
    /// gateway's address (optional: a service may only be published).
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// The VIP's port (with `vip`), translated to `target_port`; 0: every
    /// TCP and UDP port, untranslated (Swarm's VIPs, balanced by firewall
    /// mark).
    #[serde(default)]
    pub port: Option<u16>,
    /// The port the tasks listen on (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// Ports published on this node's data-path address (the routing
    /// mesh).
    #[serde(default)]
    pub published: Vec<PublishedSpec>,
    /// Scheduler (default `mh`).
    #[serde(default = "default_scheduler")]
    pub scheduler: Scheduler,
    /// Maglev table size for `mh`/`sh` (a prime; default 65537).
    #[serde(default = "default_maglev_size")]
    pub maglev_size: u32,
    /// The tasks.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendSpec>,
}

/// A published port.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedSpec {
    /// The port on the node's data-path address (the control plane picks
    /// it, or takes the user's).
    pub port: u16,
    /// `nat` (default) or `preserve-source`.
    #[serde(default)]
    pub mode: MeshMode,
}

/// How the routing mesh forwards a published port's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeshMode {
    /// Swarm's: DNAT to the task and SNAT to this node's address in the
    /// ingress network; replies come back to this node by address.
    #[default]
    Nat,
    /// The task sees the client's address: DNAT only; the task's node
    /// remembers which node the connection came in through and returns the
    /// replies through it (moby/moby#25526).
    PreserveSource,
    /// Swarm's `mode=host`: the port is open only on the nodes running a
    /// task of the service, and goes to those local tasks, the client's
    /// address preserved. A cluster-state mode: the control plane compiles
    /// it, per node, into a `preserve-source` port of a service of the
    /// node's own tasks; the tables refuse it.
    Host,
}

fn default_scheduler() -> Scheduler {
    Scheduler::Mh
}
fn default_maglev_size() -> u32 {
    maglev::DEFAULT_SIZE
}

/// A backend (task) of a service.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// The task's address: an endpoint of the service's network.
    pub ip: Ipv4Addr,
    /// Weight (default 1; 0 drains).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// `active` (default) or `draining` (as weight 0: existing connections
    /// stay, no new ones).
    #[serde(default)]
    pub state: BackendState,
}

fn default_weight() -> u32 {
    1
}

/// A backend's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new connections (by weight).
    #[default]
    Active,
    /// Keeps its connections, takes no new ones.
    Draining,
}

/// A transport protocol a service balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => protocol::TCP,
            Proto::Udp => protocol::UDP,
        }
    }
}

/// A compiled backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Address.
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// The endpoint's MAC (frames to it are switched by it).
    pub mac: MacAddr,
    /// Effective weight: 0 if draining.
    pub weight: u32,
    /// The encapsulation template of the node it runs on, if that is
    /// another node (looked up once when the tables are compiled, so the
    /// fast path need not look the backend's MAC up per packet).
    pub remote: Option<u32>,
    /// RFC 1624 checksum differences of the DNAT from the service's VIP to
    /// this backend, precomputed (`wire::rewrite::dnat_delta`): `[0]` for
    /// the IPv4 header, `[1]` for TCP/UDP. Zero without a VIP.
    pub vip_csum: [u32; 2],
}

/// A compiled service.
#[derive(Debug, Clone)]
pub struct Service {
    /// Name.
    pub name: String,
    /// IP protocol number.
    pub proto: u8,
    /// Network of the tasks (and of the VIP).
    pub net: NetId,
    /// VIP and its port, if the service has one.
    pub vip: Option<(Ipv4Addr, u16)>,
    /// Published ports and their modes.
    pub published: Vec<(u16, MeshMode)>,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// Backends, in the order declared.
    pub backends: Vec<Backend>,
    /// The Maglev table (for `mh` and `sh`), built here, on the control
    /// side, from the backends' identities (address and port) and the
    /// cluster-wide seed.
    pub maglev: Option<Maglev>,
}

impl Service {
    /// Whether a packet to `dst`:`dport` (of the service's network) is to
    /// the VIP: its port, or any for an every-port VIP.
    #[inline(always)]
    pub fn vip_is(&self, dst: Ipv4Addr, dport: u16, proto: u8) -> bool {
        match self.vip {
            Some((ip, 0)) => ip == dst && matches!(proto, protocol::TCP | protocol::UDP),
            Some(v) => v == (dst, dport) && proto == self.proto,
            None => false,
        }
    }

    /// Whether the VIP is an every-port one (the port is kept).
    #[inline(always)]
    pub fn vip_target_is_port(&self) -> bool {
        matches!(self.vip, Some((_, 0)))
    }

    /// The backend port of a VIP connection to port `dport`: the target
    /// port, or for an every-port VIP the port itself.
    #[inline(always)]
    pub fn vip_target(&self, be: &Backend, dport: u16) -> u16 {
        if matches!(self.vip, Some((_, 0))) { dport } else { be.port }
    }
}

/// Cluster-wide seed of the Maglev tables: every node builds the same
/// tables from the same backends.
pub const MAGLEV_SEED: u64 = 0x6d61_676c_6576_2121; // "maglev!!"

/// The key of a VIP in [`Services::vips`]: address, port, protocol and
/// network packed into 64 bits (networks are fewer than 2^15).
#[inline(always)]
pub fn vip_key(net: NetId, ip: [u8; 4], port: u16, proto: u8) -> u64 {
    (u64::from(u32::from_be_bytes(ip)) << 32)
        | (u64::from(port) << 16)
        | (u64::from(proto == protocol::UDP) << 15)
        | u64::from(net & 0x7fff)
}

/// The key of a published port in [`Services::published`].
#[inline(always)]
pub fn published_key(port: u16, proto: u8) -> u64 {
    (u64::from(port) << 8) | u64::from(proto)
}

/// A published port's service and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Service index.
    pub service: u32,
    /// Mode.
    pub mode: MeshMode,
}

/// The compiled services.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// By index (conntrack entries and counters refer to it).
    pub list: Vec<Service>,
    /// [`vip_key`] → service index.
    pub vips: FlatMap<u32>,
    /// [`published_key`] → service and mode.
    pub published: FlatMap<Published>,
}

impl Services {
    /// Validates and compiles `specs` against the compiled networks;
    /// `endpoint_mac(net, ip)` is the MAC cluster state has for an endpoint
    /// (`None` if there is none). Errors name the service and the problem.
    pub fn compile(
        specs: &[ServiceSpec],
        networks: &[Network],
        net_by_name: impl Fn(&str) -> Option<NetId>,
        endpoint_mac: impl Fn(NetId, Ipv4Addr) -> Option<MacAddr>,
    ) -> Result<Services, TablesError> {
        let mut out = Services::default();
        let mut names = std::collections::HashSet::new();
        for s in specs {
            let name = &s.name;
            if !names.insert(name.as_str()) {
                return invalid(format!("service name {name:?} is used twice"));
            }
            let net = net_by_name(&s.network)
                .ok_or_else(|| TablesError::Invalid(format!("service {name:?}: unknown network {:?}", s.network)))?;
            if net > 0x7fff {
                return invalid(format!("service {name:?}: services are limited to the first 32768 networks"));
            }
            let nw = &networks[usize::from(net)];
            let vip = vip_of(s, net, nw, &endpoint_mac)?;
            let target = target_port(s, nw)?;
            let backends = backends_of(s, net, nw, vip, target, &endpoint_mac)?;
            let maglev = if s.scheduler.uses_maglev() {
                let mb: Vec<MaglevBackend> =
                    backends.iter().map(|b| MaglevBackend { id: backend_id(b), weight: b.weight }).collect();
                Some(
                    Maglev::build(&mb, s.maglev_size, MAGLEV_SEED)
                        .map_err(|e| TablesError::Invalid(format!("service {name:?}: {e}")))?,
                )
            } else {
                None
            };
            out.index(s, net, vip)?;
            out.list.push(Service {
                name: name.clone(),
                proto: s.protocol.number(),
                net,
                vip,
                published: s.published.iter().map(|p| (p.port, p.mode)).collect(),
                scheduler: s.scheduler,
                backends,
                maglev,
            });
        }
        Ok(out)
    }

    /// Enters the next service (`s`, in network `net`, at `vip`) in the
    /// VIP and published-port maps; no VIP or port may be another's.
    fn index(&mut self, s: &ServiceSpec, net: NetId, vip: Option<(Ipv4Addr, u16)>) -> Result<(), TablesError> {
        let (name, proto) = (&s.name, s.protocol.number());
        let pname = if proto == protocol::TCP { "tcp" } else { "udp" };
        let idx = self.list.len() as u32;
        if let Some((ip, port)) = vip {
            // An every-port VIP (port 0) takes both protocols.
            let protos: &[u8] = if port == 0 { &[protocol::TCP, protocol::UDP] } else { &[proto] };
            for &p in protos {
                if self.vips.insert(vip_key(net, ip.octets(), port, p), idx).is_some() {
                    return invalid(format!("service {name:?}: {ip}:{port} ({pname}) is another service's"));
                }
            }
        }
        for p in &s.published {
            if p.mode == MeshMode::Host {
                return invalid(format!(
                    "service {name:?}: published port {}: mode host is compiled by the control plane (a preserve-source port of the node's own tasks)",
                    p.port
                ));
            }
            let v = Published { service: idx, mode: p.mode };
            if self.published.insert(published_key(p.port, proto), v).is_some() {
                return invalid(format!("service {name:?}: published port {} ({pname}) is taken", p.port));
            }
        }
        Ok(())
    }

    /// The service at a VIP and port, if any: the VIP:port's, else an
    /// every-port VIP's.
    #[inline]
    pub fn at(&self, net: NetId, ip: [u8; 4], port: u16, proto: u8) -> Option<u32> {
        match self.vips.get(&vip_key(net, ip, port, proto)) {
            Some(&s) => Some(s),
            None => self.vips.get(&vip_key(net, ip, 0, proto)).copied(),
        }
    }

    /// The service and mode of a published port, if any.
    #[inline]
    pub fn published(&self, port: u16, proto: u8) -> Option<Published> {
        self.published.get(&published_key(port, proto)).copied()
    }

    /// True if `ip` is the VIP of a service of network `net` (a linear
    /// scan: only ICMP to a VIP asks).
    pub fn is_vip(&self, net: NetId, ip: Ipv4Addr) -> bool {
        self.list.iter().any(|s| s.net == net && s.vip.is_some_and(|(v, _)| v == ip))
    }

    /// True if any service has its tasks in network `net`.
    pub fn in_network(&self, net: NetId) -> bool {
        self.list.iter().any(|s| s.net == net)
    }
}

/// A service's VIP and port: a host address of its network that nothing
/// else has, or none (then it needs a published port).
fn vip_of(
    s: &ServiceSpec,
    net: NetId,
    nw: &Network,
    endpoint_mac: impl Fn(NetId, Ipv4Addr) -> Option<MacAddr>,
) -> Result<Option<(Ipv4Addr, u16)>, TablesError> {
    let name = &s.name;
    let vip = match (s.vip, s.port) {
        (Some(vip), Some(port)) => {
            if !nw.subnet.contains(vip) || vip == nw.subnet.addr || vip == nw.broadcast() {
                return invalid(format!("service {name:?}: vip {vip} is not a host address of {}", nw.subnet));
            }
            if vip == nw.gateway_ip || nw.node_ip == Some(vip) || endpoint_mac(net, vip).is_some() {
                return invalid(format!(
                    "service {name:?}: vip {vip} is already the gateway's, this node's or an endpoint's"
                ));
            }
            Some((vip, port))
        }
        (None, None) => None,
        _ => return invalid(format!("service {name:?}: give vip and port together")),
    };
    if vip.is_none() && s.published.is_empty() {
        return invalid(format!("service {name:?}: neither a vip nor a published port"));
    }
    Ok(vip)
}

/// The port a service's backends listen on (`target_port`, else the VIP's
/// port), after the checks of its ports.
fn target_port(s: &ServiceSpec, nw: &Network) -> Result<u16, TablesError> {
    let name = &s.name;
    if !s.published.is_empty() && nw.node_ip.is_none() {
        return invalid(format!(
            "service {name:?}: published ports need this node's address in network {:?} (node_ip)",
            nw.name
        ));
    }
    if s.target_port == Some(0) || s.published.iter().any(|p| p.port == 0) {
        return invalid(format!("service {name:?}: ports must be 1..=65535"));
    }
    match (s.target_port.or(s.port), s.published.is_empty()) {
        (Some(0), false) => invalid(format!("service {name:?}: published ports need a target_port")),
        (Some(p), _) => Ok(p),
        (None, _) => invalid(format!("service {name:?}: target_port is needed without a vip")),
    }
}

/// A service's backends: endpoints of its network, each once, at most
/// 65535 (a connection entry keeps a backend's index in 16 bits), with the
/// checksum differences of a DNAT from the VIP to each.
fn backends_of(
    s: &ServiceSpec,
    net: NetId,
    nw: &Network,
    vip: Option<(Ipv4Addr, u16)>,
    target: u16,
    endpoint_mac: impl Fn(NetId, Ipv4Addr) -> Option<MacAddr>,
) -> Result<Vec<Backend>, TablesError> {
    let name = &s.name;
    if s.backends.len() > usize::from(u16::MAX) {
        return invalid(format!("service {name:?}: at most 65535 backends"));
    }
    let mut backends = Vec::with_capacity(s.backends.len());
    for b in &s.backends {
        let mac = endpoint_mac(net, b.ip).ok_or_else(|| {
            TablesError::Invalid(format!(
                "service {name:?}: backend {} is not an endpoint of network {:?}",
                b.ip, nw.name
            ))
        })?;
        if backends.iter().any(|x: &Backend| x.ip == b.ip) {
            return invalid(format!("service {name:?}: backend {} is listed twice", b.ip));
        }
        let weight = if b.state == BackendState::Draining { 0 } else { b.weight };
        // An every-port VIP keeps the port: the difference is the address's.
        let vip_csum = vip.map_or([0; 2], |(vip, vport)| {
            let to = if vport == 0 { 0 } else { target };
            crate::wire::rewrite::dnat_delta(vip, vport, b.ip, to)
        });
        backends.push(Backend { ip: b.ip, port: target, mac, weight, remote: None, vip_csum });
    }
    Ok(backends)
}

/// A backend's identity for Maglev: address and port, the same on every
/// node.
pub fn backend_id(b: &Backend) -> u64 {
    (u64::from(u32::from(b.ip)) << 16) | u64::from(b.port)
}

/// A scheduling algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Round robin over backends with a weight.
    Rr,
    /// Weighted round robin (IPVS's interleaved algorithm).
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections: least connections / weight.
    Wlc,
    /// Source hashing: the client's address picks the backend (Maglev
    /// table, so consistent across nodes and under backend changes).
    Sh,
    /// Maglev hashing of the 5-tuple.
    Mh,
}

impl Scheduler {
    /// The name as configured (`rr`, `wrr`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Sh => "sh",
            Scheduler::Mh => "mh",
        }
    }

    /// True for the schedulers that need a Maglev table.
    pub fn uses_maglev(self) -> bool {
        matches!(self, Scheduler::Sh | Scheduler::Mh)
    }
}
