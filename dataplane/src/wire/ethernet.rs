//! Ethernet II frames, optionally with one or two VLAN tags (802.1Q, 802.1ad).

use super::error::{Layer, WireError, need};
use core::fmt;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// True for the broadcast address.
    #[inline]
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
    /// True for group (multicast or broadcast) addresses: the I/G bit is set.
    #[inline]
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
    /// True for individual (unicast) addresses.
    #[inline]
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Error parsing a MAC address from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes separated by ':', like 02:42:c6:13:00:02")]
pub struct MacParseError(pub String);

impl core::str::FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(|| MacParseError(s.to_string()))?;
            if p.is_empty() || p.len() > 2 {
                return Err(MacParseError(s.to_string()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| MacParseError(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

/// Well-known EtherType values.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q customer VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service VLAN tag (QinQ outer tag).
    pub const QINQ: u16 = 0x88a8;
}

/// Length of an untagged Ethernet II header.
pub const HEADER_LEN: usize = 14;
/// Length of one VLAN tag.
pub const TAG_LEN: usize = 4;
/// Most VLAN tags the parser walks (802.1ad outer + 802.1Q inner).
pub const MAX_TAGS: usize = 2;

/// A zero-copy view of an Ethernet II frame.
///
/// Invariant (checked by [`EthernetFrame::new_checked`]): the buffer holds the
/// whole header, every VLAN tag included, so accessors cannot go out of bounds.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buf: T,
    header_len: usize,
}

/// One VLAN tag: the TPID it was found under and its TCI fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    /// 0x8100 or 0x88a8.
    pub tpid: u16,
    /// Priority code point (3 bits).
    pub pcp: u8,
    /// Drop eligible indicator.
    pub dei: bool,
    /// VLAN identifier (12 bits).
    pub vid: u16,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Checks that `buf` holds a whole Ethernet header, with up to
    /// [`MAX_TAGS`] VLAN tags, and wraps it.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        need(Layer::Ethernet, HEADER_LEN, b.len())?;
        let mut len = HEADER_LEN;
        let mut tags = 0;
        while matches!(u16::from_be_bytes([b[len - 2], b[len - 1]]), ethertype::VLAN | ethertype::QINQ) {
            tags += 1;
            if tags > MAX_TAGS {
                return Err(WireError::Unsupported {
                    layer: Layer::Ethernet,
                    field: "vlan tag count",
                    value: tags as u32,
                });
            }
            len += TAG_LEN;
            need(Layer::Ethernet, len, b.len())?;
        }
        Ok(EthernetFrame { buf, header_len: len })
    }

    /// Destination address.
    #[inline]
    pub fn dst(&self) -> MacAddr {
        let b = self.buf.as_ref();
        MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// Source address.
    #[inline]
    pub fn src(&self) -> MacAddr {
        let b = self.buf.as_ref();
        MacAddr([b[6], b[7], b[8], b[9], b[10], b[11]])
    }

    /// The EtherType of the payload, after any VLAN tags.
    #[inline]
    pub fn ethertype(&self) -> u16 {
        let b = self.buf.as_ref();
        u16::from_be_bytes([b[self.header_len - 2], b[self.header_len - 1]])
    }

    /// Header length: 14 plus 4 per VLAN tag.
    #[inline]
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Number of VLAN tags (0 to [`MAX_TAGS`]).
    #[inline]
    pub fn tag_count(&self) -> usize {
        (self.header_len - HEADER_LEN) / TAG_LEN
    }

    /// The `i`-th VLAN tag, outermost first.
    #[inline]
    pub fn tag(&self, i: usize) -> Option<VlanTag> {
        if i >= self.tag_count() {
            return None;
        }
        let b = self.buf.as_ref();
        let o = 12 + i * TAG_LEN;
        let tci = u16::from_be_bytes([b[o + 2], b[o + 3]]);
        Some(VlanTag {
            tpid: u16::from_be_bytes([b[o], b[o + 1]]),
            pcp: (tci >> 13) as u8,
            dei: tci & 0x1000 != 0,
            vid: tci & 0x0fff,
        })
    }

    /// The innermost VLAN id, if tagged.
    #[inline]
    pub fn vlan_id(&self) -> Option<u16> {
        self.tag_count().checked_sub(1).and_then(|i| self.tag(i)).map(|t| t.vid)
    }

    /// Everything after the header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len..]
    }

    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Sets the destination address.
    #[inline]
    pub fn set_dst(&mut self, m: MacAddr) {
        self.buf.as_mut()[0..6].copy_from_slice(&m.0);
    }
    /// Sets the source address.
    #[inline]
    pub fn set_src(&mut self, m: MacAddr) {
        self.buf.as_mut()[6..12].copy_from_slice(&m.0);
    }
    /// The payload, writable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len;
        &mut self.buf.as_mut()[h..]
    }
}

/// Writes an untagged Ethernet II header into the first 14 bytes of `buf`.
pub fn emit_header(buf: &mut [u8], dst: MacAddr, src: MacAddr, ethertype: u16) -> Result<(), WireError> {
    need(Layer::Ethernet, HEADER_LEN, buf.len())?;
    buf[0..6].copy_from_slice(&dst.0);
    buf[6..12].copy_from_slice(&src.0);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged() {
        let mut f = [0u8; 60];
        emit_header(&mut f, MacAddr::BROADCAST, MacAddr([2, 0, 0, 0, 0, 1]), ethertype::ARP).unwrap();
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(e.dst(), MacAddr::BROADCAST);
        assert_eq!(e.src().to_string(), "02:00:00:00:00:01");
        assert_eq!(e.ethertype(), ethertype::ARP);
        assert_eq!(e.header_len(), 14);
        assert_eq!(e.vlan_id(), None);
        assert_eq!(e.payload().len(), 46);
    }

    #[test]
    fn qinq_and_dot1q() {
        let mut f = [0u8; 22];
        f[12..14].copy_from_slice(&ethertype::QINQ.to_be_bytes());
        f[14..16].copy_from_slice(&0x2064u16.to_be_bytes()); // pcp 1, vid 100
        f[16..18].copy_from_slice(&ethertype::VLAN.to_be_bytes());
        f[18..20].copy_from_slice(&0x1007u16.to_be_bytes()); // dei, vid 7
        f[20..22].copy_from_slice(&ethertype::IPV6.to_be_bytes());
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(e.tag_count(), 2);
        assert_eq!(e.tag(0), Some(VlanTag { tpid: ethertype::QINQ, pcp: 1, dei: false, vid: 100 }));
        assert_eq!(e.tag(1), Some(VlanTag { tpid: ethertype::VLAN, pcp: 0, dei: true, vid: 7 }));
        assert_eq!(e.vlan_id(), Some(7));
        assert_eq!(e.ethertype(), ethertype::IPV6);
        assert!(e.payload().is_empty());
    }

    #[test]
    fn truncated_and_too_many_tags() {
        assert_eq!(
            EthernetFrame::new_checked(&[0u8; 13][..]).unwrap_err(),
            WireError::Truncated { layer: Layer::Ethernet, need: 14, have: 13 }
        );
        let mut f = [0u8; 17];
        f[12..14].copy_from_slice(&ethertype::VLAN.to_be_bytes());
        assert!(matches!(EthernetFrame::new_checked(&f[..]), Err(WireError::Truncated { need: 18, .. })));
        let mut f = [0u8; 40];
        for o in [12, 16, 20] {
            f[o..o + 2].copy_from_slice(&ethertype::VLAN.to_be_bytes());
        }
        assert!(matches!(EthernetFrame::new_checked(&f[..]), Err(WireError::Unsupported { .. })));
    }

    #[test]
    fn mac_parse() {
        assert_eq!("02:42:c6:13:00:02".parse::<MacAddr>().unwrap(), MacAddr([2, 0x42, 0xc6, 0x13, 0, 2]));
        for bad in ["", "02:42", "02:42:c6:13:00:02:03", "zz:42:c6:13:00:02", "002:42:c6:13:00:02"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(MacAddr([0x02, 0, 0, 0, 0, 1]).is_unicast());
    }
}
