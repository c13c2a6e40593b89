//! Software segmentation of TCP super-frames (GSO), for ports that cannot
//! take them (an AF_XDP socket, a TAP without the offload): the segments
//! the kernel's `tcp_gso_segment` and `inet_gso_segment` would cut, plain
//! or inside VXLAN. Each segment carries a copy of the headers, the next
//! `gso_size` bytes of payload, and its own lengths, IP IDs (the first
//! segment's ID, then one more each; an outer header with DF keeps its
//! ID), sequence number, flags (FIN and PSH
//! on the last segment only, CWR on the first only) and complete
//! checksums (IPv4 headers, TCP, and the outer UDP if it had one: VXLAN's
//! usual zero stays zero).

use super::checksum;
use super::error::{Layer, WireError};
use core::net::Ipv4Addr;

/// Where a super-frame's headers are, from the frame's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The outer IPv4 header of a super-frame inside VXLAN (its UDP
    /// header follows it).
    pub outer_ip: Option<usize>,
    /// The IPv4 header of the TCP segment (the inner one in VXLAN).
    pub ip: usize,
    /// The TCP header.
    pub tcp: usize,
}

const ETH: usize = 14;
const IPV4: [u8; 2] = [0x08, 0x00];

fn rd16(d: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([d[at], d[at + 1]])
}

fn wr16(d: &mut [u8], at: usize, v: u16) {
    d[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The IPv4 header at `at` (after an Ethernet header whose type is IPv4):
/// its length and protocol.
fn ipv4_at(d: &[u8], at: usize) -> Result<(usize, u8), WireError> {
    if d.len() < at + 20 {
        return Err(WireError::Truncated { layer: Layer::Ipv4, need: at + 20, have: d.len() });
    }
    if d[at - 2..at] != IPV4 {
        return Err(WireError::Unsupported {
            layer: Layer::Ethernet,
            field: "ethertype",
            value: u32::from(rd16(d, at - 2)),
        });
    }
    if d[at] >> 4 != 4 {
        return Err(WireError::BadVersion { layer: Layer::Ipv4, version: d[at] >> 4 });
    }
    let ihl = usize::from(d[at] & 0xf) * 4;
    if ihl < 20 {
        return Err(WireError::BadLength { layer: Layer::Ipv4, value: ihl, min: 20 });
    }
    Ok((ihl, d[at + 9]))
}

impl Layout {
    /// The layout of the frame `d` whose TCP header starts at `tcp` (a
    /// virtio-net header's `csum_start`): Ethernet, IPv4 and TCP, or the
    /// same inside Ethernet, IPv4, UDP and VXLAN. Anything else is refused.
    pub fn of(d: &[u8], tcp: usize) -> Result<Layout, WireError> {
        let (ihl, proto) = ipv4_at(d, ETH)?;
        let layout = if ETH + ihl == tcp && proto == 6 {
            Layout { outer_ip: None, ip: ETH, tcp }
        } else if proto == 17 {
            let ip = ETH + ihl + 8 + 8 + ETH;
            let (inner_ihl, inner_proto) = ipv4_at(d, ip)?;
            if ip + inner_ihl != tcp || inner_proto != 6 {
                return Err(WireError::Unsupported { layer: Layer::Tcp, field: "csum_start", value: tcp as u32 });
            }
            Layout { outer_ip: Some(ETH), ip, tcp }
        } else {
            return Err(WireError::Unsupported { layer: Layer::Tcp, field: "csum_start", value: tcp as u32 });
        };
        let hlen = usize::from(d.get(tcp + 12).copied().unwrap_or(0) >> 4) * 4;
        if hlen < 20 || d.len() < tcp + hlen {
            return Err(WireError::Truncated { layer: Layer::Tcp, need: tcp + hlen.max(20), have: d.len() });
        }
        Ok(layout)
    }

    /// Bytes of headers in front of the payload.
    pub fn headers(&self, d: &[u8]) -> usize {
        self.tcp + usize::from(d[self.tcp + 12] >> 4) * 4
    }
}

/// Rewrites the IPv4 header at `at` in `seg` for a segment: total length
/// up to the segment's end, the ID `base + i` (with `bump`), the header
/// checksum.
fn fix_ipv4(seg: &mut [u8], at: usize, i: u16, bump: bool) {
    let ihl = usize::from(seg[at] & 0xf) * 4;
    wr16(seg, at + 2, (seg.len() - at) as u16);
    if bump {
        let id = rd16(seg, at + 4).wrapping_add(i);
        wr16(seg, at + 4, id);
    }
    wr16(seg, at + 10, 0);
    let c = checksum::checksum(&seg[at..at + ihl]);
    wr16(seg, at + 10, c);
}

fn addr(d: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(d[at], d[at + 1], d[at + 2], d[at + 3])
}

/// The full TCP or UDP checksum of the transport header at `l4` (the
/// field at `l4 + field`) over the rest of `seg`, under the IPv4 header at
/// `ip`.
fn transport_checksum(seg: &mut [u8], ip: usize, l4: usize, field: usize, proto: u8) -> u16 {
    wr16(seg, l4 + field, 0);
    let len = (seg.len() - l4) as u16;
    let acc = checksum::pseudo_header_v4(addr(seg, ip + 12), addr(seg, ip + 16), proto, len);
    checksum::finish(checksum::sum(&seg[l4..], acc))
}

/// Cuts the super-frame `d` (laid out as `l`) into segments of at most
/// `mss` payload bytes, each built in `scratch` and handed to `emit`.
/// Returns the number of segments. A segment that would not fit in
/// `scratch`, or an `mss` of 0, is an error and nothing is emitted.
pub fn segment(
    d: &[u8],
    l: &Layout,
    mss: u16,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, WireError> {
    let hdrs = l.headers(d);
    let mss = usize::from(mss);
    if mss == 0 {
        return Err(WireError::BadLength { layer: Layer::VirtioNet, value: 0, min: 1 });
    }
    let payload = &d[hdrs..];
    let seg_max = hdrs + mss.min(payload.len());
    if seg_max > scratch.len() {
        return Err(WireError::Truncated { layer: Layer::VirtioNet, need: seg_max, have: scratch.len() });
    }
    let n = payload.len().div_ceil(mss).max(1);
    let seq = u32::from_be_bytes([d[l.tcp + 4], d[l.tcp + 5], d[l.tcp + 6], d[l.tcp + 7]]);
    for i in 0..n {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let end = hdrs + chunk.len();
        let seg = &mut scratch[..end];
        seg[..hdrs].copy_from_slice(&d[..hdrs]);
        seg[hdrs..].copy_from_slice(chunk);
        let k = i as u16;
        fix_ipv4(seg, l.ip, k, true);
        let t = l.tcp;
        seg[t + 4..t + 8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        if i + 1 < n {
            seg[t + 13] &= !(0x01 | 0x08); // FIN, PSH: the last segment's
        }
        if i > 0 {
            seg[t + 13] &= !0x80; // CWR: the first segment's
        }
        let c = transport_checksum(seg, l.ip, t, 16, 6);
        wr16(seg, t + 16, c);
        if let Some(o) = l.outer_ip {
            // The outer ID moves on only where it means something: an
            // outer header with DF set (as meshplane's VXLAN has) is an
            // atomic datagram, whose ID is its sender's (RFC 6864).
            let df = seg[o + 6] & 0x40 != 0;
            fix_ipv4(seg, o, k, !df);
            let udp = o + usize::from(seg[o] & 0xf) * 4;
            wr16(seg, udp + 4, (end - udp) as u16);
            if rd16(seg, udp + 6) != 0 {
                let c = match transport_checksum(seg, o, udp, 6, 17) {
                    0 => 0xffff,
                    c => c,
                };
                wr16(seg, udp + 6, c);
            }
        }
        emit(seg);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    /// A TSO super-frame as a task's kernel hands it over: `payload` bytes
    /// of pattern, FIN|PSH|CWR set, IP ID 100, seq 1000; the TCP checksum
    /// left partial (garbage here: segmentation recomputes it).
    fn super_frame(payload: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 2])
            .ipv4([198, 19, 0, 1], [198, 19, 0, 2], 64)
            .tcp(40000, 5001, 1000, 64000)
            .ack(7)
            .psh()
            .fin()
            .cwr();
        let mut f = Vec::new();
        b.write(&mut f, &data).expect("builds");
        f[18..20].copy_from_slice(&100u16.to_be_bytes());
        f[34 + 16..34 + 18].copy_from_slice(&[0xde, 0xad]);
        f
    }

    /// The frame inside VXLAN (outer UDP checksum `udp_csum`).
    fn in_vxlan(inner: &[u8], udp_csum: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        let total = (20 + 8 + 8 + inner.len()) as u16;
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 7, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
        wr16(&mut f, 16, total);
        f.extend_from_slice(&[0xc0, 0x00, 0x12, 0xb5, 0, 0, 0, 0]);
        wr16(&mut f, 34 + 6, udp_csum);
        f.extend_from_slice(&[0x08, 0, 0, 0, 0, 0x10, 0, 0]);
        f.extend_from_slice(inner);
        f
    }

    /// Checks each segment with etherparse: lengths, checksums, payload;
    /// returns (seq, flags, ip id, payload) of each (inner ones in VXLAN).
    fn check(segs: &[Vec<u8>], vxlan: bool) -> Vec<(u32, u8, u16, Vec<u8>)> {
        segs.iter()
            .map(|s| {
                let inner = if vxlan {
                    let p = SlicedPacket::from_ethernet(s).expect("outer parses");
                    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("outer ipv4") };
                    assert_eq!(usize::from(ip.header().total_len()), s.len() - 14);
                    assert!(ip.header().to_header().calc_header_checksum() == ip.header().header_checksum());
                    let Some(TransportSlice::Udp(u)) = &p.transport else { panic!("udp") };
                    assert_eq!(usize::from(u.length()), s.len() - 34);
                    if u.checksum() != 0 {
                        let h = u.to_header();
                        let c = h
                            .calc_checksum_ipv4_raw(ip.header().source(), ip.header().destination(), u.payload())
                            .expect("sums");
                        assert_eq!(c, u.checksum(), "outer UDP checksum");
                    }
                    &s[50..]
                } else {
                    &s[..]
                };
                let p = SlicedPacket::from_ethernet(inner).expect("parses");
                let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("ipv4") };
                assert_eq!(usize::from(ip.header().total_len()), inner.len() - 14);
                assert_eq!(ip.header().to_header().calc_header_checksum(), ip.header().header_checksum());
                let Some(TransportSlice::Tcp(t)) = &p.transport else { panic!("tcp") };
                let c = t
                    .to_header()
                    .calc_checksum_ipv4_raw(ip.header().source(), ip.header().destination(), t.payload())
                    .expect("sums");
                assert_eq!(c, t.checksum(), "TCP checksum");
                (t.sequence_number(), inner[47], ip.header().identification(), t.payload().to_vec())
            })
            .collect()
    }

    fn cut(f: &[u8], tcp: usize, mss: u16) -> Vec<Vec<u8>> {
        let l = Layout::of(f, tcp).expect("layout");
        let mut out = Vec::new();
        let mut scratch = [0u8; 2048];
        let n = segment(f, &l, mss, &mut scratch, |s| out.push(s.to_vec())).expect("segments");
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn a_super_frame_is_cut_as_the_kernel_cuts_it() {
        let f = super_frame(3000);
        let segs = cut(&f, 34, 1400);
        let got = check(&segs, false);
        let lens: Vec<usize> = got.iter().map(|g| g.3.len()).collect();
        assert_eq!(lens, [1400, 1400, 200]);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1000, 2400, 3800]);
        assert_eq!(got.iter().map(|g| g.2).collect::<Vec<_>>(), [100, 101, 102]);
        // ACK stays on all; CWR on the first only; FIN and PSH on the last.
        assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [0x90, 0x10, 0x19]);
        let joined: Vec<u8> = got.iter().flat_map(|g| g.3.clone()).collect();
        assert_eq!(joined, f[54..]);
    }

    #[test]
    fn a_vxlan_super_frame_gets_its_outer_headers_per_segment() {
        let inner = super_frame(2900);
        for udp_csum in [0, 0x1234] {
            let f = in_vxlan(&inner, udp_csum);
            let segs = cut(&f, 50 + 34, 1448);
            let got = check(&segs, true);
            assert_eq!(got.iter().map(|g| g.3.len()).collect::<Vec<_>>(), [1448, 1448, 4]);
            assert_eq!(segs.iter().map(|s| rd16(s, 18)).collect::<Vec<_>>(), [7, 7, 7], "outer IP IDs with DF");
            let mut no_df = f.clone();
            no_df[20] = 0;
            let segs = cut(&no_df, 50 + 34, 1448);
            check(&segs, true);
            assert_eq!(segs.iter().map(|s| rd16(s, 18)).collect::<Vec<_>>(), [7, 8, 9], "outer IP IDs without DF");
            assert!(segs.iter().all(|s| (rd16(s, 40) == 0) == (udp_csum == 0)), "a zero UDP checksum stays zero");
        }
    }

    #[test]
    fn one_segment_or_none_of_payload() {
        let f = super_frame(500);
        let got = check(&cut(&f, 34, 1400), false);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, 0x99, "FIN|PSH|CWR|ACK kept on a lone segment");
        let empty = super_frame(0);
        assert_eq!(check(&cut(&empty, 34, 1400), false).len(), 1);
    }

    #[test]
    fn bad_layouts_are_refused_and_emit_nothing() {
        let f = super_frame(3000);
        assert!(Layout::of(&f, 30).is_err(), "csum_start not at the TCP header");
        assert!(Layout::of(&f[..40], 34).is_err(), "truncated TCP header");
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(Layout::of(&v6, 34).is_err(), "not IPv4");
        let mut udp = f.clone();
        udp[23] = 17;
        assert!(Layout::of(&udp, 34).is_err(), "UDP that is not a tunnel to TCP");
        let l = Layout::of(&f, 34).expect("layout");
        let mut small = [0u8; 1000];
        let mut n = 0;
        assert!(segment(&f, &l, 1400, &mut small, |_| n += 1).is_err(), "a segment larger than the scratch");
        assert!(segment(&f, &l, 0, &mut [0u8; 2048], |_| n += 1).is_err(), "mss 0");
        assert_eq!(n, 0);
    }
}
