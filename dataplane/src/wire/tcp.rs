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

/// TCP option kinds (RFC 9293, 3.2).
pub mod option {
    /// End of option list.
    pub const END: u8 = 0;
    /// No-operation (padding).
    pub const NOP: u8 = 1;
    /// Maximum segment size (length 4).
    pub const MSS: u8 = 2;
}

/// Lowers the MSS option of the segment whose TCP header starts `seg` to
/// `max` if it announces more (what `iptables -j TCPMSS --clamp-mss-to-pmtu`
/// does), updating the checksum incrementally (RFC 1624) over the 16-bit
/// words the value touches (it may sit at an odd offset). Returns the old
/// and new MSS if it was lowered; `None` (nothing written) when the header
/// does not parse, has no MSS option, or the option list is malformed
/// before one, or the MSS is already `max` or less. A segment without the
/// option is left as is (see ARCHITECTURE.md: RFC 9293's default of 536
/// bytes applies to it, below any network MTU − 40 meshplane allows).
pub fn clamp_mss(seg: &mut [u8], max: u16) -> Option<(u16, u16)> {
    let hl = usize::from(*seg.get(12)? >> 4) * 4;
    if hl < MIN_HEADER_LEN || seg.len() < hl {
        return None;
    }
    let mut i = MIN_HEADER_LEN;
    let at = loop {
        let kind = *seg.get(i).filter(|_| i < hl)?;
        match kind {
            option::END => return None,
            option::NOP => i += 1,
            _ => {
                let len = usize::from(*seg.get(i + 1).filter(|_| i + 1 < hl)?);
                if len < 2 || i + len > hl {
                    return None;
                }
                if kind == option::MSS {
                    if len != 4 {
                        return None;
                    }
                    break i + 2;
                }
                i += len;
            }
        }
    };
    let old = u16::from_be_bytes([seg[at], seg[at + 1]]);
    if old <= max {
        return None;
    }
    // The aligned words covering the value: one if it is even, two if odd
    // (the header is a whole number of words, so both are in it).
    let (w0, w1) = (at & !1, (at + 2).next_multiple_of(2));
    let mut before = [0u8; 4];
    before[..w1 - w0].copy_from_slice(&seg[w0..w1]);
    seg[at..at + 2].copy_from_slice(&max.to_be_bytes());
    let mut csum = u16::from_be_bytes([seg[16], seg[17]]);
    for w in (w0..w1).step_by(2) {
        let o = u16::from_be_bytes([before[w - w0], before[w - w0 + 1]]);
        csum = checksum::update16(csum, o, u16::from_be_bytes([seg[w], seg[w + 1]]));
    }
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    Some((old, max))
}

/// The reset a host's stack answers a segment to a closed port with
/// (RFC 9293, 3.10.7.1): to a segment with ACK, a reset with SEQ = its
/// ACK; else a reset with ACK = its SEQ plus its length (SYN and FIN count
/// one each). Ports are the answer's own (swapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetRepr {
    /// Source port of the reset (the segment's destination port).
    pub src_port: u16,
    /// Destination port of the reset (the segment's source port).
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (0 without ACK).
    pub ack: u32,
    /// `RST`, or `RST | ACK`.
    pub flags: u8,
}

impl ResetRepr {
    /// Length of the frame [`ResetRepr::emit_frame`] writes: Ethernet,
    /// IPv4 and TCP headers without options.
    pub const FRAME_LEN: usize = 54;

    /// The reset answering `seg`, or `None` if `seg` is a reset itself (a
    /// reset never answers a reset).
    pub fn answering<T: AsRef<[u8]>>(seg: &TcpPacket<T>) -> Option<ResetRepr> {
        let f = seg.flags();
        if f & flags::RST != 0 {
            return None;
        }
        let (seq, ack, out) = if f & flags::ACK != 0 {
            (seg.ack(), 0, flags::RST)
        } else {
            let len = seg.payload().len() as u32 + u32::from(f & flags::SYN != 0) + u32::from(f & flags::FIN != 0);
            (0, seg.seq().wrapping_add(len), flags::RST | flags::ACK)
        };
        Some(ResetRepr { src_port: seg.dst_port(), dst_port: seg.src_port(), seq, ack, flags: out })
    }

    /// Writes the reset as a whole frame (Ethernet from `src_mac` to
    /// `dst_mac`; IPv4 from `src` to `dst`, DF, TTL 64; TCP window 0) with
    /// both checksums.
    pub fn emit_frame(
        &self,
        out: &mut [u8; Self::FRAME_LEN],
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) {
        use super::ipv4::protocol;
        out[0..6].copy_from_slice(&dst_mac);
        out[6..12].copy_from_slice(&src_mac);
        out[12..14].copy_from_slice(&super::ethernet::ethertype::IPV4.to_be_bytes());
        // IPv4: 20 bytes, total 40, DF, TTL 64.
        out[14..34].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, protocol::TCP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out[26..30].copy_from_slice(&src.octets());
        out[30..34].copy_from_slice(&dst.octets());
        let ipsum = checksum::checksum(&out[14..34]);
        out[24..26].copy_from_slice(&ipsum.to_be_bytes());
        // TCP: 20 bytes, window 0.
        out[34..36].copy_from_slice(&self.src_port.to_be_bytes());
        out[36..38].copy_from_slice(&self.dst_port.to_be_bytes());
        out[38..42].copy_from_slice(&self.seq.to_be_bytes());
        out[42..46].copy_from_slice(&self.ack.to_be_bytes());
        out[46..54].copy_from_slice(&[0x50, self.flags, 0, 0, 0, 0, 0, 0]);
        let sum = checksum::sum(&out[34..54], checksum::pseudo_header_v4(src, dst, protocol::TCP, 20));
        out[50..52].copy_from_slice(&checksum::finish(sum).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN from 198.18.0.9 to 198.18.1.1 with these options (padded to
    /// words with END), its checksum filled.
    fn syn(opts: &[u8]) -> (Vec<u8>, Ipv4Addr, Ipv4Addr) {
        let hl = MIN_HEADER_LEN + opts.len().next_multiple_of(4);
        let mut b = vec![0u8; hl];
        b[0..4].copy_from_slice(&[0x9c, 0x40, 0, 80]);
        b[12] = ((hl / 4) as u8) << 4;
        b[13] = flags::SYN;
        b[MIN_HEADER_LEN..MIN_HEADER_LEN + opts.len()].copy_from_slice(opts);
        let (s, d) = (Ipv4Addr::new(198, 18, 0, 9), Ipv4Addr::new(198, 18, 1, 1));
        TcpPacket::new_checked(&mut b[..]).unwrap().fill_checksum_v4(s, d);
        (b, s, d)
    }

    #[test]
    fn clamp_mss_lowers_an_even_or_odd_option_with_a_valid_checksum() {
        // MSS 8960 first (even offset), then after one NOP (odd offset),
        // between a window scale and SACK-permitted.
        for opts in [&[2, 4, 0x23, 0x00, 1, 3, 3, 7][..], &[1, 2, 4, 0x23, 0x00, 4, 2, 1, 3, 3, 7][..]] {
            let (mut b, s, d) = syn(opts);
            let at = MIN_HEADER_LEN + opts.iter().position(|&k| k == 2).unwrap() + 2;
            assert_eq!(clamp_mss(&mut b, 1410), Some((8960, 1410)), "{opts:?}");
            assert_eq!(&b[at..at + 2], &1410u16.to_be_bytes());
            let seg = TcpPacket::new_checked(&b[..]).unwrap();
            assert!(seg.verify_checksum_v4(s, d), "{opts:?}");
            let mut full = b.clone();
            TcpPacket::new_checked(&mut full[..]).unwrap().fill_checksum_v4(s, d);
            assert_eq!(b, full, "the incremental checksum is the recomputed one");
        }
    }

    #[test]
    fn clamp_mss_leaves_what_it_must_not_touch() {
        // Already small enough; no MSS option; END before it; a zero-length
        // option (malformed); an MSS option of the wrong length.
        for opts in
            [&[2, 4, 0x05, 0x82][..], &[1, 1, 4, 2], &[0, 0, 2, 4, 0x23, 0], &[8, 0, 2, 4, 0x23, 0], &[2, 3, 0x23, 0]]
        {
            let (mut b, ..) = syn(opts);
            let orig = b.clone();
            assert_eq!(clamp_mss(&mut b, 1410), None, "{opts:?}");
            assert_eq!(b, orig);
        }
        // A header longer than the buffer.
        let (mut b, ..) = syn(&[2, 4, 0x23, 0]);
        assert_eq!(clamp_mss(&mut b[..22], 1410), None);
    }

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

    #[test]
    fn a_reset_answers_as_rfc_9293_says() {
        let (s, d) = (Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 1, 2));
        let seg = |f: u8, payload: &[u8]| {
            let mut b = vec![0u8; 20 + payload.len()];
            b[0..2].copy_from_slice(&33000u16.to_be_bytes());
            b[2..4].copy_from_slice(&80u16.to_be_bytes());
            b[4..8].copy_from_slice(&100u32.to_be_bytes());
            b[8..12].copy_from_slice(&7u32.to_be_bytes());
            b[12] = 5 << 4;
            b[13] = f;
            b[20..].copy_from_slice(payload);
            b
        };
        let syn = ResetRepr::answering(&TcpPacket::new_checked(seg(flags::SYN | flags::FIN, b"ab")).unwrap());
        assert_eq!(
            syn,
            Some(ResetRepr { src_port: 80, dst_port: 33000, seq: 0, ack: 104, flags: flags::RST | flags::ACK })
        );
        let ack = ResetRepr::answering(&TcpPacket::new_checked(seg(flags::ACK, b"")).unwrap()).unwrap();
        assert_eq!((ack.seq, ack.ack, ack.flags), (7, 0, flags::RST));
        assert_eq!(ResetRepr::answering(&TcpPacket::new_checked(seg(flags::RST, b"")).unwrap()), None);
        let mut out = [0u8; ResetRepr::FRAME_LEN];
        ack.emit_frame(&mut out, [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], d, s);
        let ip = crate::wire::ipv4::Ipv4Packet::new_checked(&out[14..]).unwrap();
        assert!(ip.verify_checksum() && ip.src() == d && ip.dst() == s && ip.total_len() == 40);
        assert!(TcpPacket::new_checked(&out[34..]).unwrap().verify_checksum_v4(d, s));
        assert_eq!((&out[0..6], &out[6..12]), (&[2, 0, 0, 0, 0, 1][..], &[2, 0, 0, 0, 0, 2][..]));
    }
}
