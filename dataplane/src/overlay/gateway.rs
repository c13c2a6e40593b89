//! What the network gateway answers itself: ICMP echo (so `ping <gateway>`
//! works from a task) and ICMP fragmentation-needed for packets larger than
//! the network MTU with DF set (so path MTU discovery works through the
//! overlay). The routing mesh answers its clients' oversize packets with
//! the same error, from the published address (`pipeline::follow`).

use crate::packet::{DropReason, Frame, Verdict};
use crate::tables::{Network, PortId};
use crate::wire::MacAddr;
use crate::wire::ethernet::{self, ethertype};
use crate::wire::frame::{Head, field};
use crate::wire::icmpv4::{self, Icmpv4Packet};
use crate::wire::ipv4::{Ipv4Packet, Ipv4Repr, protocol};
use core::net::Ipv4Addr;

/// TTL of packets the gateway originates.
const TTL: u8 = 64;

/// Turns an ICMP echo request to the gateway into the reply, in place.
pub(crate) fn echo(frame: &mut Frame<'_>, in_port: PortId, nw: &Network) -> Verdict {
    use DropReason as D;
    let d = frame.data_mut();
    let Some(client) = Head::new(d).map(|h| h.src_mac()) else { return Verdict::Drop(D::Malformed) };
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut d[ethernet::HEADER_LEN..]) else {
        return Verdict::Drop(D::Malformed);
    };
    if ip.is_fragment() {
        // The gateway does not reassemble: a fragmented ping goes unanswered.
        return Verdict::Drop(D::NoRoute);
    }
    if !ip.verify_checksum() {
        return Verdict::Drop(D::Malformed);
    }
    {
        let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload()) else {
            return Verdict::Drop(D::Malformed);
        };
        if icmp.kind() != icmpv4::kind::ECHO_REQUEST || icmp.code() != 0 {
            return Verdict::Drop(D::NoRoute);
        }
        if !icmp.verify_checksum() {
            return Verdict::Drop(D::Malformed);
        }
    }
    // Swapping source and destination leaves the header checksum as it is.
    let (src, dst) = (ip.src(), ip.dst());
    ip.set_src(dst);
    ip.set_dst(src);
    ip.set_ttl(TTL);
    let Ok(mut icmp) = Icmpv4Packet::new_checked(ip.payload_mut()) else {
        return Verdict::Drop(D::Malformed);
    };
    icmp.set_kind(icmpv4::kind::ECHO_REPLY);
    let total = ethernet::HEADER_LEN + ip.total_len();
    d[field::DST_MAC].copy_from_slice(&client.0);
    d[field::SRC_MAC].copy_from_slice(&nw.gateway_mac.0);
    let start = frame.start();
    frame.set_window(start, total);
    frame.set_offload(crate::packet::Offload::NONE);
    Verdict::Tx(in_port)
}

/// Replaces an oversize IPv4 packet with DF set by an ICMP destination
/// unreachable / fragmentation needed (RFC 1191) from the gateway back to
/// the sender, quoting the original header and 8 bytes of payload, with the
/// network MTU as next-hop MTU.
pub(crate) fn frag_needed(frame: &mut Frame<'_>, in_port: PortId, nw: &Network) -> Verdict {
    let from = Origin { ip: nw.gateway_ip, mac: nw.gateway_mac, broadcast: Some(nw.broadcast()) };
    frag_needed_from(frame, in_port, from, nw.mtu, || true)
}

/// Where an ICMP error comes from: its source address and MAC, and the
/// broadcast address of the sender's subnet if it is known (a packet to it
/// or from it is never answered).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    /// The error's source address.
    pub ip: Ipv4Addr,
    /// The error's source MAC.
    pub mac: MacAddr,
    /// The subnet broadcast address, if any.
    pub broadcast: Option<Ipv4Addr>,
}

/// [`frag_needed`] from any address (`from`: the gateway for a task, the
/// published address for a routing-mesh client), out of `out_port` back to
/// the sender's MAC (its next hop), with next-hop MTU `mtu`. `allow` is the
/// rate limit, asked only once RFC 1122 lets the error be sent (as the
/// kernel's `icmp_send` checks before `icmpv4_xrlim_allow`): refused, the
/// packet is dropped as `icmp_rate_limited`.
pub(crate) fn frag_needed_from(
    frame: &mut Frame<'_>,
    out_port: PortId,
    from: Origin,
    mtu: u16,
    allow: impl FnOnce() -> bool,
) -> Verdict {
    let mtu = mtu.to_be_bytes();
    let what = (icmpv4::kind::DEST_UNREACHABLE, icmpv4::CODE_FRAG_NEEDED, [0, 0, mtu[0], mtu[1]]);
    error_from(frame, out_port, from, what, DropReason::MtuExceeded, allow)
}

/// Replaces an IPv4 packet whose TTL ran out at the gateway (egress) by an
/// ICMP time-exceeded from the gateway back to the task, as a router does
/// (`traceroute` from a task then shows the gateway as the first hop).
pub(crate) fn time_exceeded(
    frame: &mut Frame<'_>,
    in_port: PortId,
    nw: &Network,
    allow: impl FnOnce() -> bool,
) -> Verdict {
    let from = Origin { ip: nw.gateway_ip, mac: nw.gateway_mac, broadcast: Some(nw.broadcast()) };
    let what = (icmpv4::kind::TIME_EXCEEDED, icmpv4::CODE_TTL_EXCEEDED, [0; 4]);
    error_from(frame, in_port, from, what, DropReason::TtlExceeded, allow)
}

/// An ICMP error `(type, code, rest of header)` about the frame's IPv4
/// packet, written over it: from `from`, out of `out_port` back to the
/// sender's MAC, quoting the packet's header and 8 bytes. Where RFC 1122
/// forbids the error, the packet is dropped as `otherwise`; where the rate
/// limit `allow` refuses it, as `icmp_rate_limited`.
fn error_from(
    frame: &mut Frame<'_>,
    out_port: PortId,
    from: Origin,
    (kind, code, rest): (u8, u8, [u8; 4]),
    otherwise: DropReason,
    allow: impl FnOnce() -> bool,
) -> Verdict {
    use DropReason as D;
    let d = frame.data();
    let Some(client) = Head::new(d).map(|h| h.src_mac()) else { return Verdict::Drop(D::Malformed) };
    let Ok(ip) = Ipv4Packet::new_checked(&d[ethernet::HEADER_LEN..]) else {
        return Verdict::Drop(D::Malformed);
    };
    // RFC 1122 3.2.2: no ICMP error about an ICMP error, about a later
    // fragment, to a source that is not one host, or about a datagram to a
    // multicast or broadcast address.
    let src = ip.src();
    let not_one_host = src.is_unspecified() || src.is_broadcast() || src.is_multicast() || Some(src) == from.broadcast;
    let dst = ip.dst();
    let to_group = dst.is_broadcast() || dst.is_multicast() || Some(dst) == from.broadcast;
    let icmp_error = ip.protocol() == protocol::ICMP
        && !ip.is_later_fragment()
        && ip.payload().first().is_some_and(|k| !matches!(*k, icmpv4::kind::ECHO_REQUEST | icmpv4::kind::ECHO_REPLY));
    if ip.is_later_fragment() || not_one_host || to_group || icmp_error {
        return Verdict::Drop(otherwise);
    }
    if !allow() {
        return Verdict::Drop(D::IcmpRateLimited);
    }
    let mut quote = [0u8; 60 + 8];
    let qlen = (ip.header_len() + 8).min(ip.total_len());
    quote[..qlen].copy_from_slice(&ip.packet()[..qlen]);
    let sender = ip.src();

    let icmp_len = icmpv4::HEADER_LEN + qlen;
    let total = ethernet::HEADER_LEN + 20 + icmp_len;
    // The error is written over the original, in the same buffer; with a
    // tiny MTU and a long IPv4 header it can be longer than the original.
    if total > frame.capacity() {
        return Verdict::Drop(otherwise);
    }
    let start = frame.start();
    frame.set_window(start, total);
    frame.set_offload(crate::packet::Offload::NONE);
    let d = frame.data_mut();
    let ok = ethernet::emit_header(d, client, from.mac, ethertype::IPV4).is_ok()
        && Ipv4Repr {
            src: from.ip,
            dst: sender,
            protocol: protocol::ICMP,
            payload_len: icmp_len as u16,
            ttl: TTL,
            tos: 0,
            ident: 0,
            dont_frag: false,
        }
        .emit(&mut d[14..34])
        .is_ok()
        && icmpv4::emit_header(&mut d[34..], kind, code, rest).is_ok();
    if !ok {
        return Verdict::Drop(D::Malformed);
    }
    d[42..42 + qlen].copy_from_slice(&quote[..qlen]);
    match Icmpv4Packet::new_checked(&mut d[34..]) {
        Ok(mut icmp) => icmp.fill_checksum(),
        Err(_) => return Verdict::Drop(D::Malformed),
    }
    Verdict::Tx(out_port)
}
