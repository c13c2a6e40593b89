//! The overlay switch: per-network forwarding from cluster state (no
//! flood-and-learn), VXLAN encapsulation toward remote VTEPs and
//! decapsulation from them, proxy ARP, and the network gateway's ICMP.
//!
//! A leaf of the packet path: it reads the tables and rewrites frames, and
//! knows nothing of the balancer. The pipeline (`pipeline::task`,
//! `pipeline::uplink`) calls its steps in order and decides what follows.

pub(crate) mod arp;
pub(crate) mod fast;
pub(crate) mod gateway;

use crate::packet::{DropReason, Frame, PortId, UPLINK, Verdict};
use crate::tables::{Location, NetId, Tables, ip_key, mac_key};
use crate::wire::arp::ArpRepr;
use crate::wire::ethernet::{self, ethertype};
use crate::wire::frame::{macs, plain_ipv4};
use crate::wire::vxlan::{self, Classified};
use crate::wire::{Layer, MacAddr, WireError, flow, parse_frame};
use core::net::Ipv4Addr;

/// True if every header of the frame up to the transport header parses.
#[inline(always)]
pub(crate) fn well_formed(d: &[u8]) -> bool {
    plain_ipv4(d).is_some() || parse_frame(d).is_ok()
}

/// The MAC cluster state has for `ip` in network `net`.
#[inline]
pub(crate) fn arp_lookup(t: &Tables, net: NetId, ip: Ipv4Addr) -> Option<MacAddr> {
    t.arp.get(&ip_key(net, ip)).copied()
}

/// Where the forwarding table of network `net` has the endpoint with MAC
/// `mac`: a local port, a remote node's template, or nowhere.
#[inline(always)]
pub(crate) fn locate(t: &Tables, net: NetId, mac: MacAddr) -> Option<Location> {
    t.fdb.get(&mac_key(net, mac)).copied()
}

/// Encapsulates the frame (an untagged frame whose headers up to the
/// transport header parse) toward the VTEP of template `i`, with the outer
/// source port from the frame's own flow hash.
#[inline]
pub(crate) fn encap_flow(frame: &mut Frame<'_>, t: &Tables, i: u32) -> Verdict {
    let d = frame.data();
    let hash = match plain_ipv4(d) {
        Some((h, _)) => flow::hash_ipv4_at_fixed_offsets(flow::DEFAULT_SEED, h.through_ports()),
        None => flow::flow_hash(d),
    };
    encap(frame, t, i, hash)
}

/// Encapsulates the frame toward the VTEP of template `i`, into headroom,
/// with the outer source port from the inner flow's `hash`.
#[inline]
pub(crate) fn encap(frame: &mut Frame<'_>, t: &Tables, i: u32, hash: u32) -> Verdict {
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

/// Step one of a frame from the uplink: is it VXLAN for this node? `Ok`
/// with what the outer headers say, `Ok(None)` for a frame that is not the
/// overlay's, `Err` (exit) with the verdict for VXLAN that is broken: a
/// drop for VXLAN for us that is malformed, the kernel's for a frame
/// malformed below VXLAN (not recognisably ours).
#[inline]
pub(crate) fn classify(frame: &Frame<'_>, t: &Tables) -> Result<Option<vxlan::Decap>, Verdict> {
    use DropReason as D;
    match vxlan::classify(frame.data(), t.data_ip, t.vxlan_port) {
        Ok(Classified::Vxlan(d)) => Ok(Some(d)),
        Ok(Classified::NotVxlan) => Ok(None),
        Err(WireError::VxlanNoIFlag(_)) => Err(Verdict::Drop(D::VxlanNoIFlag)),
        Err(WireError::Fragment(_)) => Err(Verdict::Drop(D::VxlanFragment)),
        Err(WireError::BadChecksum(_)) => Err(Verdict::Drop(D::VxlanBadChecksum)),
        Err(WireError::Truncated { layer: Layer::Vxlan, .. }) => Err(Verdict::Drop(D::VxlanMalformed)),
        Err(_) => Err(Verdict::Pass),
    }
}

/// Where a decapsulated frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inner {
    /// To a local endpoint, on this port.
    Port(PortId),
    /// To this node's own MAC in the network (the routing mesh's replies).
    Node,
}

/// A VXLAN frame for us, checked and decapsulated (the frame's window is
/// now the inner frame).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decapped {
    /// The frame's network (from its VNI).
    pub(crate) net: NetId,
    /// The VTEP that sent it.
    pub(crate) outer_src: Ipv4Addr,
    /// Where it goes.
    pub(crate) to: Inner,
}

/// Step two of a VXLAN frame for us (`d`, from [`classify`]): a known VNI
/// and VTEP; an inner frame that parses; an inner broadcast answered from
/// state if it is an ARP request (the exit `Err(Tx)` back to the peer's
/// VTEP), else dropped; a unicast destination that is local (or this
/// node's own MAC in the network); an inner source behind exactly the VTEP
/// that sent it; no VLAN tag; inner ARP consistent with state; within the
/// network MTU. Then decapsulated. `Err` is the exit with its verdict.
#[inline(never)] // the general path: kept out of the fast paths' loop
pub(crate) fn decap(frame: &mut Frame<'_>, d: &vxlan::Decap, t: &Tables) -> Result<Decapped, Verdict> {
    use DropReason as D;
    let drop = |r| Err(Verdict::Drop(r));
    let Some(net) = t.net_of_vni(d.vni) else { return drop(D::UnknownVni) };
    if !t.vteps.contains_key(&u64::from(u32::from(d.outer_src))) {
        return drop(D::UnknownVtep);
    }
    let inner = &frame.data()[d.inner.clone()];
    let Some(h) = inner.first_chunk::<14>().filter(|_| well_formed(inner)) else {
        return drop(D::InnerMalformed);
    };
    let (dst, src) = macs(h);
    let behind_sender = |t: &Tables| match locate(t, net, src) {
        Some(Location::Remote(i)) if t.template_vtep.get(i as usize) == Some(&d.outer_src) => Some(i),
        _ => None,
    };
    if dst.is_multicast() {
        // A peer's broadcast ARP request (the kernel's VXLAN sends them to
        // every VTEP it knows): answered from cluster state, back to the
        // peer's VTEP. Nothing else is flooded.
        if u16::from_be_bytes([h[12], h[13]]) != ethertype::ARP {
            return drop(D::InnerBroadcast);
        }
        let Some(i) = behind_sender(t) else { return drop(D::InnerSrcSpoofed) };
        let start = frame.start() + d.inner.start;
        frame.set_window(start, d.inner.len());
        return Err(match arp::overlay(frame, net, src, t) {
            Ok(()) => encap(frame, t, i, flow::flow_hash(frame.data())),
            Err(r) => Verdict::Drop(r),
        });
    }
    // To this node's own MAC in the network: the routing mesh's replies.
    let to = if t.networks[usize::from(net)].node_mac == Some(dst) {
        Inner::Node
    } else {
        match locate(t, net, dst) {
            Some(Location::Local(p)) => Inner::Port(p),
            _ => return drop(D::InnerDstNotLocal),
        }
    };
    if behind_sender(t).is_none() {
        return drop(D::InnerSrcSpoofed);
    }
    match u16::from_be_bytes([h[12], h[13]]) {
        ethertype::VLAN | ethertype::QINQ => return drop(D::InnerVlanTagged),
        // Peers that run their own ARP over the overlay (the kernel's VXLAN
        // does) are heard only when they say what cluster state says.
        ethertype::ARP => match ArpRepr::parse(&inner[ethernet::HEADER_LEN..]) {
            Ok(a) if a.sender_mac == src && arp_lookup(t, net, a.sender_ip) == Some(src) => {}
            _ => return drop(D::InnerArpSpoofed),
        },
        _ => {}
    }
    let inner_len = if frame.is_super() { frame.wire_len().saturating_sub(d.inner.start) } else { inner.len() };
    if inner_len > usize::from(t.networks[usize::from(net)].mtu) + ethernet::HEADER_LEN {
        return drop(D::Oversize);
    }
    let start = frame.start() + d.inner.start;
    frame.set_window(start, d.inner.len());
    Ok(Decapped { net, outer_src: d.outer_src, to })
}
