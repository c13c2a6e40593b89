//! Egress: how a task's traffic to an address outside every cluster
//! network leaves through its own node (source NAT to the node's egress
//! address), and what the compiled tables know to route it: the egress
//! address and port range, the next hops from the node's FIB (routes and
//! on-link neighbours, filled by the node), the node's own addresses and
//! every cluster subnet.
//!
//! The packet path reads [`Tables::egress_class`] once per new connection
//! and [`Tables::egress_hop`] once per packet (so a changed route or MAC
//! is followed at the next table swap).

use super::{FlatMap, NeighbourSpec, Subnet, Tables, TablesError, invalid};
use crate::wire::MacAddr;
use crate::wire::ipv4::protocol;
use core::net::Ipv4Addr;
use serde::Deserialize;

/// The node's egress, as the tables file describes it (`[node.egress]`).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSpec {
    /// The source address the world sees (default: the node's data-path
    /// address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
    /// The source ports it uses, `LO-HI` inclusive (default
    /// [`DEFAULT_PORTS`]).
    #[serde(default)]
    pub ports: PortRange,
    /// Every cluster network's subnet (of the whole cluster, not only this
    /// node's networks): never egress, networks stay isolated.
    #[serde(default)]
    pub cluster_subnets: Vec<Subnet>,
    /// Routes from the node's FIB out of the data NIC, each with its next
    /// hop's MAC (the longest prefix wins).
    #[serde(default)]
    pub route: Vec<EgressRouteSpec>,
    /// On-link destinations the kernel has resolved.
    #[serde(default)]
    pub neighbour: Vec<NeighbourSpec>,
    /// Addresses of this node's host besides the data-path and egress
    /// addresses (a task's packets to them are for the host, not the
    /// world).
    #[serde(default)]
    pub host_addrs: Vec<Ipv4Addr>,
    /// The link to this node's own host (a TAP into the node's kernel),
    /// through which tasks reach the host's addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_link: Option<HostLinkSpec>,
}

/// The host link: a TAP device the node opens in its own namespace, whose
/// kernel end has `peer_ip`; tasks' connections to the host are
/// source-NATed to `ip` (meshplane's end), so the host answers through
/// the link's connected route.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostLinkSpec {
    /// meshplane's end: the source the host sees.
    pub ip: Ipv4Addr,
    /// The kernel's end.
    pub peer_ip: Ipv4Addr,
    /// meshplane's end's MAC.
    pub mac: MacAddr,
    /// The kernel's end's MAC.
    pub peer_mac: MacAddr,
    /// The TAP device (a tables port of its own).
    #[serde(default = "default_host_port")]
    pub port: String,
    /// The kernel does not hold the data-path address (a TAP uplink):
    /// connections to it go to `peer_ip` instead, replies come back from
    /// the data-path address.
    #[serde(default)]
    pub dnat_data_ip: bool,
}

/// The host link's TAP device's default name.
pub const DEFAULT_HOST_PORT: &str = "mp-host";

fn default_host_port() -> String {
    DEFAULT_HOST_PORT.into()
}

/// The ports connections to the host use on the host link's address (no
/// one else uses that address).
pub const HOST_PORTS: PortRange = PortRange { lo: 1024, hi: 65535 };

/// One egress route.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressRouteSpec {
    /// Destination prefix (`0.0.0.0/0`: the default route).
    pub prefix: Subnet,
    /// The next hop's MAC.
    pub mac: MacAddr,
}

/// An inclusive range of ports, written `LO-HI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The first port.
    pub lo: u16,
    /// The last port.
    pub hi: u16,
}

/// The default egress source ports: above Linux's ephemeral range
/// (32768-60999) and the published ports' (30000-32767), so that the
/// kernel, which holds the data-path address with AF_XDP, never picks them.
pub const DEFAULT_PORTS: PortRange = PortRange { lo: 61000, hi: 65535 };

/// The fewest ports a range may hold.
pub const MIN_PORTS: u32 = 64;

impl Default for PortRange {
    fn default() -> Self {
        DEFAULT_PORTS
    }
}

impl PortRange {
    /// How many ports it holds.
    pub fn len(&self) -> u32 {
        u32::from(self.hi).saturating_sub(u32::from(self.lo)) + 1
    }

    /// Never empty (`lo <= hi` is checked where it is made).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True if `p` is inside.
    #[inline(always)]
    pub fn contains(&self, p: u16) -> bool {
        (self.lo..=self.hi).contains(&p)
    }
}

impl core::fmt::Display for PortRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl core::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid port range {s:?}: expected LO-HI like 61000-65535");
        let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
        let (lo, hi): (u16, u16) = (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?);
        if lo < 1024 || lo > hi {
            return Err(format!("invalid port range {s:?}: LO must be at least 1024 and at most HI"));
        }
        let r = PortRange { lo, hi };
        if r.len() < MIN_PORTS {
            return Err(format!("invalid port range {s:?}: holds {} ports, at least {MIN_PORTS} are needed", r.len()));
        }
        Ok(r)
    }
}

impl serde::Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The compiled egress of a node.
#[derive(Debug, Clone)]
pub struct Egress {
    /// The SNAT source address.
    pub addr: Ipv4Addr,
    /// The SNAT source ports.
    pub ports: PortRange,
    /// (network, mask, next hop's MAC), longest prefix first.
    pub routes: Vec<(u32, u32, MacAddr)>,
    /// On-link destination → MAC, keyed by [`neigh_key`].
    pub neigh: FlatMap<MacAddr>,
    /// This node's host's addresses (data-path, egress and the listed
    /// ones).
    pub host_addrs: Vec<u32>,
    /// Every cluster subnet, (network, mask).
    pub cluster: Vec<(u32, u32)>,
    /// The link to the host, if any.
    pub host_link: Option<HostLinkSpec>,
}

/// What a task's packet to the gateway for address `dst` is, once it is
/// not to the gateway itself, a VIP or a tracked connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// Inside a cluster network: networks stay isolated (`no_route`).
    Cluster,
    /// VXLAN to a peer's data-path address: refused (`egress_to_vtep`);
    /// after SNAT to this node's address it would be taken as VXLAN from a
    /// known VTEP.
    Vtep,
    /// This node's data-path address and one of its published ports
    /// (`egress_hairpin`: use the VIP).
    Hairpin,
    /// An address of this node's host.
    Host,
    /// The world (other nodes' addresses included).
    Outside,
}

/// The key of an on-link destination in [`Egress::neigh`] (bit 40 set: it
/// can never be a (network, IP) key).
#[inline(always)]
pub fn neigh_key(ip: Ipv4Addr) -> u64 {
    u64::from(u32::from(ip)) | 1 << 40
}

/// Compiles a node's egress spec (`data_ip`: the node's data-path
/// address; `networks`: the subnets of this node's networks, added to the
/// cluster's).
pub(super) fn compile(
    s: &EgressSpec,
    data_ip: Ipv4Addr,
    networks: impl Iterator<Item = Subnet>,
) -> Result<Egress, TablesError> {
    let addr = s.addr.unwrap_or(data_ip);
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback() {
        return invalid(format!("node.egress.addr {addr} must be a unicast address"));
    }
    let r = s.ports;
    if r.lo < 1024 || r.lo > r.hi || r.len() < MIN_PORTS {
        return invalid(format!("node.egress.ports {r}: must lie in 1024-65535 and hold at least {MIN_PORTS} ports"));
    }
    let mut cluster: Vec<(u32, u32)> =
        s.cluster_subnets.iter().copied().chain(networks).map(|n| (u32::from(n.addr), n.mask())).collect();
    cluster.sort_unstable();
    cluster.dedup();
    if let Some(&(net, mask)) = cluster.iter().find(|&&(net, mask)| u32::from(addr) & mask == net) {
        return invalid(format!(
            "node.egress.addr {addr} lies in the cluster subnet {}/{}",
            Ipv4Addr::from(net),
            mask.count_ones()
        ));
    }
    let mut routes: Vec<(u32, u32, MacAddr)> =
        s.route.iter().map(|rt| (u32::from(rt.prefix.addr), rt.prefix.mask(), rt.mac)).collect();
    // Longest prefix first; one entry per prefix (the first given wins).
    routes.sort_by_key(|&(net, mask, _)| (core::cmp::Reverse(mask.count_ones()), net));
    routes.dedup_by_key(|&mut (net, mask, _)| (net, mask));
    if routes.len() > MAX_ROUTES {
        return invalid(format!("node.egress: {} routes, at most {MAX_ROUTES}", routes.len()));
    }
    let mut neigh = FlatMap::default();
    for n in &s.neighbour {
        neigh.insert(neigh_key(n.ip), n.mac);
    }
    let mut host_addrs = vec![u32::from(data_ip), u32::from(addr)];
    host_addrs.extend(s.host_addrs.iter().map(|&a| u32::from(a)));
    if let Some(h) = &s.host_link {
        for a in [h.ip, h.peer_ip] {
            if let Some(&(net, mask)) = cluster.iter().find(|&&(net, mask)| u32::from(a) & mask == net) {
                return invalid(format!(
                    "node.egress.host_link: {a} lies in the cluster subnet {}/{}",
                    Ipv4Addr::from(net),
                    mask.count_ones()
                ));
            }
        }
        if h.ip == h.peer_ip || !h.mac.is_unicast() || !h.peer_mac.is_unicast() || h.mac == h.peer_mac {
            return invalid("node.egress.host_link: two different unicast addresses and MACs are needed");
        }
        host_addrs.push(u32::from(h.peer_ip));
    }
    host_addrs.sort_unstable();
    host_addrs.dedup();
    Ok(Egress { addr, ports: r, routes, neigh, host_addrs, cluster, host_link: s.host_link.clone() })
}

/// Routes an egress table holds at most (the packet path scans them).
pub const MAX_ROUTES: usize = 64;

impl Tables {
    /// What a task's packet to `dst` (IP protocol `proto`, destination
    /// port `dport`) is once nothing tracked takes it, with egress on
    /// (`None`: egress off, as in tables without `[node.egress]`).
    #[inline]
    pub fn egress_class(&self, dst: Ipv4Addr, proto: u8, dport: u16) -> Option<Dest> {
        let e = self.egress.as_ref()?;
        let d = u32::from(dst);
        Some(if self.in_any_network(dst) || e.cluster.iter().any(|&(net, mask)| d & mask == net) {
            Dest::Cluster
        } else if proto == protocol::UDP && dport == self.vxlan_port && self.vteps.contains_key(&u64::from(d)) {
            Dest::Vtep
        } else if dst == self.data_ip
            && matches!(proto, protocol::TCP | protocol::UDP)
            && self.services.published(dport, proto).is_some()
        {
            Dest::Hairpin
        } else if e.host_addrs.contains(&d) || e.host_link.as_ref().is_some_and(|h| h.ip == dst) {
            Dest::Host
        } else {
            Dest::Outside
        })
    }

    /// The MAC of the next hop toward `dst` outside the cluster: the
    /// on-link neighbour's, else the longest matching route's.
    #[inline]
    pub fn egress_hop(&self, dst: Ipv4Addr) -> Option<MacAddr> {
        let e = self.egress.as_ref()?;
        if let Some(m) = e.neigh.get(&neigh_key(dst)) {
            return Some(*m);
        }
        let d = u32::from(dst);
        e.routes.iter().find(|&&(net, mask, _)| d & mask == net).map(|&(_, _, mac)| mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> EgressSpec {
        toml::from_str(text).expect("egress spec")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    #[test]
    fn ranges_parse_and_bad_ones_say_why() {
        assert_eq!("61000-65535".parse::<PortRange>(), Ok(DEFAULT_PORTS));
        assert_eq!("1024-1087".parse::<PortRange>().map(|r| r.len()), Ok(64));
        for (bad, why) in [
            ("1024-1086", "at least 64"),
            ("80-1000", "at least 1024"),
            ("2000-1999", "at most HI"),
            ("x-y", "expected LO-HI"),
            ("61000", "expected LO-HI"),
        ] {
            let e = bad.parse::<PortRange>().expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_longest_prefix_and_on_link_neighbours_win() {
        let s = spec(
            r#"
            cluster_subnets = ["198.19.0.0/16"]
            route = [
                { prefix = "0.0.0.0/0", mac = "02:00:00:00:00:01" },
                { prefix = "198.18.3.0/24", mac = "02:00:00:00:00:03" },
                { prefix = "198.18.0.0/15", mac = "02:00:00:00:00:02" },
            ]
            neighbour = [{ ip = "198.18.3.7", mac = "02:00:00:00:00:07" }]
            "#,
        );
        let e = compile(&s, ip("198.18.0.1"), core::iter::empty()).expect("compiles");
        assert_eq!(e.routes.iter().map(|r| r.1.count_ones()).collect::<Vec<_>>(), [24, 15, 0]);
        let spec: super::super::TablesSpec =
            toml::from_str("[node]\ndata_ip = \"198.18.0.1\"\ndata_mac = \"02:00:00:00:00:aa\"").expect("spec");
        let mut t = Tables::compile(&spec).expect("tables");
        t.egress = Some(e);
        let mac = |s: &str| t.egress_hop(ip(s)).map(|m| m.0[5]);
        assert_eq!(mac("198.18.3.7"), Some(7));
        assert_eq!(mac("198.18.3.8"), Some(3));
        assert_eq!(mac("198.18.200.1"), Some(2));
        assert_eq!(mac("203.0.113.1"), Some(1));
        assert_eq!(t.egress_class(ip("198.19.7.1"), 6, 80), Some(Dest::Cluster));
        assert_eq!(t.egress_class(ip("198.18.0.1"), 6, 80), Some(Dest::Host));
        assert_eq!(t.egress_class(ip("198.18.3.8"), 6, 80), Some(Dest::Outside));
        t.egress = None;
        assert_eq!((t.egress_class(ip("198.18.3.8"), 6, 80), t.egress_hop(ip("198.18.3.8"))), (None, None));
    }

    #[test]
    fn an_egress_address_inside_the_cluster_is_refused() {
        let s = spec(r#"addr = "198.19.0.9""#);
        let sn: Subnet = "198.19.0.0/24".parse().expect("subnet");
        let e = compile(&s, ip("198.18.0.1"), core::iter::once(sn)).expect_err("refused");
        assert!(e.to_string().contains("lies in the cluster subnet 198.19.0.0/24"), "{e}");
    }
}
