//! VXLAN (RFC 7348): the 8-byte header, classification and decapsulation of
//! received frames, and encapsulation into headroom in front of an inner frame.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```

use super::checksum;
use super::error::{Layer, WireError, need};
use super::ethernet::{self, EthernetFrame, MacAddr, ethertype};
use super::ipv4::{self, Ipv4Packet, protocol};
use super::udp::{self, UdpPacket};
use core::net::Ipv4Addr;
use core::ops::Range;

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;
/// IANA-assigned VXLAN UDP port.
pub const DEFAULT_PORT: u16 = 4789;
/// Bytes of outer headers meshplane writes: Ethernet (14) + IPv4 (20) +
/// UDP (8) + VXLAN (8). The overlay MTU is the underlay MTU minus this.
pub const ENCAP_LEN: usize = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + udp::HEADER_LEN + HEADER_LEN;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// First outer UDP source port used for flow entropy (RFC 7348 section 5
/// recommends the dynamic range 49152-65535).
pub const SRC_PORT_MIN: u16 = 49152;

/// A checked VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanHeader {
    /// The 24-bit network identifier.
    pub vni: u32,
}

impl VxlanHeader {
    /// Reads a header on receive: the I flag must be set; the reserved bits
    /// are ignored, as RFC 7348 requires.
    #[inline]
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need(Layer::Vxlan, HEADER_LEN, b.len())?;
        if b[0] & FLAG_I == 0 {
            return Err(WireError::VxlanNoIFlag(b[0]));
        }
        Ok(VxlanHeader { vni: u32::from_be_bytes([0, b[4], b[5], b[6]]) })
    }

    /// Writes the header: I flag set, every reserved bit zero.
    #[inline]
    pub fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        need(Layer::Vxlan, HEADER_LEN, b.len())?;
        if self.vni > MAX_VNI {
            return Err(WireError::Unsupported { layer: Layer::Vxlan, field: "vni", value: self.vni });
        }
        let v = self.vni.to_be_bytes();
        b[..HEADER_LEN].copy_from_slice(&[FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]);
        Ok(())
    }
}

/// What [`classify`] found in a frame received on the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Not UDP to our data-path address and VXLAN port: not the overlay's.
    NotVxlan,
    /// A VXLAN frame for us.
    Vxlan(Decap),
}

/// A received VXLAN frame, ready to decapsulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decap {
    /// The VNI from the VXLAN header.
    pub vni: u32,
    /// Outer source MAC (the underlay neighbour).
    pub outer_src_mac: MacAddr,
    /// Outer source IP: the sending VTEP.
    pub outer_src: Ipv4Addr,
    /// Outer UDP source port (the sender's flow entropy).
    pub outer_src_port: u16,
    /// Where the inner Ethernet frame lies in the received buffer (without
    /// any trailing padding of the outer frame).
    pub inner: Range<usize>,
}

/// Classifies a frame received on the underlay: is it VXLAN for
/// `local`:`port`? Well-formed frames that are not are
/// [`Classified::NotVxlan`]. Errors are frames that are malformed on the
/// way to deciding, or VXLAN frames for us that are malformed (no I flag,
/// inner frame shorter than an Ethernet header), or the first fragment of a
/// datagram to our VXLAN port ([`WireError::Fragment`]: never reassembled).
/// Later fragments to our address are the host's (`NotVxlan`).
///
/// The outer IPv4 header checksum of a frame for us is verified
/// ([`WireError::BadChecksum`], as the kernel's IP layer would); the outer
/// UDP checksum is not (RFC 7348 lets receivers skip it).
///
/// Untagged IPv4 without options, the shape every VTEP sends, is read at
/// fixed offsets; any other frame, and any frame with something wrong in
/// it, goes through [`classify_general`], which gives the same answer for
/// every input (the `vxlan_decap` fuzz target checks that).
#[inline]
pub fn classify(frame: &[u8], local: Ipv4Addr, port: u16) -> Result<Classified, WireError> {
    const MIN: usize = ENCAP_LEN + ethernet::HEADER_LEN;
    if let Some(h) = frame.first_chunk::<MIN>()
        && h[12] == 0x08
        && h[13] == 0x00
        && h[14] == 0x45
    {
        let total = usize::from(u16::from_be_bytes([h[16], h[17]]));
        if total >= ipv4::MIN_HEADER_LEN && total + ethernet::HEADER_LEN <= frame.len() {
            if h[30..34] != local.octets() || h[23] != protocol::UDP {
                return Ok(Classified::NotVxlan);
            }
            let udp_len = usize::from(u16::from_be_bytes([h[38], h[39]]));
            let not_fragment = h[20] & 0x3f == 0 && h[21] == 0;
            if not_fragment && udp_len >= udp::HEADER_LEN && udp_len + ipv4::MIN_HEADER_LEN <= total {
                if u16::from_be_bytes([h[36], h[37]]) != port {
                    return Ok(Classified::NotVxlan);
                }
                if udp_len >= udp::HEADER_LEN + HEADER_LEN + ethernet::HEADER_LEN
                    && h[42] & FLAG_I != 0
                    && h[14..].first_chunk::<20>().is_some_and(ipv4_header_ok)
                {
                    return Ok(Classified::Vxlan(Decap {
                        vni: u32::from_be_bytes([0, h[46], h[47], h[48]]),
                        outer_src_mac: MacAddr([h[6], h[7], h[8], h[9], h[10], h[11]]),
                        outer_src: Ipv4Addr::new(h[26], h[27], h[28], h[29]),
                        outer_src_port: u16::from_be_bytes([h[34], h[35]]),
                        inner: ENCAP_LEN..ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + udp_len,
                    }));
                }
            }
        }
    }
    classify_general(frame, local, port)
}

/// [`classify`] for any frame (VLAN tags, IPv4 options, malformed headers),
/// header by header through the checked views. The reference the fast path
/// is fuzzed against.
pub fn classify_general(frame: &[u8], local: Ipv4Addr, port: u16) -> Result<Classified, WireError> {
    let eth = EthernetFrame::new_checked(frame)?;
    if eth.ethertype() != ethertype::IPV4 {
        return Ok(Classified::NotVxlan);
    }
    let l3 = eth.header_len();
    let ip = Ipv4Packet::new_checked(eth.payload())?;
    if ip.dst() != local || ip.protocol() != protocol::UDP {
        return Ok(Classified::NotVxlan);
    }
    if ip.is_later_fragment() {
        // No UDP header to tell: meshplane never fragments what it sends
        // (DF is set), so this is the host's; the kernel reassembles.
        return Ok(Classified::NotVxlan);
    }
    let l4 = l3 + ip.header_len();
    if ip.is_fragment() {
        // A first fragment: the UDP ports are here, the datagram is not.
        let p = ip.payload();
        if p.len() >= 4 && u16::from_be_bytes([p[2], p[3]]) != port {
            return Ok(Classified::NotVxlan);
        }
        if !ip.verify_checksum() {
            return Err(WireError::BadChecksum(Layer::Ipv4));
        }
        return Err(WireError::Fragment(Layer::Ipv4));
    }
    let udp = UdpPacket::new_checked(ip.payload())?;
    if udp.dst_port() != port {
        return Ok(Classified::NotVxlan);
    }
    if !ip.verify_checksum() {
        return Err(WireError::BadChecksum(Layer::Ipv4));
    }
    let vx = VxlanHeader::parse(udp.payload())?;
    let inner_start = l4 + udp::HEADER_LEN + HEADER_LEN;
    let inner_end = l4 + udp.len();
    need(Layer::Vxlan, HEADER_LEN + ethernet::HEADER_LEN, udp.len() - udp::HEADER_LEN)?;
    Ok(Classified::Vxlan(Decap {
        vni: vx.vni,
        outer_src_mac: eth.src(),
        outer_src: ip.src(),
        outer_src_port: udp.src_port(),
        inner: inner_start..inner_end,
    }))
}

/// True if a 20-byte IPv4 header (no options) has a correct checksum.
#[inline(always)]
pub fn ipv4_header_ok(h: &[u8; 20]) -> bool {
    // The one's-complement sum of 16-bit words is the sum of 32-bit words
    // folded, in either byte order (RFC 1071 section 2), and all ones
    // reads the same both ways: five 32-bit loads in native order.
    let w = |i: usize| u64::from(u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]));
    let mut acc = w(0) + w(4) + w(8) + w(12) + w(16);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc == 0xffff
}

/// Maps a flow hash onto the outer UDP source port range 49152-65535.
#[inline]
pub fn src_port_for_hash(hash: u32) -> u16 {
    // Multiply-shift range reduction: uniform, no division.
    SRC_PORT_MIN + ((u64::from(hash) * 16384) >> 32) as u16
}

/// What goes into an outer header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncapParams {
    /// This node's data-path MAC.
    pub src_mac: MacAddr,
    /// The underlay next hop's MAC.
    pub dst_mac: MacAddr,
    /// This node's data-path address (always the outer source, whatever the
    /// inner frame says).
    pub src_ip: Ipv4Addr,
    /// The remote VTEP.
    pub dst_ip: Ipv4Addr,
    /// Destination UDP port (4789 unless configured).
    pub dst_port: u16,
    /// The network's VNI.
    pub vni: u32,
    /// Outer TTL.
    pub ttl: u8,
}

/// A precomputed outer Ethernet/IPv4/UDP/VXLAN header for one (remote VTEP,
/// VNI) pair. Writing it costs a 50-byte copy and three field stores; the
/// IPv4 checksum is finished from a precomputed partial sum.
///
/// Outer IPv4: DF set (RFC 7348 section 4.3: VTEPs do not fragment; routers
/// on the path must not either, so PMTU problems surface), ID 0 (RFC 6864
/// allows any ID on atomic datagrams). Outer UDP checksum 0 (RFC 7348).
#[derive(Debug, Clone)]
pub struct EncapTemplate {
    hdr: [u8; ENCAP_LEN],
    /// Unfolded sum of the IPv4 header with total length and checksum zero.
    ip_partial: u32,
}

impl EncapTemplate {
    /// Builds the template. Fails only for a VNI wider than 24 bits.
    #[inline]
    pub fn new(p: &EncapParams) -> Result<Self, WireError> {
        let mut hdr = [0u8; ENCAP_LEN];
        ethernet::emit_header(&mut hdr, p.dst_mac, p.src_mac, ethertype::IPV4)?;
        let ip = ipv4::Ipv4Repr {
            src: p.src_ip,
            dst: p.dst_ip,
            protocol: protocol::UDP,
            payload_len: 0,
            ttl: p.ttl,
            tos: 0,
            ident: 0,
            dont_frag: true,
        };
        ip.emit(&mut hdr[14..34])?;
        hdr[16..18].copy_from_slice(&[0, 0]);
        hdr[24..26].copy_from_slice(&[0, 0]);
        let ip_partial = checksum::sum(&hdr[14..34], 0);
        hdr[36..38].copy_from_slice(&p.dst_port.to_be_bytes());
        VxlanHeader { vni: p.vni }.emit(&mut hdr[42..50])?;
        Ok(EncapTemplate { hdr, ip_partial })
    }

    /// Writes the outer headers into the [`ENCAP_LEN`] bytes in front of the
    /// inner frame at `buf[inner_start..inner_start + inner_len]`, with outer
    /// UDP source port `src_port`. Returns the offset where the finished
    /// frame starts.
    #[inline]
    pub fn write(
        &self,
        buf: &mut [u8],
        inner_start: usize,
        inner_len: usize,
        src_port: u16,
    ) -> Result<usize, WireError> {
        let start =
            inner_start.checked_sub(ENCAP_LEN).ok_or(WireError::NoHeadroom { need: ENCAP_LEN, have: inner_start })?;
        need(Layer::Vxlan, inner_start + inner_len, buf.len())?;
        let udp_len = inner_len + udp::HEADER_LEN + HEADER_LEN;
        let ip_len = udp_len + ipv4::MIN_HEADER_LEN;
        let ip_len16 = u16::try_from(ip_len).map_err(|_| WireError::BadLength {
            layer: Layer::Ipv4,
            value: ip_len,
            min: ipv4::MIN_HEADER_LEN,
        })?;
        // A fixed-size array, so the 50-byte copy is a few vector moves
        // rather than a call to memcpy.
        let h: &mut [u8; ENCAP_LEN] = (&mut buf[start..inner_start])
            .try_into()
            .map_err(|_| WireError::NoHeadroom { need: ENCAP_LEN, have: inner_start })?;
        self.write_header(h, ip_len16, src_port);
        Ok(start)
    }

    /// Writes the outer headers of an outer IPv4 packet of `ip_len` bytes
    /// (inner frame + 36) with UDP source port `src_port` into `h`, the
    /// [`ENCAP_LEN`] bytes in front of the inner frame. Infallible: the
    /// caller has checked that `ip_len` is at least 36 and is the real
    /// length (the fast path knows it from the network MTU).
    #[inline(always)]
    pub fn write_header(&self, h: &mut [u8; ENCAP_LEN], ip_len: u16, src_port: u16) {
        *h = self.hdr;
        h[16..18].copy_from_slice(&ip_len.to_be_bytes());
        let c = checksum::finish(self.ip_partial + u32::from(ip_len));
        h[24..26].copy_from_slice(&c.to_be_bytes());
        h[34..36].copy_from_slice(&src_port.to_be_bytes());
        h[38..40].copy_from_slice(&ip_len.wrapping_sub(ipv4::MIN_HEADER_LEN as u16).to_be_bytes());
    }
}

/// One-shot encapsulation: builds the template and writes it, with the
/// outer source port taken from [`super::flow::flow_hash`] of the inner frame.
/// The pipeline keeps templates in its tables and calls
/// [`EncapTemplate::write`] (or, on its fast path, [`EncapTemplate::write_header`]) instead.
pub fn encap(buf: &mut [u8], inner_start: usize, inner_len: usize, p: &EncapParams) -> Result<usize, WireError> {
    need(Layer::Vxlan, inner_start + inner_len, buf.len())?;
    let hash = super::flow::flow_hash(&buf[inner_start..inner_start + inner_len]);
    EncapTemplate::new(p)?.write(buf, inner_start, inner_len, src_port_for_hash(hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> EncapParams {
        EncapParams {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src_ip: Ipv4Addr::new(198, 18, 0, 1),
            dst_ip: Ipv4Addr::new(198, 18, 0, 2),
            dst_port: DEFAULT_PORT,
            vni: 0x00ab_cdef,
            ttl: 64,
        }
    }

    #[test]
    fn header_checksum_check_matches_the_reference() {
        let mut h = [0u8; 20];
        for seed in 0..2000u32 {
            for (i, b) in h.iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2_654_435_761).rotate_left(i as u32 * 3) >> 7) as u8;
            }
            h[0] = 0x45;
            if seed % 2 == 0 {
                h[10..12].fill(0);
                let c = checksum::checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
            }
            let reference = checksum::fold(checksum::sum(&h, 0)) == 0xffff;
            assert_eq!(ipv4_header_ok(&h), reference, "{h:?}");
            assert!(seed % 2 == 1 || reference, "a filled-in checksum verifies");
        }
    }

    #[test]
    fn header_flags() {
        let mut b = [0xffu8; 8];
        VxlanHeader { vni: 4096 }.emit(&mut b).unwrap();
        assert_eq!(b, [0x08, 0, 0, 0, 0x00, 0x10, 0x00, 0]);
        // Reserved bits set on receive are ignored.
        let rx = [0xff, 0xff, 0xff, 0xff, 0x00, 0x10, 0x00, 0xff];
        assert_eq!(VxlanHeader::parse(&rx).unwrap(), VxlanHeader { vni: 4096 });
        assert_eq!(VxlanHeader::parse(&[0xf7, 0, 0, 0, 0, 0, 1, 0]).unwrap_err(), WireError::VxlanNoIFlag(0xf7));
        assert!(VxlanHeader { vni: MAX_VNI + 1 }.emit(&mut b).is_err());
    }

    #[test]
    fn encap_then_classify() {
        let inner: Vec<u8> = (0..60u8).collect();
        let mut buf = vec![0u8; ENCAP_LEN + inner.len() + 4];
        buf[ENCAP_LEN..ENCAP_LEN + 60].copy_from_slice(&inner);
        let start = encap(&mut buf, ENCAP_LEN, 60, &params()).unwrap();
        assert_eq!(start, 0);
        let frame = &buf[..ENCAP_LEN + 60];
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert!(ip.verify_checksum());
        assert!(ip.dont_frag());
        assert_eq!(ip.total_len(), 20 + 8 + 8 + 60);
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(udp.checksum(), 0);
        assert!(udp.src_port() >= SRC_PORT_MIN);
        match classify(frame, params().dst_ip, DEFAULT_PORT).unwrap() {
            Classified::Vxlan(d) => {
                assert_eq!(d.vni, 0x00ab_cdef);
                assert_eq!(d.outer_src, params().src_ip);
                assert_eq!(&frame[d.inner], &inner[..]);
            }
            c => panic!("{c:?}"),
        }
        assert_eq!(classify(frame, params().src_ip, DEFAULT_PORT).unwrap(), Classified::NotVxlan);
        assert_eq!(classify(frame, params().dst_ip, 8472).unwrap(), Classified::NotVxlan);
    }

    #[test]
    fn no_headroom() {
        let mut buf = vec![0u8; 100];
        assert_eq!(encap(&mut buf, 49, 40, &params()).unwrap_err(), WireError::NoHeadroom { need: 50, have: 49 });
        assert!(matches!(encap(&mut buf, 50, 51, &params()), Err(WireError::Truncated { .. })));
    }

    #[test]
    fn src_port_range() {
        assert_eq!(src_port_for_hash(0), 49152);
        assert_eq!(src_port_for_hash(u32::MAX), 65535);
    }
}
