//! IPv4 (RFC 791): a zero-copy view with options and fragment flags, a
//! representation for building headers, and in-place address rewrites with
//! incremental checksum updates.

use super::checksum;
use super::error::{Layer, WireError, need};
use core::net::Ipv4Addr;

/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol numbers used by meshplane.
pub mod protocol {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 hop-by-hop options.
    pub const HOPOPT: u8 = 0;
    /// IPv6 routing header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 fragment header.
    pub const IPV6_FRAG: u8 = 44;
    /// Encapsulating security payload.
    pub const ESP: u8 = 50;
    /// Authentication header.
    pub const AH: u8 = 51;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 no next header.
    pub const IPV6_NONXT: u8 = 59;
    /// IPv6 destination options.
    pub const IPV6_OPTS: u8 = 60;
}

mod field {
    use core::ops::Range;
    pub(super) const VER_IHL: usize = 0;
    pub(super) const TOS: usize = 1;
    pub(super) const IDENT: Range<usize> = 4..6;
    pub(super) const FLG_OFF: Range<usize> = 6..8;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: Range<usize> = 10..12;
    pub(super) const SRC: Range<usize> = 12..16;
    pub(super) const DST: Range<usize> = 16..20;
}

/// A zero-copy view of an IPv4 packet.
///
/// Invariants (checked by [`Ipv4Packet::new_checked`]): version is 4; the
/// header length is at least 20 and within the buffer; the total length is at
/// least the header length and within the buffer. Bytes after the total
/// length (Ethernet padding) are ignored by every accessor.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Checks the invariants above and wraps `buf`.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        need(Layer::Ipv4, MIN_HEADER_LEN, b.len())?;
        let version = b[field::VER_IHL] >> 4;
        if version != 4 {
            return Err(WireError::BadVersion { layer: Layer::Ipv4, version });
        }
        let ihl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if ihl < MIN_HEADER_LEN {
            return Err(WireError::BadLength { layer: Layer::Ipv4, value: ihl, min: MIN_HEADER_LEN });
        }
        need(Layer::Ipv4, ihl, b.len())?;
        let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
        if total < ihl {
            return Err(WireError::BadLength { layer: Layer::Ipv4, value: total, min: ihl });
        }
        need(Layer::Ipv4, total, b.len())?;
        Ok(Ipv4Packet { buf })
    }

    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// Header length in bytes, options included.
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[field::VER_IHL] & 0x0f) * 4
    }
    /// Total length field: header plus payload.
    #[inline]
    pub fn total_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.b()[2], self.b()[3]]))
    }
    /// DSCP and ECN byte.
    #[inline]
    pub fn tos(&self) -> u8 {
        self.b()[field::TOS]
    }
    /// Identification.
    #[inline]
    pub fn ident(&self) -> u16 {
        let b = self.b();
        u16::from_be_bytes([b[field::IDENT.start], b[field::IDENT.start + 1]])
    }
    #[inline]
    fn flags_offset(&self) -> u16 {
        let b = self.b();
        u16::from_be_bytes([b[field::FLG_OFF.start], b[field::FLG_OFF.start + 1]])
    }
    /// Don't-fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & 0x4000 != 0
    }
    /// More-fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        self.flags_offset() & 0x2000 != 0
    }
    /// Fragment offset in bytes.
    #[inline]
    pub fn frag_offset(&self) -> usize {
        usize::from(self.flags_offset() & 0x1fff) * 8
    }
    /// True if this datagram is a fragment (first or later).
    #[inline]
    pub fn is_fragment(&self) -> bool {
        self.flags_offset() & 0x3fff != 0
    }
    /// True for a later fragment, which carries no transport header.
    #[inline]
    pub fn is_later_fragment(&self) -> bool {
        self.flags_offset() & 0x1fff != 0
    }
    /// Time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }
    /// Payload protocol.
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.b()[field::PROTOCOL]
    }
    /// Header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        let b = self.b();
        u16::from_be_bytes([b[field::CHECKSUM.start], b[field::CHECKSUM.start + 1]])
    }
    /// Source address.
    #[inline]
    pub fn src(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }
    /// Destination address.
    #[inline]
    pub fn dst(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }
    /// The options bytes (empty without options).
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.b()[MIN_HEADER_LEN..self.header_len()]
    }
    /// True if the header checksum is correct.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(&self.b()[..self.header_len()], 0)) == 0xffff
    }
    /// The payload: from the end of the header to the total length.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..self.total_len()]
    }
    /// The packet, header and payload, without any trailing padding.
    #[inline]
    pub fn packet(&self) -> &[u8] {
        &self.b()[..self.total_len()]
    }
    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline]
    fn bm(&mut self) -> &mut [u8] {
        self.buf.as_mut()
    }
    /// Writes a 16-bit header word and updates the header checksum (RFC 1624).
    #[inline]
    fn set_word(&mut self, at: usize, new: u16) {
        let old = u16::from_be_bytes([self.b()[at], self.b()[at + 1]]);
        let c = checksum::update16(self.checksum(), old, new);
        let b = self.bm();
        b[at..at + 2].copy_from_slice(&new.to_be_bytes());
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
    /// Sets the TTL, updating the header checksum incrementally.
    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        let w = u16::from_be_bytes([ttl, self.protocol()]);
        self.set_word(field::TTL, w);
    }
    /// Sets the source address, updating the header checksum only (the
    /// transport checksum is [`super::rewrite`]'s job).
    #[inline]
    pub fn set_src(&mut self, a: Ipv4Addr) {
        let old = u32::from(self.src());
        let c = checksum::update32(self.checksum(), old, a.into());
        let b = self.bm();
        b[field::SRC].copy_from_slice(&a.octets());
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
    /// Sets the destination address, updating the header checksum only.
    #[inline]
    pub fn set_dst(&mut self, a: Ipv4Addr) {
        let old = u32::from(self.dst());
        let c = checksum::update32(self.checksum(), old, a.into());
        let b = self.bm();
        b[field::DST].copy_from_slice(&a.octets());
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
    /// Recomputes the header checksum from scratch.
    #[inline]
    pub fn fill_checksum(&mut self) {
        let h = self.header_len();
        let b = self.bm();
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&b[..h]);
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
    /// The payload, writable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (h, t) = (self.header_len(), self.total_len());
        &mut self.bm()[h..t]
    }
}

/// The fields of an IPv4 header without options, for building packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Payload protocol.
    pub protocol: u8,
    /// Payload length (total length minus 20).
    pub payload_len: u16,
    /// Time to live.
    pub ttl: u8,
    /// DSCP and ECN.
    pub tos: u8,
    /// Identification.
    pub ident: u16,
    /// Don't-fragment flag.
    pub dont_frag: bool,
}

impl Ipv4Repr {
    /// Reads the fixed fields of a checked packet. Options are not part of
    /// the representation; `payload_len` is counted after them.
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv4Packet<T>) -> Ipv4Repr {
        Ipv4Repr {
            src: p.src(),
            dst: p.dst(),
            protocol: p.protocol(),
            payload_len: (p.total_len() - p.header_len()) as u16,
            ttl: p.ttl(),
            tos: p.tos(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
        }
    }

    /// Writes a 20-byte header with a correct checksum into `b`.
    #[inline]
    pub fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        need(Layer::Ipv4, MIN_HEADER_LEN, b.len())?;
        let total = (MIN_HEADER_LEN as u16).checked_add(self.payload_len).ok_or(WireError::BadLength {
            layer: Layer::Ipv4,
            value: usize::from(self.payload_len) + MIN_HEADER_LEN,
            min: MIN_HEADER_LEN,
        })?;
        b[0] = 0x45;
        b[1] = self.tos;
        b[2..4].copy_from_slice(&total.to_be_bytes());
        b[4..6].copy_from_slice(&self.ident.to_be_bytes());
        b[6..8].copy_from_slice(&(if self.dont_frag { 0x4000u16 } else { 0 }).to_be_bytes());
        b[8] = self.ttl;
        b[9] = self.protocol;
        b[10..12].copy_from_slice(&[0, 0]);
        b[12..16].copy_from_slice(&self.src.octets());
        b[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum::checksum(&b[..MIN_HEADER_LEN]);
        b[10..12].copy_from_slice(&c.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let r = Ipv4Repr {
            src: Ipv4Addr::new(198, 18, 0, 1),
            dst: Ipv4Addr::new(198, 18, 0, 2),
            protocol: protocol::UDP,
            payload_len: 8,
            ttl: 64,
            tos: 0,
            ident: 0x1234,
            dont_frag: true,
        };
        let mut b = vec![0u8; 28];
        r.emit(&mut b).unwrap();
        b
    }

    #[test]
    fn emit_parse_roundtrip() {
        let b = sample();
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 28);
        assert!(p.dont_frag() && !p.more_frags() && !p.is_fragment());
        assert_eq!(p.payload().len(), 8);
        assert_eq!(Ipv4Repr::parse(&p).ident, 0x1234);
    }

    #[test]
    fn padding_is_not_payload() {
        let mut b = sample();
        b.extend_from_slice(&[0xee; 18]);
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.payload().len(), 8);
        assert_eq!(p.packet().len(), 28);
    }

    #[test]
    fn setters_keep_checksum_valid() {
        let mut b = sample();
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        p.set_src(Ipv4Addr::new(198, 19, 255, 254));
        p.set_dst(Ipv4Addr::new(198, 18, 77, 1));
        p.set_ttl(1);
        assert!(p.verify_checksum());
        let c = p.checksum();
        p.fill_checksum();
        assert_eq!(p.checksum(), c);
    }

    #[test]
    fn fragments_flagged() {
        let mut b = sample();
        b[6] = 0x20; // MF, offset 0: first fragment
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(p.is_fragment() && p.more_frags() && !p.is_later_fragment());
        b[6] = 0x00;
        b[7] = 0xb9; // offset 185*8 = 1480, last fragment
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(p.is_fragment() && p.is_later_fragment() && !p.more_frags());
        assert_eq!(p.frag_offset(), 1480);
    }

    #[test]
    fn options() {
        let mut b = [0u8; 32];
        b[0] = 0x47; // ihl 7: 8 bytes of options
        b[2..4].copy_from_slice(&32u16.to_be_bytes());
        b[20] = 0x07; // record route
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.options().len(), 8);
        assert_eq!(p.options()[0], 7);
        assert_eq!(p.payload().len(), 4);
    }

    #[test]
    fn rejects_bad_headers() {
        let b = sample();
        let mut v6 = b.clone();
        v6[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&v6[..]).unwrap_err(),
            WireError::BadVersion { layer: Layer::Ipv4, version: 6 }
        );
        let mut short_ihl = b.clone();
        short_ihl[0] = 0x44;
        assert!(matches!(Ipv4Packet::new_checked(&short_ihl[..]), Err(WireError::BadLength { value: 16, .. })));
        let mut long_ihl = b.clone();
        long_ihl[0] = 0x4f; // 60-byte header in a 28-byte buffer
        assert!(matches!(Ipv4Packet::new_checked(&long_ihl[..]), Err(WireError::Truncated { need: 60, .. })));
        let mut small_total = b.clone();
        small_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert!(matches!(Ipv4Packet::new_checked(&small_total[..]), Err(WireError::BadLength { value: 19, .. })));
        let mut big_total = b.clone();
        big_total[2..4].copy_from_slice(&29u16.to_be_bytes());
        assert!(matches!(Ipv4Packet::new_checked(&big_total[..]), Err(WireError::Truncated { need: 29, .. })));
        assert!(matches!(Ipv4Packet::new_checked(&b[..19]), Err(WireError::Truncated { need: 20, .. })));
    }
}
