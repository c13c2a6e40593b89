//! Frame-in/frame-out tests of the overlay pipeline, table-driven in the
//! style of katran's: input frame and port + the example tables → expected
//! verdict and, for transmitted frames, the exact bytes sent.
//!
//! Expected frames are built independently of the code under test: by hand
//! (literal headers, full RFC 1071 checksums) or with etherparse, and on the
//! uplink side from frames the Linux kernel's VXLAN device sent.

use core::net::Ipv4Addr;
use meshplane_dataplane::packet::{DropReason as D, Frame, HEADROOM, Verdict};
use meshplane_dataplane::pcap;
use meshplane_dataplane::pipeline::{WorkerState, process, process_burst, process_general};
use meshplane_dataplane::tables::{Tables, UPLINK};
use meshplane_dataplane::wire::checksum;
use meshplane_dataplane::wire::{flow, vxlan};

const TASK1: u16 = 1;
const TASK3: u16 = 2;
const DB1: u16 = 3;

const NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const NODE2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const T1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const T2_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2]; // remote, on node 2
const T3_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
const DB1_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
const DB2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2]; // remote, on node 2
const GW_MAC: [u8; 6] = [0x02, 0x42, 0xc6, 0x13, 0x00, 0xfe];
const T1: [u8; 4] = [198, 19, 0, 1];
const T2: [u8; 4] = [198, 19, 0, 2];
const T3: [u8; 4] = [198, 19, 0, 3];
const GW: [u8; 4] = [198, 19, 0, 254];
const BCAST: [u8; 6] = [0xff; 6];

fn tables() -> Tables {
    Tables::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml")).unwrap()
}

/// Runs one frame through the pipeline; returns the verdict and the frame
/// as it is afterwards.
fn run(t: &Tables, st: &mut WorkerState, in_port: u16, input: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; HEADROOM + input.len() + 64];
    buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
    let mut f = Frame::new(&mut buf, HEADROOM, input.len()).unwrap();
    let v = process(&mut f, in_port, 0, t, st);
    let out = f.data().to_vec();
    // The general path (no fast paths) must agree on every frame.
    let mut gbuf = vec![0u8; HEADROOM + input.len() + 64];
    gbuf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
    let mut g = Frame::new(&mut gbuf, HEADROOM, input.len()).unwrap();
    let mut gst = WorkerState::new(t.ports.len());
    let gv = process_general(&mut g, in_port, 0, t, &mut gst);
    assert_eq!((v, &out[..]), (gv, g.data()), "fast and general paths disagree");
    (v, out)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP frame written byte by byte (not with the code under test).
fn arp(dst: [u8; 6], src: [u8; 6], op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = eth(dst, src, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

fn udp(dst: [u8; 6], src: [u8; 6], sip: [u8; 4], dip: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst).ipv4(sip, dip, 64).udp(40000, 5001).write(&mut f, payload).unwrap();
    f
}

fn ping(dst: [u8; 6], src: [u8; 6], sip: [u8; 4], dip: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .icmpv4_echo_request(0x1234, 7)
        .write(&mut f, payload)
        .unwrap();
    f
}

/// Sets DF on the IPv4 header of an Ethernet frame and fixes its checksum.
fn set_df(f: Vec<u8>) -> Vec<u8> {
    with_df(f, true)
}

/// Sets or clears DF (etherparse's builder sets it) and fixes the checksum.
fn with_df(mut f: Vec<u8>, df: bool) -> Vec<u8> {
    f[20] = if df { f[20] | 0x40 } else { f[20] & !0x40 };
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// The VXLAN frame node 1 must send for `inner` toward node 2, written
/// field by field: outer Ethernet, IPv4 (DF, ID 0, TTL 64), UDP (source
/// port from the inner flow hash, checksum 0), VXLAN (I flag, VNI).
fn expected_encap(inner: &[u8], vni: u32) -> Vec<u8> {
    let mut f = eth(NODE2_MAC, NODE1_MAC, 0x0800);
    let total = (20 + 8 + 8 + inner.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
    let c = checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let sport = vxlan::src_port_for_hash(flow::flow_hash(inner));
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&4789u16.to_be_bytes());
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
    f.extend_from_slice(&vni.to_be_bytes()[1..]);
    f.push(0);
    f.extend_from_slice(inner);
    f
}

/// A VXLAN frame arriving at node 1, built with etherparse for the outer
/// headers: `flags` is the VXLAN flags byte (0x08 = I).
fn vxlan_in(outer_src: [u8; 4], outer_dst: [u8; 4], vni: u32, flags: u8, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![flags, 0, 0, 0];
    payload.extend_from_slice(&vni.to_be_bytes()[1..]);
    payload.push(0);
    payload.extend_from_slice(inner);
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(NODE2_MAC, NODE1_MAC)
        .ipv4(outer_src, outer_dst, 64)
        .udp(51000, 4789)
        .write(&mut f, &payload)
        .unwrap();
    f
}

fn fixture(name: &str) -> Vec<Vec<u8>> {
    let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    pcap::read(std::fs::File::open(p).unwrap()).unwrap().into_iter().map(|r| r.data).collect()
}

struct Case {
    name: &'static str,
    in_port: u16,
    input: Vec<u8>,
    verdict: Verdict,
    /// Expected output for `Tx` verdicts.
    output: Option<Vec<u8>>,
}

fn case(name: &'static str, in_port: u16, input: Vec<u8>, verdict: Verdict, output: Option<Vec<u8>>) -> Case {
    Case { name, in_port, input, verdict, output }
}

fn task_side_cases() -> Vec<Case> {
    let z = [0u8; 6];
    let t2_ping = ping(T2_MAC, T1_MAC, T1, T2, b"overlay-ping");
    let t3_udp = udp(T3_MAC, T1_MAC, T1, T3, b"local");
    let big_df = set_df(udp(T2_MAC, T1_MAC, T1, T2, &[0xab; 1451 - 28]));
    let t3_udp_padded = udp(T3_MAC, T1_MAC, T1, T3, b"padded");
    vec![
        case(
            "arp request for a remote task is answered from state",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, T1, z, T2),
            Verdict::Tx(TASK1),
            Some(arp(T1_MAC, T2_MAC, 2, T2_MAC, T2, T1_MAC, T1)),
        ),
        case(
            "arp request for the gateway is answered with the gateway mac",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, T1, z, GW),
            Verdict::Tx(TASK1),
            Some(arp(T1_MAC, GW_MAC, 2, GW_MAC, GW, T1_MAC, T1)),
        ),
        case(
            "unicast arp re-validation is answered too",
            TASK1,
            arp(T3_MAC, T1_MAC, 1, T1_MAC, T1, T3_MAC, T3),
            Verdict::Tx(TASK1),
            Some(arp(T1_MAC, T3_MAC, 2, T3_MAC, T3, T1_MAC, T1)),
        ),
        case(
            "arp for an address nobody has",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, T1, z, [198, 19, 0, 99]),
            Verdict::Drop(D::ArpUnknownTarget),
            None,
        ),
        case(
            "arp for another network's endpoint is not answered",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, T1, z, [198, 19, 1, 2]),
            Verdict::Drop(D::ArpUnknownTarget),
            None,
        ),
        case(
            "arp reply from a task",
            TASK1,
            arp(T3_MAC, T1_MAC, 2, T1_MAC, T1, T3_MAC, T3),
            Verdict::Drop(D::ArpNotRequest),
            None,
        ),
        case("gratuitous arp", TASK1, arp(BCAST, T1_MAC, 1, T1_MAC, T1, z, T1), Verdict::Drop(D::ArpGratuitous), None),
        case(
            "arp with another task's address as sender",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, T3, z, T2),
            Verdict::Drop(D::ArpSenderSpoofed),
            None,
        ),
        case(
            "arp of a non-ipv4 kind",
            TASK1,
            {
                let mut f = arp(BCAST, T1_MAC, 1, T1_MAC, T1, z, T2);
                f[16..18].copy_from_slice(&0x86ddu16.to_be_bytes());
                f
            },
            Verdict::Drop(D::ArpMalformed),
            None,
        ),
        case(
            "truncated arp",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, T1, z, T2)[..30].to_vec(),
            Verdict::Drop(D::ArpMalformed),
            None,
        ),
        case(
            "to a remote task: vxlan to its node",
            TASK1,
            t2_ping.clone(),
            Verdict::Tx(UPLINK),
            Some(expected_encap(&t2_ping, 4096)),
        ),
        case("to a local task: switched unchanged", TASK1, t3_udp.clone(), Verdict::Tx(TASK3), Some(t3_udp)),
        case("hairpin to its own mac", TASK1, udp(T1_MAC, T1_MAC, T1, T1, b"x"), Verdict::Drop(D::Hairpin), None),
        case(
            "unknown unicast",
            TASK1,
            udp([2, 9, 9, 9, 9, 9], T1_MAC, T1, T2, b"x"),
            Verdict::Drop(D::UnknownUnicast),
            None,
        ),
        case(
            "another network's local mac is unknown here",
            TASK1,
            udp(DB1_MAC, T1_MAC, T1, [198, 19, 1, 1], b"x"),
            Verdict::Drop(D::UnknownUnicast),
            None,
        ),
        case(
            "another network's remote mac is unknown here",
            TASK1,
            udp(DB2_MAC, T1_MAC, T1, [198, 19, 1, 2], b"x"),
            Verdict::Drop(D::UnknownUnicast),
            None,
        ),
        case("spoofed source mac", TASK1, udp(T2_MAC, T3_MAC, T3, T2, b"x"), Verdict::Drop(D::SrcMacSpoofed), None),
        case(
            "broadcast is not flooded",
            TASK1,
            udp(BCAST, T1_MAC, T1, [198, 19, 0, 255], b"x"),
            Verdict::Drop(D::BroadcastNotFlooded),
            None,
        ),
        case(
            "multicast is not flooded",
            TASK1,
            udp([1, 0, 0x5e, 0, 0, 1], T1_MAC, T1, [224, 0, 0, 1], b"x"),
            Verdict::Drop(D::BroadcastNotFlooded),
            None,
        ),
        case(
            "oversize without DF",
            TASK1,
            with_df(udp(T2_MAC, T1_MAC, T1, T2, &[0xab; 1451 - 28]), false),
            Verdict::Drop(D::MtuExceeded),
            None,
        ),
        case(
            "exactly the MTU passes",
            TASK1,
            set_df(udp(T2_MAC, T1_MAC, T1, T2, &[0xab; 1450 - 28])),
            Verdict::Tx(UPLINK),
            {
                let f = set_df(udp(T2_MAC, T1_MAC, T1, T2, &[0xab; 1450 - 28]));
                Some(expected_encap(&f, 4096))
            },
        ),
        case(
            "oversize with DF: fragmentation needed",
            TASK1,
            big_df.clone(),
            Verdict::Tx(TASK1),
            Some(frag_needed(&big_df, 1450)),
        ),
        case(
            "to the gateway but not for it",
            TASK1,
            udp(GW_MAC, T1_MAC, T1, [198, 18, 99, 1], b"x"),
            Verdict::Drop(D::NoRoute),
            None,
        ),
        case("udp to the gateway address", TASK1, udp(GW_MAC, T1_MAC, T1, GW, b"x"), Verdict::Drop(D::NoRoute), None),
        case(
            "vlan tagged from a task",
            TASK1,
            {
                let mut f = Vec::new();
                etherparse::PacketBuilder::ethernet2(T1_MAC, T2_MAC)
                    .single_vlan(etherparse::VlanId::try_new(5).unwrap())
                    .ipv4(T1, T2, 64)
                    .udp(1, 2)
                    .write(&mut f, b"x")
                    .unwrap();
                f
            },
            Verdict::Drop(D::VlanTagged),
            None,
        ),
        case("shorter than ethernet", TASK1, vec![0u8; 13], Verdict::Drop(D::Malformed), None),
        case(
            "truncated ipv4",
            TASK1,
            udp(T2_MAC, T1_MAC, T1, T2, b"x")[..30].to_vec(),
            Verdict::Drop(D::Malformed),
            None,
        ),
        case("unknown port", 9, t2_ping.clone(), Verdict::Drop(D::UnknownPort), None),
        case("spoofed source address", TASK1, udp(T2_MAC, T1_MAC, T3, T2, b"x"), Verdict::Drop(D::SrcIpSpoofed), None),
        case(
            "arp probe for the sender's own address",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, [0; 4], z, T1),
            Verdict::Drop(D::ArpGratuitous),
            None,
        ),
        case(
            "arp probe for another address is answered",
            TASK1,
            arp(BCAST, T1_MAC, 1, T1_MAC, [0; 4], z, T3),
            Verdict::Tx(TASK1),
            Some(arp(T1_MAC, T3_MAC, 2, T3_MAC, T3, T1_MAC, [0; 4])),
        ),
        case(
            "trailing bytes after the ip packet are trimmed",
            TASK1,
            {
                let mut f = t3_udp_padded.clone();
                f.extend_from_slice(&[0u8; 1500]);
                f
            },
            Verdict::Tx(TASK3),
            Some(t3_udp_padded.clone()),
        ),
        case(
            "trailing bytes do not ride along in vxlan",
            TASK1,
            {
                let mut f = t2_ping.clone();
                f.extend_from_slice(&[0u8; 1500]);
                f
            },
            Verdict::Tx(UPLINK),
            Some(expected_encap(&t2_ping, 4096)),
        ),
        case(
            "no frag-needed about a later fragment",
            TASK1,
            {
                let mut f = big_df.clone();
                f[20..22].copy_from_slice(&0x4001u16.to_be_bytes()); // DF, offset 8
                f[24..26].copy_from_slice(&[0, 0]);
                let c = checksum::checksum(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
                f
            },
            Verdict::Drop(D::MtuExceeded),
            None,
        ),
        case(
            "no frag-needed about a datagram to the subnet broadcast",
            TASK1,
            set_df(udp(T2_MAC, T1_MAC, T1, [198, 19, 0, 255], &[0xab; 1451 - 28])),
            Verdict::Drop(D::MtuExceeded),
            None,
        ),
        case(
            "a fragmented ping to the gateway is not answered",
            TASK1,
            {
                let mut f = with_df(ping(GW_MAC, T1_MAC, T1, GW, b"frag"), false);
                f[20] |= 0x20; // MF
                f[24..26].copy_from_slice(&[0, 0]);
                let c = checksum::checksum(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
                f
            },
            Verdict::Drop(D::NoRoute),
            None,
        ),
        case(
            "truncated udp header between local tasks",
            TASK1,
            {
                let mut f = udp(T3_MAC, T1_MAC, T1, T3, b"x");
                f[38..40].copy_from_slice(&200u16.to_be_bytes()); // UDP length past the packet
                f
            },
            Verdict::Drop(D::Malformed),
            None,
        ),
        case(
            "truncated ipv6 header between local tasks",
            TASK1,
            {
                let mut f = eth(T3_MAC, T1_MAC, 0x86dd);
                f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
                f
            },
            Verdict::Drop(D::Malformed),
            None,
        ),
        case(
            "db network: remote endpoint over vni 4097",
            DB1,
            udp(DB2_MAC, DB1_MAC, [198, 19, 1, 1], [198, 19, 1, 2], b"db"),
            Verdict::Tx(UPLINK),
            {
                let f = udp(DB2_MAC, DB1_MAC, [198, 19, 1, 1], [198, 19, 1, 2], b"db");
                Some(expected_encap(&f, 4097))
            },
        ),
        case(
            "db network: app's remote mac is unknown there",
            DB1,
            udp(T2_MAC, DB1_MAC, [198, 19, 1, 1], T2, b"x"),
            Verdict::Drop(D::UnknownUnicast),
            None,
        ),
    ]
}

/// The ICMP fragmentation-needed the gateway must send for `orig`.
fn frag_needed(orig: &[u8], mtu: u16) -> Vec<u8> {
    let quote = &orig[14..14 + 20 + 8];
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let c = checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&GW);
    ip.extend_from_slice(&orig[26..30]);
    let c = checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(orig[6..12].try_into().unwrap(), GW_MAC, 0x0800);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

fn uplink_cases() -> Vec<Case> {
    let icmp = fixture("vxlan_icmp.pcap");
    let tcp = fixture("vxlan_udp_tcp.pcap");
    let inner_ok = udp(T1_MAC, T2_MAC, T2, T1, b"from node 2");
    let me = [198, 18, 0, 1];
    let node2 = [198, 18, 0, 2];
    vec![
        case(
            "kernel vxlan: echo reply to task1 decapsulated",
            UPLINK,
            icmp[5].clone(),
            Verdict::Tx(TASK1),
            Some(icmp[5][50..].to_vec()),
        ),
        case(
            "kernel vxlan: tcp syn-ack to task1 decapsulated",
            UPLINK,
            tcp[6].clone(),
            Verdict::Tx(TASK1),
            Some(tcp[6][50..].to_vec()),
        ),
        case("underlay arp is the kernel's", UPLINK, icmp[0].clone(), Verdict::Pass, None),
        case(
            "underlay arp request for our data address is answered from data_mac",
            UPLINK,
            arp(BCAST, NODE2_MAC, 1, NODE2_MAC, node2, [0; 6], me),
            Verdict::Tx(UPLINK),
            Some(arp(NODE2_MAC, NODE1_MAC, 2, NODE1_MAC, me, NODE2_MAC, node2)),
        ),
        case(
            "underlay arp request for another address is the kernel's",
            UPLINK,
            arp(BCAST, NODE2_MAC, 1, NODE2_MAC, node2, [0; 6], [198, 18, 0, 7]),
            Verdict::Pass,
            None,
        ),
        case(
            "underlay arp reply to our data address is the kernel's",
            UPLINK,
            arp(NODE1_MAC, NODE2_MAC, 2, NODE2_MAC, node2, NODE1_MAC, me),
            Verdict::Pass,
            None,
        ),
        case("vxlan for another vtep is the kernel's", UPLINK, icmp[4].clone(), Verdict::Pass, None),
        case(
            "udp to us on another port is the kernel's",
            UPLINK,
            {
                let mut f = vxlan_in(node2, me, 4096, 0x08, &inner_ok);
                f[36..38].copy_from_slice(&8472u16.to_be_bytes());
                f
            },
            Verdict::Pass,
            None,
        ),
        case(
            "built vxlan frame decapsulated",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &inner_ok),
            Verdict::Tx(TASK1),
            Some(inner_ok.clone()),
        ),
        case(
            "reserved bits set are ignored",
            UPLINK,
            vxlan_in(node2, me, 4096, 0xff, &inner_ok),
            Verdict::Tx(TASK1),
            Some(inner_ok.clone()),
        ),
        case("no I flag", UPLINK, vxlan_in(node2, me, 4096, 0x00, &inner_ok), Verdict::Drop(D::VxlanNoIFlag), None),
        case("unknown vni", UPLINK, vxlan_in(node2, me, 4099, 0x08, &inner_ok), Verdict::Drop(D::UnknownVni), None),
        case(
            "spoofed outer source",
            UPLINK,
            vxlan_in([198, 18, 0, 9], me, 4096, 0x08, &inner_ok),
            Verdict::Drop(D::UnknownVtep),
            None,
        ),
        case(
            "inner frame to another vni's mac",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &udp(DB1_MAC, T2_MAC, T2, [198, 19, 1, 1], b"x")),
            Verdict::Drop(D::InnerDstNotLocal),
            None,
        ),
        case(
            "inner frame to a remote mac",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &udp(T2_MAC, T2_MAC, T2, T2, b"x")),
            Verdict::Drop(D::InnerDstNotLocal),
            None,
        ),
        case(
            "inner source is a local task",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &udp(T1_MAC, T3_MAC, T3, T1, b"x")),
            Verdict::Drop(D::InnerSrcSpoofed),
            None,
        ),
        case(
            "inner source belongs to another vni",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &udp(T1_MAC, DB2_MAC, T2, T1, b"x")),
            Verdict::Drop(D::InnerSrcSpoofed),
            None,
        ),
        case(
            "a peer's arp request over vxlan is answered from state, back to its vtep",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &arp(BCAST, T2_MAC, 1, T2_MAC, T2, [0; 6], T1)),
            Verdict::Tx(UPLINK),
            Some(expected_encap(&arp(T2_MAC, T1_MAC, 2, T1_MAC, T1, T2_MAC, T2), 4096)),
        ),
        case(
            "a peer's arp request for an address not in state",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &arp(BCAST, T2_MAC, 1, T2_MAC, T2, [0; 6], [198, 19, 0, 77])),
            Verdict::Drop(D::ArpUnknownTarget),
            None,
        ),
        case(
            "a peer's arp request with a sender address not its own",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &arp(BCAST, T2_MAC, 1, T2_MAC, T3, [0; 6], T1)),
            Verdict::Drop(D::InnerArpSpoofed),
            None,
        ),
        case(
            "vxlan with a bad outer ipv4 header checksum",
            UPLINK,
            {
                let mut f = vxlan_in(node2, me, 4096, 0x08, &inner_ok);
                f[24] ^= 0x5a;
                f
            },
            Verdict::Drop(D::VxlanBadChecksum),
            None,
        ),
        case(
            "inner broadcast other than arp",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &udp(BCAST, T2_MAC, T2, [198, 19, 0, 255], b"x")),
            Verdict::Drop(D::InnerBroadcast),
            None,
        ),
        case(
            "vxlan with no room for an inner frame",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &inner_ok[..13]),
            Verdict::Drop(D::VxlanMalformed),
            None,
        ),
        case(
            "fragmented vxlan",
            UPLINK,
            {
                let mut f = vxlan_in(node2, me, 4096, 0x08, &inner_ok);
                f[20] |= 0x20; // MF
                f[24..26].copy_from_slice(&[0, 0]);
                let c = checksum::checksum(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
                f
            },
            Verdict::Drop(D::VxlanFragment),
            None,
        ),
        case(
            "oversize inner frame",
            UPLINK,
            vxlan_in(node2, me, 4096, 0x08, &udp(T1_MAC, T2_MAC, T2, T1, &[0; 1451 - 28])),
            Verdict::Drop(D::Oversize),
            None,
        ),
    ]
}

#[test]
fn task_side_fixtures() {
    check(task_side_cases());
}

#[test]
fn uplink_fixtures() {
    check(uplink_cases());
}

fn check(cases: Vec<Case>) {
    let t = tables();
    let mut failures = Vec::new();
    for c in cases {
        let mut st = WorkerState::new(t.ports.len());
        let (v, out) = run(&t, &mut st, c.in_port, &c.input);
        if v != c.verdict {
            failures.push(format!("{}: verdict {v:?}, expected {:?}", c.name, c.verdict));
            continue;
        }
        if let Some(exp) = &c.output
            && &out != exp
        {
            let at = out.iter().zip(exp).position(|(a, b)| a != b).unwrap_or(out.len().min(exp.len()));
            failures.push(format!("{}: output differs at byte {at} (len {} vs {})", c.name, out.len(), exp.len()));
        }
        // Every verdict is counted exactly once.
        let s = &st.stats;
        match v {
            Verdict::Drop(r) => assert_eq!((s.dropped(r), s.total_drops()), (1, 1), "{}", c.name),
            Verdict::Pass => assert_eq!(s.passed, 1, "{}", c.name),
            Verdict::Tx(p) => {
                assert_eq!(s.ports[usize::from(p)].tx_packets, 1, "{}", c.name);
                assert_eq!(s.ports[usize::from(p)].tx_bytes, out.len() as u64, "{}", c.name);
            }
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn emitted_frames_are_valid_and_echo_is_answered() {
    let t = tables();
    let mut st = WorkerState::new(t.ports.len());
    let req = ping(GW_MAC, T1_MAC, T1, GW, b"gateway?");
    let (v, out) = run(&t, &mut st, TASK1, &req);
    assert_eq!(v, Verdict::Tx(TASK1));
    // Expected: addresses swapped, TTL 64, type 0, checksums recomputed in full.
    let mut exp = req.clone();
    exp[0..6].copy_from_slice(&T1_MAC);
    exp[6..12].copy_from_slice(&GW_MAC);
    exp[22] = 64;
    exp[26..30].copy_from_slice(&GW);
    exp[30..34].copy_from_slice(&T1);
    exp[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&exp[14..34]);
    exp[24..26].copy_from_slice(&c.to_be_bytes());
    exp[34] = 0;
    exp[36..38].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&exp[34..]);
    exp[36..38].copy_from_slice(&c.to_be_bytes());
    assert_eq!(out, exp);

    // A bad ICMP checksum is not answered.
    let mut bad = req.clone();
    bad[40] ^= 0xff;
    assert_eq!(run(&t, &mut st, TASK1, &bad).0, Verdict::Drop(D::Malformed));
    // Neither is an echo reply or other ICMP to the gateway.
    let mut reply = req.clone();
    reply[34] = 0;
    assert_eq!(run(&t, &mut st, TASK1, &reply).0, Verdict::Drop(D::NoRoute));
}

#[test]
fn frag_needed_carries_the_network_mtu() {
    let t = tables();
    let mut st = WorkerState::new(t.ports.len());
    // db has mtu 1400.
    let f = set_df(udp(DB2_MAC, DB1_MAC, [198, 19, 1, 1], [198, 19, 1, 2], &[1; 1401 - 28]));
    let (v, out) = run(&t, &mut st, DB1, &f);
    assert_eq!(v, Verdict::Tx(DB1));
    let p = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
    let Some(etherparse::TransportSlice::Icmpv4(i)) = p.transport else { panic!("not icmp") };
    assert_eq!(
        i.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }
        )
    );
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!() };
    assert_eq!(ip.header().source_addr(), Ipv4Addr::new(198, 19, 1, 254));
    assert_eq!(ip.header().destination_addr(), Ipv4Addr::new(198, 19, 1, 1));
    // An ICMP error that is too big is dropped, not answered with an error.
    let mut err = set_df(ping(DB2_MAC, DB1_MAC, [198, 19, 1, 1], [198, 19, 1, 2], &[0; 1500]));
    err[34] = 3;
    assert_eq!(run(&t, &mut st, DB1, &err).0, Verdict::Drop(D::MtuExceeded));
}

#[test]
fn a_frame_never_crosses_vnis_exhaustively() {
    // Every (source port, destination MAC) combination: a frame from a port
    // of one network is only ever sent to a port of the same network or,
    // encapsulated with that network's VNI, to the uplink.
    let t = tables();
    let macs = [T1_MAC, T2_MAC, T3_MAC, DB1_MAC, DB2_MAC, GW_MAC, BCAST];
    let srcs = [(TASK1, T1_MAC, T1), (TASK3, T3_MAC, T3), (DB1, DB1_MAC, [198, 19, 1, 1])];
    for (port, smac, sip) in srcs {
        let net = t.ports[usize::from(port)].network.unwrap();
        for dmac in macs {
            let mut st = WorkerState::new(t.ports.len());
            let (v, out) = run(&t, &mut st, port, &udp(dmac, smac, sip, [198, 19, 0, 2], b"x"));
            match v {
                Verdict::Tx(UPLINK) => {
                    let vni = u32::from_be_bytes([0, out[46], out[47], out[48]]);
                    assert_eq!(vni, t.networks[usize::from(net)].vni);
                }
                Verdict::Tx(p) => assert_eq!(t.ports[usize::from(p)].network, Some(net)),
                _ => {}
            }
        }
    }
}

#[test]
fn counters_add_up_over_a_sequence() {
    let t = tables();
    let mut st = WorkerState::new(t.ports.len());
    let cases: Vec<Case> = task_side_cases().into_iter().chain(uplink_cases()).collect();
    let n = cases.len() as u64;
    let mut rx = 0;
    for c in &cases {
        if usize::from(c.in_port) < t.ports.len() {
            rx += 1;
        }
        run(&t, &mut st, c.in_port, &c.input);
    }
    let s = &st.stats;
    let tx: u64 = s.ports.iter().map(|p| p.tx_packets).sum();
    let rx_counted: u64 = s.ports.iter().map(|p| p.rx_packets).sum();
    assert_eq!(rx_counted, rx);
    assert_eq!(tx + s.total_drops() + s.passed, n);
    assert_eq!(s.dropped(D::UnknownPort), 1);
}

#[test]
fn a_burst_gives_what_frame_by_frame_gives() {
    // Every fixture, grouped by input port into bursts of mixed verdicts
    // (forwarded, dropped, passed, answered), longer than the lookahead and
    // in both orders: the same verdicts, the same bytes and the same
    // counters as `process` one frame at a time.
    let t = tables();
    let cases: Vec<Case> = task_side_cases().into_iter().chain(uplink_cases()).collect();
    let mut ports: Vec<u16> = cases.iter().map(|c| c.in_port).collect();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        for reverse in [false, true] {
            let mut inputs: Vec<&[u8]> = cases.iter().filter(|c| c.in_port == port).map(|c| &c.input[..]).collect();
            if reverse {
                inputs.reverse();
            }
            let mut one = WorkerState::new(t.ports.len());
            let expected: Vec<(Verdict, Vec<u8>)> = inputs.iter().map(|i| run(&t, &mut one, port, i)).collect();

            let mut bufs: Vec<Vec<u8>> = inputs
                .iter()
                .map(|i| {
                    let mut b = vec![0u8; HEADROOM + i.len() + 64];
                    b[HEADROOM..HEADROOM + i.len()].copy_from_slice(i);
                    b
                })
                .collect();
            let mut frames: Vec<Frame<'_>> =
                bufs.iter_mut().zip(&inputs).map(|(b, i)| Frame::new(b, HEADROOM, i.len()).unwrap()).collect();
            let mut verdicts = vec![Verdict::Pass; frames.len()];
            let mut burst = WorkerState::new(t.ports.len());
            process_burst(&mut frames, port, 0, &t, &mut burst, &mut verdicts);
            let got: Vec<(Verdict, Vec<u8>)> =
                verdicts.iter().zip(&frames).map(|(v, f)| (*v, f.data().to_vec())).collect();
            if port == UPLINK || port == TASK1 {
                assert!(inputs.len() > 2 * meshplane_dataplane::pipeline::LOOKAHEAD, "port {port}: a long burst");
            }
            assert_eq!(got, expected, "port {port}, reversed {reverse}");
            assert_eq!(burst.stats.drops, one.stats.drops, "port {port}");
            assert_eq!(burst.stats.passed, one.stats.passed, "port {port}");
            assert_eq!(burst.stats.ports, one.stats.ports, "port {port}");
        }
    }
}

/// An internal network (`network create --internal`): a task's packet to
/// an address outside every network is dropped as `egress_internal` and
/// counted; inside the cluster's networks nothing changes (same frames,
/// same verdicts as without `internal`), and a network that is not
/// internal keeps `no_route` for the same packet.
#[test]
fn internal_network_drops_egress_with_its_own_reason() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml")).unwrap();
    let mut spec: meshplane_dataplane::tables::TablesSpec = toml::from_str(&text).unwrap();
    assert!(!spec.networks[0].internal, "serde default: not internal");
    spec.networks[0].internal = true; // "app"
    let internal = Tables::compile(&spec).unwrap();
    let plain = tables();
    let outside = [198, 18, 99, 1];
    let cases = [
        ("udp to an address outside every network", udp(GW_MAC, T1_MAC, T1, outside, b"x"), D::EgressInternal),
        ("ping outside", ping(GW_MAC, T1_MAC, T1, outside, b"out?"), D::EgressInternal),
        (
            "udp to the db network's subnet (a cluster network)",
            udp(GW_MAC, T1_MAC, T1, [198, 19, 1, 7], b"x"),
            D::NoRoute,
        ),
        ("udp to the gateway address", udp(GW_MAC, T1_MAC, T1, GW, b"x"), D::NoRoute),
    ];
    let mut st = WorkerState::new(internal.ports.len());
    for (what, f, want) in &cases {
        let (v, _) = run(&internal, &mut st, TASK1, f);
        assert_eq!(v, Verdict::Drop(*want), "internal: {what}");
        let (v, _) = run(&plain, &mut WorkerState::new(plain.ports.len()), TASK1, f);
        assert_eq!(v, Verdict::Drop(D::NoRoute), "not internal: {what}");
    }
    // Within the network: switched to the remote task as before.
    let within = udp(T2_MAC, T1_MAC, T1, T2, b"inside");
    assert_eq!(run(&internal, &mut st, TASK1, &within), run(&plain, &mut st, TASK1, &within));
    // Counted: through the burst driver, one counter per reason.
    let mut burst = WorkerState::new(internal.ports.len());
    let mut bufs: Vec<Vec<u8>> = cases
        .iter()
        .map(|(_, f, _)| {
            let mut b = vec![0u8; HEADROOM + f.len() + 64];
            b[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
            b
        })
        .collect();
    let mut frames: Vec<Frame<'_>> =
        bufs.iter_mut().zip(&cases).map(|(b, (_, f, _))| Frame::new(b, HEADROOM, f.len()).unwrap()).collect();
    let mut verdicts = vec![Verdict::Drop(D::Malformed); frames.len()];
    process_burst(&mut frames, TASK1, 0, &internal, &mut burst, &mut verdicts);
    assert_eq!(burst.stats.drops[D::EgressInternal as usize], 2);
    assert_eq!(burst.stats.drops[D::NoRoute as usize], 2);
    assert_eq!(D::EgressInternal.name(), "egress_internal");
}
