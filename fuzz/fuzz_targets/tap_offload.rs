//! What a TAP port reads, a virtio-net header and the frame behind it,
//! through the whole path of a super-frame: the header is accepted or
//! refused (`io::tap::offload_of`: a refused one is a counted drop), an
//! accepted frame goes through the pipeline on an arbitrary port, and
//! what it is sent as is cut into segments where a port would have to
//! (`io::tx_segments`). No panic anywhere; every segment fits a segment
//! buffer, parses, and has TCP and IPv4 header checksums that verify.
//!
//! Input: byte 0 picks the header length (its top bit: 24 bytes with the
//! UDP-tunnel fields, else 12) and the input port (its low 7 bits modulo
//! ports + 1); then the header; then the frame.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::io::tap::offload_of;
use meshplane_dataplane::io::{SEGMENT_ROOM, tx_segments};
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::process;
use meshplane_dataplane::wire::virtio_net::{HEADER_LEN_TUNNEL, HEADER_LEN_V1};
use meshplane_dataplane::wire::{checksum, parse_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let vnet = if sel & 0x80 != 0 { HEADER_LEN_TUNNEL } else { HEADER_LEN_V1 };
    if rest.len() < vnet {
        return;
    }
    let (hdr, frame) = rest.split_at(vnet);
    let mut buf = vec![0u8; HEADROOM + frame.len()];
    buf[HEADROOM..].copy_from_slice(frame);
    let Some(offload) = offload_of(vnet, hdr, &mut buf[HEADROOM..]) else { return };
    let t = common::tables();
    let in_port = u16::from(sel & 0x7f) % (t.ports.len() as u16 + 1);
    let mut st = common::worker(t);
    let Some(mut f) = Frame::new(&mut buf, HEADROOM, frame.len()) else { return };
    f.set_offload(offload);
    if !matches!(process(&mut f, in_port, 0, t, &mut st), Verdict::Tx(_)) || !f.is_super() {
        return;
    }
    let _ = tx_segments(&f, |s| {
        assert!(s.len() <= SEGMENT_ROOM, "a segment larger than a segment buffer");
        parse_frame(s).expect("a segment parses");
        // The TCP segment: plain, or inside VXLAN.
        let at = if s[23] == 17 { 50 } else { 0 };
        let ip = &s[at + 14..];
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(checksum::fold(checksum::sum(&ip[..ihl], 0)), 0xffff, "IPv4 header checksum");
        let tcp = &ip[ihl..total];
        let (src, dst) = (
            core::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            core::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        );
        let sum = checksum::sum(tcp, checksum::pseudo_header_v4(src, dst, 6, tcp.len() as u16));
        assert_eq!(checksum::fold(sum), 0xffff, "TCP checksum of a segment");
        true
    });
});
