//! The overlay switch: per-network forwarding from cluster state (no
//! flood-and-learn), VXLAN encapsulation toward remote VTEPs and
//! decapsulation from them, proxy ARP, and the network gateway's ICMP.

mod arp;
mod gateway;

use crate::pipeline::{DropReason, Frame, Verdict};
use crate::tables::{Location, PortId, Tables, UPLINK, ip_key, mac_key};
use crate::wire::ethernet::{self, ethertype};
use crate::wire::ipv4::{Ipv4Packet, protocol};
use crate::wire::vxlan::{self, Classified};
use crate::wire::{Layer, MacAddr, WireError, flow};
use core::net::Ipv4Addr;

#[inline]
fn macs(d: &[u8]) -> (MacAddr, MacAddr) {
    (MacAddr([d[0], d[1], d[2], d[3], d[4], d[5]]), MacAddr([d[6], d[7], d[8], d[9], d[10], d[11]]))
}

/// A frame from a task port.
#[inline]
pub(crate) fn from_task(frame: &mut Frame<'_>, in_port: PortId, t: &Tables) -> Verdict {
    use DropReason as D;
    let Some(net) = t.ports.get(usize::from(in_port)).and_then(|p| p.network) else {
        return Verdict::Drop(D::UnknownPort);
    };
    let d = frame.data();
    if d.len() < ethernet::HEADER_LEN {
        return Verdict::Drop(D::Malformed);
    }
    let (dst, src) = macs(d);
    let etype = u16::from_be_bytes([d[12], d[13]]);
    if matches!(etype, ethertype::VLAN | ethertype::QINQ) {
        return Verdict::Drop(D::VlanTagged);
    }
    if t.fdb.get(&mac_key(net, src)) != Some(&Location::Local(in_port)) {
        return Verdict::Drop(D::SrcMacSpoofed);
    }
    if etype == ethertype::ARP {
        return arp::proxy(frame, in_port, net, src, t);
    }
    if dst.is_multicast() {
        return Verdict::Drop(D::BroadcastNotFlooded);
    }
    let nw = &t.networks[usize::from(net)];
    // MTU: no frame larger than the network allows leaves a task port.
    if etype == ethertype::IPV4 {
        let Ok(ip) = Ipv4Packet::new_checked(&d[ethernet::HEADER_LEN..]) else {
            return Verdict::Drop(D::Malformed);
        };
        if ip.total_len() > usize::from(nw.mtu) {
            return if ip.dont_frag() {
                gateway::frag_needed(frame, in_port, nw)
            } else {
                Verdict::Drop(D::MtuExceeded)
            };
        }
        if dst == nw.gateway_mac {
            return if ip.dst() == nw.gateway_ip && ip.protocol() == protocol::ICMP {
                gateway::echo(frame, in_port, nw)
            } else {
                Verdict::Drop(D::NoRoute)
            };
        }
    } else if d.len() > usize::from(nw.mtu) + ethernet::HEADER_LEN {
        return Verdict::Drop(D::Oversize);
    } else if dst == nw.gateway_mac {
        return Verdict::Drop(D::NoRoute);
    }
    match t.fdb.get(&mac_key(net, dst)) {
        Some(&Location::Local(p)) if p == in_port => Verdict::Drop(D::Hairpin),
        Some(&Location::Local(p)) => Verdict::Tx(p),
        Some(&Location::Remote(i)) => encap(frame, t, i),
        None => Verdict::Drop(D::UnknownUnicast),
    }
}

/// Encapsulates the frame toward the VTEP of template `i`, into headroom.
#[inline]
fn encap(frame: &mut Frame<'_>, t: &Tables, i: u32) -> Verdict {
    let Some(tpl) = t.templates.get(i as usize) else {
        return Verdict::Drop(DropReason::UnknownUnicast);
    };
    if frame.headroom() < vxlan::ENCAP_LEN {
        return Verdict::Drop(DropReason::NoHeadroom);
    }
    let (start, len) = (frame.start(), frame.len());
    let port = vxlan::src_port_for_hash(flow::flow_hash(frame.data()));
    match tpl.write(frame.buf_mut(), start, len, port) {
        Ok(s) => {
            frame.set_window(s, len + vxlan::ENCAP_LEN);
            Verdict::Tx(UPLINK)
        }
        Err(_) => Verdict::Drop(DropReason::NoHeadroom),
    }
}

/// A frame from the uplink: VXLAN for us is validated and decapsulated to a
/// local port; anything else is the kernel's.
#[inline]
pub(crate) fn from_uplink(frame: &mut Frame<'_>, t: &Tables) -> Verdict {
    use DropReason as D;
    let d = match vxlan::classify(frame.data(), t.data_ip, t.vxlan_port) {
        Ok(Classified::Vxlan(d)) => d,
        Ok(Classified::NotVxlan) => return Verdict::Pass,
        Err(WireError::VxlanNoIFlag(_)) => return Verdict::Drop(D::VxlanNoIFlag),
        Err(WireError::Fragment(_)) => return Verdict::Drop(D::VxlanFragment),
        Err(WireError::Truncated { layer: Layer::Vxlan, .. }) => return Verdict::Drop(D::VxlanMalformed),
        // Malformed below VXLAN: not recognisably ours; the kernel decides.
        Err(_) => return Verdict::Pass,
    };
    let Some(&net) = t.by_vni.get(&d.vni) else {
        return Verdict::Drop(D::UnknownVni);
    };
    if !t.vteps.contains_key(&u32::from(d.outer_src)) {
        return Verdict::Drop(D::UnknownVtep);
    }
    let inner = &frame.data()[d.inner.clone()];
    let (dst, src) = macs(inner);
    if dst.is_multicast() {
        return Verdict::Drop(D::InnerBroadcast);
    }
    let out = match t.fdb.get(&mac_key(net, dst)) {
        Some(&Location::Local(p)) => p,
        _ => return Verdict::Drop(D::InnerDstNotLocal),
    };
    match t.fdb.get(&mac_key(net, src)) {
        Some(&Location::Remote(i)) if t.template_vtep.get(i as usize) == Some(&d.outer_src) => {}
        _ => return Verdict::Drop(D::InnerSrcSpoofed),
    }
    if inner.len() > usize::from(t.networks[usize::from(net)].mtu) + ethernet::HEADER_LEN {
        return Verdict::Drop(D::Oversize);
    }
    let start = frame.start() + d.inner.start;
    frame.set_window(start, d.inner.len());
    Verdict::Tx(out)
}

/// The MAC cluster state has for `ip` in network `net`.
#[inline]
pub(crate) fn arp_lookup(t: &Tables, net: crate::tables::NetId, ip: Ipv4Addr) -> Option<MacAddr> {
    t.arp.get(&ip_key(net, ip)).copied()
}
