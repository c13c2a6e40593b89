//! The overlay switch: per-network forwarding from cluster state (no
//! flood-and-learn), VXLAN encapsulation toward remote VTEPs and
//! decapsulation from them, proxy ARP, and the network gateway's ICMP.

mod arp;
pub(crate) mod fast;
mod gateway;

use crate::lb::LbState;
use crate::pipeline::{DropReason, Frame, Verdict};
use crate::tables::{Location, NetId, PortId, Tables, UPLINK, ip_key, mac_key};
use crate::wire::arp::ArpRepr;
use crate::wire::ethernet::{self, ethertype};
use crate::wire::ipv4::{Ipv4Packet, protocol};
use crate::wire::vxlan::{self, Classified};
use crate::wire::{Layer, MacAddr, WireError, flow, parse_frame};
use core::net::Ipv4Addr;

#[inline(always)]
fn macs(h: &[u8; 14]) -> (MacAddr, MacAddr) {
    (MacAddr([h[0], h[1], h[2], h[3], h[4], h[5]]), MacAddr([h[6], h[7], h[8], h[9], h[10], h[11]]))
}

/// What the MTU and gateway checks need of an IPv4 packet.
#[derive(Clone, Copy)]
struct Ip4 {
    total: usize,
    df: bool,
    dst: Ipv4Addr,
    protocol: u8,
}

/// Validates the common frame, untagged IPv4 without options carrying an
/// unfragmented TCP, UDP or ICMP packet, at fixed offsets, exactly as far
/// as [`parse_frame`] would; `None` means "ask `parse_frame`".
#[inline(always)]
fn ipv4_fast(d: &[u8]) -> Option<Ip4> {
    let h = d.first_chunk::<34>()?;
    if h[12] != 0x08 || h[13] != 0x00 || h[14] != 0x45 || h[20] & 0x3f != 0 || h[21] != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([h[16], h[17]]));
    if total + ethernet::HEADER_LEN > d.len() {
        return None;
    }
    let ok = fast::transport_ok(d, ethernet::HEADER_LEN, total);
    ok.then(|| Ip4 { total, df: h[20] & 0x40 != 0, dst: Ipv4Addr::new(h[30], h[31], h[32], h[33]), protocol: h[23] })
}

/// True if every header of the frame up to the transport header parses.
#[inline(always)]
fn well_formed(d: &[u8]) -> bool {
    ipv4_fast(d).is_some() || parse_frame(d).is_ok()
}

/// A frame from a task port.
#[inline(never)] // the general path: kept out of the fast paths' loop
pub(crate) fn from_task(frame: &mut Frame<'_>, in_port: PortId, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    use DropReason as D;
    let Some((net, port_mac, port_ip)) =
        t.ports.get(usize::from(in_port)).and_then(|p| Some((p.network?, p.mac, p.ip)))
    else {
        return Verdict::Drop(D::UnknownPort);
    };
    let d = frame.data();
    // Nothing malformed is forwarded: every header up to the transport
    // header must parse (this also covers frames shorter than Ethernet).
    let fast = ipv4_fast(d);
    let Some(h) = d.first_chunk::<14>().filter(|_| fast.is_some() || parse_frame(d).is_ok()) else {
        let arp = d.get(12..14) == Some(&ethertype::ARP.to_be_bytes()[..]);
        return Verdict::Drop(if arp { D::ArpMalformed } else { D::Malformed });
    };
    let (dst, src) = macs(h);
    let etype = u16::from_be_bytes([d[12], d[13]]);
    if matches!(etype, ethertype::VLAN | ethertype::QINQ) {
        return Verdict::Drop(D::VlanTagged);
    }
    let src_ok = match port_mac {
        Some(m) => m == src,
        None => t.fdb.get(&mac_key(net, src)) == Some(&Location::Local(in_port)),
    };
    if !src_ok {
        return Verdict::Drop(D::SrcMacSpoofed);
    }
    if etype == ethertype::ARP {
        return arp::proxy(frame, in_port, net, src, t);
    }
    if dst.is_multicast() {
        return Verdict::Drop(D::BroadcastNotFlooded);
    }
    let nw = &t.networks[usize::from(net)];
    // MTU: no frame larger than the network allows leaves a task port. For
    // IPv4 the packet's total length counts; bytes after it (Ethernet
    // padding) are trimmed before the frame is forwarded.
    if etype == ethertype::IPV4 {
        let ip = match fast {
            Some(ip) => ip,
            None => match Ipv4Packet::new_checked(&d[ethernet::HEADER_LEN..]) {
                Ok(p) => Ip4 { total: p.total_len(), df: p.dont_frag(), dst: p.dst(), protocol: p.protocol() },
                Err(_) => return Verdict::Drop(D::Malformed),
            },
        };
        let src_ip_ok = match port_ip {
            Some(a) => a.octets() == [d[26], d[27], d[28], d[29]],
            None => arp_lookup(t, net, Ipv4Addr::new(d[26], d[27], d[28], d[29])) == Some(src),
        };
        if !src_ip_ok {
            return Verdict::Drop(D::SrcIpSpoofed);
        }
        if ip.total > usize::from(nw.mtu) {
            return if ip.df { gateway::frag_needed(frame, in_port, nw) } else { Verdict::Drop(D::MtuExceeded) };
        }
        if dst == nw.gateway_mac {
            if ip.dst == nw.gateway_ip && ip.protocol == protocol::ICMP {
                return gateway::echo(frame, in_port, nw);
            }
            // To a service VIP (proxy ARP answers VIPs with the gateway's
            // MAC): balanced. Only plain IPv4 (no options, not a fragment)
            // is balanced; anything else to a VIP has no route.
            if let Some(f) = fast
                && matches!(ip.protocol, protocol::TCP | protocol::UDP)
                && let Some(svc) = t.services.at(net, ip.dst.octets(), u16::from_be_bytes([d[36], d[37]]), ip.protocol)
            {
                if f.total + ethernet::HEADER_LEN < frame.len() {
                    let start = frame.start();
                    frame.set_window(start, f.total + ethernet::HEADER_LEN);
                }
                return crate::lb::to_vip(frame, net, svc, now, t, lb);
            }
            // The reply of a preserve-source connection, to its client
            // outside the network.
            if nw.has_services
                && let Some(v) = crate::lb::routed(frame, net, now, t, lb)
            {
                return v;
            }
            return Verdict::Drop(D::NoRoute);
        }
        if nw.node_mac == Some(dst) {
            // To this node's own address in the network: the routing
            // mesh's replies.
            return crate::lb::to_node(frame, net, now, t, lb);
        }
    } else if d.len() > usize::from(nw.mtu) + ethernet::HEADER_LEN {
        return Verdict::Drop(D::Oversize);
    } else if dst == nw.gateway_mac {
        return Verdict::Drop(D::NoRoute);
    }
    if let Some(ip) = fast
        && ip.total + ethernet::HEADER_LEN < frame.len()
    {
        let start = frame.start();
        frame.set_window(start, ip.total + ethernet::HEADER_LEN);
    }
    match t.fdb.get(&mac_key(net, dst)) {
        Some(&Location::Local(p)) if p == in_port => Verdict::Drop(D::Hairpin),
        _ => switch(frame, net, dst, now, t, lb),
    }
}

/// Sends a frame of network `net` to the endpoint with MAC `dst`: to its
/// local port (reversing a balanced connection's reply on the way, in a
/// network with services), or encapsulated to its node. The frame is an
/// untagged frame whose headers up to the transport header parse.
#[inline]
pub(crate) fn switch(
    frame: &mut Frame<'_>,
    net: NetId,
    dst: MacAddr,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Verdict {
    match t.fdb.get(&mac_key(net, dst)) {
        Some(&Location::Local(p)) => deliver(frame, net, p, None, now, t, lb),
        Some(&Location::Remote(i)) => {
            let d = frame.data();
            let hash = match d.first_chunk::<38>() {
                Some(h) if ipv4_fast(d).is_some() => flow::hash_ipv4_at_fixed_offsets(flow::DEFAULT_SEED, h),
                _ => flow::flow_hash(d),
            };
            encap(frame, t, i, hash)
        }
        None => Verdict::Drop(DropReason::UnknownUnicast),
    }
}

/// Hands a frame to local port `p` of network `net` (`outer_src`: the VTEP
/// it came from over VXLAN, if it did); in a network with services, the
/// balancer sees it first (see `lb::on_delivery`).
#[inline]
fn deliver(
    frame: &mut Frame<'_>,
    net: NetId,
    p: PortId,
    outer_src: Option<Ipv4Addr>,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Verdict {
    let has_services = t.networks.get(usize::from(net)).is_some_and(|n| n.has_services);
    if has_services && !crate::lb::on_delivery(frame, net, outer_src, now, t, lb) {
        return Verdict::Drop(DropReason::Malformed);
    }
    Verdict::Tx(p)
}

/// Encapsulates the frame toward the VTEP of template `i`, into headroom,
/// with the outer source port from the inner flow's `hash`.
#[inline]
fn encap(frame: &mut Frame<'_>, t: &Tables, i: u32, hash: u32) -> Verdict {
    let Some(tpl) = t.templates.get(i as usize) else {
        return Verdict::Drop(DropReason::UnknownUnicast);
    };
    if frame.headroom() < vxlan::ENCAP_LEN {
        return Verdict::Drop(DropReason::NoHeadroom);
    }
    let (start, len) = (frame.start(), frame.len());
    let port = vxlan::src_port_for_hash(hash);
    match tpl.write(frame.buf_mut(), start, len, port) {
        Ok(s) => {
            frame.set_window(s, len + vxlan::ENCAP_LEN);
            Verdict::Tx(UPLINK)
        }
        Err(_) => Verdict::Drop(DropReason::NoHeadroom),
    }
}

/// A frame from the uplink: VXLAN for us is validated and decapsulated to a
/// local port; an ARP request for the data-path address is answered; a
/// published port goes to the routing mesh; anything else is the kernel's.
#[inline(never)] // the general path: kept out of the fast paths' loop
pub(crate) fn from_uplink(frame: &mut Frame<'_>, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    use DropReason as D;
    let d = match vxlan::classify(frame.data(), t.data_ip, t.vxlan_port) {
        Ok(Classified::Vxlan(d)) => d,
        Ok(Classified::NotVxlan) => {
            return arp::uplink(frame, t)
                .or_else(|| published(frame, now, t, lb))
                .or_else(|| refuse(frame, t))
                .unwrap_or(Verdict::Pass);
        }
        Err(WireError::VxlanNoIFlag(_)) => return Verdict::Drop(D::VxlanNoIFlag),
        Err(WireError::Fragment(_)) => return Verdict::Drop(D::VxlanFragment),
        Err(WireError::BadChecksum(_)) => return Verdict::Drop(D::VxlanBadChecksum),
        Err(WireError::Truncated { layer: Layer::Vxlan, .. }) => return Verdict::Drop(D::VxlanMalformed),
        // Malformed below VXLAN: not recognisably ours; the kernel decides.
        Err(_) => return Verdict::Pass,
    };
    let Some(net) = t.net_of_vni(d.vni) else {
        return Verdict::Drop(D::UnknownVni);
    };
    if !t.vteps.contains_key(&u64::from(u32::from(d.outer_src))) {
        return Verdict::Drop(D::UnknownVtep);
    }
    let inner = &frame.data()[d.inner.clone()];
    let Some(h) = inner.first_chunk::<14>().filter(|_| well_formed(inner)) else {
        return Verdict::Drop(D::InnerMalformed);
    };
    let (dst, src) = macs(h);
    if dst.is_multicast() {
        // A peer's broadcast ARP request (the kernel's VXLAN sends them to
        // every VTEP it knows): answered from cluster state, back to the
        // peer's VTEP. Nothing else is flooded.
        if u16::from_be_bytes([h[12], h[13]]) != ethertype::ARP {
            return Verdict::Drop(D::InnerBroadcast);
        }
        return match t.fdb.get(&mac_key(net, src)) {
            Some(&Location::Remote(i)) if t.template_vtep.get(i as usize) == Some(&d.outer_src) => {
                let start = frame.start() + d.inner.start;
                frame.set_window(start, d.inner.len());
                match arp::overlay(frame, net, src, t) {
                    Ok(()) => encap(frame, t, i, flow::flow_hash(frame.data())),
                    Err(r) => Verdict::Drop(r),
                }
            }
            _ => Verdict::Drop(D::InnerSrcSpoofed),
        };
    }
    // To this node's own MAC in the network: the routing mesh's replies.
    let to_node = t.networks[usize::from(net)].node_mac == Some(dst);
    let out = match t.fdb.get(&mac_key(net, dst)) {
        Some(&Location::Local(p)) => p,
        _ if to_node => UPLINK,
        _ => return Verdict::Drop(D::InnerDstNotLocal),
    };
    match t.fdb.get(&mac_key(net, src)) {
        Some(&Location::Remote(i)) if t.template_vtep.get(i as usize) == Some(&d.outer_src) => {}
        _ => return Verdict::Drop(D::InnerSrcSpoofed),
    }
    match u16::from_be_bytes([h[12], h[13]]) {
        ethertype::VLAN | ethertype::QINQ => return Verdict::Drop(D::InnerVlanTagged),
        // Peers that run their own ARP over the overlay (the kernel's VXLAN
        // does) are heard only when they say what cluster state says.
        ethertype::ARP => match ArpRepr::parse(&inner[ethernet::HEADER_LEN..]) {
            Ok(a) if a.sender_mac == src && arp_lookup(t, net, a.sender_ip) == Some(src) => {}
            _ => return Verdict::Drop(D::InnerArpSpoofed),
        },
        _ => {}
    }
    if inner.len() > usize::from(t.networks[usize::from(net)].mtu) + ethernet::HEADER_LEN {
        return Verdict::Drop(D::Oversize);
    }
    let start = frame.start() + d.inner.start;
    frame.set_window(start, d.inner.len());
    if to_node {
        return crate::lb::to_node(frame, net, now, t, lb);
    }
    deliver(frame, net, out, Some(d.outer_src), now, t, lb)
}

/// A frame from the uplink that is not VXLAN: TCP or UDP to this node's
/// data-path address and a published port goes to the routing mesh
/// (`None` for anything else: the kernel's).
fn published(frame: &mut Frame<'_>, now: u64, t: &Tables, lb: &mut LbState) -> Option<Verdict> {
    let d = frame.data();
    let ip = ipv4_fast(d)?;
    if ip.dst != t.data_ip || !matches!(ip.protocol, protocol::TCP | protocol::UDP) {
        return None;
    }
    let pubd = t.services.published(u16::from_be_bytes([d[36], d[37]]), ip.protocol)?;
    if ip.total + ethernet::HEADER_LEN < frame.len() {
        let start = frame.start();
        frame.set_window(start, ip.total + ethernet::HEADER_LEN);
    }
    Some(crate::lb::from_client(frame, pubd, now, t, lb))
}

/// A TCP segment to this node's data-path address that no published port
/// takes (the service was removed, or never was): answered with a reset
/// back to the sender, as a host's stack answers a closed port (RFC 9293,
/// 3.10.7.1), so the client is refused at once instead of timing out.
/// Only a well-formed segment with a valid checksum and no RST flag of
/// its own gets one (a reset never answers a reset). Only on nodes whose
/// kernel does not hold the data-path address (TAP I/O:
/// `reset_closed_ports`); with AF_XDP the kernel gets these segments and
/// answers them itself. `None` (the kernel's) for anything else.
fn refuse(frame: &mut Frame<'_>, t: &Tables) -> Option<Verdict> {
    use crate::wire::checksum;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    const SYN: u8 = 0x02;
    const FIN: u8 = 0x01;
    if !t.reset_closed_ports {
        return None;
    }
    let d = frame.data();
    let ip = ipv4_fast(d)?;
    if ip.dst != t.data_ip || ip.protocol != protocol::TCP {
        return None;
    }
    let src = Ipv4Addr::new(d[26], d[27], d[28], d[29]);
    let seg = crate::wire::tcp::TcpPacket::new_checked(d.get(34..ethernet::HEADER_LEN + ip.total)?).ok()?;
    if seg.flags() & RST != 0 || !seg.verify_checksum_v4(src, ip.dst) || src.is_broadcast() || src.is_multicast() {
        return None;
    }
    let (sport, dport, flags) = (seg.src_port(), seg.dst_port(), seg.flags());
    // RFC 9293: to a segment with ACK, a reset with SEQ = its ACK; else a
    // reset with ACK = its SEQ + its length (SYN and FIN count one each).
    let (seq, ack, out_flags) = if flags & ACK != 0 {
        (seg.ack(), 0, RST)
    } else {
        let len = seg.payload().len() as u32 + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
        (0, seg.seq().wrapping_add(len), RST | ACK)
    };
    let peer_mac: [u8; 6] = d[6..12].try_into().ok()?;
    let (buf, start, _) = frame.parts();
    let out = buf.get_mut(start..start + 54)?;
    out[0..6].copy_from_slice(&peer_mac);
    out[6..12].copy_from_slice(&t.data_mac.0);
    out[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
    // IPv4: 20 bytes, total 40, DF, TTL 64.
    out[14..34].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, protocol::TCP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    out[26..30].copy_from_slice(&ip.dst.octets());
    out[30..34].copy_from_slice(&src.octets());
    let ipsum = checksum::checksum(&out[14..34]);
    out[24..26].copy_from_slice(&ipsum.to_be_bytes());
    // TCP: 20 bytes, window 0.
    out[34..36].copy_from_slice(&dport.to_be_bytes());
    out[36..38].copy_from_slice(&sport.to_be_bytes());
    out[38..42].copy_from_slice(&seq.to_be_bytes());
    out[42..46].copy_from_slice(&ack.to_be_bytes());
    out[46..54].copy_from_slice(&[0x50, out_flags, 0, 0, 0, 0, 0, 0]);
    let sum = checksum::sum(&out[34..54], checksum::pseudo_header_v4(ip.dst, src, protocol::TCP, 20));
    out[50..52].copy_from_slice(&checksum::finish(sum).to_be_bytes());
    frame.set_window(start, 54);
    Some(Verdict::Tx(UPLINK))
}

/// The MAC cluster state has for `ip` in network `net`.
#[inline]
pub(crate) fn arp_lookup(t: &Tables, net: crate::tables::NetId, ip: Ipv4Addr) -> Option<MacAddr> {
    t.arp.get(&ip_key(net, ip)).copied()
}
