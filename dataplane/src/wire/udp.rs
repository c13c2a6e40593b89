//! UDP (RFC 768).

use super::checksum;
use super::error::{Layer, WireError, need};
use core::net::Ipv4Addr;

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

/// A zero-copy view of a UDP datagram.
///
/// Invariants (checked by [`UdpPacket::new_checked`]): the length field is at
/// least 8 and within the buffer; bytes after it are ignored.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Checks the invariants above and wraps `buf`.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        need(Layer::Udp, HEADER_LEN, b.len())?;
        let len = usize::from(u16::from_be_bytes([b[4], b[5]]));
        if len < HEADER_LEN {
            return Err(WireError::BadLength { layer: Layer::Udp, value: len, min: HEADER_LEN });
        }
        need(Layer::Udp, len, b.len())?;
        Ok(UdpPacket { buf })
    }
    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.b()[0], self.b()[1]])
    }
    /// Destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.b()[2], self.b()[3]])
    }
    /// Length field: header plus payload.
    #[inline]
    pub fn len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.b()[4], self.b()[5]]))
    }
    /// Always false: the length is at least 8 by construction.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Checksum field (0 means "no checksum" over IPv4).
    #[inline]
    pub fn checksum(&self) -> u16 {
        u16::from_be_bytes([self.b()[6], self.b()[7]])
    }
    /// The payload.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.b()[HEADER_LEN..self.len()]
    }
    /// True if the checksum is absent (0) or correct for an IPv4 pseudo-header.
    #[inline]
    pub fn verify_checksum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let acc = checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::UDP, self.len() as u16);
        checksum::fold(checksum::sum(&self.b()[..self.len()], acc)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Computes the full checksum for an IPv4 pseudo-header and writes it
    /// (a computed 0 is sent as 0xffff, RFC 768).
    #[inline]
    pub fn fill_checksum_v4(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        let len = self.len();
        let b = self.buf.as_mut();
        b[6..8].copy_from_slice(&[0, 0]);
        let acc = checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::UDP, len as u16);
        let c = match checksum::finish(checksum::sum(&b[..len], acc)) {
            0 => 0xffff,
            c => c,
        };
        b[6..8].copy_from_slice(&c.to_be_bytes());
    }
}

/// The fields of a UDP header, for building packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload length.
    pub payload_len: u16,
}

impl UdpRepr {
    /// Reads a checked datagram's header.
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(p: &UdpPacket<T>) -> UdpRepr {
        UdpRepr { src_port: p.src_port(), dst_port: p.dst_port(), payload_len: (p.len() - HEADER_LEN) as u16 }
    }
    /// Writes the header with a zero checksum into `b`.
    #[inline]
    pub fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        need(Layer::Udp, HEADER_LEN, b.len())?;
        let len = self.payload_len.checked_add(HEADER_LEN as u16).ok_or(WireError::BadLength {
            layer: Layer::Udp,
            value: usize::from(self.payload_len) + HEADER_LEN,
            min: HEADER_LEN,
        })?;
        b[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        b[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        b[4..6].copy_from_slice(&len.to_be_bytes());
        b[6..8].copy_from_slice(&[0, 0]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_checksum() {
        let mut b = [0u8; 13];
        UdpRepr { src_port: 40000, dst_port: 4789, payload_len: 5 }.emit(&mut b).unwrap();
        b[8..].copy_from_slice(b"hello");
        let (s, d) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        let mut p = UdpPacket::new_checked(&mut b[..]).unwrap();
        assert!(p.verify_checksum_v4(s, d), "zero checksum means none");
        p.fill_checksum_v4(s, d);
        assert_ne!(p.checksum(), 0);
        assert!(p.verify_checksum_v4(s, d));
        assert!(!p.verify_checksum_v4(s, Ipv4Addr::new(198, 18, 0, 3)));
        assert_eq!(UdpRepr::parse(&p), UdpRepr { src_port: 40000, dst_port: 4789, payload_len: 5 });
        assert_eq!(p.payload(), b"hello");
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut b = [0u8; 8];
        b[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert!(matches!(UdpPacket::new_checked(&b[..]), Err(WireError::BadLength { value: 7, .. })));
        b[4..6].copy_from_slice(&9u16.to_be_bytes());
        assert!(matches!(UdpPacket::new_checked(&b[..]), Err(WireError::Truncated { need: 9, .. })));
        assert!(matches!(UdpPacket::new_checked(&b[..7]), Err(WireError::Truncated { need: 8, .. })));
    }
}
