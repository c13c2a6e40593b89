//! In-place NAT rewrites of IPv4 packets with RFC 1624 incremental checksum
//! updates: the IPv4 header checksum, and the TCP or UDP checksum through
//! the pseudo-header and the ports.

use super::checksum;
use super::error::{Layer, WireError, need};
use super::ipv4::{Ipv4Packet, protocol};
use core::net::Ipv4Addr;

/// The fields a NAT rewrite changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Nat {
    /// New source address.
    pub src_addr: Option<Ipv4Addr>,
    /// New destination address.
    pub dst_addr: Option<Ipv4Addr>,
    /// New TCP/UDP source port.
    pub src_port: Option<u16>,
    /// New TCP/UDP destination port.
    pub dst_port: Option<u16>,
}

impl Nat {
    /// True if the rewrite changes a port.
    #[inline]
    pub fn touches_ports(&self) -> bool {
        self.src_port.is_some() || self.dst_port.is_some()
    }
}

/// Accumulates the RFC 1624 difference `~m + m'` of changed 16-bit words, to
/// apply to several checksums that cover the same words.
#[derive(Debug, Clone, Copy, Default)]
struct Delta(u32);

impl Delta {
    #[inline]
    fn word(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }
    #[inline]
    fn addr(&mut self, old: Ipv4Addr, new: Ipv4Addr) {
        let (o, n) = (u32::from(old), u32::from(new));
        self.word((o >> 16) as u16, (n >> 16) as u16);
        self.word(o as u16, n as u16);
    }
    /// `HC' = ~(~HC + sum(~m + m'))`.
    #[inline]
    fn apply(self, csum: u16) -> u16 {
        apply_delta(csum, self.0)
    }
}

/// The two 16-bit halves of a word, summed (unfolded): a native-order
/// word's share of a ones'-complement sum. Ones'-complement sums are
/// byte-order independent (RFC 1071 section 2(B)), so the fixed-offset
/// paths work on native-order words, with no byte swaps.
#[inline(always)]
fn words(v: u32) -> u32 {
    (v & 0xffff) + (v >> 16)
}

/// A checksum (as read, native order) after changes whose RFC 1624
/// difference `sum(~m + m')` is `delta`: `HC' = ~(~HC + delta)`.
#[inline(always)]
pub fn apply_delta(csum: u16, delta: u32) -> u16 {
    !checksum::fold(u32::from(!csum) + delta)
}

/// [`apply_delta`] for the TCP or UDP checksum of protocol `proto`: a UDP
/// checksum of 0 ("none") stays 0 and a computed 0 becomes 0xffff (RFC
/// 768). 0 and 0xffff read the same in either byte order.
#[inline(always)]
pub fn transport_csum(proto: u8, old: u16, delta: u32) -> u16 {
    match (proto, old) {
        (protocol::UDP, 0) => 0,
        (protocol::UDP, _) => match apply_delta(old, delta) {
            0 => 0xffff,
            c => c,
        },
        _ => apply_delta(old, delta),
    }
}

/// The RFC 1624 differences of rewriting the destination `from:from_port`
/// to `to:to_port`, in native-order words as [`rewrite_ipv4`] computes them
/// per packet: `[0]` for the IPv4 header (the address), `[1]` for TCP/UDP
/// (pseudo-header address and port). For a rewrite known in advance (a
/// VIP to a backend), computed once and applied with [`apply_delta`] and
/// [`transport_csum`].
pub fn dnat_delta(from: Ipv4Addr, from_port: u16, to: Ipv4Addr, to_port: u16) -> [u32; 2] {
    let addr = words(!u32::from_ne_bytes(from.octets())) + words(u32::from_ne_bytes(to.octets()));
    let port = u32::from(!u16::from_ne_bytes(from_port.to_be_bytes())) + u32::from(to_port.to_be());
    [addr, addr + port]
}

#[inline]
fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Rewrites the addresses and ports of the IPv4 packet at the start of `ip`
/// (Ethernet header already stripped), updating every checksum that covers
/// them incrementally:
///
/// - the IPv4 header checksum for addresses;
/// - the TCP checksum (pseudo-header and ports);
/// - the UDP checksum likewise, unless it is 0 ("no checksum"), which stays
///   0; a computed 0 becomes 0xffff (RFC 768);
/// - ICMP and other protocols: addresses only; asking to change ports there
///   is [`WireError::Unsupported`].
///
/// A later fragment has no transport header: addresses are rewritten and a
/// port change is [`WireError::Fragment`]. On error nothing is written.
///
/// An unfragmented TCP or UDP packet without IPv4 options, the shape a load
/// balancer rewrites all day, is handled at fixed offsets; everything else
/// goes through [`rewrite_ipv4_general`], with the same result.
#[inline(always)]
pub fn rewrite_ipv4(ip: &mut [u8], nat: &Nat) -> Result<(), WireError> {
    let len = ip.len();
    if let Some(h) = ip.first_chunk_mut::<40>()
        && h[0] == 0x45
        && h[6] & 0x3f == 0
        && h[7] == 0
    {
        let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
        let csum_at = match h[9] {
            protocol::TCP if total >= 40 => 36,
            protocol::UDP if total >= 28 => 26,
            _ => 0,
        };
        if csum_at != 0 && total <= len {
            #[inline(always)]
            fn ne32(b: &[u8; 40], at: usize) -> u32 {
                u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
            }
            let mut addr = 0u32;
            if let Some(a) = nat.src_addr {
                let new = u32::from_ne_bytes(a.octets());
                addr += words(!ne32(h, 12)) + words(new);
                h[12..16].copy_from_slice(&a.octets());
            }
            if let Some(a) = nat.dst_addr {
                let new = u32::from_ne_bytes(a.octets());
                addr += words(!ne32(h, 16)) + words(new);
                h[16..20].copy_from_slice(&a.octets());
            }
            let mut l4 = addr;
            if let Some(p) = nat.src_port {
                l4 += u32::from(!u16::from_ne_bytes([h[20], h[21]])) + u32::from(p.to_be());
                h[20..22].copy_from_slice(&p.to_be_bytes());
            }
            if let Some(p) = nat.dst_port {
                l4 += u32::from(!u16::from_ne_bytes([h[22], h[23]])) + u32::from(p.to_be());
                h[22..24].copy_from_slice(&p.to_be_bytes());
            }
            let ipc = apply_delta(u16::from_ne_bytes([h[10], h[11]]), addr);
            h[10..12].copy_from_slice(&ipc.to_ne_bytes());
            let new = transport_csum(h[9], u16::from_ne_bytes([h[csum_at], h[csum_at + 1]]), l4);
            h[csum_at..csum_at + 2].copy_from_slice(&new.to_ne_bytes());
            return Ok(());
        }
    }
    rewrite_ipv4_general(ip, nat)
}

/// [`rewrite_ipv4`] for any IPv4 packet (options, fragments, ICMP, short or
/// malformed packets), through the checked views.
pub fn rewrite_ipv4_general(ip: &mut [u8], nat: &Nat) -> Result<(), WireError> {
    let pkt = Ipv4Packet::new_checked(&*ip)?;
    let (hl, total, proto) = (pkt.header_len(), pkt.total_len(), pkt.protocol());
    let (old_src, old_dst) = (pkt.src(), pkt.dst());
    let later = pkt.is_later_fragment();

    let mut addr_delta = Delta::default();
    if let Some(a) = nat.src_addr {
        addr_delta.addr(old_src, a);
    }
    if let Some(a) = nat.dst_addr {
        addr_delta.addr(old_dst, a);
    }

    // Validate the transport header before writing anything.
    let l4 = hl;
    let csum_at = match (later, proto) {
        (true, _) if nat.touches_ports() => return Err(WireError::Fragment(Layer::Ipv4)),
        (true, _) => None,
        (false, protocol::TCP) => {
            need(Layer::Tcp, l4 + 18, total)?;
            Some(l4 + 16)
        }
        (false, protocol::UDP) => {
            need(Layer::Udp, l4 + 8, total)?;
            Some(l4 + 6)
        }
        (false, p) if nat.touches_ports() => {
            return Err(WireError::Unsupported {
                layer: Layer::Ipv4,
                field: "protocol for a port rewrite",
                value: p.into(),
            });
        }
        (false, _) => None,
    };

    if let Some(at) = csum_at {
        let mut d = addr_delta;
        if let Some(p) = nat.src_port {
            d.word(rd16(ip, l4), p);
            ip[l4..l4 + 2].copy_from_slice(&p.to_be_bytes());
        }
        if let Some(p) = nat.dst_port {
            d.word(rd16(ip, l4 + 2), p);
            ip[l4 + 2..l4 + 4].copy_from_slice(&p.to_be_bytes());
        }
        let old = rd16(ip, at);
        let new = match proto {
            protocol::UDP if old == 0 => 0,
            protocol::UDP => match d.apply(old) {
                0 => 0xffff,
                c => c,
            },
            _ => d.apply(old),
        };
        ip[at..at + 2].copy_from_slice(&new.to_be_bytes());
    }

    if nat.src_addr.is_some() || nat.dst_addr.is_some() {
        let c = addr_delta.apply(rd16(ip, 10));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        if let Some(a) = nat.src_addr {
            ip[12..16].copy_from_slice(&a.octets());
        }
        if let Some(a) = nat.dst_addr {
            ip[16..20].copy_from_slice(&a.octets());
        }
    }
    Ok(())
}

/// Completes the checksums of an untagged Ethernet frame carrying IPv4
/// TCP or UDP, as a task's kernel may leave them partial on a veth with
/// transmit offloads on: recomputed from scratch
/// ([`recompute_checksums_ipv4`]; a UDP checksum of 0 stays 0). Any other
/// frame, or one whose IPv4 header does not parse, is left as it is (the
/// pipeline judges it).
pub fn complete_frame_checksums(frame: &mut [u8]) {
    if frame.len() > 14 + 20 && frame[12..14] == [0x08, 0x00] && matches!(frame[14 + 9], protocol::TCP | protocol::UDP)
    {
        let _ = recompute_checksums_ipv4(&mut frame[14..]);
    }
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum from scratch
/// (a UDP checksum of 0 is left as 0). The reference the incremental path is
/// tested and fuzzed against; not for the fast path.
pub fn recompute_checksums_ipv4(ip: &mut [u8]) -> Result<(), WireError> {
    let mut pkt = Ipv4Packet::new_checked(&mut *ip)?;
    pkt.fill_checksum();
    if pkt.is_later_fragment() {
        return Ok(());
    }
    let (src, dst, proto, hl, total) = (pkt.src(), pkt.dst(), pkt.protocol(), pkt.header_len(), pkt.total_len());
    let seg = &mut ip[hl..total];
    let at = match proto {
        protocol::TCP if seg.len() >= 18 => 16,
        protocol::UDP if seg.len() >= 8 => {
            if rd16(seg, 6) == 0 {
                return Ok(());
            }
            6
        }
        _ => return Ok(()),
    };
    seg[at..at + 2].copy_from_slice(&[0, 0]);
    // For a first fragment the transport length is the whole datagram's,
    // which one fragment cannot tell: use the UDP length field, or for TCP
    // the fragment's bytes (then only consistency, not validity, is checked).
    // RFC 768: UDP is summed over its own length when that fits the packet.
    let (len, n) = match proto {
        protocol::UDP => {
            let ul = rd16(seg, 4);
            let n = usize::from(ul);
            (ul, if (8..=seg.len()).contains(&n) { n } else { seg.len() })
        }
        _ => (seg.len() as u16, seg.len()),
    };
    let mut c = checksum::finish(checksum::sum(&seg[..n], checksum::pseudo_header_v4(src, dst, proto, len)));
    if proto == protocol::UDP && c == 0 {
        c = 0xffff;
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame() -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ipv4([198, 18, 5, 1], [198, 19, 0, 10], 64)
            .tcp(40000, 80, 1, 65535)
            .syn()
            .write(&mut f, b"GET / HTTP/1.0\r\n\r\n")
            .unwrap();
        f
    }

    #[test]
    fn dnat_snat_tcp_matches_full_recompute() {
        let mut p = tcp_frame();
        let nat = Nat {
            src_addr: Some(Ipv4Addr::new(198, 19, 255, 1)),
            dst_addr: Some(Ipv4Addr::new(198, 19, 0, 23)),
            src_port: Some(61000),
            dst_port: Some(8080),
        };
        rewrite_ipv4(&mut p, &nat).unwrap();
        let mut full = p.clone();
        recompute_checksums_ipv4(&mut full).unwrap();
        assert_eq!(p, full);
        let parsed = etherparse::SlicedPacket::from_ip(&p).unwrap();
        let Some(etherparse::TransportSlice::Tcp(t)) = parsed.transport else { panic!() };
        assert_eq!((t.source_port(), t.destination_port()), (61000, 8080));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).udp(1, 2).write(&mut f, b"abc").unwrap();
        f[26..28].copy_from_slice(&[0, 0]);
        rewrite_ipv4(
            &mut f,
            &Nat { dst_addr: Some(Ipv4Addr::new(198, 18, 9, 9)), dst_port: Some(9), ..Nat::default() },
        )
        .unwrap();
        assert_eq!(&f[26..28], &[0, 0]);
        assert!(Ipv4Packet::new_checked(&f[..]).unwrap().verify_checksum());
    }

    #[test]
    fn icmp_and_fragments() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut f, b"ping")
            .unwrap();
        let before = f.clone();
        assert!(matches!(
            rewrite_ipv4(&mut f, &Nat { src_port: Some(1), ..Nat::default() }),
            Err(WireError::Unsupported { .. })
        ));
        assert_eq!(f, before, "nothing written on error");
        rewrite_ipv4(&mut f, &Nat { src_addr: Some(Ipv4Addr::new(198, 18, 0, 7)), ..Nat::default() }).unwrap();
        assert!(Ipv4Packet::new_checked(&f[..]).unwrap().verify_checksum());
        assert_eq!(&f[20..], &before[20..], "ICMP has no pseudo-header");

        let mut frag = tcp_frame();
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128
        Ipv4Packet::new_checked(&mut frag[..]).unwrap().fill_checksum();
        let before = frag.clone();
        assert_eq!(
            rewrite_ipv4(&mut frag, &Nat { dst_port: Some(1), ..Nat::default() }),
            Err(WireError::Fragment(Layer::Ipv4))
        );
        assert_eq!(frag, before);
        rewrite_ipv4(&mut frag, &Nat { dst_addr: Some(Ipv4Addr::new(198, 18, 3, 3)), ..Nat::default() }).unwrap();
        assert_eq!(&frag[20..], &before[20..], "a later fragment's payload is untouched");
    }

    #[test]
    fn fast_and_general_paths_agree() {
        let nat = Nat {
            src_addr: Some(Ipv4Addr::new(198, 19, 255, 1)),
            dst_addr: Some(Ipv4Addr::new(198, 19, 0, 23)),
            src_port: Some(61000),
            dst_port: None,
        };
        let mut udp = Vec::new();
        etherparse::PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(1, 2)
            .write(&mut udp, &[7u8; 20])
            .unwrap();
        for pkt in [tcp_frame(), udp] {
            let (mut fast, mut general) = (pkt.clone(), pkt.clone());
            rewrite_ipv4(&mut fast, &nat).unwrap();
            rewrite_ipv4_general(&mut general, &nat).unwrap();
            assert_eq!(fast, general);
            assert_ne!(fast, pkt);
        }
    }

    #[test]
    fn truncated_transport_is_an_error() {
        let mut f = tcp_frame();
        f.truncate(20 + 17);
        f[2..4].copy_from_slice(&37u16.to_be_bytes());
        assert!(matches!(
            rewrite_ipv4(&mut f, &Nat { dst_port: Some(1), ..Nat::default() }),
            Err(WireError::Truncated { .. })
        ));
    }
}
