//! Services in the tables: the declarative form (TOML `[[service]]`), its
//! validation, and the compiled form the packet path reads.
//!
//! Today: internal virtual IPs (a VIP:port in a network, balanced to the
//! service's tasks in that network). The routing mesh (published ports on
//! the node's data-path address) comes next (issue 4, still open).

use super::maglev::{self, Maglev, MaglevBackend};
use super::sched::Scheduler;
use crate::tables::{FlatMap, NetId, Network};
use crate::wire::MacAddr;
use crate::wire::ipv4::protocol;
use core::net::Ipv4Addr;
use serde::Deserialize;

/// A service as the tables file declares it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Name (unique).
    pub name: String,
    /// `tcp` or `udp`.
    pub protocol: Proto,
    /// The network the VIP lives in.
    pub network: String,
    /// The virtual IP, in the network's subnet, not an endpoint's or the
    /// gateway's address.
    pub vip: Ipv4Addr,
    /// The VIP's port.
    pub port: u16,
    /// The port the tasks listen on (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
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

fn default_scheduler() -> Scheduler {
    Scheduler::Mh
}
fn default_maglev_size() -> u32 {
    maglev::DEFAULT_SIZE
}

/// A backend (task) of a service.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new connections (by weight).
    #[default]
    Active,
    /// Keeps its connections, takes no new ones.
    Draining,
}

/// A transport protocol a service balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
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
}

/// A compiled service.
#[derive(Debug, Clone)]
pub struct Service {
    /// Name.
    pub name: String,
    /// IP protocol number.
    pub proto: u8,
    /// Network of the VIP.
    pub net: NetId,
    /// VIP.
    pub vip: Ipv4Addr,
    /// VIP port.
    pub port: u16,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// Backends, in the order declared.
    pub backends: Vec<Backend>,
    /// The Maglev table (for `mh` and `sh`), built here, on the control
    /// side, from the backends' identities (address and port) and the
    /// cluster-wide seed.
    pub maglev: Option<Maglev>,
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

/// The compiled services.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// By index (conntrack entries and counters refer to it).
    pub list: Vec<Service>,
    /// [`vip_key`] → service index.
    pub vips: FlatMap<u32>,
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
    ) -> Result<Services, String> {
        let mut out = Services::default();
        let mut names = std::collections::HashSet::new();
        for s in specs {
            let name = &s.name;
            if !names.insert(name.as_str()) {
                return Err(format!("service name {name:?} is used twice"));
            }
            let net =
                net_by_name(&s.network).ok_or_else(|| format!("service {name:?}: unknown network {:?}", s.network))?;
            if net > 0x7fff {
                return Err(format!("service {name:?}: services are limited to the first 32768 networks"));
            }
            let nw = &networks[usize::from(net)];
            if !nw.subnet.contains(s.vip) || s.vip == nw.subnet.addr || s.vip == nw.broadcast() {
                return Err(format!("service {name:?}: vip {} is not a host address of {}", s.vip, nw.subnet));
            }
            if s.vip == nw.gateway_ip || endpoint_mac(net, s.vip).is_some() {
                return Err(format!("service {name:?}: vip {} is already the gateway's or an endpoint's", s.vip));
            }
            if s.port == 0 || s.target_port == Some(0) {
                return Err(format!("service {name:?}: ports must be 1..=65535"));
            }
            let target = s.target_port.unwrap_or(s.port);
            let mut backends = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let mac = endpoint_mac(net, b.ip).ok_or_else(|| {
                    format!("service {name:?}: backend {} is not an endpoint of network {:?}", b.ip, nw.name)
                })?;
                if backends.iter().any(|x: &Backend| x.ip == b.ip) {
                    return Err(format!("service {name:?}: backend {} is listed twice", b.ip));
                }
                let weight = if b.state == BackendState::Draining { 0 } else { b.weight };
                backends.push(Backend { ip: b.ip, port: target, mac, weight });
            }
            let maglev = if s.scheduler.uses_maglev() {
                let mb: Vec<MaglevBackend> =
                    backends.iter().map(|b| MaglevBackend { id: backend_id(b), weight: b.weight }).collect();
                Some(Maglev::build(&mb, s.maglev_size, MAGLEV_SEED).map_err(|e| format!("service {name:?}: {e}"))?)
            } else {
                None
            };
            let proto = s.protocol.number();
            let idx = out.list.len() as u32;
            if out.vips.insert(vip_key(net, s.vip.octets(), s.port, proto), idx).is_some() {
                return Err(format!(
                    "service {name:?}: {}:{} ({}) is another service's",
                    s.vip,
                    s.port,
                    if proto == protocol::TCP { "tcp" } else { "udp" }
                ));
            }
            out.list.push(Service {
                name: name.clone(),
                proto,
                net,
                vip: s.vip,
                port: s.port,
                scheduler: s.scheduler,
                backends,
                maglev,
            });
        }
        Ok(out)
    }

    /// The service at a VIP, if any.
    #[inline]
    pub fn at(&self, net: NetId, ip: [u8; 4], port: u16, proto: u8) -> Option<u32> {
        self.vips.get(&vip_key(net, ip, port, proto)).copied()
    }

    /// True if any service has its VIP in network `net`.
    pub fn in_network(&self, net: NetId) -> bool {
        self.list.iter().any(|s| s.net == net)
    }
}

/// A backend's identity for Maglev: address and port, the same on every
/// node.
pub fn backend_id(b: &Backend) -> u64 {
    (u64::from(u32::from(b.ip)) << 16) | u64::from(b.port)
}
