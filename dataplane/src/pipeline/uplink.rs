//! The path of a frame from the uplink (the data-path NIC), top to bottom.
//!
//! ```text
//! fast   overlay::fast::uplink_vxlan  VXLAN from a known VTEP, unicast IPv4 to a local endpoint → Tx(port)
//!        anything else, or anything it doubts: the general path below
//! 1 classify   VXLAN for us, or not             drop vxlan_no_i_flag, vxlan_fragment, vxlan_bad_checksum,
//!                                               vxlan_malformed; Pass (malformed below VXLAN)
//!   not VXLAN:
//!   2a arp       ARP request for our address    Tx(uplink) reply
//!   2b egress    to the egress address: a reply lb::egress::from_outside → Tx(task port) (DNAT back;
//!                (TCP/UDP to the range, echo    ICMP errors translated with their quote); drop
//!                reply, ICMP error quoting us)  egress_no_connection
//!   2c published TCP/UDP to a published port    lb::from_client (routing mesh) → switch (SYN's MSS
//!                                               clamped); over the network MTU with DF: Tx(uplink)
//!                                               frag-needed from data_ip; drop icmp_rate_limited,
//!                                               mtu_exceeded (no DF)
//!   2d refuse    TCP to a closed port (TAP)     Tx(uplink) reset
//!   2e kernel    anything else                  Pass
//!   VXLAN:
//!   3 decap      VNI, VTEP, inner frame         drop unknown_vni, unknown_vtep, inner_*, oversize;
//!                                               Tx(uplink) answer to an inner ARP broadcast
//!   4 deliver    to a local endpoint            pipeline::deliver (balanced replies reversed)
//!              or to this node's own MAC        lb::to_node (routing-mesh replies)
//! ```

use super::{deliver, follow};
use crate::lb::{self, LbState};
use crate::overlay::fast::BurstCache;
use crate::overlay::{self, Inner};
use crate::packet::{Frame, UPLINK, Verdict};
use crate::tables::Tables;
use crate::wire::ethernet;
use crate::wire::frame::plain_ipv4;
use crate::wire::ipv4::protocol;
use crate::wire::tcp::{ResetRepr, TcpPacket};
use core::net::Ipv4Addr;

/// A frame from the uplink: the fast path (with `FAST`), then the general
/// path.
#[inline(always)]
pub(super) fn decide<const FAST: bool>(
    frame: &mut Frame<'_>,
    now: u64,
    t: &Tables,
    cache: &mut BurstCache<'_>,
    lb: &mut LbState,
) -> Verdict {
    if FAST && let Some(v) = overlay::fast::uplink_vxlan(frame, t, cache) {
        return v;
    }
    from_uplink(frame, now, t, lb)
}

/// The general path of a frame from the uplink (see the module's map).
#[inline(never)] // the general path: kept out of the fast paths' loop
pub(super) fn from_uplink(frame: &mut Frame<'_>, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    // 1 classify
    let vx = match overlay::classify(frame, t) {
        Ok(Some(vx)) => vx,
        // 2 not VXLAN
        Ok(None) => {
            return overlay::arp::uplink(frame, t)
                .or_else(|| lb::egress::from_outside(frame, now, t, lb))
                .or_else(|| published(frame, now, t, lb))
                .or_else(|| refuse(frame, t))
                .unwrap_or(Verdict::Pass);
        }
        Err(exit) => return exit,
    };
    // 3 decap
    let inner = match overlay::decap(frame, &vx, t) {
        Ok(inner) => inner,
        Err(exit) => return exit,
    };
    // 4 deliver
    match inner.to {
        Inner::Node => lb::to_node(frame, inner.net, now, t, lb),
        Inner::Port(p) => deliver(frame, inner.net, p, Some(inner.outer_src), now, t, lb),
    }
}

/// Step 2c: TCP or UDP to this node's data-path address and a published
/// port goes to the routing mesh (`None` for anything else).
fn published(frame: &mut Frame<'_>, now: u64, t: &Tables, lb: &mut LbState) -> Option<Verdict> {
    let (h, total) = plain_ipv4(frame.data())?;
    if !t.is_mesh_addr(Ipv4Addr::from(h.dst_ip())) || !matches!(h.protocol(), protocol::TCP | protocol::UDP) {
        return None;
    }
    let pubd = t.services.published(h.dst_port(), h.protocol())?;
    frame.truncate(total + ethernet::HEADER_LEN);
    let next = lb::from_client(frame, pubd, now, t, lb);
    Some(follow(frame, next, now, t, lb))
}

/// Step 2d: a TCP segment to this node's data-path address that no
/// published port takes (the service was removed, or never was) is
/// answered with a reset back to the sender, as a host's stack answers a
/// closed port (RFC 9293, 3.10.7.1), so the client is refused at once
/// instead of timing out. Only a well-formed segment with a valid checksum
/// and no RST flag of its own gets one (a reset never answers a reset).
/// Only on nodes whose kernel does not hold the data-path address (TAP
/// I/O: `reset_closed_ports`); with AF_XDP the kernel gets these segments
/// and answers them itself. `None` (the kernel's) for anything else.
fn refuse(frame: &mut Frame<'_>, t: &Tables) -> Option<Verdict> {
    if !t.reset_closed_ports {
        return None;
    }
    let d = frame.data();
    let (h, total) = plain_ipv4(d)?;
    if h.dst_ip() != t.data_ip.octets() || h.protocol() != protocol::TCP {
        return None;
    }
    let src = Ipv4Addr::from(h.src_ip());
    let seg = TcpPacket::new_checked(d.get(ethernet::HEADER_LEN + 20..ethernet::HEADER_LEN + total)?).ok()?;
    if !seg.verify_checksum_v4(src, t.data_ip) || src.is_broadcast() || src.is_multicast() {
        return None;
    }
    let rst = ResetRepr::answering(&seg)?;
    let peer_mac = h.src_mac();
    let (buf, start, _) = frame.parts();
    let out = buf.get_mut(start..)?.first_chunk_mut::<{ ResetRepr::FRAME_LEN }>()?;
    rst.emit_frame(out, t.data_mac.0, peer_mac.0, t.data_ip, src);
    frame.set_window(start, ResetRepr::FRAME_LEN);
    frame.set_offload(crate::packet::Offload::NONE);
    Some(Verdict::Tx(UPLINK))
}
