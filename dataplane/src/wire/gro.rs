//! Receive coalescing (GRO) of TCP/IPv4 segments into one super-frame,
//! for a port that takes super-frames (a task's TAP): consecutive
//! in-order segments of one flow become one write, the way the kernel's
//! `tcp_gro_receive` and VPP's `gro-coalesce` merge them. The rules are
//! the kernel's, strictly: the same Ethernet header; the same IPv4 header
//! (no options, not a fragment) but for its length, checksum and an ID one
//! more than the previous segment's; the same TCP header (options
//! included) but for the sequence number, which continues the previous
//! segment exactly, the checksum, and PSH, allowed on the last segment
//! only; flags other than ACK and PSH (SYN, FIN, RST, URG, CWR, ECE) are
//! never merged; every segment but the last carries exactly the first's
//! payload length, the last no more; every segment's checksums verify
//! (a corrupt one is never hidden inside a super-frame: it goes on alone
//! and its receiver drops it).

use super::checksum;
use core::net::Ipv4Addr;

const ETH: usize = 14;
const IP: usize = 20;

/// What a segment that may be merged looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Bytes of headers (Ethernet, IPv4, TCP with options).
    pub headers: usize,
    /// Payload bytes.
    pub payload: usize,
    /// The sequence number.
    pub seq: u32,
    /// The IP ID.
    pub id: u16,
    /// PSH is set.
    pub psh: bool,
}

fn rd16(d: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([d[at], d[at + 1]])
}

/// The segment `d` is, if it may be merged: an untagged IPv4 frame without
/// options, not a fragment, carrying TCP with payload, flags ACK (and
/// PSH) only, its lengths consistent and its checksums good.
pub fn segment_of(d: &[u8]) -> Option<Seg> {
    if d.len() < ETH + IP + 20 || d[12..14] != [0x08, 0x00] || d[ETH] != 0x45 || d[ETH + 9] != 6 {
        return None;
    }
    // Not a fragment: no MF, offset 0 (DF may be set).
    if rd16(d, ETH + 6) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(rd16(d, ETH + 2));
    if total + ETH != d.len() {
        return None;
    }
    let tcp = ETH + IP;
    let thl = usize::from(d[tcp + 12] >> 4) * 4;
    let flags = d[tcp + 13];
    if thl < 20 || tcp + thl >= d.len() || flags & !0x08 != 0x10 {
        return None;
    }
    if checksum::fold(checksum::sum(&d[ETH..tcp], 0)) != 0xffff {
        return None;
    }
    let (src, dst) = (Ipv4Addr::new(d[26], d[27], d[28], d[29]), Ipv4Addr::new(d[30], d[31], d[32], d[33]));
    let l4 = &d[tcp..];
    if checksum::fold(checksum::sum(l4, checksum::pseudo_header_v4(src, dst, 6, l4.len() as u16))) != 0xffff {
        return None;
    }
    Some(Seg {
        headers: tcp + thl,
        payload: d.len() - tcp - thl,
        seq: u32::from_be_bytes([d[tcp + 4], d[tcp + 5], d[tcp + 6], d[tcp + 7]]),
        id: rd16(d, ETH + 4),
        psh: flags & 0x08 != 0,
    })
}

/// True if segment `b` (`sb`) continues segment `a` (`sa`), where the
/// merge's segments carry `mss` payload bytes: `a` is not its last (no
/// PSH, a full segment), the headers match but for what changes from
/// segment to segment, and `b` starts where `a` ends.
pub fn continues(a: &[u8], sa: &Seg, b: &[u8], sb: &Seg, mss: usize) -> bool {
    let tcp = ETH + IP;
    sa.headers == sb.headers
        && !sa.psh
        && sa.payload == mss
        && sb.payload <= mss
        && sb.seq == sa.seq.wrapping_add(mss as u32)
        && sb.id == sa.id.wrapping_add(1)
        // Ethernet, then IPv4 version to ID exclusive of length and ID
        // (TOS), flags to protocol, addresses; TCP ports, ack to window
        // (flags but PSH), urgent pointer and options.
        && a[..ETH + 2] == b[..ETH + 2]
        && a[ETH + 6..ETH + 10] == b[ETH + 6..ETH + 10]
        && a[ETH + 12..tcp + 4] == b[ETH + 12..tcp + 4]
        && a[tcp + 8..tcp + 13] == b[tcp + 8..tcp + 13]
        && a[tcp + 13] | 0x08 == b[tcp + 13] | 0x08
        && a[tcp + 14..tcp + 16] == b[tcp + 14..tcp + 16]
        && a[tcp + 18..sa.headers] == b[tcp + 18..sb.headers]
}

/// Merges `segs` (each checked with [`segment_of`], each continuing the one
/// before it) into `out`: the first segment's headers with the last's PSH,
/// every payload, the IP total length and header checksum, and the TCP
/// checksum left partial (the pseudo-header's sum, as a kernel hands a
/// super-frame to a device with checksum offload). Returns the
/// super-frame's length and its segment size; `None` if it would not fit
/// `out` or exceed an IPv4 packet.
pub fn merge(segs: &[(&[u8], Seg)], out: &mut [u8]) -> Option<(usize, u16)> {
    let (first, s0) = segs.first()?;
    let (last, _) = segs.last()?;
    let total = s0.headers + segs.iter().map(|(_, s)| s.payload).sum::<usize>();
    if total > out.len() || total - ETH > usize::from(u16::MAX) {
        return None;
    }
    out[..s0.headers].copy_from_slice(&first[..s0.headers]);
    let mut at = s0.headers;
    for (d, s) in segs {
        out[at..at + s.payload].copy_from_slice(&d[s.headers..]);
        at += s.payload;
    }
    let tcp = ETH + IP;
    out[tcp + 13] = last[tcp + 13];
    out[ETH + 2..ETH + 4].copy_from_slice(&((total - ETH) as u16).to_be_bytes());
    out[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&out[ETH..tcp]);
    out[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    let (src, dst) =
        (Ipv4Addr::new(out[26], out[27], out[28], out[29]), Ipv4Addr::new(out[30], out[31], out[32], out[33]));
    let pseudo = checksum::fold(checksum::pseudo_header_v4(src, dst, 6, (total - tcp) as u16));
    out[tcp + 16..tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
    Some((total, s0.payload as u16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::gso::{Layout, segment};

    /// A stream's segments as a sender's kernel cuts them: `n` bytes from
    /// seq 1000 in segments of `mss`, IDs from 40, PSH on the last.
    fn stream(n: usize, mss: u16) -> Vec<Vec<u8>> {
        let data: Vec<u8> = (0..n).map(|i| (i % 241) as u8).collect();
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 1])
            .ipv4([198, 19, 0, 2], [198, 19, 0, 1], 64)
            .tcp(5001, 40000, 1000, 501)
            .ack(9)
            .psh()
            .write(&mut f, &data)
            .expect("builds");
        f[18..20].copy_from_slice(&40u16.to_be_bytes());
        let mut segs = Vec::new();
        segment(&f, &Layout::of(&f, 34).expect("layout"), mss, &mut [0u8; 2048], |s| segs.push(s.to_vec()))
            .expect("cuts");
        segs
    }

    /// Merges as a worker would: the longest chain from the first.
    fn coalesce(frames: &[Vec<u8>]) -> Option<Vec<u8>> {
        let segs: Vec<(&[u8], Seg)> = frames.iter().map(|f| (&f[..], segment_of(f).expect("mergeable"))).collect();
        let mss = segs[0].1.payload;
        let k = 1 + segs.windows(2).take_while(|w| continues(w[0].0, &w[0].1, w[1].0, &w[1].1, mss)).count();
        (k == segs.len()).then_some(())?;
        let mut out = vec![0u8; 65_600];
        let (len, gso) = merge(&segs, &mut out)?;
        assert_eq!(usize::from(gso), mss);
        out.truncate(len);
        Some(out)
    }

    #[test]
    fn in_order_segments_become_the_super_frame_they_were_cut_from() {
        let segs = stream(5000, 1400);
        assert_eq!(segs.len(), 4);
        let merged = coalesce(&segs).expect("merges");
        // Cut again, it gives back the very same segments.
        let mut again = Vec::new();
        let l = Layout::of(&merged, 34).expect("layout");
        segment(&merged, &l, 1400, &mut [0u8; 2048], |s| again.push(s.to_vec())).expect("cuts");
        assert_eq!(again, segs);
        // Its checksum is partial: the pseudo-header's sum.
        let p = checksum::fold(checksum::pseudo_header_v4(
            Ipv4Addr::new(198, 19, 0, 2),
            Ipv4Addr::new(198, 19, 0, 1),
            6,
            (merged.len() - 34) as u16,
        ));
        assert_eq!(rd16(&merged, 50), p);
        assert_eq!(checksum::fold(checksum::sum(&merged[14..34], 0)), 0xffff);
    }

    #[test]
    fn what_gro_refuses() {
        let segs = stream(5000, 1400);
        let ok = |s: &[Vec<u8>]| coalesce(s).is_some();
        assert!(ok(&segs));
        let fix = |f: &mut Vec<u8>| {
            crate::wire::rewrite::recompute_checksums_ipv4(&mut f[14..]).expect("ipv4");
        };
        // Out of order.
        assert!(!ok(&[segs[1].clone(), segs[0].clone()]));
        // A gap.
        assert!(!ok(&[segs[0].clone(), segs[2].clone()]));
        // Different flows (another source port).
        let mut other = segs[1].clone();
        other[34] ^= 1;
        fix(&mut other);
        assert!(!ok(&[segs[0].clone(), other]));
        // Flags: PSH before the last, or a FIN.
        let mut psh = segs[0].clone();
        psh[47] |= 0x08;
        fix(&mut psh);
        assert!(!ok(&[psh, segs[1].clone()]));
        let mut fin = segs[1].clone();
        fin[47] |= 0x01;
        fix(&mut fin);
        assert!(segment_of(&fin).is_none());
        // A different TCP option or window, a changed TTL, an ID that
        // does not follow.
        let mut win = segs[1].clone();
        win[48] ^= 1;
        fix(&mut win);
        assert!(!ok(&[segs[0].clone(), win]));
        let mut ttl = segs[1].clone();
        ttl[22] -= 1;
        fix(&mut ttl);
        assert!(!ok(&[segs[0].clone(), ttl]));
        let mut id = segs[1].clone();
        id[19] += 1;
        fix(&mut id);
        assert!(!ok(&[segs[0].clone(), id]));
        // A short segment before the last.
        let short = stream(2000, 1000);
        let shorter = stream(1500, 700);
        assert!(!ok(&[shorter[0].clone(), short[1].clone()]));
        // A bad checksum, a fragment, no payload: not a candidate at all.
        let mut bad = segs[1].clone();
        bad[60] ^= 0xff;
        assert!(segment_of(&bad).is_none());
        let mut frag = segs[1].clone();
        frag[20] |= 0x20;
        fix(&mut frag);
        assert!(segment_of(&frag).is_none());
        let empty = &stream(0, 1400)[0];
        assert_eq!(empty.len(), 54);
        assert!(segment_of(empty).is_none());
    }
}
