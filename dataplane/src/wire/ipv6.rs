//! IPv6 (RFC 8200): the fixed header, and a walk over extension headers far
//! enough to find the transport header.

use super::error::{Layer, WireError, need};
use super::ipv4::protocol;
use core::net::Ipv6Addr;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Most extension headers [`Ipv6Packet::transport`] walks before giving up.
pub const MAX_EXTENSIONS: usize = 8;

/// A zero-copy view of an IPv6 packet.
///
/// Invariants (checked by [`Ipv6Packet::new_checked`]): version is 6 and the
/// buffer holds the fixed header plus the payload length it declares.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buf: T,
}

/// Where the transport header of an IPv6 packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    /// The upper-layer protocol (next header value of the last header).
    pub protocol: u8,
    /// Offset of the transport header from the start of the IPv6 header.
    pub offset: usize,
    /// True if a fragment header was crossed (first fragment).
    pub fragmented: bool,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Checks the invariants above and wraps `buf`.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        need(Layer::Ipv6, HEADER_LEN, b.len())?;
        let version = b[0] >> 4;
        if version != 6 {
            return Err(WireError::BadVersion { layer: Layer::Ipv6, version });
        }
        let plen = usize::from(u16::from_be_bytes([b[4], b[5]]));
        need(Layer::Ipv6, HEADER_LEN + plen, b.len())?;
        Ok(Ipv6Packet { buf })
    }

    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// Traffic class.
    #[inline]
    pub fn traffic_class(&self) -> u8 {
        let b = self.b();
        (b[0] << 4) | (b[1] >> 4)
    }
    /// Flow label (20 bits).
    #[inline]
    pub fn flow_label(&self) -> u32 {
        let b = self.b();
        (u32::from(b[1] & 0x0f) << 16) | (u32::from(b[2]) << 8) | u32::from(b[3])
    }
    /// Payload length field.
    #[inline]
    pub fn payload_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.b()[4], self.b()[5]]))
    }
    /// Next header of the fixed header.
    #[inline]
    pub fn next_header(&self) -> u8 {
        self.b()[6]
    }
    /// Hop limit.
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.b()[7]
    }
    /// Source address bytes.
    #[inline]
    pub fn src_bytes(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[8..24]);
        a
    }
    /// Destination address bytes.
    #[inline]
    pub fn dst_bytes(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[24..40]);
        a
    }
    /// Source address.
    #[inline]
    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.src_bytes())
    }
    /// Destination address.
    #[inline]
    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.dst_bytes())
    }
    /// The payload (extension headers included), without trailing padding.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.b()[HEADER_LEN..HEADER_LEN + self.payload_len()]
    }

    /// The packet bytes from `offset` (counted from the start of the IPv6
    /// header, as [`Transport::offset`] is) to the end of the payload; empty
    /// if `offset` is at or past the end.
    #[inline]
    pub fn from_offset(&self, offset: usize) -> &[u8] {
        let end = HEADER_LEN + self.payload_len();
        self.b().get(offset.max(HEADER_LEN)..end).unwrap_or(&[])
    }

    /// Walks hop-by-hop, routing, fragment, destination-options and AH
    /// headers to find the transport header.
    ///
    /// A later fragment is [`WireError::Fragment`]; more than
    /// [`MAX_EXTENSIONS`] headers is [`WireError::TooManyExtensions`]. ESP
    /// and "no next header" end the walk: they are returned as the protocol
    /// with the offset where they start. The offset always lies within the
    /// packet (it may equal its end when the transport header is empty).
    #[inline]
    pub fn transport(&self) -> Result<Transport, WireError> {
        let end = HEADER_LEN + self.payload_len();
        let b = &self.b()[..end];
        let mut next = self.next_header();
        let mut off = HEADER_LEN;
        let mut fragmented = false;
        for _ in 0..=MAX_EXTENSIONS {
            let len = match next {
                protocol::HOPOPT | protocol::IPV6_ROUTE | protocol::IPV6_OPTS => {
                    need(Layer::Ipv6, off + 2, end)?;
                    (usize::from(b[off + 1]) + 1) * 8
                }
                protocol::AH => {
                    need(Layer::Ipv6, off + 2, end)?;
                    (usize::from(b[off + 1]) + 2) * 4
                }
                protocol::IPV6_FRAG => {
                    need(Layer::Ipv6, off + 8, end)?;
                    let frag = u16::from_be_bytes([b[off + 2], b[off + 3]]);
                    if frag & 0xfff8 != 0 {
                        return Err(WireError::Fragment(Layer::Ipv6));
                    }
                    // An atomic fragment (offset 0, M clear) carries the whole datagram.
                    fragmented |= frag & 1 != 0;
                    8
                }
                p => return Ok(Transport { protocol: p, offset: off, fragmented }),
            };
            need(Layer::Ipv6, off + len, end)?;
            next = b[off];
            off += len;
        }
        Err(WireError::TooManyExtensions(MAX_EXTENSIONS))
    }
}

/// The fields of a fixed IPv6 header, for building packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Repr {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Next header.
    pub next_header: u8,
    /// Payload length.
    pub payload_len: u16,
    /// Hop limit.
    pub hop_limit: u8,
}

impl Ipv6Repr {
    /// Reads the fixed header of a checked packet.
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv6Packet<T>) -> Ipv6Repr {
        Ipv6Repr {
            src: p.src(),
            dst: p.dst(),
            next_header: p.next_header(),
            payload_len: p.payload_len() as u16,
            hop_limit: p.hop_limit(),
        }
    }
    /// Writes the fixed header (traffic class and flow label zero) into `b`.
    #[inline]
    pub fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        need(Layer::Ipv6, HEADER_LEN, b.len())?;
        b[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        b[4..6].copy_from_slice(&self.payload_len.to_be_bytes());
        b[6] = self.next_header;
        b[7] = self.hop_limit;
        b[8..24].copy_from_slice(&self.src.octets());
        b[24..40].copy_from_slice(&self.dst.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(next: u8, ext: &[u8], upper: &[u8]) -> Vec<u8> {
        let r = Ipv6Repr {
            src: "2001:2::1".parse().unwrap(),
            dst: "2001:2::2".parse().unwrap(),
            next_header: next,
            payload_len: (ext.len() + upper.len()) as u16,
            hop_limit: 64,
        };
        let mut b = vec![0u8; 40];
        r.emit(&mut b).unwrap();
        b.extend_from_slice(ext);
        b.extend_from_slice(upper);
        b
    }

    #[test]
    fn no_extensions() {
        let b = packet(protocol::UDP, &[], &[0u8; 8]);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.transport().unwrap(), Transport { protocol: protocol::UDP, offset: 40, fragmented: false });
        assert_eq!(Ipv6Repr::parse(&p).src, "2001:2::1".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn hop_by_hop_dest_opts_and_first_fragment() {
        let mut ext = vec![];
        ext.extend_from_slice(&[protocol::IPV6_OPTS, 0, 1, 4, 0, 0, 0, 0]); // hbh, 8 bytes, PadN
        ext.extend_from_slice(&[protocol::IPV6_FRAG, 1, 1, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // dst opts, 16 bytes
        ext.extend_from_slice(&[protocol::TCP, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef]); // fragment offset 0, M=1
        let b = packet(protocol::HOPOPT, &ext, &[0u8; 20]);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.transport().unwrap(), Transport { protocol: protocol::TCP, offset: 72, fragmented: true });
    }

    #[test]
    fn later_fragment_and_loops() {
        let ext = [protocol::UDP, 0, 0x05, 0x69, 0, 0, 0, 1]; // offset 173*8
        let b = packet(protocol::IPV6_FRAG, &ext, &[0u8; 8]);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.transport().unwrap_err(), WireError::Fragment(Layer::Ipv6));

        let mut ext = vec![];
        for _ in 0..=MAX_EXTENSIONS {
            ext.extend_from_slice(&[protocol::IPV6_OPTS, 0, 1, 4, 0, 0, 0, 0]);
        }
        let b = packet(protocol::IPV6_OPTS, &ext, &[]);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.transport().unwrap_err(), WireError::TooManyExtensions(MAX_EXTENSIONS));
    }

    #[test]
    fn truncated_extension() {
        let ext = [protocol::UDP, 3, 0, 0, 0, 0, 0, 0]; // claims 32 bytes
        let b = packet(protocol::HOPOPT, &ext, &[]);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert!(matches!(p.transport(), Err(WireError::Truncated { need: 72, have: 48, .. })));
        let mut bad = b.clone();
        bad[0] = 0x40;
        assert!(matches!(Ipv6Packet::new_checked(&bad[..]), Err(WireError::BadVersion { version: 4, .. })));
        assert!(matches!(Ipv6Packet::new_checked(&b[..47]), Err(WireError::Truncated { need: 48, .. })));
    }
}
