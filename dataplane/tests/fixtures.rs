//! Frames captured from the Linux kernel (see tests/fixtures/README.md and
//! scripts/capture-fixtures for how each capture was made), read by the
//! wire layer: every field the kernel wrote must come back as written.

use core::net::{Ipv4Addr, Ipv6Addr};
use meshplane_dataplane::pcap;
use meshplane_dataplane::wire::arp::{ArpRepr, Operation};
use meshplane_dataplane::wire::checksum;
use meshplane_dataplane::wire::ethernet::{EthernetFrame, MacAddr, ethertype};
use meshplane_dataplane::wire::icmpv4::{self, Icmpv4Packet};
use meshplane_dataplane::wire::ipv4::{Ipv4Packet, protocol};
use meshplane_dataplane::wire::ipv6::Ipv6Packet;
use meshplane_dataplane::wire::parse::{Fragment, L3, L4, parse_frame};
use meshplane_dataplane::wire::rewrite::{Nat, recompute_checksums_ipv4, rewrite_ipv4};
use meshplane_dataplane::wire::tcp::{TcpPacket, flags};
use meshplane_dataplane::wire::udp::UdpPacket;
use meshplane_dataplane::wire::vxlan::{self, Classified, EncapParams, EncapTemplate};

const MAC_A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const MAC_B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn frames(name: &str) -> Vec<Vec<u8>> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let recs = pcap::read(std::io::BufReader::new(f)).unwrap();
    recs.into_iter()
        .map(|r| {
            assert_eq!(r.orig_len as usize, r.data.len(), "fixtures are captured whole");
            r.data
        })
        .collect()
}

/// Decapsulates a VXLAN frame addressed to `local`, returning (VNI, inner frame).
fn decap(frame: &[u8], local: Ipv4Addr) -> (u32, &[u8]) {
    match vxlan::classify(frame, local, vxlan::DEFAULT_PORT).unwrap() {
        Classified::Vxlan(d) => (d.vni, &frame[d.inner]),
        Classified::NotVxlan => panic!("not VXLAN"),
    }
}

fn ipv4_of(frame: &[u8]) -> Ipv4Packet<&[u8]> {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(eth.ethertype(), ethertype::IPV4);
    Ipv4Packet::new_checked(&frame[eth.header_len()..]).unwrap()
}

#[test]
fn every_fixture_frame_parses() {
    for name in [
        "vxlan_icmp.pcap",
        "vxlan_udp_tcp.pcap",
        "plain_arp_icmp.pcap",
        "vlan_udp.pcap",
        "ipv6_udp.pcap",
        "ipv4_options_frag.pcap",
    ] {
        let fs = frames(name);
        assert!(!fs.is_empty(), "{name}");
        for (i, f) in fs.iter().enumerate() {
            let p = parse_frame(f).unwrap_or_else(|e| panic!("{name} #{i}: {e}"));
            assert!(p.l3_offset <= p.l3_end && p.l3_end <= f.len());
            if let Ok(Classified::Vxlan(d)) = vxlan::classify(f, UNDERLAY_A, 4789) {
                parse_frame(&f[d.inner]).unwrap_or_else(|e| panic!("{name} #{i} inner: {e}"));
            }
        }
    }
}

#[test]
fn kernel_vxlan_icmp_decapsulates() {
    let fs = frames("vxlan_icmp.pcap");
    assert_eq!(fs.len(), 8);
    // #0, #1: underlay ARP, not VXLAN.
    assert_eq!(vxlan::classify(&fs[0], UNDERLAY_A, 4789).unwrap(), Classified::NotVxlan);
    // #2: A -> B, an inner ARP request for 198.19.0.2 in VNI 4096.
    let (vni, inner) = decap(&fs[2], UNDERLAY_B);
    assert_eq!(vni, 4096);
    let e = EthernetFrame::new_checked(inner).unwrap();
    assert!(e.dst().is_broadcast());
    assert_eq!(e.src(), MacAddr([2, 0, 0, 0, 1, 1]));
    let arp = ArpRepr::parse(e.payload()).unwrap();
    assert_eq!(arp.operation, Operation::Request);
    assert_eq!((arp.sender_ip, arp.target_ip), (Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2)));
    // Addressed to B, the frame is not VXLAN for A.
    assert_eq!(vxlan::classify(&fs[2], UNDERLAY_A, 4789).unwrap(), Classified::NotVxlan);
    // #4: inner ICMP echo request, seq 1; #5: its reply, B -> A.
    let (_, inner) = decap(&fs[4], UNDERLAY_B);
    let ip = ipv4_of(inner);
    assert!(ip.verify_checksum());
    assert_eq!((ip.src(), ip.dst(), ip.protocol()), (Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2), 1));
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!((icmp.kind(), icmp.echo_seq()), (icmpv4::kind::ECHO_REQUEST, 1));
    assert!(icmp.verify_checksum());
    let (_, inner) = decap(&fs[5], UNDERLAY_A);
    let ip = ipv4_of(inner);
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!((icmp.kind(), icmp.echo_seq()), (icmpv4::kind::ECHO_REPLY, 1));
    // The kernel sends a zero outer UDP checksum by default.
    let outer = ipv4_of(&fs[4]);
    assert_eq!(UdpPacket::new_checked(outer.payload()).unwrap().checksum(), 0);
}

/// meshplane's outer header for the kernel's inner frame equals the
/// kernel's outer header in every field but the ones meshplane chooses
/// differently: IPv4 ID and DF (meshplane sends DF, ID 0), the header
/// checksum that follows from them, and the outer source port (the kernel's
/// was pinned to 51000 for the capture; meshplane's comes from the flow hash).
#[test]
fn encap_matches_kernel_vxlan_header() {
    let fs = frames("vxlan_icmp.pcap");
    let kernel = &fs[4];
    let (_, inner) = decap(kernel, UNDERLAY_B);
    let tpl = EncapTemplate::new(&EncapParams {
        src_mac: MAC_A,
        dst_mac: MAC_B,
        src_ip: UNDERLAY_A,
        dst_ip: UNDERLAY_B,
        dst_port: 4789,
        vni: 4096,
        ttl: 64,
    })
    .unwrap();
    let mut buf = vec![0u8; vxlan::ENCAP_LEN + inner.len()];
    buf[vxlan::ENCAP_LEN..].copy_from_slice(inner);
    let start = tpl.write(&mut buf, vxlan::ENCAP_LEN, inner.len(), 51000).unwrap();
    assert_eq!(start, 0);
    assert_eq!(buf.len(), kernel.len());
    let ours = ipv4_of(&buf);
    assert!(ours.verify_checksum());
    assert!(ours.dont_frag());
    let mut differ: Vec<usize> = (0..buf.len()).filter(|&i| buf[i] != kernel[i]).collect();
    differ.retain(|i| !(18..22).contains(i) && !(24..26).contains(i));
    assert!(differ.is_empty(), "bytes differ outside ID/flags/checksum: {differ:?}");
}

#[test]
fn kernel_vxlan_tcp_and_udp() {
    let fs = frames("vxlan_udp_tcp.pcap");
    // This capture was made with `udpcsum`: outer UDP checksums are real.
    let outer = ipv4_of(&fs[4]);
    let udp = UdpPacket::new_checked(outer.payload()).unwrap();
    assert_ne!(udp.checksum(), 0);
    assert!(udp.verify_checksum_v4(outer.src(), outer.dst()));
    assert_eq!(udp.src_port(), 51000);
    // #4: inner UDP "meshplane-udp".
    let (vni, inner) = decap(&fs[4], UNDERLAY_B);
    assert_eq!(vni, 4096);
    let ip = ipv4_of(inner);
    let u = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((u.src_port(), u.dst_port(), u.payload()), (40000, 5001, &b"meshplane-udp"[..]));
    assert!(u.verify_checksum_v4(ip.src(), ip.dst()));
    // #5 SYN, #6 SYN-ACK, #8 data.
    let tcp_of = |i: usize, local| {
        let (_, inner) = decap(&fs[i], local);
        let ip = ipv4_of(inner);
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.verify_checksum_v4(ip.src(), ip.dst()), "#{i}");
        (t.flags(), t.header_len(), t.payload().to_vec(), t.options().first().copied())
    };
    assert_eq!(tcp_of(5, UNDERLAY_B), (flags::SYN, 40, vec![], Some(2)));
    assert_eq!(tcp_of(6, UNDERLAY_A).0, flags::SYN | flags::ACK);
    let (f, _, payload, _) = tcp_of(8, UNDERLAY_B);
    assert_eq!(f & (flags::PSH | flags::ACK), flags::PSH | flags::ACK);
    assert_eq!(payload, b"meshplane-tcp");
}

/// DNAT + SNAT of a real kernel TCP segment: incremental checksums equal a
/// full recomputation, and the result still verifies.
#[test]
fn nat_rewrite_of_kernel_tcp_segment() {
    let fs = frames("vxlan_udp_tcp.pcap");
    let (_, inner) = decap(&fs[8], UNDERLAY_B);
    let mut ip = inner[14..].to_vec();
    let nat = Nat {
        src_addr: Some(Ipv4Addr::new(198, 19, 255, 2)),
        dst_addr: Some(Ipv4Addr::new(198, 19, 7, 7)),
        src_port: Some(30080),
        dst_port: Some(8080),
    };
    rewrite_ipv4(&mut ip, &nat).unwrap();
    let mut full = ip.clone();
    recompute_checksums_ipv4(&mut full).unwrap();
    assert_eq!(ip, full);
    let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
    assert!(p.verify_checksum());
    let t = TcpPacket::new_checked(p.payload()).unwrap();
    assert!(t.verify_checksum_v4(p.src(), p.dst()));
    assert_eq!((t.src_port(), t.dst_port(), t.payload()), (30080, 8080, &b"meshplane-tcp"[..]));
}

#[test]
fn kernel_arp_reply_equals_ours() {
    let fs = frames("plain_arp_icmp.pcap");
    assert_eq!(fs[0].len(), 42, "veth does not pad to 60 bytes");
    let req = ArpRepr::parse(EthernetFrame::new_checked(&fs[0][..]).unwrap().payload()).unwrap();
    assert_eq!(req.operation, Operation::Request);
    assert_eq!((req.sender_mac, req.sender_ip, req.target_ip), (MAC_A, UNDERLAY_A, UNDERLAY_B));
    let kernel_reply = EthernetFrame::new_checked(&fs[1][..]).unwrap();
    let mut ours = [0u8; 28];
    req.reply_from(MAC_B).emit(&mut ours).unwrap();
    assert_eq!(&ours[..], kernel_reply.payload());
    // #2, #3: ICMP echo with valid checksums.
    for (i, kind) in [(2, icmpv4::kind::ECHO_REQUEST), (3, icmpv4::kind::ECHO_REPLY)] {
        let ip = ipv4_of(&fs[i]);
        assert!(ip.verify_checksum());
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.kind(), kind);
        assert!(icmp.verify_checksum());
    }
}

#[test]
fn dot1q_tagged_frames() {
    let fs = frames("vlan_udp.pcap");
    let arp = EthernetFrame::new_checked(&fs[0][..]).unwrap();
    assert_eq!((arp.tag_count(), arp.vlan_id(), arp.ethertype(), arp.header_len()), (1, Some(100), ethertype::ARP, 18));
    assert_eq!(arp.tag(0).unwrap().tpid, ethertype::VLAN);
    let p = parse_frame(&fs[2]).unwrap();
    assert_eq!(p.vlan, Some(100));
    assert_eq!(p.l3_offset, 18);
    assert_eq!(p.l4, L4::Udp { src_port: 40000, dst_port: 5001 });
    let o = p.l4_offset.unwrap();
    assert_eq!(&fs[2][o + 8..p.l3_end], b"meshplane-vlan");
}

#[test]
fn ipv6_extension_headers() {
    let fs = frames("ipv6_udp.pcap");
    // #2 plain UDP, #3 behind hop-by-hop, #4 behind destination options.
    for (i, offset, payload) in
        [(2, 40, &b"meshplane-udp6"[..]), (3, 48, &b"meshplane-hbh"[..]), (4, 56, &b"meshplane-dst"[..])]
    {
        let ip = Ipv6Packet::new_checked(&fs[i][14..]).unwrap();
        assert_eq!(ip.src(), "2001:2::1".parse::<Ipv6Addr>().unwrap());
        let t = ip.transport().unwrap();
        assert_eq!((t.protocol, t.offset, t.fragmented), (protocol::UDP, offset, false), "#{i}");
        let udp_bytes = &fs[i][14 + offset..14 + 40 + ip.payload_len()];
        let u = UdpPacket::new_checked(udp_bytes).unwrap();
        assert_eq!((u.dst_port(), u.payload()), (5001, payload));
        // The UDP checksum over the IPv6 pseudo-header verifies.
        let acc = checksum::pseudo_header_v6(&ip.src_bytes(), &ip.dst_bytes(), protocol::UDP, udp_bytes.len() as u32);
        assert_eq!(checksum::fold(checksum::sum(udp_bytes, acc)), 0xffff, "#{i}");
        assert_eq!(parse_frame(&fs[i]).unwrap().l4_offset, Some(14 + offset));
    }
    // #0: neighbour solicitation, ICMPv6.
    assert_eq!(parse_frame(&fs[0]).unwrap().l3, L3::Ipv6 { protocol: protocol::ICMPV6, fragment: Fragment::No });
}

#[test]
fn ipv4_options_and_fragments() {
    let fs = frames("ipv4_options_frag.pcap");
    // #0: echo request with NOP + record route: a 60-byte header.
    let ip = ipv4_of(&fs[0]);
    assert_eq!(ip.header_len(), 60);
    assert_eq!(&ip.options()[..2], &[1, 7], "NOP, RR");
    assert!(ip.verify_checksum());
    assert!(Icmpv4Packet::new_checked(ip.payload()).unwrap().verify_checksum());
    // #2..#4: one 3008-byte echo request in three fragments.
    let expect = [(Fragment::First, 0, true), (Fragment::Later, 1480, true), (Fragment::Later, 2960, false)];
    let mut datagram = Vec::new();
    for (k, (frag, off, mf)) in expect.into_iter().enumerate() {
        let f = &fs[2 + k];
        let p = parse_frame(f).unwrap();
        assert!(matches!(p.l3, L3::Ipv4 { fragment, .. } if fragment == frag), "#{}", 2 + k);
        assert_eq!(p.l4_offset.is_some(), frag == Fragment::First);
        let ip = ipv4_of(f);
        assert_eq!((ip.frag_offset(), ip.more_frags()), (off, mf));
        assert_eq!(datagram.len(), off);
        datagram.extend_from_slice(ip.payload());
        // A port rewrite of a later fragment is refused; addresses are fine.
        if frag == Fragment::Later {
            let mut b = f[14..].to_vec();
            assert!(rewrite_ipv4(&mut b, &Nat { dst_port: Some(1), ..Nat::default() }).is_err());
        }
    }
    let icmp = Icmpv4Packet::new_checked(&datagram[..]).unwrap();
    assert_eq!(icmp.kind(), icmpv4::kind::ECHO_REQUEST);
    assert!(icmp.verify_checksum(), "the reassembled echo request verifies");
}
