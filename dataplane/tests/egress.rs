//! Egress through the pipeline, frame in / frame out: the example tables
//! (node 198.18.0.1, tasks T1 and T3 in `app`, DB1 in `db`) with
//! `[node.egress]`: a 64-port range and a default route to a router
//! (MAC 02:00:00:00:00:fe). Servers outside are 198.18.3.10 and
//! 198.18.3.11. Expected frames are built with etherparse, independently
//! of the rewrite code under test (so every checksum is checked too).

use meshplane_dataplane::lb::conntrack::{CtState, SECOND};
use meshplane_dataplane::packet::{DropReason as D, Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process, process_general};
use meshplane_dataplane::tables::{Tables, TablesSpec, UPLINK};
use meshplane_dataplane::wire::icmpv4::Icmpv4Packet;

const TASK1: u16 = 1;
const TASK3: u16 = 2;
const DB1: u16 = 3;
const NODE1: [u8; 4] = [198, 18, 0, 1];
const NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const GW_MAC: [u8; 6] = [0x02, 0x42, 0xc6, 0x13, 0x00, 0xfe];
const DB_GW_MAC: [u8; 6] = [0x02, 0x42, 0xc6, 0x13, 0x01, 0xfe];
const T1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const T3_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
const DB1_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
const T1: [u8; 4] = [198, 19, 0, 1];
const T3: [u8; 4] = [198, 19, 0, 3];
const DB1_IP: [u8; 4] = [198, 19, 1, 1];
const SERVER: [u8; 4] = [198, 18, 3, 10];
const SERVER2: [u8; 4] = [198, 18, 3, 11];
const ROUTER: [u8; 4] = [198, 18, 2, 1];
const LO: u16 = 61000;
const HI: u16 = 61063;

const EGRESS: &str = r#"
[node.egress]
ports = "61000-61063"
route = [{ prefix = "0.0.0.0/0", mac = "02:00:00:00:00:fe" }]
"#;

fn tables(extra: &str) -> Tables {
    let base = include_str!("../../examples/tables.toml");
    let spec: TablesSpec = toml::from_str(&format!("{base}\n{extra}")).expect("spec parses");
    Tables::compile(&spec).expect("tables compile")
}

/// Runs one frame through the pipeline and, on a copy of the state, the
/// general path alone: both must agree. The verdict and the frame after.
fn run(t: &Tables, st: &mut WorkerState, in_port: u16, input: &[u8], now: u64) -> (Verdict, Vec<u8>) {
    let go = |st: &mut WorkerState, general: bool| {
        let mut buf = vec![0u8; HEADROOM + input.len().max(128) + 64];
        buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
        let mut f = Frame::new(&mut buf, HEADROOM, input.len()).expect("frame");
        let v =
            if general { process_general(&mut f, in_port, now, t, st) } else { process(&mut f, in_port, now, t, st) };
        (v, f.data().to_vec())
    };
    let mut copy = st.clone();
    let general = go(&mut copy, true);
    let out = go(st, false);
    assert_eq!(out, general, "the general path agrees");
    out
}

/// A TCP frame with flags SYN (`syn`), SYN-ACK (`syn && ack`) or ACK.
#[allow(clippy::too_many_arguments)]
fn tcp(src: [u8; 6], dst: [u8; 6], sip: [u8; 4], dip: [u8; 4], ttl: u8, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src, dst).ipv4(sip, dip, ttl).tcp(sport, dport, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut f, b"hello").expect("tcp");
    f
}

fn udp(src: [u8; 6], dst: [u8; 6], sip: [u8; 4], dip: [u8; 4], ttl: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, ttl)
        .udp(sport, dport)
        .write(&mut f, b"dgram")
        .expect("udp");
    f
}

fn echo(src: [u8; 6], dst: [u8; 6], sip: [u8; 4], dip: [u8; 4], ttl: u8, id: u16, reply: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src, dst).ipv4(sip, dip, ttl);
    let b = if reply { b.icmpv4_echo_reply(id, 3) } else { b.icmpv4_echo_request(id, 3) };
    b.write(&mut f, b"ping").expect("echo");
    f
}

/// An ICMP error of `kind`/`code` from `sip` to `dip` quoting the first
/// `n` bytes of the IPv4 packet of frame `quoted`.
#[allow(clippy::too_many_arguments)]
fn icmp_error(
    src: [u8; 6],
    dst: [u8; 6],
    sip: [u8; 4],
    dip: [u8; 4],
    kind: u8,
    code: u8,
    quoted: &[u8],
    n: usize,
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0x14];
    icmp.extend_from_slice(&quoted[14..14 + n]);
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .write(&mut f, etherparse::IpNumber::ICMP, &icmp)
        .expect("icmp");
    Icmpv4Packet::new_checked(&mut f[34..]).expect("icmp").fill_checksum();
    f
}

fn sport(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[34], f[35]])
}

#[test]
fn tcp_leaves_source_natted_to_the_next_hop_and_the_reply_returns() {
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000, 80, true);
    let (v, out) = run(&t, &mut st, TASK1, &syn, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    let p = sport(&out);
    assert!((LO..=HI).contains(&p), "port {p} in the range");
    assert_eq!(out, tcp(NODE1_MAC, ROUTER_MAC, NODE1, SERVER, 63, p, 80, true), "SNAT, TTL − 1, MACs");
    // The SYN-ACK comes back to the egress address and port.
    let mut synack = Vec::new();
    etherparse::PacketBuilder::ethernet2(ROUTER_MAC, NODE1_MAC)
        .ipv4(SERVER, NODE1, 60)
        .tcp(80, p, 7, 1000)
        .syn()
        .ack(1001)
        .write(&mut synack, b"")
        .expect("syn-ack");
    let (v, back) = run(&t, &mut st, UPLINK, &synack, SECOND);
    assert_eq!(v, Verdict::Tx(TASK1));
    let mut want = Vec::new();
    etherparse::PacketBuilder::ethernet2(GW_MAC, T1_MAC)
        .ipv4(SERVER, T1, 60)
        .tcp(80, 40000, 7, 1000)
        .syn()
        .ack(1001)
        .write(&mut want, b"")
        .expect("syn-ack");
    assert_eq!(back, want, "DNAT back to the task, from its gateway");
    // The next segment of the task uses the same port.
    let (v, out) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000, 80, false), 2 * SECOND);
    assert_eq!((v, sport(&out)), (Verdict::Tx(UPLINK), p));
    let e = st.lb.egress_stats();
    assert_eq!((e.new_conns, e.tx_packets, e.rx_packets), (1, 2, 1));
}

#[test]
fn udp_leaves_and_expires_with_the_balancers_timeout() {
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let (v, out) = run(&t, &mut st, TASK3, &udp(T3_MAC, GW_MAC, T3, SERVER, 64, 5353, 53), 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    let p = sport(&out);
    assert_eq!(out, udp(NODE1_MAC, ROUTER_MAC, NODE1, SERVER, 63, p, 53));
    let reply = udp(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, 53, p);
    let (v, back) = run(&t, &mut st, UPLINK, &reply, 299 * SECOND);
    assert_eq!((v, back), (Verdict::Tx(TASK3), udp(GW_MAC, T3_MAC, SERVER, T3, 60, 53, 5353)));
    // 300 s after the last packet it is gone.
    let (v, _) = run(&t, &mut st, UPLINK, &reply, 600 * SECOND);
    assert_eq!(v, Verdict::Drop(D::EgressNoConnection));
}

#[test]
fn ping_ids_are_translated_per_task() {
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let (v1, o1) = run(&t, &mut st, TASK1, &echo(T1_MAC, GW_MAC, T1, SERVER, 64, 7, false), 0);
    let (v3, o3) = run(&t, &mut st, TASK3, &echo(T3_MAC, GW_MAC, T3, SERVER, 64, 7, false), 0);
    assert_eq!((v1, v3), (Verdict::Tx(UPLINK), Verdict::Tx(UPLINK)));
    let id = |f: &[u8]| u16::from_be_bytes([f[38], f[39]]);
    let (i1, i3) = (id(&o1), id(&o3));
    assert_ne!(i1, i3, "the same id from two tasks gets two ids");
    assert_eq!(o1, echo(NODE1_MAC, ROUTER_MAC, NODE1, SERVER, 63, i1, false));
    for (i, port, mac, ip) in [(i1, TASK1, T1_MAC, T1), (i3, TASK3, T3_MAC, T3)] {
        let (v, back) = run(&t, &mut st, UPLINK, &echo(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, i, true), SECOND);
        assert_eq!((v, back), (Verdict::Tx(port), echo(GW_MAC, mac, SERVER, ip, 60, 7, true)));
    }
    // An echo mapping lives 60 s.
    let late = echo(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, i1, true);
    assert_eq!(run(&t, &mut st, UPLINK, &late, 62 * SECOND).0, Verdict::Drop(D::EgressNoConnection));
}

#[test]
fn icmp_errors_about_a_connection_reach_the_task_translated() {
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    for (n, tcp_quote) in [(28, true), (45, true), (28, false)] {
        let (sent_by_task, sport_task) = if tcp_quote {
            (tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000 + n as u16, 80, true), 40000 + n as u16)
        } else {
            (udp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000 + n as u16, 53), 40000 + n as u16)
        };
        let (v, out) = run(&t, &mut st, TASK1, &sent_by_task, 0);
        assert_eq!(v, Verdict::Tx(UPLINK));
        // The router's frag-needed quotes what it got (TTL 63).
        let err = icmp_error(ROUTER_MAC, NODE1_MAC, ROUTER, NODE1, 3, 4, &out, n);
        let (v, back) = run(&t, &mut st, UPLINK, &err, SECOND);
        assert_eq!(v, Verdict::Tx(TASK1), "n {n}");
        let as_task_sent = if tcp_quote {
            tcp(T1_MAC, GW_MAC, T1, SERVER, 63, sport_task, 80, true)
        } else {
            udp(T1_MAC, GW_MAC, T1, SERVER, 63, sport_task, 53)
        };
        assert_eq!(back, icmp_error(GW_MAC, T1_MAC, ROUTER, T1, 3, 4, &as_task_sent, n), "n {n}");
    }
    assert_eq!(st.lb.egress_stats().icmp_in, 3);
    // An error about a port nobody holds: dropped, counted.
    let stray = icmp_error(
        ROUTER_MAC,
        NODE1_MAC,
        ROUTER,
        NODE1,
        11,
        0,
        &udp(NODE1_MAC, ROUTER_MAC, NODE1, SERVER, 63, LO + 5, 9),
        28,
    );
    let (v, _) = run(&t, &mut st, UPLINK, &stray, SECOND);
    assert!(matches!(v, Verdict::Drop(D::EgressNoConnection)), "{v:?}");
    // One about the kernel's own packets (a port outside the range): the kernel's.
    let kernel = icmp_error(
        ROUTER_MAC,
        NODE1_MAC,
        ROUTER,
        NODE1,
        3,
        3,
        &udp(NODE1_MAC, ROUTER_MAC, NODE1, SERVER, 63, 7946, 7946),
        28,
    );
    assert_eq!(run(&t, &mut st, UPLINK, &kernel, SECOND).0, Verdict::Pass);
}

#[test]
fn ttl_one_is_answered_with_time_exceeded_from_the_gateway() {
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let probe = udp(T1_MAC, GW_MAC, T1, SERVER, 1, 33434, 33434);
    let (v, back) = run(&t, &mut st, TASK1, &probe, 0);
    assert_eq!(v, Verdict::Tx(TASK1));
    let want = {
        let mut f = icmp_error(GW_MAC, T1_MAC, [198, 19, 0, 254], T1, 11, 0, &probe, 28);
        // The gateway's errors have no rest-of-header (the test's builder
        // writes an MTU there), and no DF.
        f[38..42].fill(0);
        f[20] = 0;
        f[24..26].fill(0);
        let c = meshplane_dataplane::wire::checksum::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        Icmpv4Packet::new_checked(&mut f[34..]).expect("icmp").fill_checksum();
        f
    };
    assert_eq!(back, want);
    assert_eq!((st.lb.egress_stats().time_exceeded, st.lb.egress_stats().new_conns), (1, 0), "nothing opened");
}

#[test]
fn ports_are_shared_across_destinations_one_task_holds_half_and_the_range_runs_out() {
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let mut toward_server = std::collections::BTreeSet::new();
    for i in 0..32u16 {
        let (v, out) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000 + i, 80, true), 0);
        assert_eq!(v, Verdict::Tx(UPLINK), "T1 connection {i}");
        toward_server.insert(sport(&out));
    }
    let (v, _) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 41000, 80, true), 0);
    assert_eq!(v, Verdict::Drop(D::EgressTaskLimit), "half the range is one task's share");
    for i in 0..32u16 {
        let (v, out) = run(&t, &mut st, TASK3, &tcp(T3_MAC, GW_MAC, T3, SERVER, 64, 40000 + i, 80, true), 0);
        assert_eq!(v, Verdict::Tx(UPLINK), "T3 connection {i}");
        assert!(toward_server.insert(sport(&out)), "no port twice toward one destination");
    }
    assert_eq!(toward_server.len(), 64, "the whole range toward {SERVER:?}:80");
    let (v, _) = run(&t, &mut st, DB1, &tcp(DB1_MAC, DB_GW_MAC, DB1_IP, SERVER, 64, 40000, 80, true), 0);
    assert_eq!(v, Verdict::Drop(D::EgressPortsExhausted));
    // Another destination has a pool of its own: the same ports again.
    let (v, out) = run(&t, &mut st, DB1, &tcp(DB1_MAC, DB_GW_MAC, DB1_IP, SERVER2, 64, 40000, 80, true), 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert!(toward_server.contains(&sport(&out)));
    // A reset frees a port: 10 s later it is handed out again.
    let (_, first) = run(&t, &mut st, TASK3, &tcp(T3_MAC, GW_MAC, T3, SERVER, 64, 40000, 80, false), SECOND);
    let mut rst = Vec::new();
    etherparse::PacketBuilder::ethernet2(ROUTER_MAC, NODE1_MAC)
        .ipv4(SERVER, NODE1, 60)
        .tcp(80, sport(&first), 7, 0)
        .rst()
        .write(&mut rst, b"")
        .expect("rst");
    assert_eq!(run(&t, &mut st, UPLINK, &rst, SECOND).0, Verdict::Tx(TASK3));
    let (v, _) = run(&t, &mut st, DB1, &tcp(DB1_MAC, DB_GW_MAC, DB1_IP, SERVER, 64, 40000, 80, true), 12 * SECOND);
    assert_eq!(v, Verdict::Tx(UPLINK), "the reset connection's port is free again");
    assert_eq!(st.lb.egress_ports_held(T1.into(), SERVER.into()), 32);
}

#[test]
fn what_egress_refuses_is_counted() {
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let cases = [
        // Another cluster network: networks stay isolated.
        (TASK1, tcp(T1_MAC, GW_MAC, T1, DB1_IP, 64, 1, 80, true), D::NoRoute),
        // VXLAN to a peer: it would arrive as VXLAN from a known VTEP.
        (TASK1, udp(T1_MAC, GW_MAC, T1, [198, 18, 0, 2], 64, 1, 4789), D::EgressToVtep),
    ];
    for (port, f, why) in cases {
        assert_eq!(run(&t, &mut st, port, &f, 0).0, Verdict::Drop(why), "{why:?}");
    }
    // To the egress address, nothing tracked: a port of the range is
    // egress's (dropped); another port is the kernel's.
    let stray = tcp(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, 80, LO + 9, false);
    assert_eq!(run(&t, &mut st, UPLINK, &stray, 0).0, Verdict::Drop(D::EgressNoConnection));
    let ssh = tcp(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, 40000, 22, true);
    assert_eq!(run(&t, &mut st, UPLINK, &ssh, 0).0, Verdict::Pass);
    // Without a route: no next hop (and the miss remembered for the node).
    let t = tables("[node.egress]\nports = \"61000-61063\"");
    let mut st = WorkerState::for_tables(&t);
    let (v, _) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 1, 80, true), 0);
    assert_eq!(v, Verdict::Drop(D::EgressNoNextHop));
    assert_eq!(st.lb.egress_stats().neigh_miss, Some(SERVER.into()));
    // Without egress: as before, no route.
    let t = tables("");
    let mut st = WorkerState::for_tables(&t);
    let (v, _) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 1, 80, true), 0);
    assert_eq!(v, Verdict::Drop(D::NoRoute));
    // An internal network reaches nothing outside.
    let internal = include_str!("../../examples/tables.toml").replace("mtu = 1400", "mtu = 1400\ninternal = true");
    let spec: TablesSpec = toml::from_str(&format!("{internal}\n{EGRESS}")).expect("spec");
    let t = Tables::compile(&spec).expect("tables");
    let mut st = WorkerState::for_tables(&t);
    let (v, _) = run(&t, &mut st, DB1, &tcp(DB1_MAC, DB_GW_MAC, DB1_IP, SERVER, 64, 1, 80, true), 0);
    assert_eq!(v, Verdict::Drop(D::EgressInternal));
}

const HOST_PORT: u16 = 4;
const LINK_MAC: [u8; 6] = [2, 0x4d, 0x50, 0, 0, 2];
const KERNEL_MAC: [u8; 6] = [2, 0x4d, 0x50, 0, 0, 1];
const LINK: [u8; 4] = [198, 18, 99, 2];
const KERNEL: [u8; 4] = [198, 18, 99, 1];

fn host_link(dnat: bool) -> String {
    format!(
        "{EGRESS}[node.egress.host_link]\nip = \"198.18.99.2\"\npeer_ip = \"198.18.99.1\"\nmac = \"02:4d:50:00:00:02\"\npeer_mac = \"02:4d:50:00:00:01\"\ndnat_data_ip = {dnat}\n"
    )
}

#[test]
fn a_task_reaches_its_hosts_data_address_through_the_host_link() {
    for dnat in [false, true] {
        let t = tables(&host_link(dnat));
        assert_eq!((t.host_port, t.port_id("mp-host")), (Some(HOST_PORT), Some(HOST_PORT)));
        let mut st = WorkerState::for_tables(&t);
        let syn = tcp(T1_MAC, GW_MAC, T1, NODE1, 64, 40000, 8088, true);
        let (v, out) = run(&t, &mut st, TASK1, &syn, 0);
        assert_eq!(v, Verdict::Tx(HOST_PORT), "dnat {dnat}");
        let p = sport(&out);
        let to = if dnat { KERNEL } else { NODE1 };
        assert_eq!(out, tcp(LINK_MAC, KERNEL_MAC, LINK, to, 63, p, 8088, true), "dnat {dnat}");
        // The kernel answers from where the SYN went.
        let (v, back) = run(&t, &mut st, HOST_PORT, &tcp(KERNEL_MAC, LINK_MAC, to, LINK, 64, 8088, p, false), SECOND);
        assert_eq!((v, back), (Verdict::Tx(TASK1), tcp(GW_MAC, T1_MAC, NODE1, T1, 64, 8088, 40000, false)));
        // The kernel's ARP for meshplane's end is answered; a frame from
        // another MAC, or opening a connection, is not taken.
        let mut arp = [[0xff; 6], KERNEL_MAC].concat();
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&KERNEL_MAC);
        arp.extend_from_slice(&KERNEL);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&LINK);
        let (v, reply) = run(&t, &mut st, HOST_PORT, &arp, SECOND);
        assert_eq!((v, &reply[0..12]), (Verdict::Tx(HOST_PORT), &[KERNEL_MAC, LINK_MAC].concat()[..]));
        let spoofed = tcp(T3_MAC, LINK_MAC, to, LINK, 64, 8088, p, false);
        assert_eq!(run(&t, &mut st, HOST_PORT, &spoofed, SECOND).0, Verdict::Drop(D::SrcMacSpoofed));
        let opening = tcp(KERNEL_MAC, LINK_MAC, to, LINK, 64, 8088, p + 1, true);
        assert_eq!(run(&t, &mut st, HOST_PORT, &opening, SECOND).0, Verdict::Drop(D::EgressNoConnection));
    }
}

#[test]
fn a_host_link_inside_the_cluster_or_named_as_a_task_port_is_refused() {
    let bad = host_link(false).replace("198.18.99.2", "198.19.0.77");
    let spec: TablesSpec =
        toml::from_str(&format!("{}\n{bad}", include_str!("../../examples/tables.toml"))).expect("spec");
    let e = Tables::compile(&spec).expect_err("refused").to_string();
    assert!(e.contains("lies in the cluster subnet 198.19.0.0/24"), "{e}");
    let bad = format!("{}port = \"task1\"\n", host_link(false));
    let spec: TablesSpec =
        toml::from_str(&format!("{}\n{bad}", include_str!("../../examples/tables.toml"))).expect("spec");
    let e = Tables::compile(&spec).expect_err("refused").to_string();
    assert!(e.contains("\"task1\" is already a port's name"), "{e}");
}

#[test]
fn a_one_way_stream_keeps_its_way_back() {
    // Only the task speaks for longer than the UDP timeout: the reply
    // half is kept (put back) by the task's packets, so a late reply still
    // finds it, on the same port.
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let mut ports = std::collections::BTreeSet::new();
    for s in [0, 200, 400] {
        let (v, out) = run(&t, &mut st, TASK1, &udp(T1_MAC, GW_MAC, T1, SERVER, 64, 5000, 514), s * SECOND);
        assert_eq!(v, Verdict::Tx(UPLINK));
        ports.insert(sport(&out));
    }
    assert_eq!(ports.len(), 1, "one mapping all along");
    let p = *ports.first().expect("a port");
    let reply = udp(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, 514, p);
    assert_eq!(run(&t, &mut st, UPLINK, &reply, 450 * SECOND).0, Verdict::Tx(TASK1));
    assert_eq!(st.lb.egress_stats().new_conns, 1);
}

const GW: [u8; 4] = [198, 19, 0, 254];
const DB_GW: [u8; 4] = [198, 19, 1, 254];

/// The example tables with the host link and a DNS port per network
/// (`app` 25300, `db` 25301), `db` internal if asked.
fn dns_tables(db_internal: bool) -> Tables {
    dns_tables_dnat(db_internal, false)
}

/// [`dns_tables`], the host link DNATing the node's data address if asked.
fn dns_tables_dnat(db_internal: bool, dnat: bool) -> Tables {
    let base = include_str!("../../examples/tables.toml");
    let mut spec: TablesSpec = toml::from_str(&format!("{base}\n{}", host_link(dnat))).expect("spec parses");
    spec.networks[0].dns_port = Some(25300);
    spec.networks[1].dns_port = Some(25301);
    spec.networks[1].internal = db_internal;
    Tables::compile(&spec).expect("tables compile")
}

#[test]
fn dns_queries_go_to_their_networks_port_on_the_host_link_and_answers_come_from_the_gateway() {
    for db_internal in [false, true] {
        let t = dns_tables(db_internal);
        let mut st = WorkerState::for_tables(&t);
        let cases = [(TASK1, T1_MAC, T1, GW_MAC, GW, 25300), (DB1, DB1_MAC, DB1_IP, DB_GW_MAC, DB_GW, 25301)];
        for (port, mac, ip, gw_mac, gw, dns) in cases {
            // A TTL of 1 is legal: the query is for the gateway.
            for ttl in [64, 1] {
                let q = udp(mac, gw_mac, ip, gw, ttl, 41000 + u16::from(ttl), 53);
                let (v, out) = run(&t, &mut st, port, &q, 0);
                assert_eq!(v, Verdict::Tx(HOST_PORT), "internal db {db_internal}, port {port}, ttl {ttl}");
                let p = sport(&out);
                assert_eq!(out, udp(LINK_MAC, KERNEL_MAC, LINK, KERNEL, ttl, p, dns), "DNAT + SNAT, TTL kept");
                let answer = udp(KERNEL_MAC, LINK_MAC, KERNEL, LINK, 64, dns, p);
                let (v, back) = run(&t, &mut st, HOST_PORT, &answer, SECOND);
                assert_eq!(v, Verdict::Tx(port));
                assert_eq!(back, udp(gw_mac, mac, gw, ip, 64, 53, 41000 + u16::from(ttl)), "from the gateway's :53");
            }
        }
        let e = st.lb.egress_stats();
        assert_eq!((e.dns_conns, e.new_conns, e.tx_packets, e.rx_packets), (4, 0, 4, 4));
    }
}

/// A network's DNS listener on the host link is reached through the
/// gateway's port 53 only: addressed directly (its own network's port or
/// another's), refused and counted; another port there still goes.
#[test]
fn a_task_cannot_address_a_dns_listener_directly() {
    for dnat in [false, true] {
        let t = dns_tables_dnat(false, dnat);
        let mut st = WorkerState::for_tables(&t);
        // The host's end, and (DNATed there) the node's data address.
        let targets: &[[u8; 4]] = if dnat { &[KERNEL, NODE1] } else { &[KERNEL] };
        for &to in targets {
            for dport in [25300, 25301] {
                let direct = [
                    udp(T1_MAC, GW_MAC, T1, to, 64, 41000, dport),
                    tcp(T1_MAC, GW_MAC, T1, to, 64, 41000, dport, true),
                ];
                for f in direct {
                    let v = run(&t, &mut st, TASK1, &f, 0).0;
                    assert_eq!(v, Verdict::Drop(D::EgressToDns), "dnat {dnat}, to {to:?}, port {dport}");
                }
            }
            let other = tcp(T1_MAC, GW_MAC, T1, to, 64, 41001, 8080, true);
            assert_eq!(run(&t, &mut st, TASK1, &other, 0).0, Verdict::Tx(HOST_PORT), "dnat {dnat}, to {to:?}");
        }
    }
}

#[test]
fn dns_over_tcp_follows_the_connection() {
    let t = dns_tables(false);
    let mut st = WorkerState::for_tables(&t);
    let (v, out) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, GW, 64, 42000, 53, true), 0);
    assert_eq!(v, Verdict::Tx(HOST_PORT));
    let p = sport(&out);
    assert_eq!(out, tcp(LINK_MAC, KERNEL_MAC, LINK, KERNEL, 64, p, 25300, true));
    let mut synack = Vec::new();
    etherparse::PacketBuilder::ethernet2(KERNEL_MAC, LINK_MAC)
        .ipv4(KERNEL, LINK, 64)
        .tcp(25300, p, 7, 1000)
        .syn()
        .ack(1001)
        .write(&mut synack, b"")
        .expect("syn-ack");
    let (v, back) = run(&t, &mut st, HOST_PORT, &synack, SECOND);
    assert_eq!(v, Verdict::Tx(TASK1));
    let mut want = Vec::new();
    etherparse::PacketBuilder::ethernet2(GW_MAC, T1_MAC)
        .ipv4(GW, T1, 64)
        .tcp(53, 42000, 7, 1000)
        .syn()
        .ack(1001)
        .write(&mut want, b"")
        .expect("syn-ack");
    assert_eq!(back, want);
    // The query itself, on the same mapping; the answer back.
    let (v, out) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, GW, 64, 42000, 53, false), 2 * SECOND);
    assert_eq!((v, out), (Verdict::Tx(HOST_PORT), tcp(LINK_MAC, KERNEL_MAC, LINK, KERNEL, 64, p, 25300, false)));
    let (v, back) =
        run(&t, &mut st, HOST_PORT, &tcp(KERNEL_MAC, LINK_MAC, KERNEL, LINK, 64, 25300, p, false), 3 * SECOND);
    assert_eq!((v, back), (Verdict::Tx(TASK1), tcp(GW_MAC, T1_MAC, GW, T1, 64, 53, 42000, false)));
    assert_eq!(st.lb.egress_stats().dns_conns, 1);
}

#[test]
fn a_port_unreachable_about_a_query_is_quoted_from_the_gateway() {
    // No server listens yet: the kernel answers port unreachable, and the
    // task sees it from its resolver about the query it sent.
    let t = dns_tables(false);
    let mut st = WorkerState::for_tables(&t);
    let q = udp(T1_MAC, GW_MAC, T1, GW, 64, 43000, 53);
    let (v, out) = run(&t, &mut st, TASK1, &q, 0);
    assert_eq!(v, Verdict::Tx(HOST_PORT));
    let err = icmp_error(KERNEL_MAC, LINK_MAC, KERNEL, LINK, 3, 3, &out, 28);
    let (v, back) = run(&t, &mut st, HOST_PORT, &err, SECOND);
    assert_eq!(v, Verdict::Tx(TASK1));
    assert_eq!(back, icmp_error(GW_MAC, T1_MAC, GW, T1, 3, 3, &q, 28));
}

#[test]
fn dns_entries_live_ten_seconds_and_a_network_without_a_dns_port_has_no_route() {
    let t = dns_tables(false);
    let mut st = WorkerState::for_tables(&t);
    let (_, out) = run(&t, &mut st, TASK1, &udp(T1_MAC, GW_MAC, T1, GW, 64, 44000, 53), 0);
    let p = sport(&out);
    let answer = udp(KERNEL_MAC, LINK_MAC, KERNEL, LINK, 64, 25300, p);
    assert_eq!(run(&t, &mut st, HOST_PORT, &answer, 9 * SECOND).0, Verdict::Tx(TASK1));
    assert_eq!(run(&t, &mut st, HOST_PORT, &answer, 20 * SECOND).0, Verdict::Drop(D::EgressNoConnection));
    // Without a DNS port, a query to the gateway is no one's.
    let t = tables(&host_link(false));
    let mut st = WorkerState::for_tables(&t);
    let (v, _) = run(&t, &mut st, TASK1, &udp(T1_MAC, GW_MAC, T1, GW, 64, 44000, 53), 0);
    assert_eq!(v, Verdict::Drop(D::NoRoute));
}

#[test]
fn a_dns_port_needs_the_host_link_and_is_one_networks() {
    let base = include_str!("../../examples/tables.toml");
    let mut spec: TablesSpec = toml::from_str(&format!("{base}\n{EGRESS}")).expect("spec");
    spec.networks[0].dns_port = Some(25300);
    let e = Tables::compile(&spec).expect_err("refused").to_string();
    assert!(e.contains("network \"app\": dns_port needs the host link"), "{e}");
    let mut spec: TablesSpec = toml::from_str(&format!("{base}\n{}", host_link(false))).expect("spec");
    spec.networks[0].dns_port = Some(25300);
    spec.networks[1].dns_port = Some(25300);
    let e = Tables::compile(&spec).expect_err("refused").to_string();
    assert!(e.contains("dns_port 25300 is used twice"), "{e}");
}

#[test]
fn a_closed_egress_connections_tuple_keeps_its_port_on_every_path() {
    // The task closes its connection and opens it again from the same
    // port (a bare SYN on a closing tuple): the balancer's port-reuse
    // rule is for balanced connections only, so the mapping stays, and the
    // fast and general paths agree (`run` checks). Network app has a
    // service, so the fast path looks the task's flows up too.
    let t = tables(&format!(
        "{EGRESS}[[service]]\nname = \"web\"\nprotocol = \"tcp\"\nnetwork = \"app\"\nvip = \"198.19.0.100\"\nport = 80\n\
         target_port = 8080\n[[service.backend]]\nip = \"198.19.0.3\"\n"
    ));
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40100, 80, true);
    let (_, out) = run(&t, &mut st, TASK1, &syn, 0);
    let p = sport(&out);
    let mut fin = Vec::new();
    etherparse::PacketBuilder::ethernet2(T1_MAC, GW_MAC)
        .ipv4(T1, SERVER, 64)
        .tcp(40100, 80, 1001, 1000)
        .fin()
        .ack(1)
        .write(&mut fin, b"")
        .expect("fin");
    assert_eq!(run(&t, &mut st, TASK1, &fin, SECOND).0, Verdict::Tx(UPLINK));
    let (v, out) = run(&t, &mut st, TASK1, &syn, 2 * SECOND);
    assert_eq!((v, sport(&out)), (Verdict::Tx(UPLINK), p));
}

#[test]
fn a_tasks_reset_closes_its_egress_connection_and_frees_its_port_within_the_close_timeout() {
    // The server does not answer a reset: the task's reset closes both
    // entries, so 10 s later the mapping and its port are gone (before,
    // the reply entry stayed established for 900 s, holding the port).
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let (v, out) = run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000, 80, true), 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    let p = sport(&out);
    let answer = tcp(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, 80, p, false);
    assert_eq!(run(&t, &mut st, UPLINK, &answer, 0).0, Verdict::Tx(TASK1));
    assert_eq!(
        run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000, 80, false), 0).0,
        Verdict::Tx(UPLINK)
    );
    assert_eq!(run(&t, &mut st, TASK1, &t1_reset(), SECOND).0, Verdict::Tx(UPLINK));
    let closed = |st: &WorkerState| st.lb.conntrack.values(SECOND).filter(|v| v.state == CtState::Close).count();
    assert_eq!(closed(&st), 2, "both entries closed");
    assert_eq!(st.lb.egress_ports_held(T1.into(), SERVER.into()), 1);
    st.lb.sweep(12 * SECOND, usize::MAX);
    assert_eq!((st.lb.conntrack.len(), st.lb.egress_ports_held(T1.into(), SERVER.into())), (0, 0));
}

#[test]
fn a_task_reusing_its_port_after_a_reset_keeps_its_way_back_past_the_close_timeout() {
    // The task resets its connection and opens it again from the same
    // port within 10 s (the mapping and its port stay): its SYN opens the
    // reply half again too, so the server's answer 30 s later still
    // reaches the task. Before, the reply half kept the closed state and
    // its 10 s, and that answer was dropped (egress_no_connection).
    let t = tables(EGRESS);
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000, 80, true);
    let (_, out) = run(&t, &mut st, TASK1, &syn, 0);
    let p = sport(&out);
    let answer = tcp(ROUTER_MAC, NODE1_MAC, SERVER, NODE1, 60, 80, p, false);
    assert_eq!(run(&t, &mut st, UPLINK, &answer, 0).0, Verdict::Tx(TASK1));
    assert_eq!(run(&t, &mut st, TASK1, &t1_reset(), SECOND).0, Verdict::Tx(UPLINK));
    let (v, out) = run(&t, &mut st, TASK1, &syn, 2 * SECOND);
    assert_eq!((v, sport(&out)), (Verdict::Tx(UPLINK), p), "the same mapping");
    assert_eq!(run(&t, &mut st, UPLINK, &answer, 2 * SECOND).0, Verdict::Tx(TASK1));
    assert_eq!(
        run(&t, &mut st, TASK1, &tcp(T1_MAC, GW_MAC, T1, SERVER, 64, 40000, 80, false), 2 * SECOND).0,
        Verdict::Tx(UPLINK)
    );
    assert_eq!(run(&t, &mut st, UPLINK, &answer, 40 * SECOND).0, Verdict::Tx(TASK1), "40 s later");
}

/// T1's reset of its connection from port 40000 to SERVER:80.
fn t1_reset() -> Vec<u8> {
    let mut rst = Vec::new();
    etherparse::PacketBuilder::ethernet2(T1_MAC, GW_MAC)
        .ipv4(T1, SERVER, 64)
        .tcp(40000, 80, 1006, 0)
        .rst()
        .write(&mut rst, b"")
        .expect("rst");
    rst
}
