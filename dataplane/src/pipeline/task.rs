//! The path of a frame from a task port, top to bottom.
//!
//! ```text
//! fast   overlay::fast::task_unicast  unicast IPv4 to an endpoint of the network → Tx(port) / Tx(uplink, VXLAN)
//!        lb::fast::task_vip           TCP/UDP to a VIP, tracked or new             → Tx(uplink, VXLAN) / switch
//!        anything else, or anything they doubt: the general path below
//! 1 port      the port's network and endpoint         drop unknown_port
//! 2 admit     headers parse, untagged, endpoint's MAC drop arp_malformed, malformed, vlan_tagged, src_mac_spoofed
//! 3 arp       proxy ARP from cluster state            Tx(in_port) reply; drop arp_*
//! 4 flood     no broadcast or multicast               drop broadcast_not_flooded
//! 5 ipv4      endpoint's address, network MTU         drop src_ip_spoofed, mtu_exceeded; Tx(in_port) frag-needed
//! 6 gateway   to the gateway MAC                      Tx(in_port) echo reply (gateway, VIPs);
//!                                                     6a TCP/UDP to gateway:53 with a DNS port: lb::egress::to_dns
//!                                                     (DNAT to the node's DNS server) → Tx(host port);
//!                                                     6b TCP/UDP to the gateway, a hairpin connection's
//!                                                     answer: lb::egress::hairpin_back → switch;
//!                                                     6c a published port of this node: lb::from_client
//!                                                     (nat mode; the answer back to the task's port);
//!                                                     lb::to_vip; lb::routed;
//!                                                     drop egress_internal (internal network, outside
//!                                                     every network); lb::egress::from_task (SNAT,
//!                                                     TTL − 1) → Tx(uplink); Tx(in_port) time-exceeded;
//!                                                     drop egress_*, ttl_exceeded, no_route
//! 7 node      to this node's own MAC in the network   lb::to_node (routing-mesh replies)
//! 8 switch    within the network                      drop hairpin; pipeline::switch
//! ```

use super::{follow, switch};
use crate::lb::{self, LbState};
use crate::overlay::fast::BurstCache;
use crate::overlay::{self, arp_lookup, gateway};
use crate::packet::{DropReason as D, Frame, PortId, Step, Verdict};
use crate::tables::services::{MeshMode, Published};
use crate::tables::{Location, NetId, Network, Tables};
use crate::wire::MacAddr;
use crate::wire::ethernet::{self, ethertype};
use crate::wire::frame::{field, macs, plain_ipv4};
use crate::wire::ipv4::{Ipv4Packet, protocol};
use crate::wire::parse_frame;
use core::net::Ipv4Addr;

/// A frame from task port `in_port`: the fast paths (with `FAST`), then
/// the general path.
#[inline(always)]
pub(super) fn decide<const FAST: bool>(
    frame: &mut Frame<'_>,
    in_port: PortId,
    now: u64,
    t: &Tables,
    cache: &BurstCache<'_>,
    lb: &mut LbState,
) -> Verdict {
    if FAST && let Some(v) = overlay::fast::task_unicast(frame, in_port, t, cache) {
        return v;
    }
    if FAST
        && let Some(pf) = cache.lb_port()
        && let Some(n) = lb::fast::task_vip(frame, now, t, pf, lb)
    {
        return follow(frame, n, now, t, lb);
    }
    from_task(frame, in_port, now, t, lb)
}

/// The general path of a frame from a task port (see the module's map).
#[inline(never)] // the general path: kept out of the fast paths' loop
pub(super) fn from_task(frame: &mut Frame<'_>, in_port: PortId, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    steps(frame, in_port, now, t, lb).unwrap_or_else(|exit| exit)
}

#[inline(always)]
fn steps(frame: &mut Frame<'_>, in_port: PortId, now: u64, t: &Tables, lb: &mut LbState) -> Step<Verdict> {
    // 1 port
    let Some((net, port_mac, port_ip)) =
        t.ports.get(usize::from(in_port)).and_then(|p| Some((p.network?, p.mac, p.ip)))
    else {
        return Err(Verdict::Drop(D::UnknownPort));
    };
    // 2 admit
    let a = admit(frame.data(), t, in_port, net, port_mac)?;
    // 3 arp
    if a.etype == ethertype::ARP {
        return Ok(overlay::arp::proxy(frame, in_port, net, a.src, t));
    }
    // 4 flood
    if a.dst.is_multicast() {
        return Err(Verdict::Drop(D::BroadcastNotFlooded));
    }
    let nw = &t.networks[usize::from(net)];
    if a.etype == ethertype::IPV4 {
        // 5 ipv4
        let ip = ipv4(frame, &a, in_port, nw, port_ip, t, net)?;
        // 6 gateway
        if a.dst == nw.gateway_mac {
            return Ok(to_gateway(frame, in_port, net, nw, &ip, now, t, lb));
        }
        // 7 node
        if nw.node_mac == Some(a.dst) {
            return Ok(lb::to_node(frame, net, now, t, lb));
        }
    } else if frame.len() > usize::from(nw.mtu) + ethernet::HEADER_LEN {
        return Err(Verdict::Drop(D::Oversize));
    } else if a.dst == nw.gateway_mac {
        return Err(Verdict::Drop(D::NoRoute));
    }
    // 8 switch: padding after an IPv4 packet is trimmed first.
    if let Some(ip) = a.common {
        frame.truncate(ip.total + ethernet::HEADER_LEN);
    }
    match overlay::locate(t, net, a.dst) {
        Some(Location::Local(p)) if p == in_port => Err(Verdict::Drop(D::Hairpin)),
        _ => Ok(switch(frame, net, a.dst, now, t, lb)),
    }
}

/// What step 2 learns of a frame.
struct Admitted {
    /// The IPv4 facts if the frame is the common shape
    /// (`wire::frame::plain_ipv4`).
    common: Option<Ip4>,
    dst: MacAddr,
    src: MacAddr,
    etype: u16,
}

/// Step 2: nothing malformed is forwarded (every header up to the
/// transport header must parse; this also covers frames shorter than
/// Ethernet), nothing tagged, nothing from another MAC than the port's
/// endpoint.
#[inline(always)]
fn admit(d: &[u8], t: &Tables, in_port: PortId, net: NetId, port_mac: Option<MacAddr>) -> Step<Admitted> {
    let common = plain_ipv4(d).map(|(h, total)| Ip4 {
        total,
        df: h.dont_frag(),
        dst: Ipv4Addr::from(h.dst_ip()),
        protocol: h.protocol(),
        common_dport: Some(h.dst_port()),
    });
    let Some(h) = d.first_chunk::<14>().filter(|_| common.is_some() || parse_frame(d).is_ok()) else {
        let arp = d.get(12..14) == Some(&ethertype::ARP.to_be_bytes()[..]);
        return Err(Verdict::Drop(if arp { D::ArpMalformed } else { D::Malformed }));
    };
    let (dst, src) = macs(h);
    let etype = u16::from_be_bytes([h[12], h[13]]);
    if matches!(etype, ethertype::VLAN | ethertype::QINQ) {
        return Err(Verdict::Drop(D::VlanTagged));
    }
    let src_ok = match port_mac {
        Some(m) => m == src,
        None => overlay::locate(t, net, src) == Some(Location::Local(in_port)),
    };
    if !src_ok {
        return Err(Verdict::Drop(D::SrcMacSpoofed));
    }
    Ok(Admitted { common, dst, src, etype })
}

/// What the MTU and gateway checks need of an IPv4 packet.
#[derive(Clone, Copy)]
struct Ip4 {
    total: usize,
    df: bool,
    dst: Ipv4Addr,
    protocol: u8,
    /// The TCP/UDP destination port, for the common shape only (the only
    /// packets balanced).
    common_dport: Option<u16>,
}

/// Step 5: the IPv4 source is the endpoint's; no packet larger than the
/// network allows leaves a task port (its total length counts; padding
/// after it is trimmed later). A packet too large with DF is answered
/// with fragmentation-needed from the gateway.
#[inline(always)]
fn ipv4(
    frame: &mut Frame<'_>,
    a: &Admitted,
    in_port: PortId,
    nw: &Network,
    port_ip: Option<Ipv4Addr>,
    t: &Tables,
    net: NetId,
) -> Step<Ip4> {
    let d = frame.data();
    let ip = match a.common {
        Some(ip) => ip,
        None => match Ipv4Packet::new_checked(&d[ethernet::HEADER_LEN..]) {
            Ok(p) => Ip4 {
                total: p.total_len(),
                df: p.dont_frag(),
                dst: p.dst(),
                protocol: p.protocol(),
                common_dport: None,
            },
            Err(_) => return Err(Verdict::Drop(D::Malformed)),
        },
    };
    // At its fixed place with or without options (parsed in step 2).
    let src: [u8; 4] = d[field::SRC_IP].try_into().unwrap_or_default();
    let src_ip_ok = match port_ip {
        Some(a) => a.octets() == src,
        None => arp_lookup(t, net, Ipv4Addr::from(src)) == Some(a.src),
    };
    if !src_ip_ok {
        return Err(Verdict::Drop(D::SrcIpSpoofed));
    }
    let total = if frame.is_super() { frame.wire_len().saturating_sub(ethernet::HEADER_LEN) } else { ip.total };
    if total > usize::from(nw.mtu) {
        return Err(if ip.df { gateway::frag_needed(frame, in_port, nw) } else { Verdict::Drop(D::MtuExceeded) });
    }
    Ok(ip)
}

/// Step 6: a packet to the gateway MAC. Echo to the gateway's address is
/// answered; a DNS query to the gateway goes to the node's DNS server
/// (when the network has one, internal or not); a plain TCP/UDP packet (no options, not a fragment) to a
/// service VIP is balanced (proxy ARP answers VIPs with the gateway's
/// MAC); the reply of a `preserve-source` connection goes back toward its
/// client outside the network; an address outside every cluster network
/// leaves through this node (egress: `lb::egress`), but from an internal
/// network (no egress, counted apart); anything else has no route.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn to_gateway(
    frame: &mut Frame<'_>,
    in_port: PortId,
    net: NetId,
    nw: &Network,
    ip: &Ip4,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Verdict {
    if ip.protocol == protocol::ICMP && (ip.dst == nw.gateway_ip || t.services.is_vip(net, ip.dst)) {
        // The gateway answers ping for itself and for every VIP (as
        // Swarm's VIPs answer it): the reply comes from the address pinged.
        return gateway::echo(frame, in_port, nw);
    }
    if ip.dst == nw.gateway_ip
        && ip.common_dport == Some(53)
        && matches!(ip.protocol, protocol::TCP | protocol::UDP)
        && let Some(port) = nw.dns_port
    {
        // 6a: a query to the network's resolver (the gateway) goes to the
        // node's DNS server for this network, over the host link.
        frame.truncate(ip.total + ethernet::HEADER_LEN);
        let next = lb::egress::to_dns(frame, net, port, now, t, lb);
        return follow(frame, next, now, t, lb);
    }
    if ip.dst == nw.gateway_ip
        && ip.common_dport.is_some()
        && nw.has_services
        && let Some(next) = lb::egress::hairpin_back(frame, net, now, t, lb)
    {
        // 6b: a task's answer to a hairpin connection (its own service's
        // VIP balanced to itself), which came from the gateway.
        frame.truncate(ip.total + ethernet::HEADER_LEN);
        return follow(frame, next, now, t, lb);
    }
    if let Some(dport) = ip.common_dport
        && matches!(ip.protocol, protocol::TCP | protocol::UDP)
        && let Some(svc) = t.services.at(net, ip.dst.octets(), dport, ip.protocol)
    {
        frame.truncate(ip.total + ethernet::HEADER_LEN);
        let next = lb::to_vip(frame, net, svc, now, t, lb);
        return follow(frame, next, now, t, lb);
    }
    if nw.has_services
        && let Some(next) = lb::routed(frame, net, now, t, lb)
    {
        return follow(frame, next, now, t, lb);
    }
    if nw.internal && !t.in_any_network(ip.dst) {
        return Verdict::Drop(D::EgressInternal);
    }
    if ip.dst == t.data_ip
        && let Some(dport) = ip.common_dport
        && matches!(ip.protocol, protocol::TCP | protocol::UDP)
        && let Some(pubd) = t.services.published(dport, ip.protocol)
    {
        // 6c: a published port of this node: the routing mesh, the task
        // as its client, in `nat` mode whatever the port's (the task's
        // address is a cluster one: a backend would answer it directly).
        frame.truncate(ip.total + ethernet::HEADER_LEN);
        let pubd = Published { mode: MeshMode::Nat, ..pubd };
        let next = lb::from_client(frame, pubd, now, t, lb);
        return follow(frame, next, now, t, lb);
    }
    match lb::egress::from_task(frame, net, now, t, lb) {
        Some(lb::Next::TimeExceeded) => {
            let v = gateway::time_exceeded(frame, in_port, nw, || lb.icmp_allow(now));
            if matches!(v, Verdict::Tx(_)) {
                lb.egress.stats.time_exceeded += 1;
            }
            v
        }
        Some(next) => follow(frame, next, now, t, lb),
        None => Verdict::Drop(D::NoRoute),
    }
}
