//! The tables the dataplane forwards by: an immutable snapshot the control
//! side compiles and publishes (today: loaded from a TOML file).
//!
//! [`TablesSpec`] is the declarative form (what the file says, what the
//! control plane will produce); [`Tables::compile`] validates it and builds
//! the lookup structures the packet path reads: per-network forwarding and
//! ARP maps keyed by a packed `u64`, and an outer-header template per
//! (remote VTEP, network), so encapsulation copies 50 bytes and stores three
//! fields. Nothing in [`Tables`] changes after compilation.
//!
//! [`services`] (VIPs, published ports, backends) and [`maglev`] (the
//! consistent-hashing rings) are compiled here too: the balancer only reads
//! them.

pub mod egress;
pub mod maglev;
pub mod services;

use crate::wire::frame::{self, Head};
use crate::wire::vxlan::{self, EncapParams, EncapTemplate};
use crate::wire::{MacAddr, WireError};
use core::net::Ipv4Addr;
use serde::Deserialize;
use std::collections::HashMap;
use thiserror::Error;

pub use crate::packet::{PortId, UPLINK};
/// Bytes VXLAN adds in front of an inner frame on the underlay, counted
/// against the underlay MTU: IPv4 (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14) = 50.
pub const VXLAN_OVERHEAD: u16 = 50;

// ---------------------------------------------------------------------------
// The declarative form (TOML).

/// This node, as the tables file describes it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Data-path IPv4 address: the outer source of everything encapsulated.
    pub data_ip: Ipv4Addr,
    /// MAC of the data-path NIC.
    pub data_mac: MacAddr,
    /// VXLAN UDP port (default 4789).
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
    /// Underlay MTU (default 1500).
    #[serde(default = "default_underlay_mtu")]
    pub underlay_mtu: u16,
    /// Outer TTL (default 64).
    #[serde(default = "default_ttl")]
    pub ttl: u8,
    /// MAC of the underlay router, for VTEPs without a neighbour entry.
    #[serde(default)]
    pub next_hop_mac: Option<MacAddr>,
    /// Directly reachable VTEPs and their MACs.
    #[serde(default)]
    pub neighbours: Vec<NeighbourSpec>,
    /// Answer TCP to the data-path address on a port no service takes
    /// with a reset (a node with TAP I/O, whose kernel does not hold the
    /// address); otherwise such frames are the kernel's (AF_XDP).
    #[serde(default)]
    pub reset_closed_ports: bool,
    /// Egress: tasks reach addresses outside the cluster through this node
    /// (none without it: such packets have no route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<egress::EgressSpec>,
    /// More addresses of this node the routing mesh answers on (the data
    /// NIC's others, or a configured list), besides `data_ip`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mesh_addrs: Vec<Ipv4Addr>,
}

fn default_vxlan_port() -> u16 {
    vxlan::DEFAULT_PORT
}
fn default_underlay_mtu() -> u16 {
    1500
}
fn default_ttl() -> u8 {
    64
}

/// An underlay neighbour.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NeighbourSpec {
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: MacAddr,
}

/// An IPv4 subnet, written `198.19.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix: u8,
}

impl Subnet {
    /// The netmask as a `u32`.
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
    }
    /// True if `ip` is inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl core::fmt::Display for Subnet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl core::str::FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid subnet {s:?}: expected ADDRESS/PREFIX like 198.19.0.0/24");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let sn = Subnet { addr, prefix };
        if u32::from(addr) & !sn.mask() != 0 {
            return Err(format!(
                "invalid subnet {s:?}: host bits are set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(addr) & sn.mask())
            ));
        }
        Ok(sn)
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An overlay network.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Name, unique.
    pub name: String,
    /// VXLAN network identifier, unique, 1 to 2^24-1.
    pub vni: u32,
    /// The network's subnet.
    pub subnet: Subnet,
    /// The gateway address (answered by the dataplane: ARP and ping).
    pub gateway_ip: Ipv4Addr,
    /// The gateway MAC.
    pub gateway_mac: MacAddr,
    /// MTU inside the network (default: underlay MTU − 50).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// This node's own address in the network (Swarm's ingress sandbox
    /// address): the source of routing-mesh connections in `nat` mode and
    /// where their replies come back. Its MAC is derived from it
    /// (02:42 and the four address bytes, as Docker derives MACs).
    #[serde(default)]
    pub node_ip: Option<Ipv4Addr>,
    /// An internal network (Docker's `--internal`): its tasks' packets to
    /// an address outside every network of the tables are dropped
    /// (`egress_internal`), never given a way out.
    #[serde(default)]
    pub internal: bool,
    /// The embedded DNS server's port for this network on the kernel end
    /// of the host link: a task's query to `gateway_ip:53` (UDP or TCP) is
    /// forwarded there (`Way::Dns`), its answer comes back from
    /// `gateway_ip:53`. `None`: no DNS (the query is `no_route`). Needs
    /// `node.egress.host_link`.
    #[serde(default)]
    pub dns_port: Option<u16>,
}

/// A port of this node's dataplane other than the uplink: a task's
/// interface, attached to one network.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Name, unique; `uplink` is reserved.
    pub name: String,
    /// The network the port is attached to.
    pub network: String,
}

/// Where an endpoint lives.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The endpoint's network.
    pub network: String,
    /// Its IPv4 address (inside the network's subnet).
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: MacAddr,
    /// On this node: the port it is attached to.
    #[serde(default)]
    pub port: Option<String>,
    /// On another node: that node's VTEP (data-path) address.
    #[serde(default)]
    pub vtep: Option<Ipv4Addr>,
}

/// The whole tables file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TablesSpec {
    /// Version of the snapshot (monotonic, set by the publisher).
    #[serde(default)]
    pub version: u64,
    /// This node.
    pub node: NodeSpec,
    /// Overlay networks.
    #[serde(default, rename = "network")]
    pub networks: Vec<NetworkSpec>,
    /// Task ports on this node.
    #[serde(default, rename = "port")]
    pub ports: Vec<PortSpec>,
    /// Endpoints, local and remote.
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointSpec>,
    /// Load-balanced services.
    #[serde(default, rename = "service")]
    pub services: Vec<services::ServiceSpec>,
}

// ---------------------------------------------------------------------------
// Errors.

/// A tables file or spec that cannot be compiled.
#[derive(Debug, Error)]
pub enum TablesError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the schema.
    #[error("{path}: {message}")]
    Syntax {
        /// The path.
        path: String,
        /// What toml/serde said, with the line.
        message: String,
    },
    /// The spec parses but is inconsistent.
    #[error("invalid tables: {0}")]
    Invalid(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, TablesError> {
    Err(TablesError::Invalid(msg.into()))
}

// ---------------------------------------------------------------------------
// The compiled form.

/// A read-mostly hash table from packed `u64` keys to small values:
/// open addressing, linear probing, power-of-two size, load at most one
/// half, one multiply to hash. Built when tables are compiled; only read on
/// the packet path, where a hit is usually one probe.
///
/// `u64::MAX` is reserved as the empty marker: no packed key reaches it
/// ([`mac_key`] and [`ip_key`] of a network index below 0xffff, VNIs and
/// IPv4 addresses all stay below it).
#[derive(Debug, Clone)]
pub struct FlatMap<V: Copy> {
    keys: Box<[u64]>,
    vals: Box<[Option<V>]>,
    len: usize,
    shift: u32,
}

const EMPTY: u64 = u64::MAX;

impl<V: Copy> Default for FlatMap<V> {
    fn default() -> Self {
        Self::with_slots(16)
    }
}

impl<V: Copy> FlatMap<V> {
    fn with_slots(slots: usize) -> Self {
        let slots = slots.next_power_of_two().max(16);
        FlatMap {
            keys: vec![EMPTY; slots].into_boxed_slice(),
            vals: vec![None; slots].into_boxed_slice(),
            len: 0,
            shift: 64 - slots.trailing_zeros(),
        }
    }

    #[inline]
    fn slot(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// The value for `key`.
    #[inline(always)]
    pub fn get(&self, key: &u64) -> Option<&V> {
        let mask = self.keys.len() - 1;
        let mut i = self.slot(*key);
        loop {
            let k = self.keys[i];
            if k == *key {
                return self.vals[i].as_ref();
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// True if `key` is present.
    #[inline]
    pub fn contains_key(&self, key: &u64) -> bool {
        self.get(key).is_some()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Inserts, returning the previous value. Not for the packet path: it
    /// may grow the table. `key` must not be `u64::MAX`.
    pub fn insert(&mut self, key: u64, val: V) -> Option<V> {
        assert_ne!(key, EMPTY, "u64::MAX is the empty marker");
        if (self.len + 1) * 2 > self.keys.len() {
            let mut bigger = Self::with_slots(self.keys.len() * 2);
            for (k, v) in self.keys.iter().zip(self.vals.iter()) {
                if let (true, Some(v)) = (*k != EMPTY, v) {
                    bigger.insert(*k, *v);
                }
            }
            *self = bigger;
        }
        let mask = self.keys.len() - 1;
        let mut i = self.slot(key);
        loop {
            if self.keys[i] == key {
                return self.vals[i].replace(val);
            }
            if self.keys[i] == EMPTY {
                self.keys[i] = key;
                self.vals[i] = Some(val);
                self.len += 1;
                return None;
            }
            i = (i + 1) & mask;
        }
    }
}

/// The MAC of an address this node holds in a network: 02:42 and the
/// address's four bytes (Docker's derivation).
pub fn node_mac_for(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

/// Index of a network in [`Tables::networks`].
pub type NetId = u16;

/// Packs (network, MAC) into one key: the network in the top 16 bits, the
/// MAC's six bytes in wire order read little-endian in the low 48, so that
/// the packet path builds a key from a frame with one load and a mask
/// ([`mac_key_at`]).
#[inline]
pub fn mac_key(net: NetId, mac: MacAddr) -> u64 {
    let m = mac.0;
    mac_key_at(net, &[m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

/// [`mac_key`] of the MAC in the first six bytes of `w` (the last two are
/// ignored): eight bytes read straight from a frame.
#[inline(always)]
pub fn mac_key_at(net: NetId, w: &[u8; 8]) -> u64 {
    (u64::from(net) << 48) | (u64::from_le_bytes(*w) & 0xffff_ffff_ffff)
}

/// The key of a VNI in [`Tables::by_vni`]: its three bytes in wire order
/// read little-endian, so that the packet path reads it from a VXLAN header
/// with one load and a mask ([`vni_key_at`]).
#[inline]
pub fn vni_key(vni: u32) -> u64 {
    let b = vni.to_be_bytes();
    vni_key_at(&[b[1], b[2], b[3], 0])
}

/// [`vni_key`] of the VNI in the first three bytes of `w` (bytes 4..8 of
/// a VXLAN header; the reserved last byte is ignored).
#[inline(always)]
pub fn vni_key_at(w: &[u8; 4]) -> u64 {
    u64::from(u32::from_le_bytes(*w) & 0xff_ffff)
}

/// Packs (network, IPv4 address) into one key.
#[inline]
pub fn ip_key(net: NetId, ip: Ipv4Addr) -> u64 {
    (u64::from(net) << 32) | u64::from(u32::from(ip))
}

/// What a VNI maps to: its network and, for the decapsulation fast path,
/// that network's MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VniNet {
    /// The network.
    pub net: NetId,
    /// Its MTU ([`Network::mtu`]).
    pub mtu: u16,
    /// The network has services (see [`PortFast::lb`]).
    pub lb: bool,
}

/// A compiled network.
#[derive(Debug, Clone)]
pub struct Network {
    /// Name.
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// Subnet.
    pub subnet: Subnet,
    /// Gateway address.
    pub gateway_ip: Ipv4Addr,
    /// Gateway MAC.
    pub gateway_mac: MacAddr,
    /// MTU inside the network.
    pub mtu: u16,
    /// A service has its tasks here: delivered frames may be the replies of
    /// balanced connections.
    pub has_services: bool,
    /// This node's address in the network, if it has one.
    pub node_ip: Option<Ipv4Addr>,
    /// Its MAC (derived from the address).
    pub node_mac: Option<MacAddr>,
    /// See [`NetworkSpec::internal`].
    pub internal: bool,
    /// See [`NetworkSpec::dns_port`].
    pub dns_port: Option<u16>,
}

impl Network {
    /// The subnet's broadcast address.
    #[inline]
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.addr) | !self.subnet.mask())
    }
}

/// Where a destination MAC is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// On a local port.
    Local(PortId),
    /// Behind a remote VTEP: index into [`Tables::templates`].
    Remote(u32),
}

/// A compiled port.
#[derive(Debug, Clone)]
pub struct Port {
    /// Name (`uplink` for port 0).
    pub name: String,
    /// The network of a task port; `None` for the uplink.
    pub network: Option<NetId>,
    /// The MAC of the port's endpoint when it has exactly one (the usual
    /// case: one task interface per port), so the source check is one
    /// compare; `None` for the uplink and for ports with several endpoints
    /// (checked in the forwarding table instead).
    pub mac: Option<MacAddr>,
    /// The IPv4 address of that single endpoint, for the source address
    /// check; `None` where `mac` is `None`.
    pub ip: Option<Ipv4Addr>,
    /// Precomputed for the overlay's fast path; `None` where `ip` is.
    pub fast: Option<PortFast>,
}

/// What the fast path compares a task port's frames with: bytes 6..14 of
/// the frame (source MAC and EtherType IPv4) and 26..30 (IPv4 source),
/// and the port's network facts it needs, so that it never looks the
/// network up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFast {
    /// The port's network.
    pub net: NetId,
    /// Source MAC followed by EtherType 0x0800.
    pub l2: [u8; 8],
    /// IPv4 source address.
    pub ip: [u8; 4],
    /// The network's MTU (at most the underlay MTU − 50, so an IPv4 packet
    /// within it always fits an outer IPv4 length).
    pub mtu: u16,
    /// `mac_key(net, gateway MAC)`: frames to the gateway are not switched.
    pub gateway_key: u64,
    /// The gateway's MAC (the source of frames the balancer forwards).
    pub gateway_mac: [u8; 6],
    /// The network has services: frames take the general path, which
    /// balances and reverses connections.
    pub lb: bool,
}

impl PortFast {
    /// What the task fast paths check of a frame `d` from this port, its
    /// head `h`: unicast destination; source MAC, EtherType and IPv4
    /// source the port's own; IPv4 without options; not a fragment; the
    /// frame exactly the packet (no trailing bytes to trim; at 42 bytes or
    /// more that makes the total at least 28), within the network MTU, its
    /// transport header sane. The IPv4 total length, or `None`.
    #[inline(always)]
    pub fn admit(&self, h: &Head<'_>, d: &[u8]) -> Option<usize> {
        let total = h.total_len();
        let ok = !h.dst_is_group()
            && *h.src_mac_and_type() == self.l2
            && h.bytes()[frame::field::VER_IHL] == 0x45
            && !h.is_fragment()
            && h.src_ip() == self.ip
            && total + 14 == d.len()
            && total <= usize::from(self.mtu)
            && frame::transport_ok(d, 14, total);
        ok.then_some(total)
    }
}

/// The compiled, immutable tables.
#[derive(Debug)]
pub struct Tables {
    /// Snapshot version.
    pub version: u64,
    /// This node's data-path address.
    pub data_ip: Ipv4Addr,
    /// This node's data-path MAC.
    pub data_mac: MacAddr,
    /// See [`NodeSpec::reset_closed_ports`].
    pub reset_closed_ports: bool,
    /// VXLAN UDP port.
    pub vxlan_port: u16,
    /// Underlay MTU.
    pub underlay_mtu: u16,
    /// Ports; index 0 is the uplink.
    pub ports: Vec<Port>,
    /// Networks, by [`NetId`].
    pub networks: Vec<Network>,
    /// VNI → network and its MTU, keyed by [`vni_key`] (see
    /// [`Tables::net_of_vni`]).
    pub by_vni: FlatMap<VniNet>,
    /// (network, MAC) → location; see [`mac_key`].
    pub fdb: FlatMap<Location>,
    /// (network, IP) → MAC, for proxy ARP (gateway included); see [`ip_key`].
    pub arp: FlatMap<MacAddr>,
    /// Outer headers, one per (remote VTEP, network).
    pub templates: Vec<EncapTemplate>,
    /// The VTEP of each template: the outer source a frame from an endpoint
    /// behind it must have (the inner-source check on decapsulation).
    pub template_vtep: Vec<Ipv4Addr>,
    /// Known remote VTEPs: the only accepted outer sources.
    pub vteps: FlatMap<()>,
    /// Services (load balancing).
    pub services: services::Services,
    /// Egress, if the node has it.
    pub egress: Option<egress::Egress>,
    /// The port of the link to the node's host (egress), if any: a port
    /// in no network.
    pub host_port: Option<PortId>,
    /// See [`NodeSpec::mesh_addrs`] (without `data_ip`, each once).
    pub mesh_addrs: Vec<Ipv4Addr>,
}

impl Tables {
    /// The network with VXLAN network identifier `vni`.
    #[inline]
    pub fn net_of_vni(&self, vni: u32) -> Option<NetId> {
        self.by_vni.get(&vni_key(vni)).map(|v| v.net)
    }

    /// True if the routing mesh answers on `ip`: the data-path address or
    /// one of `mesh_addrs`.
    #[inline]
    pub fn is_mesh_addr(&self, ip: Ipv4Addr) -> bool {
        ip == self.data_ip || self.mesh_addrs.contains(&ip)
    }

    /// True if `ip` is inside the subnet of one of the networks (every
    /// cluster network; service VIPs are allocated from them).
    #[inline]
    pub fn in_any_network(&self, ip: Ipv4Addr) -> bool {
        self.networks.iter().any(|n| n.subnet.contains(ip))
    }

    /// Reads and compiles a TOML tables file.
    pub fn load(path: &str) -> Result<Tables, TablesError> {
        let text = std::fs::read_to_string(path).map_err(|source| TablesError::Io { path: path.into(), source })?;
        let spec: TablesSpec =
            toml::from_str(&text).map_err(|e| TablesError::Syntax { path: path.into(), message: e.to_string() })?;
        Tables::compile(&spec)
    }

    /// Validates a spec and builds the lookup structures.
    pub fn compile(spec: &TablesSpec) -> Result<Tables, TablesError> {
        check_node(&spec.node)?;
        let mut b = Builder::networks(spec)?;
        b.ports()?;
        b.endpoints()?;
        let services = b.services()?;
        b.port_facts(&services);
        let n = &spec.node;
        let egress = match &n.egress {
            Some(e) => Some(egress::compile(e, n.data_ip, b.networks.iter().map(|nw| nw.subnet))?),
            None => None,
        };
        let host_port = match egress.as_ref().and_then(|e| e.host_link.as_ref()) {
            Some(h) => Some(b.host_port(&h.port)?),
            None => None,
        };
        check_dns_ports(&b.networks, host_port.is_some())?;
        let mesh_addrs = mesh_addrs(n, b.networks.iter().map(|nw| nw.subnet))?;
        Ok(Tables {
            version: spec.version,
            data_ip: n.data_ip,
            data_mac: n.data_mac,
            reset_closed_ports: n.reset_closed_ports,
            vxlan_port: n.vxlan_port,
            underlay_mtu: n.underlay_mtu,
            ports: b.ports,
            networks: b.networks,
            by_vni: b.by_vni,
            fdb: b.fdb,
            arp: b.arp,
            templates: b.templates,
            template_vtep: b.template_vtep,
            vteps: b.vteps,
            services,
            egress,
            host_port,
            mesh_addrs,
        })
    }

    /// The port with this name.
    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.ports.iter().position(|p| p.name == name).and_then(|i| PortId::try_from(i).ok())
    }
}

/// The node's extra routing-mesh addresses: unicast, outside every
/// cluster network, without `data_ip`, each once.
fn mesh_addrs(n: &NodeSpec, subnets: impl Iterator<Item = Subnet>) -> Result<Vec<Ipv4Addr>, TablesError> {
    let mut out: Vec<Ipv4Addr> = Vec::new();
    let subnets: Vec<Subnet> = subnets.collect();
    for &a in &n.mesh_addrs {
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return invalid(format!("node.mesh_addrs: {a} is not a unicast address"));
        }
        if let Some(s) = subnets.iter().find(|s| s.contains(a)) {
            return invalid(format!("node.mesh_addrs: {a} lies in the cluster subnet {s}"));
        }
        if a != n.data_ip && !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// Every network's DNS port needs the host link, and no two networks share one.
fn check_dns_ports(networks: &[Network], host_link: bool) -> Result<(), TablesError> {
    let mut seen = HashMap::new();
    for nw in networks {
        let Some(p) = nw.dns_port else { continue };
        if !host_link {
            return invalid(format!("network {:?}: dns_port needs the host link (node.egress.host_link)", nw.name));
        }
        if p == 0 {
            return invalid(format!("network {:?}: dns_port 0 is not a port", nw.name));
        }
        if let Some(other) = seen.insert(p, nw.name.as_str()) {
            return invalid(format!("networks {other:?} and {:?}: dns_port {p} is used twice", nw.name));
        }
    }
    Ok(())
}

/// The node section's own checks.
fn check_node(n: &NodeSpec) -> Result<(), TablesError> {
    if n.underlay_mtu < 68 + VXLAN_OVERHEAD {
        return invalid(format!(
            "node.underlay_mtu {} is too small (at least {})",
            n.underlay_mtu,
            68 + VXLAN_OVERHEAD
        ));
    }
    if n.vxlan_port == 0 {
        return invalid("node.vxlan_port must not be 0");
    }
    if !n.data_mac.is_unicast() || n.data_mac == MacAddr::ZERO {
        return invalid(format!("node.data_mac {} must be a unicast address", n.data_mac));
    }
    Ok(())
}

/// [`Tables::compile`]'s work in progress, one section of the spec after
/// the other: networks, ports, endpoints (and the templates toward their
/// VTEPs), services, then what the fast paths need of each port.
struct Builder<'s> {
    spec: &'s TablesSpec,
    networks: Vec<Network>,
    by_vni: FlatMap<VniNet>,
    by_name: HashMap<&'s str, NetId>,
    arp: FlatMap<MacAddr>,
    fdb: FlatMap<Location>,
    ports: Vec<Port>,
    port_ids: HashMap<&'s str, PortId>,
    endpoints_on_port: Vec<usize>,
    templates: Vec<EncapTemplate>,
    template_vtep: Vec<Ipv4Addr>,
    template_ids: HashMap<(Ipv4Addr, NetId), u32>,
    vteps: FlatMap<()>,
}

impl<'s> Builder<'s> {
    /// The networks: VNIs, names, MTUs, gateways and this node's address
    /// in each.
    fn networks(spec: &'s TablesSpec) -> Result<Self, TablesError> {
        let n = &spec.node;
        let mut b = Builder {
            spec,
            networks: Vec::new(),
            by_vni: FlatMap::default(),
            by_name: HashMap::new(),
            arp: FlatMap::default(),
            fdb: FlatMap::default(),
            ports: vec![Port { name: "uplink".into(), network: None, mac: None, ip: None, fast: None }],
            port_ids: HashMap::new(),
            endpoints_on_port: Vec::new(),
            templates: Vec::new(),
            template_vtep: Vec::new(),
            template_ids: HashMap::new(),
            vteps: FlatMap::default(),
        };
        for ns in &spec.networks {
            if ns.vni == 0 || ns.vni > vxlan::MAX_VNI {
                return invalid(format!("network {:?}: vni {} out of range 1..={}", ns.name, ns.vni, vxlan::MAX_VNI));
            }
            let id = NetId::try_from(b.networks.len()).map_err(|_| TablesError::Invalid("too many networks".into()))?;
            let max_mtu = n.underlay_mtu - VXLAN_OVERHEAD;
            let mtu = ns.mtu.unwrap_or(max_mtu);
            if !(68..=max_mtu).contains(&mtu) {
                return invalid(format!(
                    "network {:?}: mtu {mtu} must be between 68 and {max_mtu} (underlay mtu {} − {VXLAN_OVERHEAD})",
                    ns.name, n.underlay_mtu
                ));
            }
            let lb = spec.services.iter().any(|sv| sv.network == ns.name);
            if b.by_vni.insert(vni_key(ns.vni), VniNet { net: id, mtu, lb }).is_some() {
                return invalid(format!("network {:?}: vni {} is used twice", ns.name, ns.vni));
            }
            if b.by_name.insert(ns.name.as_str(), id).is_some() {
                return invalid(format!("network name {:?} is used twice", ns.name));
            }
            if !ns.subnet.contains(ns.gateway_ip) {
                return invalid(format!("network {:?}: gateway {} is outside {}", ns.name, ns.gateway_ip, ns.subnet));
            }
            if !ns.gateway_mac.is_unicast() {
                return invalid(format!("network {:?}: gateway_mac {} must be unicast", ns.name, ns.gateway_mac));
            }
            b.arp.insert(ip_key(id, ns.gateway_ip), ns.gateway_mac);
            if let Some(ip) = ns.node_ip {
                if !ns.subnet.contains(ip) || ip == ns.gateway_ip {
                    return invalid(format!(
                        "network {:?}: node_ip {ip} must be an address of {} other than the gateway's",
                        ns.name, ns.subnet
                    ));
                }
                // Tasks resolve it like any address (the routing mesh's
                // replies in `nat` mode go to it); endpoints may not reuse it.
                b.arp.insert(ip_key(id, ip), node_mac_for(ip));
            }
            b.networks.push(Network {
                name: ns.name.clone(),
                vni: ns.vni,
                subnet: ns.subnet,
                gateway_ip: ns.gateway_ip,
                gateway_mac: ns.gateway_mac,
                mtu,
                has_services: false,
                node_ip: ns.node_ip,
                node_mac: ns.node_ip.map(node_mac_for),
                internal: ns.internal,
                dns_port: ns.dns_port,
            });
        }
        Ok(b)
    }

    /// The network named `name`, or an error naming `what` refers to it.
    fn net(&self, name: &str, what: impl FnOnce() -> String) -> Result<NetId, TablesError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| TablesError::Invalid(format!("{}: unknown network {name:?}", what())))
    }

    /// The task ports, each in one network (port 0 is the uplink).
    fn ports(&mut self) -> Result<(), TablesError> {
        for ps in &self.spec.ports {
            if ps.name == "uplink" {
                return invalid("port name \"uplink\" is reserved for the data-path NIC");
            }
            let net = self.net(&ps.network, || format!("port {:?}", ps.name))?;
            let id = PortId::try_from(self.ports.len()).map_err(|_| TablesError::Invalid("too many ports".into()))?;
            if self.port_ids.insert(ps.name.as_str(), id).is_some() {
                return invalid(format!("port name {:?} is used twice", ps.name));
            }
            self.ports.push(Port { name: ps.name.clone(), network: Some(net), mac: None, ip: None, fast: None });
        }
        self.endpoints_on_port = vec![0; self.ports.len()];
        Ok(())
    }

    /// The host link's port (after the task ports; in no network).
    fn host_port(&mut self, name: &str) -> Result<PortId, TablesError> {
        if name == "uplink" || self.port_ids.contains_key(name) {
            return invalid(format!("node.egress.host_link.port {name:?} is already a port's name"));
        }
        let id = PortId::try_from(self.ports.len()).map_err(|_| TablesError::Invalid("too many ports".into()))?;
        self.ports.push(Port { name: name.to_owned(), network: None, mac: None, ip: None, fast: None });
        Ok(id)
    }

    /// The endpoints: each on a local port or behind a remote VTEP, in the
    /// forwarding and ARP tables; this node's MAC used by none.
    fn endpoints(&mut self) -> Result<(), TablesError> {
        for es in &self.spec.endpoints {
            let net = self.net(&es.network, || format!("endpoint {}", es.ip))?;
            let nw = &self.networks[usize::from(net)];
            if !nw.subnet.contains(es.ip) {
                return invalid(format!("endpoint {}: outside network {:?} ({})", es.ip, nw.name, nw.subnet));
            }
            if es.ip == nw.gateway_ip || es.mac == nw.gateway_mac {
                return invalid(format!("endpoint {}: uses the gateway's address of network {:?}", es.ip, nw.name));
            }
            if !es.mac.is_unicast() || es.mac == MacAddr::ZERO {
                return invalid(format!("endpoint {}: mac {} must be unicast", es.ip, es.mac));
            }
            let loc = match (&es.port, es.vtep) {
                (Some(p), None) => Location::Local(self.local_endpoint(es, p, net)?),
                (None, Some(vtep)) => Location::Remote(self.template(es, vtep, net)?),
                _ => return invalid(format!("endpoint {}: give exactly one of port (local) or vtep (remote)", es.ip)),
            };
            let nw = &self.networks[usize::from(net)];
            if self.fdb.insert(mac_key(net, es.mac), loc).is_some() {
                return invalid(format!("endpoint {}: mac {} is used twice in network {:?}", es.ip, es.mac, nw.name));
            }
            if self.arp.insert(ip_key(net, es.ip), es.mac).is_some() {
                return invalid(format!("endpoint {}: address is used twice in network {:?}", es.ip, nw.name));
            }
        }
        for (i, nw) in self.networks.iter().enumerate() {
            if let Some(m) = nw.node_mac
                && self.fdb.get(&mac_key(i as NetId, m)).is_some()
            {
                return invalid(format!("network {:?}: an endpoint uses this node's MAC {m}", nw.name));
            }
        }
        Ok(())
    }

    /// A local endpoint on port `p` of network `net`: the port learns its
    /// endpoint's MAC and address.
    fn local_endpoint(&mut self, es: &EndpointSpec, p: &str, net: NetId) -> Result<PortId, TablesError> {
        let id = *self
            .port_ids
            .get(p)
            .ok_or_else(|| TablesError::Invalid(format!("endpoint {}: unknown port {p:?}", es.ip)))?;
        if self.ports[usize::from(id)].network != Some(net) {
            let name = &self.networks[usize::from(net)].name;
            return invalid(format!("endpoint {}: port {p:?} is not attached to network {name:?}", es.ip));
        }
        self.endpoints_on_port[usize::from(id)] += 1;
        self.ports[usize::from(id)].mac = Some(es.mac);
        self.ports[usize::from(id)].ip = Some(es.ip);
        Ok(id)
    }

    /// The outer-header template toward `vtep` for network `net` (made the
    /// first time a remote endpoint needs it).
    fn template(&mut self, es: &EndpointSpec, vtep: Ipv4Addr, net: NetId) -> Result<u32, TablesError> {
        let n = &self.spec.node;
        if vtep == n.data_ip {
            return invalid(format!("endpoint {}: vtep {vtep} is this node; give the local port instead", es.ip));
        }
        self.vteps.insert(u64::from(u32::from(vtep)), ());
        if let Some(&i) = self.template_ids.get(&(vtep, net)) {
            return Ok(i);
        }
        // The last entry for an address wins.
        let neighbour = n.neighbours.iter().rev().find(|x| x.ip == vtep).map(|x| x.mac);
        let dst_mac = neighbour.or(n.next_hop_mac).ok_or_else(|| {
            TablesError::Invalid(format!(
                "endpoint {}: no MAC for vtep {vtep}: add a [[node.neighbours]] entry or node.next_hop_mac",
                es.ip
            ))
        })?;
        let tpl = EncapTemplate::new(&EncapParams {
            src_mac: n.data_mac,
            dst_mac,
            src_ip: n.data_ip,
            dst_ip: vtep,
            dst_port: n.vxlan_port,
            vni: self.networks[usize::from(net)].vni,
            ttl: n.ttl,
        })
        .map_err(|e: WireError| TablesError::Invalid(e.to_string()))?;
        let i = self.templates.len() as u32;
        self.templates.push(tpl);
        self.template_vtep.push(vtep);
        self.template_ids.insert((vtep, net), i);
        Ok(i)
    }

    /// The services: compiled against the networks and the ARP table;
    /// each backend's template found; VIPs resolved to their gateway.
    fn services(&mut self) -> Result<services::Services, TablesError> {
        let (networks, arp, by_name) = (&self.networks, &self.arp, &self.by_name);
        let mut services = services::Services::compile(
            &self.spec.services,
            networks,
            |name| by_name.get(name).copied(),
            |net, ip| {
                let nw = &networks[usize::from(net)];
                arp.get(&ip_key(net, ip)).copied().filter(|m| *m != nw.gateway_mac && Some(*m) != nw.node_mac)
            },
        )?;
        for s in &mut services.list {
            for b in &mut s.backends {
                b.remote = match self.fdb.get(&mac_key(s.net, b.mac)) {
                    Some(&Location::Remote(i)) => Some(i),
                    _ => None,
                };
            }
        }
        // A VIP resolves to the gateway's MAC: frames to it reach the
        // dataplane's balancer.
        for s in &services.list {
            if let Some((vip, _)) = s.vip {
                self.arp.insert(ip_key(s.net, vip), self.networks[usize::from(s.net)].gateway_mac);
            }
            self.networks[usize::from(s.net)].has_services = true;
        }
        Ok(services)
    }

    /// What the fast paths compare a port's frames with ([`PortFast`]),
    /// for ports with exactly one endpoint.
    fn port_facts(&mut self, services: &services::Services) {
        for (p, n) in self.ports.iter_mut().zip(&self.endpoints_on_port) {
            if *n != 1 {
                p.mac = None;
                p.ip = None;
            }
            p.fast = match (p.network, p.mac, p.ip) {
                (Some(net), Some(m), Some(ip)) => {
                    let nw = &self.networks[usize::from(net)];
                    let m = m.0;
                    Some(PortFast {
                        net,
                        l2: [m[0], m[1], m[2], m[3], m[4], m[5], 0x08, 0x00],
                        ip: ip.octets(),
                        mtu: nw.mtu,
                        gateway_key: mac_key(net, nw.gateway_mac),
                        gateway_mac: nw.gateway_mac.0,
                        lb: services.in_network(net),
                    })
                }
                _ => None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [node]
        data_ip = "198.18.0.1"
        data_mac = "02:00:00:00:00:01"
        [[node.neighbours]]
        ip = "198.18.0.2"
        mac = "02:00:00:00:00:02"
        [[network]]
        name = "app"
        vni = 4096
        subnet = "198.19.0.0/24"
        gateway_ip = "198.19.0.254"
        gateway_mac = "02:42:c6:13:00:fe"
        [[port]]
        name = "t1"
        network = "app"
        [[endpoint]]
        network = "app"
        ip = "198.19.0.1"
        mac = "02:00:00:00:01:01"
        port = "t1"
        [[endpoint]]
        network = "app"
        ip = "198.19.0.2"
        mac = "02:00:00:00:01:02"
        vtep = "198.18.0.2"
    "#;

    fn compile(extra: &str) -> Result<Tables, TablesError> {
        let spec: TablesSpec = toml::from_str(&format!("{BASE}\n{extra}"))
            .map_err(|e| TablesError::Syntax { path: "test".into(), message: e.to_string() })?;
        Tables::compile(&spec)
    }

    fn err(extra: &str) -> String {
        compile(extra).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_lookups() {
        let t = compile("").unwrap();
        assert_eq!((t.vxlan_port, t.underlay_mtu, t.networks[0].mtu), (4789, 1500, 1450));
        assert_eq!(t.port_id("t1"), Some(1));
        assert_eq!(t.port_id("uplink"), Some(UPLINK));
        let mac: MacAddr = "02:00:00:00:01:02".parse().unwrap();
        assert_eq!(t.fdb.get(&mac_key(0, mac)), Some(&Location::Remote(0)));
        assert_eq!(t.arp.get(&ip_key(0, Ipv4Addr::new(198, 19, 0, 254))), Some(&"02:42:c6:13:00:fe".parse().unwrap()));
        assert_eq!(t.templates.len(), 1);
        assert!(t.vteps.contains_key(&u64::from(u32::from(Ipv4Addr::new(198, 18, 0, 2)))));
    }

    #[test]
    fn every_mistake_gets_a_clear_error() {
        let dup_vni = "[[network]]\nname = \"b\"\nvni = 4096\nsubnet = \"198.19.1.0/24\"\ngateway_ip = \"198.19.1.1\"\ngateway_mac = \"02:00:00:00:09:01\"";
        assert!(err(dup_vni).contains("vni 4096 is used twice"), "{}", err(dup_vni));
        let big_mtu = "[[network]]\nname = \"b\"\nvni = 5\nsubnet = \"198.19.1.0/24\"\ngateway_ip = \"198.19.1.1\"\ngateway_mac = \"02:00:00:00:09:01\"\nmtu = 1451";
        assert!(err(big_mtu).contains("mtu 1451 must be between 68 and 1450"), "{}", err(big_mtu));
        let gw_out = "[[network]]\nname = \"b\"\nvni = 5\nsubnet = \"198.19.1.0/24\"\ngateway_ip = \"198.19.2.1\"\ngateway_mac = \"02:00:00:00:09:01\"";
        assert!(err(gw_out).contains("outside"), "{}", err(gw_out));
        let both = "[[endpoint]]\nnetwork = \"app\"\nip = \"198.19.0.9\"\nmac = \"02:00:00:00:01:09\"\nport = \"t1\"\nvtep = \"198.18.0.2\"";
        assert!(err(both).contains("exactly one of port"), "{}", err(both));
        let no_mac =
            "[[endpoint]]\nnetwork = \"app\"\nip = \"198.19.0.9\"\nmac = \"02:00:00:00:01:09\"\nvtep = \"198.18.0.7\"";
        assert!(err(no_mac).contains("no MAC for vtep 198.18.0.7"), "{}", err(no_mac));
        let dup_mac =
            "[[endpoint]]\nnetwork = \"app\"\nip = \"198.19.0.9\"\nmac = \"02:00:00:00:01:02\"\nvtep = \"198.18.0.2\"";
        assert!(err(dup_mac).contains("used twice"), "{}", err(dup_mac));
        let unknown_net = "[[port]]\nname = \"t2\"\nnetwork = \"nope\"";
        assert!(err(unknown_net).contains("unknown network \"nope\""), "{}", err(unknown_net));
        let outside =
            "[[endpoint]]\nnetwork = \"app\"\nip = \"198.18.5.5\"\nmac = \"02:00:00:00:01:09\"\nport = \"t1\"";
        assert!(err(outside).contains("outside network"), "{}", err(outside));
        let typo = "[[port]]\nname = \"t2\"\nnetwrk = \"app\"";
        assert!(err(typo).contains("unknown field `netwrk`"), "{}", err(typo));
        let bad_mac = "[[endpoint]]\nnetwork = \"app\"\nip = \"198.19.0.9\"\nmac = \"02:00:00:00:01\"\nport = \"t1\"";
        assert!(err(bad_mac).contains("invalid MAC address"), "{}", err(bad_mac));
        let reserved = "[[port]]\nname = \"uplink\"\nnetwork = \"app\"";
        assert!(err(reserved).contains("reserved"), "{}", err(reserved));
    }

    #[test]
    fn flat_map_grows_and_finds_everything() {
        let mut m = FlatMap::default();
        for k in 0..1000u64 {
            assert_eq!(m.insert(k * 7919, k), None);
        }
        assert_eq!(m.insert(7919, 5), Some(1));
        assert_eq!(m.len(), 1000);
        for k in 0..1000u64 {
            assert_eq!(m.get(&(k * 7919)).copied(), Some(if k == 1 { 5 } else { k }));
            assert!(!m.contains_key(&(k * 7919 + 1)));
        }
        assert!(m.keys.len() >= 2000, "load stays at most one half");
    }

    #[test]
    fn subnets() {
        assert!("198.19.0.0/24".parse::<Subnet>().unwrap().contains(Ipv4Addr::new(198, 19, 0, 77)));
        assert!(!"198.19.0.0/24".parse::<Subnet>().unwrap().contains(Ipv4Addr::new(198, 19, 1, 1)));
        assert!("198.19.0.1/24".parse::<Subnet>().unwrap_err().contains("did you mean 198.19.0.0/24"));
        assert!("198.19.0.0/33".parse::<Subnet>().is_err());
        assert!("0.0.0.0/0".parse::<Subnet>().unwrap().contains(Ipv4Addr::new(198, 18, 0, 1)));
    }

    #[test]
    fn example_file_compiles() {
        let t = Tables::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml")).unwrap();
        assert_eq!(t.ports.len(), 4);
        assert_eq!(t.networks.iter().map(|n| (n.vni, n.mtu)).collect::<Vec<_>>(), vec![(4096, 1450), (4097, 1400)]);
        assert!(matches!(Tables::load("/nonexistent.toml"), Err(TablesError::Io { .. })));
    }
}
