//! The common frame shape, read at fixed offsets: untagged Ethernet II
//! carrying IPv4 without options (the frame nearly all container traffic
//! is). One view, [`Head`], over a frame's first [`HEAD_LEN`] bytes, with a
//! named accessor per field ([`field`] holds the byte ranges, smoltcp
//! style); the packet path's fast paths read frames only through it.
//!
//! Owning the first [`HEAD_LEN`] bytes makes every accessor free of bounds
//! checks. What the accessors return is meaningful only for the shape the
//! caller has checked ([`Head::is_plain_ipv4`], [`plain_ipv4`]): the view
//! never says a frame is something it is not, it only reads bytes.

use super::ethernet::{self, MacAddr};
use super::ipv4::protocol;

/// Byte ranges of the common shape's fields, from the frame's start.
pub mod field {
    use core::ops::Range;
    /// Destination MAC.
    pub const DST_MAC: Range<usize> = 0..6;
    /// Source MAC.
    pub const SRC_MAC: Range<usize> = 6..12;
    /// EtherType (untagged).
    pub const ETHERTYPE: Range<usize> = 12..14;
    /// IPv4 version and header length (0x45: version 4, no options).
    pub const VER_IHL: usize = 14;
    /// IPv4 total length.
    pub const TOTAL_LEN: Range<usize> = 16..18;
    /// IPv4 flags and fragment offset.
    pub const FLAGS_FRAG: Range<usize> = 20..22;
    /// IPv4 protocol.
    pub const PROTOCOL: usize = 23;
    /// IPv4 header checksum.
    pub const IP_CHECKSUM: Range<usize> = 24..26;
    /// IPv4 source address.
    pub const SRC_IP: Range<usize> = 26..30;
    /// IPv4 destination address.
    pub const DST_IP: Range<usize> = 30..34;
    /// Start of the transport header.
    pub const L4: usize = 34;
    /// TCP/UDP source port.
    pub const SRC_PORT: Range<usize> = 34..36;
    /// TCP/UDP destination port.
    pub const DST_PORT: Range<usize> = 36..38;
    /// UDP length.
    pub const UDP_LEN: Range<usize> = 38..40;
    /// UDP checksum.
    pub const UDP_CHECKSUM: Range<usize> = 40..42;
    /// TCP flags (outside [`super::Head`]: read from the frame).
    pub const TCP_FLAGS: usize = 47;
    /// TCP checksum (outside [`super::Head`]: written in the frame).
    pub const TCP_CHECKSUM: Range<usize> = 50..52;
}

/// Bytes [`Head`] owns: Ethernet (14), IPv4 without options (20) and the
/// first 8 bytes of the transport header (ports, UDP length and checksum,
/// TCP sequence number, ICMP header).
pub const HEAD_LEN: usize = 42;

/// The first [`HEAD_LEN`] bytes of a frame, read at fixed offsets.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a>(&'a [u8; HEAD_LEN]);

impl<'a> Head<'a> {
    /// The head of `d`, or `None` if it is shorter than [`HEAD_LEN`].
    #[inline(always)]
    pub fn new(d: &'a [u8]) -> Option<Self> {
        d.first_chunk().map(Head)
    }
    /// The raw bytes.
    #[inline(always)]
    pub fn bytes(&self) -> &'a [u8; HEAD_LEN] {
        self.0
    }
    /// The first 8 bytes: the destination MAC and two bytes after it, the
    /// form the forwarding table's keys are made from (`tables::mac_key_at`).
    #[inline(always)]
    pub fn dst_mac_word(&self) -> &'a [u8; 8] {
        chunk(self.0, 0)
    }
    /// The source MAC and the EtherType, as one 8-byte array (what a task
    /// port's own frames start with, after the destination).
    #[inline(always)]
    pub fn src_mac_and_type(&self) -> &'a [u8; 8] {
        chunk(self.0, field::SRC_MAC.start)
    }
    /// True if the destination MAC is a group (broadcast or multicast) MAC.
    #[inline(always)]
    pub fn dst_is_group(&self) -> bool {
        self.0[field::DST_MAC.start] & 1 != 0
    }
    /// Destination MAC.
    #[inline(always)]
    pub fn dst_mac(&self) -> MacAddr {
        macs(chunk(self.0, 0)).0
    }
    /// Source MAC.
    #[inline(always)]
    pub fn src_mac(&self) -> MacAddr {
        macs(chunk(self.0, 0)).1
    }
    /// True for untagged IPv4 without options that is not a fragment: the
    /// shape every other accessor assumes.
    #[inline(always)]
    pub fn is_plain_ipv4(&self) -> bool {
        let h = self.0;
        h[12] == 0x08 && h[13] == 0x00 && h[field::VER_IHL] == 0x45 && !self.is_fragment()
    }
    /// True if the IPv4 flags and offset make this a fragment (MF set, or
    /// a non-zero offset; the DF and reserved bits are not looked at).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.0[20] & 0x3f != 0 || self.0[21] != 0
    }
    /// IPv4 total length.
    #[inline(always)]
    pub fn total_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.0[16], self.0[17]]))
    }
    /// IPv4 don't-fragment flag.
    #[inline(always)]
    pub fn dont_frag(&self) -> bool {
        self.0[20] & 0x40 != 0
    }
    /// IPv4 protocol.
    #[inline(always)]
    pub fn protocol(&self) -> u8 {
        self.0[field::PROTOCOL]
    }
    /// IPv4 source address, as its bytes.
    #[inline(always)]
    pub fn src_ip(&self) -> [u8; 4] {
        let h = self.0;
        [h[26], h[27], h[28], h[29]]
    }
    /// IPv4 destination address, as its bytes.
    #[inline(always)]
    pub fn dst_ip(&self) -> [u8; 4] {
        let h = self.0;
        [h[30], h[31], h[32], h[33]]
    }
    /// TCP/UDP source port.
    #[inline(always)]
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.0[34], self.0[35]])
    }
    /// TCP/UDP destination port.
    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.0[36], self.0[37]])
    }
    /// UDP length (for a UDP packet).
    #[inline(always)]
    pub fn udp_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.0[38], self.0[39]]))
    }
    /// The bytes up to the ports (38), what `flow::hash_ipv4_at_fixed_offsets`
    /// reads.
    #[inline(always)]
    pub fn through_ports(&self) -> &'a [u8; 38] {
        chunk(self.0, 0)
    }
}

/// The `N` bytes of the head at `at` (always there: every caller's `at + N`
/// is within [`HEAD_LEN`], so the fallback, zeros, is never taken and the
/// compiler drops it; no panic path either way).
#[inline(always)]
fn chunk<const N: usize>(h: &[u8; HEAD_LEN], at: usize) -> &[u8; N] {
    h.get(at..).and_then(|s| s.first_chunk()).unwrap_or(const { &[0u8; N] })
}

/// The destination and source MACs of an Ethernet header.
#[inline(always)]
pub fn macs(h: &[u8; 14]) -> (MacAddr, MacAddr) {
    (MacAddr([h[0], h[1], h[2], h[3], h[4], h[5]]), MacAddr([h[6], h[7], h[8], h[9], h[10], h[11]]))
}

/// The common frame, validated at fixed offsets exactly as far as
/// [`super::parse_frame`] would: untagged IPv4 without options, not a
/// fragment, its total length within the frame, carrying a TCP, UDP or
/// ICMP header that is sane ([`transport_ok`]). The head and the IPv4
/// total length; `None` means "ask the checked views".
#[inline(always)]
pub fn plain_ipv4(d: &[u8]) -> Option<(Head<'_>, usize)> {
    let h = Head::new(d)?;
    if !h.is_plain_ipv4() {
        return None;
    }
    let total = h.total_len();
    (total + ethernet::HEADER_LEN <= d.len() && transport_ok(d, ethernet::HEADER_LEN, total)).then_some((h, total))
}

/// Checks the transport header of the IPv4 packet whose header starts at
/// `ip` in `d` (no options; total length `total`), exactly as far as
/// `parse_frame` would: UDP length, TCP data offset, ICMP header. The one
/// copy of that check every fixed-offset path uses.
#[inline(always)]
pub fn transport_ok(d: &[u8], ip: usize, total: usize) -> bool {
    let Some(l4) = total.checked_sub(20) else { return false };
    let at = |o: usize| d.get(ip + 20 + o).copied();
    match d.get(ip + 9).copied() {
        Some(protocol::UDP) => {
            l4 >= 8
                && matches!((at(4), at(5)), (Some(a), Some(b)) if (8..=l4).contains(&usize::from(u16::from_be_bytes([a, b]))))
        }
        Some(protocol::TCP) => l4 >= 20 && at(12).is_some_and(|b| (20..=l4).contains(&(usize::from(b >> 4) * 4))),
        Some(protocol::ICMP) => l4 >= 8,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_syn() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(40000, 80, 1, 1024)
            .syn();
        let mut f = Vec::new();
        b.write(&mut f, &[]).expect("builds");
        f
    }

    #[test]
    fn the_view_reads_what_the_checked_views_read() {
        // 198.18.0.1:40000 -> 198.18.0.2:80, TCP SYN, from 02:..:01 to 02:..:02.
        let f = tcp_syn();
        let (h, total) = plain_ipv4(&f).expect("common shape");
        let p = crate::wire::parse_frame(&f).expect("parses");
        assert_eq!(total, f.len() - 14);
        assert_eq!(h.src_mac(), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(h.dst_mac(), MacAddr([2, 0, 0, 0, 0, 2]));
        assert_eq!((h.src_ip(), h.dst_ip()), ([198, 18, 0, 1], [198, 18, 0, 2]));
        assert_eq!((h.src_port(), h.dst_port(), h.protocol()), (40000, 80, protocol::TCP));
        assert!(!h.dst_is_group() && h.dont_frag() && !h.is_fragment());
        assert_eq!(p.l4_offset, Some(field::L4));
        // Anything else is not the common shape.
        let mut tagged = f.clone();
        tagged[12] = 0x81;
        assert!(plain_ipv4(&tagged).is_none());
        let mut frag = f.clone();
        frag[21] = 1;
        assert!(plain_ipv4(&frag).is_none());
        assert!(plain_ipv4(&f[..41]).is_none());
    }
}
