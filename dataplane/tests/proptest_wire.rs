//! Property tests of the wire layer: incremental checksum updates equal full
//! recomputation; parse after emit gives back what was emitted (ours, and
//! etherparse's emit read by our parser); no parser panics on random bytes.

use core::net::Ipv4Addr;
use meshplane_dataplane::wire::arp::{ArpRepr, Operation};
use meshplane_dataplane::wire::ethernet::{EthernetFrame, MacAddr};
use meshplane_dataplane::wire::icmpv4::Icmpv4Packet;
use meshplane_dataplane::wire::ipv4::{Ipv4Packet, Ipv4Repr, protocol};
use meshplane_dataplane::wire::ipv6::{Ipv6Packet, Ipv6Repr};
use meshplane_dataplane::wire::parse::{L4, parse_frame};
use meshplane_dataplane::wire::rewrite::{Nat, recompute_checksums_ipv4, rewrite_ipv4};
use meshplane_dataplane::wire::tcp::TcpPacket;
use meshplane_dataplane::wire::udp::{UdpPacket, UdpRepr};
use meshplane_dataplane::wire::vxlan::{self, Classified, EncapParams, VxlanHeader};
use meshplane_dataplane::wire::{arp, flow};
use proptest::prelude::*;

fn ip4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}
fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

/// An IPv4 packet (TCP, UDP with or without checksum, or ICMP) with random
/// options, addresses, ports and payload, and correct checksums.
fn ipv4_packet() -> impl Strategy<Value = Vec<u8>> {
    (
        ip4(),
        ip4(),
        0u8..3,
        0usize..=10,
        any::<(u16, u16)>(),
        proptest::collection::vec(any::<u8>(), 0..200),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(src, dst, kind, opt_words, (sp, dp), payload, udp_csum, ttl)| {
            let proto = [protocol::TCP, protocol::UDP, protocol::ICMP][usize::from(kind)];
            let hl = 20 + opt_words * 4;
            let l4_hdr = match proto {
                protocol::TCP => 20,
                _ => 8,
            };
            let total = hl + l4_hdr + payload.len();
            let mut b = vec![0u8; total];
            b[0] = 0x40 | (hl / 4) as u8;
            b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            b[8] = ttl;
            b[9] = proto;
            b[12..16].copy_from_slice(&src.octets());
            b[16..20].copy_from_slice(&dst.octets());
            for (i, o) in b[20..hl].iter_mut().enumerate() {
                *o = if i == 0 { 1 } else { 0 }; // NOP then EOL padding
            }
            b[hl..hl + 2].copy_from_slice(&sp.to_be_bytes());
            b[hl + 2..hl + 4].copy_from_slice(&dp.to_be_bytes());
            match proto {
                protocol::TCP => b[hl + 12] = 5 << 4,
                protocol::UDP => {
                    b[hl + 4..hl + 6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                    if !udp_csum {
                        // leave 0: no checksum
                    } else {
                        b[hl + 6] = 1; // marker: recompute fills it
                    }
                }
                _ => {}
            }
            b[hl + l4_hdr..].copy_from_slice(&payload);
            recompute_checksums_ipv4(&mut b).unwrap();
            if proto == protocol::ICMP {
                Icmpv4Packet::new_checked(&mut b[hl..]).unwrap().fill_checksum();
            }
            b
        })
}

fn nat() -> impl Strategy<Value = Nat> {
    (
        proptest::option::of(ip4()),
        proptest::option::of(ip4()),
        proptest::option::of(any::<u16>()),
        proptest::option::of(any::<u16>()),
    )
        .prop_map(|(src_addr, dst_addr, src_port, dst_port)| Nat { src_addr, dst_addr, src_port, dst_port })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn incremental_rewrite_equals_full_recompute(pkt in ipv4_packet(), nat in nat()) {
        let mut inc = pkt.clone();
        let proto = pkt[9];
        let result = rewrite_ipv4(&mut inc, &nat);
        if proto == protocol::ICMP && nat.touches_ports() {
            prop_assert!(result.is_err());
            prop_assert_eq!(inc, pkt);
            return Ok(());
        }
        result.unwrap();
        let mut full = inc.clone();
        recompute_checksums_ipv4(&mut full).unwrap();
        prop_assert_eq!(&inc, &full);
        let p = Ipv4Packet::new_checked(&inc[..]).unwrap();
        prop_assert!(p.verify_checksum());
        if let Some(a) = nat.src_addr { prop_assert_eq!(p.src(), a); }
        if let Some(a) = nat.dst_addr { prop_assert_eq!(p.dst(), a); }
        match proto {
            protocol::TCP => {
                let t = TcpPacket::new_checked(p.payload()).unwrap();
                prop_assert!(t.verify_checksum_v4(p.src(), p.dst()));
                if let Some(x) = nat.dst_port { prop_assert_eq!(t.dst_port(), x); }
            }
            protocol::UDP => {
                let u = UdpPacket::new_checked(p.payload()).unwrap();
                prop_assert!(u.verify_checksum_v4(p.src(), p.dst()));
                let orig = UdpPacket::new_checked(&pkt[pkt[0] as usize % 16 * 4..]).unwrap().checksum();
                prop_assert_eq!(u.checksum() == 0, orig == 0, "a zero UDP checksum stays zero, and only it");
                if let Some(x) = nat.src_port { prop_assert_eq!(u.src_port(), x); }
            }
            _ => {
                let i = Icmpv4Packet::new_checked(p.payload()).unwrap();
                prop_assert!(i.verify_checksum());
            }
        }
    }

    #[test]
    fn ipv4_ttl_and_address_setters_keep_checksum(pkt in ipv4_packet(), a in ip4(), ttl in any::<u8>()) {
        let mut b = pkt.clone();
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        p.set_dst(a);
        p.set_ttl(ttl);
        let c = p.checksum();
        p.fill_checksum();
        prop_assert_eq!(c, p.checksum());
    }

    #[test]
    fn arp_emit_parse(op in 0u16..5, sm in mac(), si in ip4(), tm in mac(), ti in ip4()) {
        let r = ArpRepr { operation: Operation::from(op), sender_mac: sm, sender_ip: si, target_mac: tm, target_ip: ti };
        let mut b = [0u8; arp::PACKET_LEN];
        r.emit(&mut b).unwrap();
        prop_assert_eq!(ArpRepr::parse(&b).unwrap(), r);
    }

    #[test]
    fn ipv4_emit_parse(src in ip4(), dst in ip4(), proto in any::<u8>(), plen in 0u16..2000, ttl in any::<u8>(),
                       tos in any::<u8>(), ident in any::<u16>(), df in any::<bool>()) {
        let r = Ipv4Repr { src, dst, protocol: proto, payload_len: plen, ttl, tos, ident, dont_frag: df };
        let mut b = vec![0u8; 20 + usize::from(plen)];
        r.emit(&mut b).unwrap();
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        prop_assert!(p.verify_checksum());
        prop_assert_eq!(Ipv4Repr::parse(&p), r);
        // etherparse reads what we wrote the same way.
        let (h, _) = etherparse::Ipv4Header::from_slice(&b).unwrap();
        prop_assert_eq!((h.source, h.destination, h.identification, h.dont_fragment), (src.octets(), dst.octets(), ident, df));
    }

    #[test]
    fn ipv6_udp_emit_parse(src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), sp in any::<u16>(), dp in any::<u16>(), n in 0usize..100) {
        let u = UdpRepr { src_port: sp, dst_port: dp, payload_len: n as u16 };
        let r = Ipv6Repr { src: src.into(), dst: dst.into(), next_header: protocol::UDP, payload_len: (8 + n) as u16, hop_limit: 64 };
        let mut b = vec![0u8; 48 + n];
        r.emit(&mut b).unwrap();
        u.emit(&mut b[40..]).unwrap();
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        prop_assert_eq!(Ipv6Repr::parse(&p), r);
        prop_assert_eq!(UdpRepr::parse(&UdpPacket::new_checked(&b[40..]).unwrap()), u);
    }

    #[test]
    fn vxlan_encap_classify(vni in 0u32..=vxlan::MAX_VNI, sm in mac(), dm in mac(), s in ip4(), d in ip4(),
                            port in 1u16.., inner in proptest::collection::vec(any::<u8>(), 14..300)) {
        let p = EncapParams { src_mac: sm, dst_mac: dm, src_ip: s, dst_ip: d, dst_port: port, vni, ttl: 64 };
        let mut buf = vec![0u8; vxlan::ENCAP_LEN + inner.len()];
        buf[vxlan::ENCAP_LEN..].copy_from_slice(&inner);
        let start = vxlan::encap(&mut buf, vxlan::ENCAP_LEN, inner.len(), &p).unwrap();
        prop_assert_eq!(start, 0);
        let mut h = [0u8; 8];
        VxlanHeader { vni }.emit(&mut h).unwrap();
        prop_assert_eq!(VxlanHeader::parse(&h).unwrap().vni, vni);
        match vxlan::classify(&buf, d, port).unwrap() {
            Classified::Vxlan(dc) => {
                prop_assert_eq!(dc.vni, vni);
                prop_assert_eq!(dc.outer_src, s);
                prop_assert_eq!(dc.outer_src_mac, sm);
                prop_assert_eq!(dc.outer_src_port, vxlan::src_port_for_hash(flow::flow_hash(&inner)));
                prop_assert_eq!(&buf[dc.inner], &inner[..]);
            }
            Classified::NotVxlan => prop_assert!(false, "not classified as VXLAN"),
        }
        // etherparse sees outer UDP with checksum 0 and our ports.
        let sliced = etherparse::SlicedPacket::from_ethernet(&buf).unwrap();
        let Some(etherparse::TransportSlice::Udp(u)) = sliced.transport else { panic!("no udp") };
        prop_assert_eq!((u.destination_port(), u.checksum()), (port, 0));
    }

    /// Frames built by etherparse parse to the same fields with ours.
    #[test]
    fn etherparse_frames_parse_the_same(sm in mac(), dm in mac(), s in ip4(), d in ip4(), sp in any::<u16>(), dp in any::<u16>(),
                                        tcp in any::<bool>(), vlan in proptest::option::of(0u16..4095),
                                        payload in proptest::collection::vec(any::<u8>(), 0..100)) {
        let b = etherparse::PacketBuilder::ethernet2(sm.0, dm.0);
        let mut f = Vec::new();
        let b = match vlan {
            Some(v) => b.single_vlan(etherparse::VlanId::try_new(v).unwrap()).ipv4(s.octets(), d.octets(), 9),
            None => b.ipv4(s.octets(), d.octets(), 9),
        };
        if tcp { b.tcp(sp, dp, 7, 1000).write(&mut f, &payload).unwrap() } else { b.udp(sp, dp).write(&mut f, &payload).unwrap() }
        let p = parse_frame(&f).unwrap();
        prop_assert_eq!(p.vlan, vlan);
        let (s2, d2) = match p.l4 { L4::Udp { src_port, dst_port } | L4::Tcp { src_port, dst_port, .. } => (src_port, dst_port), _ => (0, 1) };
        prop_assert_eq!((s2, d2), (sp, dp));
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        prop_assert_eq!((e.src(), e.dst()), (sm, dm));
        let ip = Ipv4Packet::new_checked(e.payload()).unwrap();
        prop_assert!(ip.verify_checksum());
        if tcp {
            prop_assert!(TcpPacket::new_checked(ip.payload()).unwrap().verify_checksum_v4(s, d));
        } else {
            prop_assert!(UdpPacket::new_checked(ip.payload()).unwrap().verify_checksum_v4(s, d));
        }
    }

    /// No parser panics on random bytes, and every length reported fits.
    #[test]
    fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200), local in ip4(), port in any::<u16>()) {
        if let Ok(p) = parse_frame(&b) {
            prop_assert!(p.l3_offset <= p.l3_end && p.l3_end <= b.len());
            if let Some(o) = p.l4_offset { prop_assert!(p.l3_offset <= o && o <= p.l3_end); }
        }
        if let Ok(Classified::Vxlan(d)) = vxlan::classify(&b, local, port) {
            prop_assert!(d.inner.start <= d.inner.end && d.inner.end <= b.len());
        }
        let _ = ArpRepr::parse(&b);
        if let Ok(p) = Ipv4Packet::new_checked(&b[..]) {
            prop_assert!(p.header_len() + p.payload().len() == p.total_len() && p.total_len() <= b.len());
        }
        if let Ok(p) = Ipv6Packet::new_checked(&b[..]) && let Ok(t) = p.transport() {
            prop_assert!(t.offset <= 40 + p.payload_len());
        }
        if let Ok(u) = UdpPacket::new_checked(&b[..]) { prop_assert!(u.payload().len() + 8 == u.len()); }
        if let Ok(t) = TcpPacket::new_checked(&b[..]) { prop_assert!(t.header_len() <= b.len()); }
        let _ = VxlanHeader::parse(&b);
        let _ = flow::flow_hash(&b);
        let mut m = b.clone();
        let _ = rewrite_ipv4(&mut m, &Nat { src_addr: Some(local), dst_port: Some(port), ..Nat::default() });
    }
}
