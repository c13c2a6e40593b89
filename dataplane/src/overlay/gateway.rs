//! What the network gateway answers itself: ICMP echo (so `ping <gateway>`
//! works from a task) and ICMP fragmentation-needed for packets larger than
//! the network MTU with DF set (so path MTU discovery works through the
//! overlay).

use crate::packet::{DropReason, Frame, Verdict};
use crate::tables::{Network, PortId};
use crate::wire::ethernet::{self, ethertype};
use crate::wire::frame::{Head, field};
use crate::wire::icmpv4::{self, Icmpv4Packet};
use crate::wire::ipv4::{Ipv4Packet, Ipv4Repr, protocol};

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
    let not_one_host = src.is_unspecified() || src.is_broadcast() || src.is_multicast() || src == nw.broadcast();
    let dst = ip.dst();
    let to_group = dst.is_broadcast() || dst.is_multicast() || dst == nw.broadcast();
    let icmp_error = ip.protocol() == protocol::ICMP
        && !ip.is_later_fragment()
        && ip.payload().first().is_some_and(|k| !matches!(*k, icmpv4::kind::ECHO_REQUEST | icmpv4::kind::ECHO_REPLY));
    if ip.is_later_fragment() || not_one_host || to_group || icmp_error {
        return Verdict::Drop(D::MtuExceeded);
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
        return Verdict::Drop(D::MtuExceeded);
    }
    let start = frame.start();
    frame.set_window(start, total);
    frame.set_offload(crate::packet::Offload::NONE);
    let d = frame.data_mut();
    let mtu = nw.mtu.to_be_bytes();
    let ok = ethernet::emit_header(d, client, nw.gateway_mac, ethertype::IPV4).is_ok()
        && Ipv4Repr {
            src: nw.gateway_ip,
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
        && icmpv4::emit_header(
            &mut d[34..],
            icmpv4::kind::DEST_UNREACHABLE,
            icmpv4::CODE_FRAG_NEEDED,
            [0, 0, mtu[0], mtu[1]],
        )
        .is_ok();
    if !ok {
        return Verdict::Drop(D::Malformed);
    }
    d[42..42 + qlen].copy_from_slice(&quote[..qlen]);
    match Icmpv4Packet::new_checked(&mut d[34..]) {
        Ok(mut icmp) => icmp.fill_checksum(),
        Err(_) => return Verdict::Drop(D::Malformed),
    }
    Verdict::Tx(in_port)
}
