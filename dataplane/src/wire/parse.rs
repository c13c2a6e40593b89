//! One pass over a frame: where each layer starts and ends, and the few
//! fields classification needs. Every offset it reports lies within the
//! frame; the `wire_parse` fuzz target checks that.

use super::arp::{ArpRepr, Operation};
use super::error::WireError;
use super::ethernet::{EthernetFrame, ethertype};
use super::icmpv4::Icmpv4Packet;
use super::ipv4::{Ipv4Packet, protocol};
use super::ipv6::Ipv6Packet;
use super::tcp::TcpPacket;
use super::udp::UdpPacket;

/// Fragment status of an IP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fragment {
    /// A whole datagram.
    #[default]
    No,
    /// The first fragment: the transport header is here, its payload is not all here.
    First,
    /// A later fragment: no transport header.
    Later,
}

/// The network layer of a parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    /// ARP for IPv4 over Ethernet (validated; read it with [`ArpRepr::parse`]).
    Arp {
        /// Request, reply or other.
        operation: Operation,
    },
    /// IPv4.
    Ipv4 {
        /// Header length, options included.
        header_len: usize,
        /// Payload protocol.
        protocol: u8,
        /// Fragment status.
        fragment: Fragment,
    },
    /// IPv6.
    Ipv6 {
        /// Upper-layer protocol after extension headers.
        protocol: u8,
        /// Fragment status.
        fragment: Fragment,
    },
    /// An EtherType meshplane does not look into.
    Other,
}

/// The transport layer of a parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// TCP.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Flag bits.
        flags: u8,
        /// Header length, options included.
        header_len: usize,
    },
    /// ICMPv4.
    Icmpv4 {
        /// Type.
        kind: u8,
        /// Code.
        code: u8,
    },
    /// Another protocol, or none found (later fragment, ESP, ...).
    Other,
}

/// Offsets and fields of a parsed frame.
///
/// Invariant: `l3_offset <= l3_end <= frame.len()`, and if `l4_offset` is
/// `Some(o)` then `l3_offset <= o <= l3_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Innermost VLAN id, if tagged.
    pub vlan: Option<u16>,
    /// EtherType after VLAN tags.
    pub ethertype: u16,
    /// Where the network header starts (the Ethernet header length).
    pub l3_offset: usize,
    /// Where the network packet ends (Ethernet padding excluded; the frame
    /// length for non-IP).
    pub l3_end: usize,
    /// The network layer.
    pub l3: L3,
    /// Where the transport header starts, if there is one.
    pub l4_offset: Option<usize>,
    /// The transport layer.
    pub l4: L4,
}

/// Parses a frame from Ethernet to the transport header. Any malformed
/// header on the way is an error; protocols meshplane does not read end the
/// walk as `Other`.
#[inline]
pub fn parse_frame(frame: &[u8]) -> Result<Parsed, WireError> {
    let eth = EthernetFrame::new_checked(frame)?;
    let l3_offset = eth.header_len();
    let mut out = Parsed {
        vlan: eth.vlan_id(),
        ethertype: eth.ethertype(),
        l3_offset,
        l3_end: frame.len(),
        l3: L3::Other,
        l4_offset: None,
        l4: L4::Other,
    };
    let (proto, l4_rel, l4_bytes) = match eth.ethertype() {
        ethertype::ARP => {
            out.l3 = L3::Arp { operation: ArpRepr::parse(eth.payload())?.operation };
            return Ok(out);
        }
        ethertype::IPV4 => {
            let ip = Ipv4Packet::new_checked(eth.payload())?;
            let fragment = match (ip.is_fragment(), ip.is_later_fragment()) {
                (false, _) => Fragment::No,
                (true, false) => Fragment::First,
                (true, true) => Fragment::Later,
            };
            out.l3 = L3::Ipv4 { header_len: ip.header_len(), protocol: ip.protocol(), fragment };
            out.l3_end = l3_offset + ip.total_len();
            if fragment == Fragment::Later {
                return Ok(out);
            }
            (ip.protocol(), ip.header_len(), &frame[l3_offset + ip.header_len()..out.l3_end])
        }
        ethertype::IPV6 => {
            let ip = Ipv6Packet::new_checked(eth.payload())?;
            out.l3_end = l3_offset + super::ipv6::HEADER_LEN + ip.payload_len();
            let t = match ip.transport() {
                Err(WireError::Fragment(_)) => {
                    out.l3 = L3::Ipv6 { protocol: protocol::IPV6_FRAG, fragment: Fragment::Later };
                    return Ok(out);
                }
                r => r?,
            };
            let fragment = if t.fragmented { Fragment::First } else { Fragment::No };
            out.l3 = L3::Ipv6 { protocol: t.protocol, fragment };
            (t.protocol, t.offset, &frame[l3_offset + t.offset..out.l3_end])
        }
        _ => return Ok(out),
    };
    let l4_offset = l3_offset + l4_rel;
    out.l4 = match proto {
        protocol::UDP => {
            let u = UdpPacket::new_checked(l4_bytes)?;
            L4::Udp { src_port: u.src_port(), dst_port: u.dst_port() }
        }
        protocol::TCP => {
            let t = TcpPacket::new_checked(l4_bytes)?;
            L4::Tcp { src_port: t.src_port(), dst_port: t.dst_port(), flags: t.flags(), header_len: t.header_len() }
        }
        protocol::ICMP if matches!(out.l3, L3::Ipv4 { .. }) => {
            let i = Icmpv4Packet::new_checked(l4_bytes)?;
            L4::Icmpv4 { kind: i.kind(), code: i.code() }
        }
        _ => L4::Other,
    };
    out.l4_offset = Some(l4_offset);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_over_vlan() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .single_vlan(etherparse::VlanId::try_new(100).unwrap())
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(5000, 4789)
            .write(&mut f, &[0u8; 10])
            .unwrap();
        f.extend_from_slice(&[0u8; 6]); // padding
        let p = parse_frame(&f).unwrap();
        assert_eq!(p.vlan, Some(100));
        assert_eq!(p.l3_offset, 18);
        assert_eq!(p.l3_end, f.len() - 6);
        assert_eq!(p.l4_offset, Some(38));
        assert_eq!(p.l4, L4::Udp { src_port: 5000, dst_port: 4789 });
    }

    #[test]
    fn ipv6_tcp() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6(
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
            .tcp(1, 2, 3, 4)
            .ack(5)
            .write(&mut f, b"x")
            .unwrap();
        let p = parse_frame(&f).unwrap();
        assert_eq!(p.l3, L3::Ipv6 { protocol: protocol::TCP, fragment: Fragment::No });
        assert_eq!(p.l4_offset, Some(54));
        assert!(matches!(p.l4, L4::Tcp { src_port: 1, dst_port: 2, header_len: 20, .. }));
    }

    #[test]
    fn malformed_transport_is_an_error() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(1, 2)
            .write(&mut f, b"abc")
            .unwrap();
        f[38..40].copy_from_slice(&100u16.to_be_bytes()); // UDP length past the IP payload
        assert!(matches!(parse_frame(&f), Err(WireError::Truncated { .. })));
    }
}
