//! NAT of what routers do beyond TCP and UDP (RFC 5508, RFC 1812): the TTL
//! a forwarded packet loses, ICMP echo identifiers, and ICMP errors, whose
//! quoted packet is translated with the packet that carries it.
//!
//! Every function checks its bounds first and writes nothing on error.

use super::checksum;
use super::error::{Layer, WireError, need};
use super::icmpv4::{self, Icmpv4Packet};
use super::ipv4::{Ipv4Packet, protocol};
use super::rewrite::{Nat, rewrite_ipv4_general};
use core::net::Ipv4Addr;

#[inline]
fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Decrements the TTL of the IPv4 packet at the start of `ip` (RFC 1624
/// update of its header checksum). Returns the TTL it had; a TTL of 0 or
/// 1 is left as it is (the packet must not be forwarded: answer it with
/// time-exceeded).
#[inline]
pub fn dec_ttl(ip: &mut [u8]) -> Result<u8, WireError> {
    need(Layer::Ipv4, 20, ip.len())?;
    let ttl = ip[8];
    if ttl > 1 {
        let old = rd16(ip, 8);
        let new = old - 0x100;
        let c = checksum::update16(rd16(ip, 10), old, new);
        ip[8] = ttl - 1;
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    Ok(ttl)
}

/// The identifier of an ICMP echo request or reply in the IPv4 packet at
/// the start of `ip` (not a fragment), with its type.
pub fn echo_id(ip: &[u8]) -> Result<(u8, u16), WireError> {
    let p = Ipv4Packet::new_checked(ip)?;
    let (hl, total) = (p.header_len(), p.total_len());
    if p.protocol() != protocol::ICMP || p.is_fragment() {
        return Err(WireError::Unsupported {
            layer: Layer::Ipv4,
            field: "protocol for echo",
            value: p.protocol().into(),
        });
    }
    need(Layer::Icmpv4, hl + icmpv4::HEADER_LEN, total)?;
    let kind = ip[hl];
    if !matches!(kind, icmpv4::kind::ECHO_REQUEST | icmpv4::kind::ECHO_REPLY) {
        return Err(WireError::Unsupported { layer: Layer::Icmpv4, field: "type for echo", value: kind.into() });
    }
    Ok((kind, rd16(ip, hl + 4)))
}

/// Rewrites an ICMP echo request or reply: its addresses (`nat`'s; its
/// ports must be `None`) and its identifier, with the IPv4 and ICMP
/// checksums (the ICMP checksum has no pseudo-header: only the identifier
/// counts).
pub fn rewrite_echo(ip: &mut [u8], nat: &Nat, id: u16) -> Result<(), WireError> {
    echo_id(ip)?;
    let hl = usize::from(ip[0] & 0x0f) * 4;
    rewrite_ipv4_general(ip, nat)?;
    let old = rd16(ip, hl + 4);
    let c = checksum::update16(rd16(ip, hl + 2), old, id);
    ip[hl + 4..hl + 6].copy_from_slice(&id.to_be_bytes());
    ip[hl + 2..hl + 4].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// The packet an ICMP error quotes (RFC 792: its IPv4 header and at least
/// 8 bytes of what followed), as far as NAT needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    /// The error's type (destination unreachable, time exceeded,
    /// parameter problem).
    pub kind: u8,
    /// Where the quoted IPv4 header starts in the outer packet.
    pub at: usize,
    /// The quoted IPv4 header's length.
    pub ihl: usize,
    /// The quoted packet's protocol.
    pub proto: u8,
    /// The quoted packet's source.
    pub src: Ipv4Addr,
    /// The quoted packet's destination.
    pub dst: Ipv4Addr,
    /// TCP/UDP: its source port; ICMP echo: its identifier.
    pub sport: u16,
    /// TCP/UDP: its destination port; ICMP echo: 0.
    pub dport: u16,
    /// How many bytes after the quoted IPv4 header the error holds.
    pub l4_len: usize,
}

/// ICMP error types NAT translates.
pub fn is_error(kind: u8) -> bool {
    matches!(kind, icmpv4::kind::DEST_UNREACHABLE | icmpv4::kind::TIME_EXCEEDED | icmpv4::kind::PARAM_PROBLEM)
}

/// Reads the quote of the ICMP error in the IPv4 packet at the start of
/// `ip`: the outer packet is not a fragment, the error's type is one NAT
/// translates, the quoted header is IPv4 of a valid length followed by at
/// least 8 bytes, and it quotes TCP, UDP or an ICMP echo (the quoted total
/// length is not trusted: routers quote what they like).
pub fn quote(ip: &[u8]) -> Result<Quote, WireError> {
    let p = Ipv4Packet::new_checked(ip)?;
    let (hl, total) = (p.header_len(), p.total_len());
    if p.protocol() != protocol::ICMP || p.is_fragment() {
        return Err(WireError::Unsupported { layer: Layer::Ipv4, field: "protocol for a quote", value: 0 });
    }
    need(Layer::Icmpv4, hl + icmpv4::HEADER_LEN, total)?;
    let kind = ip[hl];
    if !is_error(kind) {
        return Err(WireError::Unsupported { layer: Layer::Icmpv4, field: "type for a quote", value: kind.into() });
    }
    let at = hl + icmpv4::HEADER_LEN;
    need(Layer::Ipv4, at + 20, total)?;
    let inner = &ip[at..total];
    if inner[0] >> 4 != 4 {
        return Err(WireError::BadVersion { layer: Layer::Ipv4, version: inner[0] >> 4 });
    }
    let ihl = usize::from(inner[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(WireError::BadLength { layer: Layer::Ipv4, value: ihl, min: 20 });
    }
    need(Layer::Ipv4, ihl + 8, inner.len())?;
    if rd16(inner, 6) & 0x1fff != 0 {
        return Err(WireError::Fragment(Layer::Ipv4));
    }
    let proto = inner[9];
    let l4 = &inner[ihl..];
    let (sport, dport) = match proto {
        protocol::TCP | protocol::UDP => (rd16(l4, 0), rd16(l4, 2)),
        protocol::ICMP if matches!(l4[0], icmpv4::kind::ECHO_REQUEST | icmpv4::kind::ECHO_REPLY) => (rd16(l4, 4), 0),
        p => return Err(WireError::Unsupported { layer: Layer::Ipv4, field: "quoted protocol", value: p.into() }),
    };
    let addr = |at: usize| Ipv4Addr::new(inner[at], inner[at + 1], inner[at + 2], inner[at + 3]);
    Ok(Quote { kind, at, ihl, proto, src: addr(12), dst: addr(16), sport, dport, l4_len: l4.len() })
}

/// Translates an ICMP error (the IPv4 packet at the start of `ip`, whose
/// quote `q` gave): the outer addresses (`outer`'s; no ports), and the
/// quoted packet's source (`inner_src`) or destination (`inner_dst`)
/// address and port (an echo's identifier for a source). The quoted IPv4
/// header's checksum is updated, and the quoted transport checksum where
/// the quote holds it (UDP, unless 0; TCP when at least 18 bytes are
/// quoted; echo), incrementally; the ICMP checksum is computed again over
/// the whole message, as Linux's `nf_nat_icmp_reply_translation` does.
pub fn rewrite_error(
    ip: &mut [u8],
    q: &Quote,
    outer: &Nat,
    inner_src: Option<(Ipv4Addr, u16)>,
    inner_dst: Option<(Ipv4Addr, u16)>,
) -> Result<(), WireError> {
    if q != &quote(ip)? || outer.touches_ports() {
        return Err(WireError::Unsupported { layer: Layer::Icmpv4, field: "quote", value: 0 });
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(rd16(ip, 2));
    // The outer header first: it checks what it writes.
    rewrite_ipv4_general(ip, outer)?;
    let (at, l4) = (q.at, q.at + q.ihl);
    let mut ip_delta = 0u32;
    let mut l4_delta = 0u32;
    let mut id_delta = 0u32;
    fn word(d: &mut u32, old: u16, new: u16) {
        *d += u32::from(!old) + u32::from(new);
    }
    for (side, addr_at, port_at) in [(inner_src, at + 12, l4), (inner_dst, at + 16, l4 + 2)] {
        let Some((a, port)) = side else { continue };
        let (old_hi, old_lo) = (rd16(ip, addr_at), rd16(ip, addr_at + 2));
        let new = u32::from(a);
        for (old, new) in [(old_hi, (new >> 16) as u16), (old_lo, new as u16)] {
            word(&mut ip_delta, old, new);
            word(&mut l4_delta, old, new);
        }
        ip[addr_at..addr_at + 4].copy_from_slice(&a.octets());
        match q.proto {
            protocol::TCP | protocol::UDP => {
                word(&mut l4_delta, rd16(ip, port_at), port);
                ip[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
            }
            // The identifier of the echo the error quotes (its source side).
            _ if port_at == l4 => {
                word(&mut id_delta, rd16(ip, l4 + 4), port);
                ip[l4 + 4..l4 + 6].copy_from_slice(&port.to_be_bytes());
            }
            _ => {}
        }
    }
    let c = super::rewrite::apply_delta(rd16(ip, at + 10), ip_delta);
    ip[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
    let csum_at = match q.proto {
        protocol::UDP if rd16(ip, l4 + 6) != 0 => Some((l4 + 6, l4_delta)),
        protocol::TCP if q.l4_len >= 18 => Some((l4 + 16, l4_delta)),
        protocol::ICMP => Some((l4 + 2, id_delta)),
        _ => None,
    };
    if let Some((c_at, d)) = csum_at {
        let c = super::rewrite::transport_csum(q.proto, rd16(ip, c_at), d);
        ip[c_at..c_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut icmp = Icmpv4Packet::new_checked(&mut ip[hl..total])?;
    icmp.fill_checksum();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::rewrite::recompute_checksums_ipv4;

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut v, b"quoted payload").expect("udp");
        v
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 7, 1000).write(&mut v, b"abc").expect("tcp");
        v
    }

    /// An ICMP error of `kind` from `from` to `to` quoting `quoted`'s first
    /// `n` bytes.
    fn error(kind: u8, from: [u8; 4], to: [u8; 4], quoted: &[u8], n: usize) -> Vec<u8> {
        let mut icmp = vec![kind, 4, 0, 0, 0, 0, 0x05, 0x14];
        icmp.extend_from_slice(&quoted[..n.min(quoted.len())]);
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4(from, to, 64).write(&mut v, etherparse::IpNumber::ICMP, &icmp).expect("icmp");
        let mut p = Icmpv4Packet::new_checked(&mut v[20..]).expect("icmp view");
        p.fill_checksum();
        v
    }

    #[test]
    fn ttl_goes_down_with_a_valid_checksum_and_1_stays() {
        let mut p = udp([198, 18, 0, 1], [198, 18, 3, 10], 1, 2);
        assert_eq!(dec_ttl(&mut p), Ok(64));
        let mut want = p.clone();
        recompute_checksums_ipv4(&mut want).expect("recompute");
        assert_eq!((p[8], &p), (63, &want));
        p[8] = 1;
        recompute_checksums_ipv4(&mut p).expect("recompute");
        let before = p.clone();
        assert_eq!(dec_ttl(&mut p), Ok(1));
        assert_eq!(p, before);
    }

    #[test]
    fn an_echo_gets_its_new_id_and_addresses() {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4([198, 19, 0, 5], [198, 18, 3, 10], 64)
            .icmpv4_echo_request(0x1234, 9)
            .write(&mut p, b"ping!")
            .expect("echo");
        let nat = Nat { src_addr: Some(Ipv4Addr::new(198, 18, 0, 1)), ..Nat::default() };
        rewrite_echo(&mut p, &nat, 61_234).expect("rewritten");
        assert_eq!(echo_id(&p), Ok((icmpv4::kind::ECHO_REQUEST, 61_234)));
        assert_eq!(p[12..16], [198, 18, 0, 1]);
        let ip = Ipv4Packet::new_checked(&p[..]).expect("ip");
        assert!(ip.verify_checksum());
        assert!(Icmpv4Packet::new_checked(&p[20..]).expect("icmp").verify_checksum());
    }

    /// An error quoting a packet the egress translated (source 198.18.0.1:
    /// 61000) is turned back into one about the task's packet (source
    /// 198.19.0.5:40000), to the task: the result equals the error built
    /// directly about the task's packet, for every quote length and both
    /// protocols (checksums included, UDP's zero checksum kept).
    #[test]
    fn an_error_is_translated_as_if_the_task_had_been_quoted() {
        let (egress, task, server) = ([198, 18, 0, 1], [198, 19, 0, 5], [198, 18, 3, 10]);
        let mut zero_csum = udp(egress, server, 61_000, 53);
        zero_csum[26..28].fill(0);
        let mut zero_csum_task = udp(task, server, 40_000, 53);
        zero_csum_task[26..28].fill(0);
        let cases = [
            (udp(egress, server, 61_000, 53), udp(task, server, 40_000, 53), 28),
            (zero_csum, zero_csum_task, 28),
            (tcp(egress, server, 61_000, 80), tcp(task, server, 40_000, 80), 28),
            (tcp(egress, server, 61_000, 80), tcp(task, server, 40_000, 80), 48),
            (tcp(egress, server, 61_000, 80), tcp(task, server, 40_000, 80), 38),
        ];
        for (i, (sent, orig, n)) in cases.into_iter().enumerate() {
            for kind in [icmpv4::kind::DEST_UNREACHABLE, icmpv4::kind::TIME_EXCEEDED] {
                let mut e = error(kind, [198, 18, 2, 1], egress, &sent, n);
                let q = quote(&e).expect("quote");
                assert_eq!((q.src, q.sport, q.dst), (Ipv4Addr::from(egress), 61_000, Ipv4Addr::from(server)));
                let outer = Nat { dst_addr: Some(Ipv4Addr::from(task)), ..Nat::default() };
                rewrite_error(&mut e, &q, &outer, Some((Ipv4Addr::from(task), 40_000)), None).expect("translated");
                let want = error(kind, [198, 18, 2, 1], task, &orig, n);
                assert_eq!(e, want, "case {i} kind {kind}");
            }
        }
    }

    #[test]
    fn bad_quotes_are_refused_and_nothing_is_written() {
        let sent = udp([198, 18, 0, 1], [198, 18, 3, 10], 61_000, 53);
        let short = error(3, [198, 18, 2, 1], [198, 18, 0, 1], &sent, 27);
        assert!(quote(&short).is_err(), "fewer than 8 bytes after the quoted header");
        let mut long_ihl = error(3, [198, 18, 2, 1], [198, 18, 0, 1], &sent, 28);
        long_ihl[28] = 0x4f;
        assert!(quote(&long_ihl).is_err(), "an inner ihl of 15 needs 60 + 8 bytes");
        let echo_reply = error(0, [198, 18, 2, 1], [198, 18, 0, 1], &sent, 28);
        assert!(quote(&echo_reply).is_err(), "not an error");
        let mut e = error(11, [198, 18, 2, 1], [198, 18, 0, 1], &sent, 28);
        let q = quote(&e).expect("quote");
        let before = e.clone();
        let outer_port = Nat { dst_port: Some(1), ..Nat::default() };
        assert!(rewrite_error(&mut e, &q, &outer_port, None, None).is_err());
        let other = Quote { sport: 1, ..q };
        assert!(rewrite_error(&mut e, &other, &Nat::default(), None, None).is_err(), "a stale quote");
        assert_eq!(e, before);
    }
}
