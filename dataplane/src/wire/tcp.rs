//! TCP (RFC 9293) header view: what a load balancer reads.

use super::checksum;
use super::error::{Layer, WireError, need};
use core::net::Ipv4Addr;

/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// TCP flag bits (the low byte of the flags field).
pub mod flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer is significant.
    pub const URG: u8 = 0x20;
}

/// A zero-copy view of a TCP segment.
///
/// Invariant (checked by [`TcpPacket::new_checked`]): the data offset is at
/// least 5 words and the whole header, options included, is in the buffer.
/// The segment extends to the end of the buffer: callers pass exactly the IP
/// payload.
#[derive(Debug, Clone)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Checks the invariant above and wraps `buf`.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        need(Layer::Tcp, MIN_HEADER_LEN, b.len())?;
        let hl = usize::from(b[12] >> 4) * 4;
        if hl < MIN_HEADER_LEN {
            return Err(WireError::BadLength { layer: Layer::Tcp, value: hl, min: MIN_HEADER_LEN });
        }
        need(Layer::Tcp, hl, b.len())?;
        Ok(TcpPacket { buf })
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
    /// Sequence number.
    #[inline]
    pub fn seq(&self) -> u32 {
        let b = self.b();
        u32::from_be_bytes([b[4], b[5], b[6], b[7]])
    }
    /// Acknowledgment number.
    #[inline]
    pub fn ack(&self) -> u32 {
        let b = self.b();
        u32::from_be_bytes([b[8], b[9], b[10], b[11]])
    }
    /// Header length in bytes, options included.
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[12] >> 4) * 4
    }
    /// The flag bits (see [`flags`]).
    #[inline]
    pub fn flags(&self) -> u8 {
        self.b()[13]
    }
    /// Receive window.
    #[inline]
    pub fn window(&self) -> u16 {
        u16::from_be_bytes([self.b()[14], self.b()[15]])
    }
    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        u16::from_be_bytes([self.b()[16], self.b()[17]])
    }
    /// Options bytes.
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.b()[MIN_HEADER_LEN..self.header_len()]
    }
    /// Payload bytes.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..]
    }
    /// True if the checksum is correct for an IPv4 pseudo-header.
    #[inline]
    pub fn verify_checksum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let b = self.b();
        let Ok(len) = u16::try_from(b.len()) else { return false };
        let acc = checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::TCP, len);
        checksum::fold(checksum::sum(b, acc)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    /// Computes the full checksum for an IPv4 pseudo-header and writes it.
    #[inline]
    pub fn fill_checksum_v4(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        let b = self.buf.as_mut();
        b[16..18].copy_from_slice(&[0, 0]);
        let acc = checksum::pseudo_header_v4(src, dst, super::ipv4::protocol::TCP, b.len() as u16);
        let c = checksum::finish(checksum::sum(b, acc));
        b[16..18].copy_from_slice(&c.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_checksum() {
        let mut b = [0u8; 28];
        b[0..2].copy_from_slice(&33000u16.to_be_bytes());
        b[2..4].copy_from_slice(&80u16.to_be_bytes());
        b[4..8].copy_from_slice(&1u32.to_be_bytes());
        b[12] = 6 << 4; // 24-byte header
        b[13] = flags::SYN | flags::ACK;
        b[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
        b[24..].copy_from_slice(b"data");
        let (s, d) = (Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2));
        let mut t = TcpPacket::new_checked(&mut b[..]).unwrap();
        t.fill_checksum_v4(s, d);
        assert!(t.verify_checksum_v4(s, d));
        assert_eq!((t.src_port(), t.dst_port(), t.seq(), t.header_len()), (33000, 80, 1, 24));
        assert_eq!(t.flags(), flags::SYN | flags::ACK);
        assert_eq!(t.options(), &[2, 4, 5, 0xb4]);
        assert_eq!(t.payload(), b"data");
    }

    #[test]
    fn rejects_bad_offsets() {
        let mut b = [0u8; 20];
        b[12] = 4 << 4;
        assert!(matches!(TcpPacket::new_checked(&b[..]), Err(WireError::BadLength { value: 16, .. })));
        b[12] = 6 << 4;
        assert!(matches!(TcpPacket::new_checked(&b[..]), Err(WireError::Truncated { need: 24, .. })));
    }
}
