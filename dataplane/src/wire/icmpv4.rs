//! ICMPv4 (RFC 792): echo and destination-unreachable, what the overlay
//! answers itself.

use super::checksum;
use super::error::{Layer, WireError, need};

/// Length of the ICMP header (type, code, checksum, rest of header).
pub const HEADER_LEN: usize = 8;

/// ICMP message types used by meshplane.
pub mod kind {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 12;
}

/// Code of time-exceeded: time to live exceeded in transit.
pub const CODE_TTL_EXCEEDED: u8 = 0;

/// Code of destination-unreachable: fragmentation needed and DF set (RFC 1191).
pub const CODE_FRAG_NEEDED: u8 = 4;

/// A zero-copy view of an ICMPv4 message. Invariant: at least 8 bytes; the
/// message extends to the end of the buffer (pass exactly the IP payload).
#[derive(Debug, Clone)]
pub struct Icmpv4Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    /// Checks the length and wraps `buf`.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        need(Layer::Icmpv4, HEADER_LEN, buf.as_ref().len())?;
        Ok(Icmpv4Packet { buf })
    }
    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Message type.
    #[inline]
    pub fn kind(&self) -> u8 {
        self.b()[0]
    }
    /// Message code.
    #[inline]
    pub fn code(&self) -> u8 {
        self.b()[1]
    }
    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        u16::from_be_bytes([self.b()[2], self.b()[3]])
    }
    /// Echo identifier (bytes 4..6).
    #[inline]
    pub fn echo_ident(&self) -> u16 {
        u16::from_be_bytes([self.b()[4], self.b()[5]])
    }
    /// Echo sequence number (bytes 6..8).
    #[inline]
    pub fn echo_seq(&self) -> u16 {
        u16::from_be_bytes([self.b()[6], self.b()[7]])
    }
    /// Next-hop MTU of a fragmentation-needed message (bytes 6..8).
    #[inline]
    pub fn next_hop_mtu(&self) -> u16 {
        self.echo_seq()
    }
    /// Data after the 8-byte header.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.b()[HEADER_LEN..]
    }
    /// True if the checksum over the whole message is correct.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.b(), 0)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
    /// Sets the type and updates the checksum incrementally.
    #[inline]
    pub fn set_kind(&mut self, kind: u8) {
        let b = self.buf.as_mut();
        let old = u16::from_be_bytes([b[0], b[1]]);
        let new = u16::from_be_bytes([kind, b[1]]);
        let c = checksum::update16(u16::from_be_bytes([b[2], b[3]]), old, new);
        b[0] = kind;
        b[2..4].copy_from_slice(&c.to_be_bytes());
    }
    /// Recomputes the checksum over the whole message.
    #[inline]
    pub fn fill_checksum(&mut self) {
        let b = self.buf.as_mut();
        b[2..4].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
    }
}

/// Writes the header of a message: type, code, the 4 "rest of header" bytes,
/// zero checksum (call [`Icmpv4Packet::fill_checksum`] once the data is in).
pub fn emit_header(b: &mut [u8], kind: u8, code: u8, rest: [u8; 4]) -> Result<(), WireError> {
    need(Layer::Icmpv4, HEADER_LEN, b.len())?;
    b[0] = kind;
    b[1] = code;
    b[2..4].copy_from_slice(&[0, 0]);
    b[4..8].copy_from_slice(&rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_to_reply_keeps_checksum_valid() {
        let mut b = [0u8; 16];
        emit_header(&mut b, kind::ECHO_REQUEST, 0, [0x12, 0x34, 0, 1]).unwrap();
        b[8..].copy_from_slice(b"pingpong");
        let mut p = Icmpv4Packet::new_checked(&mut b[..]).unwrap();
        p.fill_checksum();
        assert!(p.verify_checksum());
        p.set_kind(kind::ECHO_REPLY);
        assert!(p.verify_checksum());
        assert_eq!((p.kind(), p.code(), p.echo_ident(), p.echo_seq()), (0, 0, 0x1234, 1));
        assert_eq!(p.data(), b"pingpong");
        assert!(matches!(Icmpv4Packet::new_checked(&b[..7]), Err(WireError::Truncated { .. })));
    }
}
