//! Arbitrary frames on arbitrary ports through the overlay pipeline with the
//! example tables: no panic; every transmitted frame parses; nothing is
//! sent on a port of another network, nor encapsulated with another
//! network's VNI, nor decapsulated into a network other than its VNI's;
//! only ARP replies (and, on a node that owns its data-path address, TCP
//! resets for closed ports) go from the uplink back to it.
//!
//! The fast paths must agree with the general path: `process` and
//! `process_general` give the same verdict, the same bytes and the same
//! counters for every input.
//!
//! With egress (tables with `[node.egress]`, a host link and an internal
//! network): a task's packet leaves the uplink plain only from the egress
//! address and data MAC, TTL one less, a TCP/UDP source port in the range,
//! never from an internal network nor to a cluster network; to the host
//! link only from the link's address; from the host link only ARP
//! answers go back (a fresh state tracks nothing).
//!
//! Input: byte 0 picks the input port (its low 6 bits modulo ports + 1, so
//! unknown ports occur too) and the tables (its top bit: with closed TCP
//! ports reset; the next: with egress), the rest is the frame.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{tables, tables_egress, tables_resetting};
use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{process, process_general};
use meshplane_dataplane::tables::UPLINK;
use meshplane_dataplane::wire::parse_frame;
use meshplane_dataplane::wire::vxlan::{self, Classified};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else { return };
    let t = match sel >> 6 {
        0 => tables(),
        1 => tables_egress(),
        _ => tables_resetting(),
    };
    let in_port = u16::from(sel & 0x3f) % (t.ports.len() as u16 + 1);
    let mut buf = vec![0u8; HEADROOM + frame.len()];
    buf[HEADROOM..].copy_from_slice(frame);
    let mut st = common::worker(t);
    let Some(mut f) = Frame::new(&mut buf, HEADROOM, frame.len()) else { return };
    let v = process(&mut f, in_port, 0, t, &mut st);

    let mut gbuf = vec![0u8; HEADROOM + frame.len()];
    gbuf[HEADROOM..].copy_from_slice(frame);
    let mut gst = common::worker(t);
    let Some(mut g) = Frame::new(&mut gbuf, HEADROOM, frame.len()) else { return };
    let gv = process_general(&mut g, in_port, 0, t, &mut gst);
    assert_eq!(v, gv, "fast and general paths disagree on the verdict");
    if matches!(v, Verdict::Tx(_)) {
        assert_eq!(f.data(), g.data(), "fast and general paths sent different bytes");
    }
    assert_eq!(st.stats.drops, gst.stats.drops);
    assert_eq!(st.stats.ports, gst.stats.ports);
    let Verdict::Tx(out) = v else { return };
    let sent = f.data();
    parse_frame(sent).expect("a transmitted frame parses");
    let out_net = t.ports[usize::from(out)].network;
    if t.host_port.is_some() && t.host_port == Some(in_port) {
        assert_eq!(Some(out), t.host_port, "nothing from the host link goes anywhere but back");
        assert_eq!(&sent[12..14], &[0x08, 0x06], "only ARP answers");
        return;
    }
    if t.host_port.is_some() && t.host_port == Some(out) {
        let link = t.egress.as_ref().and_then(|e| e.host_link.as_ref()).expect("a host link");
        let in_net = t.ports[usize::from(in_port)].network.expect("from a task port");
        let nw = &t.networks[usize::from(in_net)];
        assert_eq!(&sent[26..30], &link.ip.octets(), "to the host from the link's address");
        // A DNS query to the gateway goes to its network's DNS port on
        // the kernel's end; an internal network reaches the host no other way.
        let dns = frame.get(14) == Some(&0x45)
            && frame.get(30..34) == Some(&nw.gateway_ip.octets()[..])
            && frame.get(36..38) == Some(&[0, 53][..])
            && matches!(frame[23], 6 | 17);
        if dns {
            assert_eq!(&sent[30..34], &link.peer_ip.octets(), "DNS to the kernel's end");
            assert_eq!(sent.get(36..38), nw.dns_port.map(u16::to_be_bytes).as_ref().map(|p| &p[..]), "to its DNS port");
        } else {
            assert!(!nw.internal, "an internal network reached the host");
        }
        return;
    }
    if in_port == UPLINK && out == UPLINK {
        // Back out of the uplink: only answers to ARP requests, for the
        // data-path address (plain) or from a peer over the overlay (the
        // reply in VXLAN with the request's VNI, back to its VTEP).
        match vxlan::classify(frame, t.data_ip, t.vxlan_port) {
            Ok(Classified::Vxlan(d)) => {
                let Ok(Classified::Vxlan(r)) = vxlan::classify(sent, sent_dst(sent), t.vxlan_port) else {
                    panic!("a VXLAN frame came back out of the uplink as something else");
                };
                assert_eq!(r.vni, d.vni, "an overlay ARP answer in another VNI");
                assert_eq!((r.outer_src, sent_dst(sent)), (t.data_ip, d.outer_src), "answered to another VTEP");
                let inner = &sent[r.inner];
                assert_eq!(&inner[12..14], &[0x08, 0x06], "only ARP goes back over the overlay");
                assert_eq!(&inner[20..22], &[0, 2], "an ARP reply");
            }
            _ if t.reset_closed_ports && sent[12..14] == [0x08, 0x00] => {
                // A reset for a closed port: from the data-path address and
                // MAC, to the sender, TCP with RST, never for a reset.
                assert_eq!(sent.len(), 54, "a bare reset");
                assert_eq!(sent[23], 6, "TCP");
                assert_eq!(&sent[26..30], &t.data_ip.octets(), "from the data-path address");
                assert_eq!(&sent[30..34], &frame[26..30], "to the sender");
                assert_eq!(&sent[6..12], &t.data_mac.0, "from the data-path MAC");
                assert_eq!(&sent[0..6], &frame[6..12], "to the sender's MAC");
                assert_ne!(sent[47] & 0x04, 0, "RST set");
                assert_eq!(frame[47] & 0x04, 0, "no reset answers a reset");
                assert_eq!((&sent[34..36], &sent[36..38]), (&frame[36..38], &frame[34..36]), "ports swapped");
            }
            _ => {
                assert_eq!(&sent[12..14], &[0x08, 0x06], "only ARP goes back out of the uplink");
                assert_eq!(&sent[20..22], &[0, 2], "an ARP reply");
                assert_eq!(&sent[28..32], &t.data_ip.octets(), "for the data-path address");
                assert_eq!(&sent[6..12], &t.data_mac.0, "from the data-path MAC");
            }
        }
    } else if in_port == UPLINK {
        let Ok(Classified::Vxlan(d)) = vxlan::classify(frame, t.data_ip, t.vxlan_port) else {
            panic!("only VXLAN is sent from the uplink to a task");
        };
        let net = t.net_of_vni(d.vni).expect("a decapsulated VNI is known");
        assert_eq!(out_net, Some(net), "decapsulated into another network");
        assert_eq!(sent, &frame[d.inner], "decapsulation changed the inner frame");
    } else {
        let in_net = t.ports[usize::from(in_port)].network.expect("task ports have a network");
        if out == UPLINK {
            let Ok(Classified::Vxlan(d)) = vxlan::classify(sent, sent_dst(sent), t.vxlan_port) else {
                let e = t.egress.as_ref().expect("a frame to the uplink is VXLAN, or egress");
                assert!(!t.networks[usize::from(in_net)].internal, "an internal network has no egress");
                assert_eq!(&sent[12..14], &[0x08, 0x00], "egress is IPv4");
                assert_eq!(&sent[6..12], &t.data_mac.0, "egress leaves from the data MAC");
                assert_eq!(&sent[26..30], &e.addr.octets(), "egress leaves from the egress address");
                assert!(!t.in_any_network(sent_dst(sent)), "egress to a cluster network");
                assert_eq!(sent[22], frame[22].wrapping_sub(1), "TTL one less");
                if matches!(sent[23], 6 | 17) && sent[14] == 0x45 {
                    assert!(e.ports.contains(u16::from_be_bytes([sent[34], sent[35]])), "a source port of the range");
                }
                return;
            };
            assert_eq!(d.vni, t.networks[usize::from(in_net)].vni, "encapsulated with another VNI");
            assert_eq!(d.outer_src, t.data_ip, "outer source is always this node");
            parse_frame(&sent[d.inner]).expect("the inner frame parses");
        } else {
            assert_eq!(out_net, Some(in_net), "switched into another network");
        }
    }
});

fn sent_dst(f: &[u8]) -> core::net::Ipv4Addr {
    core::net::Ipv4Addr::new(f[30], f[31], f[32], f[33])
}
