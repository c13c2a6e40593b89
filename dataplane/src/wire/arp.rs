//! ARP (RFC 826) for IPv4 over Ethernet, the only kind an overlay carries.

use super::error::{Layer, WireError, need};
use super::ethernet::MacAddr;
use core::net::Ipv4Addr;

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Who has `target_ip`? (1)
    Request,
    /// `sender_ip` is at `sender_mac`. (2)
    Reply,
    /// Any other opcode.
    Other(u16),
}

impl From<u16> for Operation {
    #[inline]
    fn from(v: u16) -> Self {
        match v {
            1 => Operation::Request,
            2 => Operation::Reply,
            o => Operation::Other(o),
        }
    }
}

impl From<Operation> for u16 {
    #[inline]
    fn from(o: Operation) -> u16 {
        match o {
            Operation::Request => 1,
            Operation::Reply => 2,
            Operation::Other(v) => v,
        }
    }
}

/// A parsed Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRepr {
    /// Request, reply or other.
    pub operation: Operation,
    /// Sender hardware address.
    pub sender_mac: MacAddr,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: MacAddr,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

impl ArpRepr {
    /// Parses an ARP packet (the Ethernet payload). Only hardware type 1
    /// (Ethernet, length 6) with protocol type 0x0800 (IPv4, length 4) is
    /// accepted; anything else is [`WireError::Unsupported`].
    #[inline]
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need(Layer::Arp, PACKET_LEN, b.len())?;
        let htype = u16::from_be_bytes([b[0], b[1]]);
        let ptype = u16::from_be_bytes([b[2], b[3]]);
        if htype != 1 {
            return Err(WireError::Unsupported { layer: Layer::Arp, field: "hardware type", value: htype.into() });
        }
        if ptype != 0x0800 {
            return Err(WireError::Unsupported { layer: Layer::Arp, field: "protocol type", value: ptype.into() });
        }
        if b[4] != 6 || b[5] != 4 {
            return Err(WireError::Unsupported {
                layer: Layer::Arp,
                field: "address lengths",
                value: u32::from(u16::from_be_bytes([b[4], b[5]])),
            });
        }
        Ok(ArpRepr {
            operation: u16::from_be_bytes([b[6], b[7]]).into(),
            sender_mac: MacAddr([b[8], b[9], b[10], b[11], b[12], b[13]]),
            sender_ip: Ipv4Addr::new(b[14], b[15], b[16], b[17]),
            target_mac: MacAddr([b[18], b[19], b[20], b[21], b[22], b[23]]),
            target_ip: Ipv4Addr::new(b[24], b[25], b[26], b[27]),
        })
    }

    /// Writes the packet into the first [`PACKET_LEN`] bytes of `b`.
    #[inline]
    pub fn emit(&self, b: &mut [u8]) -> Result<(), WireError> {
        need(Layer::Arp, PACKET_LEN, b.len())?;
        b[0..8].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 0]);
        b[6..8].copy_from_slice(&u16::from(self.operation).to_be_bytes());
        b[8..14].copy_from_slice(&self.sender_mac.0);
        b[14..18].copy_from_slice(&self.sender_ip.octets());
        b[18..24].copy_from_slice(&self.target_mac.0);
        b[24..28].copy_from_slice(&self.target_ip.octets());
        Ok(())
    }

    /// The reply to this request from the owner of `target_ip`, whose
    /// hardware address is `mac`.
    #[inline]
    pub fn reply_from(&self, mac: MacAddr) -> ArpRepr {
        ArpRepr {
            operation: Operation::Reply,
            sender_mac: mac,
            sender_ip: self.target_ip,
            target_mac: self.sender_mac,
            target_ip: self.sender_ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_reply() {
        let req = ArpRepr {
            operation: Operation::Request,
            sender_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            sender_ip: Ipv4Addr::new(198, 19, 0, 1),
            target_mac: MacAddr::ZERO,
            target_ip: Ipv4Addr::new(198, 19, 0, 2),
        };
        let mut b = [0u8; 28];
        req.emit(&mut b).unwrap();
        assert_eq!(&b[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(ArpRepr::parse(&b).unwrap(), req);
        let rep = req.reply_from(MacAddr([2, 0, 0, 0, 0, 2]));
        assert_eq!(rep.operation, Operation::Reply);
        assert_eq!(rep.sender_ip, req.target_ip);
        assert_eq!(rep.target_mac, req.sender_mac);
    }

    #[test]
    fn rejects_other_kinds() {
        let mut b = [0u8; 28];
        b[..8].copy_from_slice(&[0, 6, 8, 0, 6, 4, 0, 1]);
        assert!(matches!(ArpRepr::parse(&b), Err(WireError::Unsupported { field: "hardware type", .. })));
        b[..8].copy_from_slice(&[0, 1, 0x86, 0xdd, 6, 16, 0, 1]);
        assert!(matches!(ArpRepr::parse(&b), Err(WireError::Unsupported { field: "protocol type", .. })));
        b[..8].copy_from_slice(&[0, 1, 8, 0, 8, 4, 0, 1]);
        assert!(matches!(ArpRepr::parse(&b), Err(WireError::Unsupported { field: "address lengths", .. })));
        assert!(matches!(ArpRepr::parse(&b[..27]), Err(WireError::Truncated { .. })));
    }
}
