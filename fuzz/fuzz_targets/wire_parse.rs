//! Every wire parser over arbitrary bytes: no panic, and every length or
//! offset a parser reports lies inside the buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::wire::arp::ArpRepr;
use meshplane_dataplane::wire::ethernet::EthernetFrame;
use meshplane_dataplane::wire::icmpv4::Icmpv4Packet;
use meshplane_dataplane::wire::ipv4::Ipv4Packet;
use meshplane_dataplane::wire::ipv6::Ipv6Packet;
use meshplane_dataplane::wire::tcp::TcpPacket;
use meshplane_dataplane::wire::udp::UdpPacket;
use meshplane_dataplane::wire::vxlan::{self, Classified, VxlanHeader};
use meshplane_dataplane::wire::{flow, parse_frame};

fuzz_target!(|data: &[u8]| {
    let n = data.len();
    if let Ok(p) = parse_frame(data) {
        assert!(p.l3_offset <= p.l3_end && p.l3_end <= n);
        if let Some(o) = p.l4_offset {
            assert!(p.l3_offset <= o && o <= p.l3_end);
        }
    }
    if let Ok(e) = EthernetFrame::new_checked(data) {
        assert!(e.header_len() + e.payload().len() == n);
        for i in 0..e.tag_count() {
            assert!(e.tag(i).is_some());
        }
    }
    let _ = ArpRepr::parse(data);
    if let Ok(p) = Ipv4Packet::new_checked(data) {
        assert!(p.header_len() >= 20 && p.header_len() <= p.total_len() && p.total_len() <= n);
        assert_eq!(p.options().len() + 20, p.header_len());
        assert_eq!(p.payload().len() + p.header_len(), p.total_len());
        let _ = p.verify_checksum();
    }
    if let Ok(p) = Ipv6Packet::new_checked(data) {
        assert!(40 + p.payload_len() <= n);
        if let Ok(t) = p.transport() {
            assert!(t.offset >= 40 && t.offset <= 40 + p.payload_len());
            let _ = p.from_offset(t.offset);
        }
    }
    if let Ok(u) = UdpPacket::new_checked(data) {
        assert!(u.len() >= 8 && u.len() <= n);
        assert_eq!(u.payload().len() + 8, u.len());
    }
    if let Ok(t) = TcpPacket::new_checked(data) {
        assert!(t.header_len() >= 20 && t.header_len() <= n);
        assert_eq!(t.options().len() + 20, t.header_len());
        assert_eq!(t.payload().len() + t.header_len(), n);
    }
    if let Ok(i) = Icmpv4Packet::new_checked(data) {
        assert_eq!(i.data().len() + 8, n);
        let _ = i.verify_checksum();
    }
    let _ = VxlanHeader::parse(data);
    if let Ok(Classified::Vxlan(d)) =
        vxlan::classify(data, core::net::Ipv4Addr::new(198, 18, 0, 2), vxlan::DEFAULT_PORT)
    {
        assert!(d.inner.start <= d.inner.end && d.inner.end <= n);
    }
    assert_eq!(
        flow::flow_hash(data),
        flow::flow_hash_general(flow::DEFAULT_SEED, data),
        "fast and general flow hash differ"
    );
});
