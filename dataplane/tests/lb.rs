//! Internal VIPs through the pipeline, frame in / frame out: the example
//! tables plus a service `web` (TCP 198.19.0.100:80 → port 8080 on T3, a
//! local task, and T2, a task on node 2), round robin so the choice is
//! known. Expected frames are built with etherparse, independently of the
//! rewrite code under test.

use meshplane_dataplane::lb::conntrack::{CtState, SECOND};
use meshplane_dataplane::packet::{DropReason as D, Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process, process_general};
use meshplane_dataplane::tables::{Tables, TablesSpec, UPLINK};
use meshplane_dataplane::wire::vxlan::{self, Classified};

const TASK1: u16 = 1;
const TASK3: u16 = 2;
const NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const NODE2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const T1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const T2_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const T3_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
const GW_MAC: [u8; 6] = [0x02, 0x42, 0xc6, 0x13, 0x00, 0xfe];
const T1: [u8; 4] = [198, 19, 0, 1];
const T2: [u8; 4] = [198, 19, 0, 2];
const T3: [u8; 4] = [198, 19, 0, 3];
const VIP: [u8; 4] = [198, 19, 0, 100];

fn tables_with(service: &str) -> Tables {
    let base = include_str!("../../examples/tables.toml");
    let spec: TablesSpec = toml::from_str(&format!("{base}\n{service}")).expect("spec parses");
    Tables::compile(&spec).expect("tables compile")
}

const WEB: &str = r#"
[[service]]
name = "web"
protocol = "tcp"
network = "app"
vip = "198.19.0.100"
port = 80
target_port = 8080
scheduler = "rr"
[[service.backend]]
ip = "198.19.0.3"
[[service.backend]]
ip = "198.19.0.2"
"#;

fn tcp(dst: [u8; 6], src: [u8; 6], sip: [u8; 4], dip: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src, dst).ipv4(sip, dip, 64).tcp(sport, dport, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut f, b"hello").unwrap();
    f
}

/// Runs one frame; returns the verdict and the frame as it is afterwards.
/// The general path (no fast paths) must agree, given the same state.
fn run(t: &Tables, st: &mut WorkerState, in_port: u16, input: &[u8], now: u64) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; HEADROOM + input.len() + 64];
    buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
    let mut f = Frame::new(&mut buf, HEADROOM, input.len()).unwrap();
    let v = process(&mut f, in_port, now, t, st);
    (v, f.data().to_vec())
}

/// [`run`], and the general path alone on a copy of the state: both must
/// give the same verdict and bytes.
fn run_agreeing(t: &Tables, st: &mut WorkerState, port: u16, f: &[u8], now: u64) -> (Verdict, Vec<u8>) {
    let mut copy = st.clone();
    let mut buf = vec![0u8; HEADROOM + f.len() + 64];
    buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
    let mut g = Frame::new(&mut buf, HEADROOM, f.len()).unwrap();
    let gv = process_general(&mut g, port, now, t, &mut copy);
    let out = run(t, st, port, f, now);
    assert_eq!(out, (gv, g.data().to_vec()), "the general path agrees");
    out
}

fn decap(out: &[u8]) -> (u32, Vec<u8>) {
    let Ok(Classified::Vxlan(d)) = vxlan::classify(out, core::net::Ipv4Addr::new(198, 18, 0, 2), 4789) else {
        panic!("not VXLAN to node 2");
    };
    assert_eq!(&out[0..12], &[NODE2_MAC, NODE1_MAC].concat()[..]);
    (d.vni, out[d.inner].to_vec())
}

#[test]
fn vip_is_balanced_and_replies_are_reversed() {
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);

    // Connection 1: rr picks the first backend, T3 (local): DNAT to
    // T3:8080, to T3's MAC, still from T1's (what a backend's node accepts
    // from T1's VTEP).
    let syn1 = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true);
    let (v, out) = run(&t, &mut st, TASK1, &syn1, 0);
    assert_eq!(v, Verdict::Tx(TASK3));
    assert_eq!(out, tcp(T3_MAC, T1_MAC, T1, T3, 40001, 8080, true));

    // Connection 2: the second backend, T2 on node 2: DNATed, then VXLAN.
    let syn2 = tcp(GW_MAC, T1_MAC, T1, VIP, 40002, 80, true);
    let (v, out) = run(&t, &mut st, TASK1, &syn2, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(decap(&out), (4096, tcp(T2_MAC, T1_MAC, T1, T2, 40002, 8080, true)));

    // More packets of connection 1 stay on T3 (rr alone would move on).
    let ack1 = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, false);
    assert_eq!(run(&t, &mut st, TASK1, &ack1, SECOND).0, Verdict::Tx(TASK3));

    // T3's reply (local) reaches T1 from VIP:80 and the gateway's MAC.
    let reply1 = tcp(T1_MAC, T3_MAC, T3, T1, 8080, 40001, false);
    let (v, out) = run(&t, &mut st, TASK3, &reply1, SECOND);
    assert_eq!(v, Verdict::Tx(TASK1));
    assert_eq!(out, tcp(T1_MAC, GW_MAC, VIP, T1, 80, 40001, false));

    // T2's reply arrives over VXLAN from node 2 and is reversed the same way.
    let reply2 = tcp(T1_MAC, T2_MAC, T2, T1, 8080, 40002, false);
    let mut vx = Vec::new();
    let mut payload = vec![0x08, 0, 0, 0, 0x00, 0x10, 0x00, 0];
    payload.extend_from_slice(&reply2);
    etherparse::PacketBuilder::ethernet2(NODE2_MAC, NODE1_MAC)
        .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
        .udp(50000, 4789)
        .write(&mut vx, &payload)
        .unwrap();
    let (v, out) = run(&t, &mut st, UPLINK, &vx, SECOND);
    assert_eq!(v, Verdict::Tx(TASK1));
    assert_eq!(out, tcp(T1_MAC, GW_MAC, VIP, T1, 80, 40002, false));

    // A connection T1 makes to T3:8080 directly is not a VIP's: its reply
    // is delivered as it is.
    let direct = tcp(T1_MAC, T3_MAC, T3, T1, 8080, 40009, false);
    assert_eq!(run(&t, &mut st, TASK3, &direct, SECOND), (Verdict::Tx(TASK1), direct.clone()));

    // Counters: 3 packets to the VIP, 2 connections, one per backend.
    let s = &st.lb.services[0];
    assert_eq!((s.packets, s.new_conns), (3, 2));
    assert_eq!(
        s.backends.iter().map(|b| (b.packets, b.new_conns, b.active)).collect::<Vec<_>>(),
        [(2, 1, 1), (1, 1, 1)]
    );
}

#[test]
fn drained_backends_keep_their_connections_and_take_no_new_ones() {
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    let syn1 = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn1, 0).0, Verdict::Tx(TASK3));
    // New tables: T3 draining. The worker keeps its state.
    let drained = tables_with(&WEB.replacen("ip = \"198.19.0.3\"", "ip = \"198.19.0.3\"\nstate = \"draining\"", 1));
    st.sync(&drained);
    let ack1 = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, false);
    assert_eq!(run(&drained, &mut st, TASK1, &ack1, SECOND).0, Verdict::Tx(TASK3), "existing flow stays");
    for sport in 41000..41010 {
        let syn = tcp(GW_MAC, T1_MAC, T1, VIP, sport, 80, true);
        assert_eq!(run(&drained, &mut st, TASK1, &syn, SECOND).0, Verdict::Tx(UPLINK), "new flows avoid T3");
    }
    // Everything drained: a new connection has nowhere to go.
    let none = tables_with(
        &WEB.replace("ip = \"198.19.0.3\"", "ip = \"198.19.0.3\"\nweight = 0")
            .replace("ip = \"198.19.0.2\"", "ip = \"198.19.0.2\"\nstate = \"draining\""),
    );
    st.sync(&none);
    let syn = tcp(GW_MAC, T1_MAC, T1, VIP, 42000, 80, true);
    assert_eq!(run(&none, &mut st, TASK1, &syn, SECOND).0, Verdict::Drop(D::NoBackend));
    assert_eq!(st.stats.dropped(D::NoBackend), 1);
}

#[test]
fn idle_connections_expire_and_are_scheduled_again() {
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn, 0).0, Verdict::Tx(TASK3));
    // A SYN-only connection times out after 60 s; the same 5-tuple is then
    // a new connection, and rr has moved on to T2.
    assert_eq!(run(&t, &mut st, TASK1, &syn, 61 * SECOND).0, Verdict::Tx(UPLINK));
    assert_eq!(st.lb.services[0].backends[0].active, 0, "the expired connection released T3");
}

#[test]
fn vip_arp_ping_and_other_ports() {
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    // ARP for the VIP: answered with the gateway's MAC.
    let mut req = Vec::new();
    req.extend_from_slice(&[0xff; 6]);
    req.extend_from_slice(&T1_MAC);
    req.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    req.extend_from_slice(&T1_MAC);
    req.extend_from_slice(&T1);
    req.extend_from_slice(&[0; 6]);
    req.extend_from_slice(&VIP);
    let (v, out) = run(&t, &mut st, TASK1, &req, 0);
    assert_eq!(v, Verdict::Tx(TASK1));
    assert_eq!(&out[22..28], &GW_MAC, "sender hardware address of the reply");
    assert_eq!(&out[28..32], &VIP);
    // Another port, or UDP, at the VIP is no service: no route.
    let other = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 81, true);
    assert_eq!(run(&t, &mut st, TASK1, &other, 0).0, Verdict::Drop(D::NoRoute));
    // Ping to the VIP is answered, from the VIP (as Swarm's VIPs answer).
    let ping = |dst: [u8; 4], reply: bool, src: [u8; 4], from: [u8; 6], to: [u8; 6]| {
        let mut f = Vec::new();
        let b = etherparse::PacketBuilder::ethernet2(from, to).ipv4(src, dst, 64);
        let b = if reply { b.icmpv4_echo_reply(9, 1) } else { b.icmpv4_echo_request(9, 1) };
        b.write(&mut f, b"abcd").expect("echo");
        f
    };
    let (v, out) = run(&t, &mut st, TASK1, &ping(VIP, false, T1, T1_MAC, GW_MAC), 0);
    assert_eq!((v, out), (Verdict::Tx(TASK1), ping(T1, true, VIP, GW_MAC, T1_MAC)));
    // Not an address of no VIP.
    let (v, _) = run(&t, &mut st, TASK1, &ping([198, 19, 0, 101], false, T1, T1_MAC, GW_MAC), 0);
    assert_ne!(v, Verdict::Tx(TASK1));
}

#[test]
fn general_path_agrees_with_fast_path_on_lb_traffic() {
    // process and process_general, each with its own state, give the same
    // verdicts and bytes over a conversation.
    let t = tables_with(WEB);
    let (mut a, mut b) = (WorkerState::for_tables(&t), WorkerState::for_tables(&t));
    let frames = [
        (TASK1, tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true)),
        (TASK1, tcp(GW_MAC, T1_MAC, T1, VIP, 40002, 80, true)),
        (TASK3, tcp(T1_MAC, T3_MAC, T3, T1, 8080, 40001, false)),
        (TASK1, tcp(T3_MAC, T1_MAC, T1, T3, 5000, 22, true)),
        (TASK1, tcp(T2_MAC, T1_MAC, T1, T2, 5000, 22, true)),
        // Established connections: the fast path takes the remote one.
        (TASK1, tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, false)),
        (TASK1, tcp(GW_MAC, T1_MAC, T1, VIP, 40002, 80, false)),
        (TASK1, tcp(GW_MAC, T1_MAC, T1, VIP, 40002, 80, false)),
    ];
    for (port, f) in &frames {
        let (va, oa) = run(&t, &mut a, *port, f, 0);
        let mut buf = vec![0u8; HEADROOM + f.len()];
        buf[HEADROOM..].copy_from_slice(f);
        let mut g = Frame::new(&mut buf, HEADROOM, f.len()).unwrap();
        let vb = process_general(&mut g, *port, 0, &t, &mut b);
        assert_eq!((va, &oa[..]), (vb, g.data()));
    }
    assert_eq!(a.stats.ports, b.stats.ports);
    assert_eq!(a.lb.services, b.lb.services);
    assert_eq!(a.lb.conntrack.stats, b.lb.conntrack.stats);
    assert_eq!(a.lb.services[0].packets, 5);
}

#[test]
fn bad_services_are_refused_with_clear_errors() {
    let base = include_str!("../../examples/tables.toml");
    let err = |svc: &str| {
        let spec: TablesSpec = toml::from_str(&format!("{base}\n{svc}")).expect("spec parses");
        Tables::compile(&spec).unwrap_err().to_string()
    };
    let e = err(&WEB.replace("198.19.0.100", "198.19.9.100"));
    assert!(e.contains("vip 198.19.9.100 is not a host address of 198.19.0.0/24"), "{e}");
    let e = err(&WEB.replace("vip = \"198.19.0.100\"", "vip = \"198.19.0.3\""));
    assert!(e.contains("already the gateway's, this node's or an endpoint's"), "{e}");
    let e = err(&WEB.replace("ip = \"198.19.0.2\"", "ip = \"198.19.0.77\""));
    assert!(e.contains("backend 198.19.0.77 is not an endpoint of network \"app\""), "{e}");
    // A connection entry keeps a backend's index in 16 bits.
    let many: String = (0..65536u32)
        .map(|i| format!("[[service.backend]]\nip = \"198.{}.{}.{}\"\n", 18 + (i >> 16), (i >> 8) & 255, i & 255))
        .collect();
    let e = err(&format!("{WEB}{many}"));
    assert!(e.contains("service \"web\": at most 65535 backends"), "{e}");
    let e = err(&WEB.replace("network = \"app\"", "network = \"nope\""));
    assert!(e.contains("unknown network \"nope\""), "{e}");
    let e = err(&WEB.replace("scheduler = \"rr\"", "scheduler = \"mh\"\nmaglev_size = 65536"));
    assert!(e.contains("maglev table size 65536 must be a prime"), "{e}");
    let e = err(&format!("{WEB}\n{}", WEB.replace("name = \"web\"", "name = \"web2\"")));
    assert!(e.contains("198.19.0.100:80 (tcp) is another service's"), "{e}");
    let spec: Result<TablesSpec, _> = toml::from_str(&format!("{base}\n{}", WEB.replace("\"rr\"", "\"fastest\"")));
    assert!(spec.unwrap_err().to_string().contains("unknown variant `fastest`"));
}

#[test]
fn a_removed_backends_connections_move_at_once() {
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn, 0).0, Verdict::Tx(TASK3));
    // T3 is removed (T2 now has index 0, where T3 was): the connection is
    // not sent to a backend that is gone, nor to whatever took its index
    // by mistake; it is scheduled again, to T2.
    let removed = tables_with(&WEB.replace("[[service.backend]]\nip = \"198.19.0.3\"\n", ""));
    assert_eq!(removed.services.list[0].backends.len(), 1);
    st.sync(&removed);
    let ack = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, false);
    let (v, out) = run(&removed, &mut st, TASK1, &ack, SECOND);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(decap(&out), (4096, tcp(T2_MAC, T1_MAC, T1, T2, 40001, 8080, false)));
    // The stale entry was replaced, not kept beside the new one: one
    // forward entry for the connection, and T2 carries it.
    let forward: Vec<_> = st.lb.conntrack.values(SECOND).filter(|v| v.flags == 0).collect();
    assert_eq!(forward.len(), 1, "{forward:?}");
    assert_eq!((forward[0].backend, st.lb.services[0].backends[0].active), (0, 1));
    // And it stays there.
    assert_eq!(run(&removed, &mut st, TASK1, &ack, 2 * SECOND).0, Verdict::Tx(UPLINK));
    assert_eq!(st.lb.conntrack.values(SECOND).filter(|v| v.flags == 0).count(), 1);
}

#[test]
fn a_connection_keeps_its_backend_when_another_is_added_before_it() {
    // T2 (index 1) carries the connection; T1 is added first in the list
    // (a task back from failing its health check): T2 moves to index 2
    // and the connection stays on T2, in both directions.
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    assert_eq!(run(&t, &mut st, TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true), 0).0, Verdict::Tx(TASK3));
    let syn = tcp(GW_MAC, T3_MAC, T3, VIP, 40002, 80, true);
    assert_eq!(run(&t, &mut st, TASK3, &syn, 0).0, Verdict::Tx(UPLINK), "rr: the second to T2");
    let added = tables_with(&WEB.replace(
        "[[service.backend]]\nip = \"198.19.0.3\"\n",
        "[[service.backend]]\nip = \"198.19.0.1\"\n[[service.backend]]\nip = \"198.19.0.3\"\n",
    ));
    assert_eq!(added.services.list[0].backends[2].ip, core::net::Ipv4Addr::from(T2));
    st.sync(&added);
    for now in [SECOND, 2 * SECOND] {
        let (v, out) = run(&added, &mut st, TASK3, &tcp(GW_MAC, T3_MAC, T3, VIP, 40002, 80, false), now);
        assert_eq!(v, Verdict::Tx(UPLINK));
        assert_eq!(decap(&out), (4096, tcp(T2_MAC, T3_MAC, T3, T2, 40002, 8080, false)));
        let (v, _) = run(&added, &mut st, TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, false), now);
        assert_eq!(v, Verdict::Tx(TASK3), "T3 keeps its connection too");
    }
}

#[test]
fn a_new_syn_on_a_closed_connections_tuple_is_scheduled_again() {
    // rr: T3, then T2. The client resets its connection and reuses the
    // port: the new SYN is a new connection (IPVS's conn_reuse_mode 1),
    // not the old one's backend again; a retransmitted SYN stays.
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn, 0).0, Verdict::Tx(TASK3));
    assert_eq!(run(&t, &mut st, TASK1, &syn, SECOND).0, Verdict::Tx(TASK3), "a retransmitted SYN stays");
    assert_eq!(run(&t, &mut st, TASK1, &rst(GW_MAC, T1_MAC, T1, VIP, 40001, 80), SECOND).0, Verdict::Tx(TASK3));
    assert_eq!(run(&t, &mut st, TASK1, &syn, 2 * SECOND).0, Verdict::Tx(UPLINK), "scheduled again: T2");
    assert_eq!(st.lb.services[0].new_conns, 2);
}

#[test]
fn maglev_picks_the_same_backend_on_independent_nodes() {
    // Two independently compiled tables and workers (two nodes) send the
    // same flows to the same backends, with no shared state.
    let svc = WEB.replace("scheduler = \"rr\"", "scheduler = \"mh\"");
    let (ta, tb) = (tables_with(&svc), tables_with(&svc));
    let (mut a, mut b) = (WorkerState::for_tables(&ta), WorkerState::for_tables(&tb));
    let mut seen = [0usize; 2];
    for sport in 30000..30400u16 {
        let syn = tcp(GW_MAC, T1_MAC, T1, VIP, sport, 80, true);
        let va = run(&ta, &mut a, TASK1, &syn, 0).0;
        assert_eq!(va, run(&tb, &mut b, TASK1, &syn, 0).0, "flow {sport}");
        seen[usize::from(va == Verdict::Tx(UPLINK))] += 1;
    }
    // And both backends get a fair share.
    assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
}

// ---------------------------------------------------------------------------
// The routing mesh: a client outside (198.18.5.5, behind the underlay)
// connects to this node's data-path address (198.18.0.1) on a published
// port. This node's address in the app network is 198.19.0.250 (MAC
// 02:42:c6:13:00:fa); node 2's is 198.19.0.251.

const CLIENT: [u8; 4] = [198, 18, 5, 5];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 5, 5];
const NODE1: [u8; 4] = [198, 18, 0, 1];
const NODE1_APP: [u8; 4] = [198, 19, 0, 250];
const NODE1_APP_MAC: [u8; 6] = [0x02, 0x42, 198, 19, 0, 250];
const NODE2_APP_MAC: [u8; 6] = [0x02, 0x42, 198, 19, 0, 251];

const MESH: &str = r#"
[[endpoint]]
network = "app"
ip = "198.19.0.251"
mac = "02:42:c6:13:00:fb"
vtep = "198.18.0.2"

[[service]]
name = "web"
protocol = "tcp"
network = "app"
target_port = 8080
scheduler = "rr"
published = [{ port = 30080, mode = "nat" }]
[[service.backend]]
ip = "198.19.0.3"
[[service.backend]]
ip = "198.19.0.2"

[[service]]
name = "web-ps"
protocol = "tcp"
network = "app"
target_port = 8080
scheduler = "rr"
published = [{ port = 30081, mode = "preserve-source" }]
[[service.backend]]
ip = "198.19.0.3"
[[service.backend]]
ip = "198.19.0.2"
"#;

/// The example tables with this node's address in network `app`
/// (198.19.0.250), as the routing mesh needs.
fn base_with_node_ip() -> String {
    include_str!("../../examples/tables.toml").replace(
        "gateway_mac = \"02:42:c6:13:00:fe\"",
        "gateway_mac = \"02:42:c6:13:00:fe\"\nnode_ip = \"198.19.0.250\"",
    )
}

fn mesh_tables() -> Tables {
    let base = base_with_node_ip();
    let spec: TablesSpec = toml::from_str(&format!("{base}\n{MESH}")).expect("spec parses");
    Tables::compile(&spec).expect("tables compile")
}

/// A VXLAN frame from node 2 carrying `inner`.
fn from_node2(inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0, 0x00, 0x10, 0x00, 0];
    payload.extend_from_slice(inner);
    let mut vx = Vec::new();
    etherparse::PacketBuilder::ethernet2(NODE2_MAC, NODE1_MAC)
        .ipv4([198, 18, 0, 2], NODE1, 64)
        .udp(50000, 4789)
        .write(&mut vx, &payload)
        .unwrap();
    vx
}

#[test]
fn routing_mesh_nat_mode_both_directions() {
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    // Connection 1 → T3 (local): DNAT to T3:8080, SNAT to this node's
    // address in the network, from this node's MAC there.
    let syn = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30080, true);
    let (v, out) = run(&t, &mut st, UPLINK, &syn, 0);
    assert_eq!(v, Verdict::Tx(TASK3));
    assert_eq!(out, tcp(T3_MAC, NODE1_APP_MAC, NODE1_APP, T3, 40001, 8080, true));
    // T3's reply to this node's address goes back to the client, from
    // 198.18.0.1:30080, to the client's MAC.
    let reply = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, 40001, false);
    let (v, out) = run(&t, &mut st, TASK3, &reply, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(out, tcp(CLIENT_MAC, NODE1_MAC, NODE1, CLIENT, 30080, 40001, false));

    // Connection 2 → T2 on node 2: DNAT + SNAT, then VXLAN.
    let syn2 = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40002, 30080, true);
    let (v, out) = run(&t, &mut st, UPLINK, &syn2, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(decap(&out), (4096, tcp(T2_MAC, NODE1_APP_MAC, NODE1_APP, T2, 40002, 8080, true)));
    // T2's reply comes back over VXLAN to this node's MAC and goes out to
    // the client.
    let back = from_node2(&tcp(NODE1_APP_MAC, T2_MAC, T2, NODE1_APP, 8080, 40002, false));
    let (v, out) = run(&t, &mut st, UPLINK, &back, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(out, tcp(CLIENT_MAC, NODE1_MAC, NODE1, CLIENT, 30080, 40002, false));

    // A frame to this node's address that is no connection's is dropped.
    let stray = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, 49999, false);
    assert_eq!(run(&t, &mut st, TASK3, &stray, 0).0, Verdict::Drop(D::NoConnection));
    // Other traffic to this node's address is the kernel's, as before.
    let ssh = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40003, 22, true);
    assert_eq!(run(&t, &mut st, UPLINK, &ssh, 0).0, Verdict::Pass);
}

#[test]
fn routing_mesh_nat_mode_keeps_source_ports_apart() {
    // One backend: two clients with the same source port must not share
    // this node's address and port toward it.
    let t = {
        let base = base_with_node_ip();
        let svc = "[[service]]\nname = \"one\"\nprotocol = \"udp\"\nnetwork = \"app\"\ntarget_port = 53\npublished = [{ port = 30053 }]\n[[service.backend]]\nip = \"198.19.0.3\"\n";
        Tables::compile(&toml::from_str(&format!("{base}\n{svc}")).unwrap()).unwrap()
    };
    let mut st = WorkerState::for_tables(&t);
    let udp = |src: [u8; 4]| {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
            .ipv4(src, NODE1, 64)
            .udp(5353, 30053)
            .write(&mut f, b"q")
            .unwrap();
        f
    };
    let (v1, o1) = run(&t, &mut st, UPLINK, &udp(CLIENT), 0);
    let (v2, o2) = run(&t, &mut st, UPLINK, &udp([198, 18, 5, 6]), 0);
    assert_eq!((v1, v2), (Verdict::Tx(TASK3), Verdict::Tx(TASK3)));
    let sport = |o: &[u8]| u16::from_be_bytes([o[34], o[35]]);
    assert_eq!(sport(&o1), 5353, "the first keeps its port");
    assert_ne!(sport(&o2), 5353, "the second gets another");
    assert_eq!((&o1[26..30], &o2[26..30]), (&NODE1_APP[..], &NODE1_APP[..]));
    // Each reply finds its own client.
    for (o, client) in [(&o1, CLIENT), (&o2, [198, 18, 5, 6])] {
        let mut r = Vec::new();
        etherparse::PacketBuilder::ethernet2(T3_MAC, NODE1_APP_MAC)
            .ipv4(T3, NODE1_APP, 64)
            .udp(53, sport(o))
            .write(&mut r, b"a")
            .unwrap();
        let (v, out) = run(&t, &mut st, TASK3, &r, 0);
        assert_eq!(v, Verdict::Tx(UPLINK));
        assert_eq!((&out[30..34], u16::from_be_bytes([out[36], out[37]])), (&client[..], 5353));
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), 30053);
    }
}

#[test]
fn routing_mesh_preserve_source_both_directions_and_both_nodes() {
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    // Ingress here, task here (T3): DNAT only, the task sees the client.
    let syn = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30081, true);
    let (v, out) = run(&t, &mut st, UPLINK, &syn, 0);
    assert_eq!(v, Verdict::Tx(TASK3));
    assert_eq!(out, tcp(T3_MAC, NODE1_APP_MAC, CLIENT, T3, 40001, 8080, true));
    // T3 answers the client through its default route, the gateway: the
    // reply leaves from 198.18.0.1:30081.
    let reply = tcp(GW_MAC, T3_MAC, T3, CLIENT, 8080, 40001, false);
    let (v, out) = run(&t, &mut st, TASK3, &reply, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(out, tcp(CLIENT_MAC, NODE1_MAC, NODE1, CLIENT, 30081, 40001, false));

    // Ingress here, task on node 2 (T2): DNAT only, over VXLAN.
    let syn2 = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40002, 30081, true);
    let (v, out) = run(&t, &mut st, UPLINK, &syn2, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(decap(&out), (4096, tcp(T2_MAC, NODE1_APP_MAC, CLIENT, T2, 40002, 8080, true)));
    // Node 2 returns T2's reply to this node's MAC, from its own MAC in
    // the network (as it does below, in the other role); it goes to the
    // client.
    let back = from_node2(&tcp(NODE1_APP_MAC, NODE2_APP_MAC, T2, CLIENT, 8080, 40002, false));
    let (v, out) = run(&t, &mut st, UPLINK, &back, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(out, tcp(CLIENT_MAC, NODE1_MAC, NODE1, CLIENT, 30081, 40002, false));

    // The other role: node 2 was the ingress and the task is T3, here. The
    // connection arrives over VXLAN from node 2's MAC with the client's
    // own address, is delivered as it is, and remembered ...
    let other = [198, 18, 5, 6];
    let inbound = tcp(T3_MAC, NODE2_APP_MAC, other, T3, 50000, 8080, true);
    let (v, out) = run(&t, &mut st, UPLINK, &from_node2(&inbound), 0);
    assert_eq!((v, out), (Verdict::Tx(TASK3), inbound));
    // ... so that T3's reply, sent to the gateway, goes back to node 2.
    let reply = tcp(GW_MAC, T3_MAC, T3, other, 8080, 50000, false);
    let (v, out) = run(&t, &mut st, TASK3, &reply, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(decap(&out), (4096, tcp(NODE2_APP_MAC, NODE1_APP_MAC, T3, other, 8080, 50000, false)));

    // To an outside address that is no connection's: no route.
    let stray = tcp(GW_MAC, T3_MAC, T3, [198, 18, 9, 9], 8080, 1, false);
    assert_eq!(run(&t, &mut st, TASK3, &stray, 0).0, Verdict::Drop(D::NoRoute));
    // Counters of web-ps: 2 connections, one per backend.
    let s = &st.lb.services[1];
    assert_eq!((s.new_conns, s.backends[0].new_conns, s.backends[1].new_conns), (2, 1, 1));
}

#[test]
fn flood_guard_drops_new_connections_above_the_rate_and_counts_them() {
    // Above 3 new connections a second the next ones are neither tracked
    // nor balanced (a connection that is not tracked could not have its
    // replies reversed): dropped, counted under their own reason;
    // connections already tracked are untouched; the next second admits
    // more.
    let t = tables_with(WEB);
    let ct = meshplane_dataplane::lb::conntrack::CtConfig { capacity: 4096, max_new_per_sec: 3, ..Default::default() };
    let mut st = WorkerState::with_conntrack(t.ports.len(), ct);
    st.sync(&t);
    let mut verdicts = Vec::new();
    for sport in 41000..41010u16 {
        verdicts.push(run(&t, &mut st, TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, sport, 80, true), 0).0);
    }
    assert!(verdicts[..3].iter().all(|v| matches!(v, Verdict::Tx(_))), "{verdicts:?}");
    assert!(verdicts[3..].iter().all(|v| *v == Verdict::Drop(D::NewConnRateLimited)), "{verdicts:?}");
    let s = st.lb.conntrack.stats;
    assert_eq!((s.inserted, s.guarded), (2 * 3, 7), "3 connections tracked (both directions), 7 not");
    assert_eq!(st.stats.dropped(D::NewConnRateLimited), 7);
    assert_eq!(st.lb.services[0].new_conns, 3);
    // A tracked connection goes on; a new one a second later is admitted.
    assert!(matches!(run(&t, &mut st, TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 41000, 80, false), 1).0, Verdict::Tx(_)));
    assert!(matches!(
        run(&t, &mut st, TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 41005, 80, true), SECOND).0,
        Verdict::Tx(_)
    ));
}

/// A TCP reset (RST|ACK) frame.
fn rst(dst: [u8; 6], src: [u8; 6], sip: [u8; 4], dip: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .tcp(sport, dport, 1, 0)
        .rst()
        .ack(1)
        .write(&mut f, &[])
        .unwrap();
    f
}

/// The states of the live entries of `st`'s table at `now`.
fn states(st: &WorkerState, now: u64) -> Vec<CtState> {
    st.lb.conntrack.values(now).map(|v| v.state).collect()
}

#[test]
fn an_untracked_segment_is_picked_up_unconfirmed_until_the_backend_answers() {
    use meshplane_dataplane::lb::conntrack::CtState::{Established, Unconfirmed};
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    // A mid-stream ACK of a connection the table does not know (nat mode):
    // balanced (T3), both directions tracked, unconfirmed.
    let ack = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30080, false);
    let (v, out) = run(&t, &mut st, UPLINK, &ack, 0);
    assert_eq!((v, out), (Verdict::Tx(TASK3), tcp(T3_MAC, NODE1_APP_MAC, NODE1_APP, T3, 40001, 8080, false)));
    assert_eq!(states(&st, 0), [Unconfirmed, Unconfirmed]);
    assert_eq!(st.lb.conntrack.stats.unconfirmed, 2);
    // The backend does not know it and resets it: the reset reaches the
    // client, the connection stays unconfirmed and is gone within seconds.
    let reset = rst(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, 40001);
    let (v, out) = run(&t, &mut st, TASK3, &reset, SECOND);
    assert_eq!((v, out), (Verdict::Tx(UPLINK), rst(CLIENT_MAC, NODE1_MAC, NODE1, CLIENT, 30080, 40001)));
    assert_eq!(states(&st, SECOND), [Unconfirmed, Unconfirmed]);
    assert!(states(&st, 7 * SECOND).is_empty(), "expired 5 s after the last segment");
    // Another one the backend answers (a connection from before a
    // restart): both entries confirmed, established, for 900 s.
    let ack = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40002, 30080, false);
    let (v, _) = run(&t, &mut st, UPLINK, &ack, 10 * SECOND);
    assert_eq!(v, Verdict::Tx(UPLINK), "T2 on node 2 (round robin)");
    let back = from_node2(&tcp(NODE1_APP_MAC, T2_MAC, T2, NODE1_APP, 8080, 40002, false));
    let (v, out) = run(&t, &mut st, UPLINK, &back, 10 * SECOND);
    assert_eq!((v, out), (Verdict::Tx(UPLINK), tcp(CLIENT_MAC, NODE1_MAC, NODE1, CLIENT, 30080, 40002, false)));
    assert_eq!(states(&st, 10 * SECOND), [Established, Established]);
    assert_eq!(st.lb.conntrack.stats.confirmed, 1);
    assert_eq!(states(&st, 10 * SECOND + 800 * SECOND), [Established, Established]);

    // The same for a VIP: T1's mid-stream ACK to the VIP, T3's reply.
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    let ack = tcp(GW_MAC, T1_MAC, T1, VIP, 41000, 80, false);
    assert_eq!(run(&t, &mut st, TASK1, &ack, 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Unconfirmed, Unconfirmed]);
    let reply = tcp(T1_MAC, T3_MAC, T3, T1, 8080, 41000, false);
    let (v, out) = run(&t, &mut st, TASK3, &reply, 0);
    assert_eq!((v, out), (Verdict::Tx(TASK1), tcp(T1_MAC, GW_MAC, VIP, T1, 80, 41000, false)));
    assert_eq!(states(&st, 0), [Established, Established]);
}

/// Tables with one `nat` UDP or TCP service on port 30053 with one backend,
/// T3.
fn one_backend_nat(proto: &str) -> Tables {
    let base = base_with_node_ip();
    let svc = format!(
        "[[service]]\nname = \"one\"\nprotocol = \"{proto}\"\nnetwork = \"app\"\ntarget_port = 53\npublished = [{{ port = 30053 }}]\n[[service.backend]]\nip = \"198.19.0.3\"\n"
    );
    Tables::compile(&toml::from_str(&format!("{base}\n{svc}")).unwrap()).unwrap()
}

#[test]
fn nat_source_ports_one_client_holds_at_most_half_a_backends_pool() {
    use meshplane_dataplane::lb::NAT_PORTS_PER_CLIENT;
    let t = one_backend_nat("udp");
    let ct =
        meshplane_dataplane::lb::conntrack::CtConfig { capacity: 1 << 18, max_new_per_sec: 0, ..Default::default() };
    let mut st = WorkerState::with_conntrack(t.ports.len(), ct);
    st.sync(&t);
    let udp = |src: [u8; 4], sport: u16| {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
            .ipv4(src, NODE1, 64)
            .udp(sport, 30053)
            .write(&mut f, b"q")
            .unwrap();
        f
    };
    // (A flow whose entry a full bucket evicts gives its port back: count
    // until the first refusal.)
    let (client, backend) = (CLIENT.into(), T3.into());
    let mut admitted = 0u32;
    for sport in 1024..=u16::MAX {
        match run(&t, &mut st, UPLINK, &udp(CLIENT, sport), 0).0 {
            Verdict::Tx(TASK3) => admitted += 1,
            v => {
                assert_eq!(v, Verdict::Drop(D::NatClientLimit), "flow {sport}");
                break;
            }
        }
    }
    assert!(admitted >= u32::from(NAT_PORTS_PER_CLIENT) && admitted < 64512, "{admitted}");
    assert_eq!(st.lb.nat_ports_held(client, backend), NAT_PORTS_PER_CLIENT);
    // The client's next flow is refused, counted; another client's is not.
    assert_eq!(run(&t, &mut st, UPLINK, &udp(CLIENT, 60000), 0).0, Verdict::Drop(D::NatClientLimit));
    assert_eq!(st.stats.dropped(D::NatClientLimit), 2);
    assert_eq!(run(&t, &mut st, UPLINK, &udp([198, 18, 5, 6], 60000), 0).0, Verdict::Tx(TASK3));
    // Ports come back to the client as its flows expire.
    st.lb.sweep(400 * SECOND, usize::MAX);
    assert_eq!(st.lb.nat_ports_held(client, backend), 0);
    assert_eq!(run(&t, &mut st, UPLINK, &udp(CLIENT, 60000), 400 * SECOND).0, Verdict::Tx(TASK3));
}

#[test]
fn nat_source_ports_held_by_unconfirmed_pickups_give_way() {
    // A connection's candidate ports (its own, then 16 derived from it)
    // all held by spoofed-looking pickups (one each from other sources):
    // a real SYN takes the first, whose holder goes, both its entries.
    let t = one_backend_nat("tcp");
    let mut st = WorkerState::for_tables(&t);
    let sport = 40000u16;
    let candidates: Vec<u16> = std::iter::once(sport)
        .chain((0..16u32).map(|i| 1024 + ((u32::from(sport) + i * 7919) % 64512) as u16))
        .collect();
    for (i, &p) in candidates.iter().enumerate() {
        let src = [198, 18, 7, i as u8 + 1];
        let ack = tcp(NODE1_MAC, CLIENT_MAC, src, NODE1, p, 30053, false);
        let (v, out) = run(&t, &mut st, UPLINK, &ack, 0);
        assert_eq!(v, Verdict::Tx(TASK3));
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), p, "the pickup holds its own port");
    }
    let held = st.lb.conntrack.len();
    let syn = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, sport, 30053, true);
    let (v, out) = run(&t, &mut st, UPLINK, &syn, 0);
    assert_eq!((v, u16::from_be_bytes([out[34], out[35]])), (Verdict::Tx(TASK3), sport));
    assert_eq!(st.lb.conntrack.len(), held, "the holder's two entries out, the new connection's two in");
    // Its reply reaches the real client.
    let reply = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 53, sport, false);
    let (v, out) = run(&t, &mut st, TASK3, &reply, 0);
    assert_eq!((v, &out[30..34]), (Verdict::Tx(UPLINK), &CLIENT[..]));
    // Confirmed holders do not give way: with every candidate of another
    // port held by confirmed connections, a new one is refused.
    let mut st = WorkerState::for_tables(&t);
    for (i, &p) in candidates.iter().enumerate() {
        let src = [198, 18, 7, i as u8 + 1];
        run(&t, &mut st, UPLINK, &tcp(NODE1_MAC, CLIENT_MAC, src, NODE1, p, 30053, true), 0);
    }
    assert_eq!(run(&t, &mut st, UPLINK, &syn, 0).0, Verdict::Drop(D::NatPortsExhausted));
}

#[test]
fn a_nat_client_reusing_its_port_gets_the_same_port_not_a_second_one() {
    // wrk with `Connection: close` cycles through its ports: a SYN on the
    // tuple of a closed connection is a new connection (scheduled again),
    // and in nat mode it takes the old one's source port on this node
    // again; the old connection's reply entry goes with its forward
    // entry, so the client holds one port, not one per reuse.
    let t = one_backend_nat("tcp");
    let mut st = WorkerState::for_tables(&t);
    let (client, backend) = (CLIENT.into(), T3.into());
    let sport = 40000u16;
    let syn = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, sport, 30053, true);
    let synack = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 53, sport, true);
    for round in 0..3u64 {
        let now = round * SECOND;
        let (v, out) = run(&t, &mut st, UPLINK, &syn, now);
        assert_eq!((v, u16::from_be_bytes([out[34], out[35]])), (Verdict::Tx(TASK3), sport), "round {round}");
        assert_eq!(run(&t, &mut st, TASK3, &synack, now).0, Verdict::Tx(UPLINK), "round {round}: the reply");
        let rst = rst(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, sport, 30053);
        assert_eq!(run(&t, &mut st, UPLINK, &rst, now).0, Verdict::Tx(TASK3));
        assert_eq!(st.lb.nat_ports_held(client, backend), 1, "round {round}: one port held");
        assert_eq!(st.lb.conntrack.len(), 2, "round {round}: one connection's two entries");
    }
    assert_eq!(st.lb.services[0].new_conns, 3, "each reuse a new connection");
}

/// The reset a host's stack sends for a segment to a closed port: exact
/// bytes, built independently (RFC 9293: SEQ = the segment's ACK if it has
/// one, else ACK = its SEQ + its length with SYN and FIN counting one).
fn reset(
    dst: [u8; 6],
    src: [u8; 6],
    (sip, sport): ([u8; 4], u16),
    (dip, dport): ([u8; 4], u16),
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let mut ip = etherparse::Ipv4Header::new(20, 64, etherparse::IpNumber::TCP, sip, dip).unwrap();
    ip.dont_fragment = true;
    let mut tcp = etherparse::TcpHeader::new(sport, dport, seq, 0);
    tcp.rst = true;
    if let Some(a) = ack {
        tcp.ack = true;
        tcp.acknowledgment_number = a;
    }
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp_header(tcp)
        .write(&mut f, &[])
        .unwrap();
    f
}

#[test]
fn closed_ports_on_the_data_address_are_reset_when_the_node_owns_it() {
    let spec = include_str!("../../examples/tables.toml").replace("[node]", "[node]\nreset_closed_ports = true");
    let t = Tables::compile(&toml::from_str(&spec).unwrap()).unwrap();
    let mut st = WorkerState::for_tables(&t);
    // A SYN (seq 1000, 5 bytes): RST|ACK with ACK = 1000 + 5 + 1.
    let syn = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40000, 22, true);
    let (v, out) = run(&t, &mut st, UPLINK, &syn, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(out, reset(CLIENT_MAC, NODE1_MAC, (NODE1, 22), (CLIENT, 40000), 0, Some(1006)));
    // A segment with ACK 1: RST with SEQ 1.
    let ack = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40000, 22, false);
    let (v, out) = run(&t, &mut st, UPLINK, &ack, 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(out, reset(CLIENT_MAC, NODE1_MAC, (NODE1, 22), (CLIENT, 40000), 1, None));
    // No reset for a reset, nor for a bad checksum, nor for another address.
    let mut rst = reset(NODE1_MAC, CLIENT_MAC, (CLIENT, 40000), (NODE1, 22), 5, None);
    assert_eq!(run(&t, &mut st, UPLINK, &rst, 0).0, Verdict::Pass);
    rst[47] = 0x02; // now a SYN, but the checksum is the reset's
    assert_eq!(run(&t, &mut st, UPLINK, &rst, 0).0, Verdict::Pass);
    let other = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, [198, 18, 0, 9], 40000, 22, true);
    assert_eq!(run(&t, &mut st, UPLINK, &other, 0).0, Verdict::Pass);
    // Without the flag (AF_XDP: the kernel holds the address) it is the kernel's.
    let plain = tables_with("");
    assert_eq!(run(&plain, &mut WorkerState::for_tables(&plain), UPLINK, &syn, 0).0, Verdict::Pass);
}

// ---------------------------------------------------------------------------
// The routing mesh's ICMP and MSS: network `app` has MTU 1450 (underlay
// 1500 − 50), so an MSS of 1410 fits it.

/// RFC 1071, written here again so that the expected frames do not come
/// from the code under test.
fn rfc1071(b: &[u8]) -> u16 {
    let mut acc: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// A TCP segment from the client to a published port with `payload`
/// bytes, DF set or not.
fn client_tcp(dport: u16, sport: u16, payload: usize, df: bool) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
        .ipv4(CLIENT, NODE1, 64)
        .tcp(sport, dport, 1000, 65535)
        .ack(1)
        .write(&mut f, &vec![0x5a; payload])
        .unwrap();
    if !df {
        f[20] &= !0x40;
        f[24..26].copy_from_slice(&[0, 0]);
        let c = rfc1071(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// The fragmentation-needed this node (198.18.0.1, its uplink MAC) must
/// send the client for `orig`, byte by byte: Ethernet back to the client's
/// MAC; IPv4 with TTL 64, no DF, ident 0; ICMP type 3 code 4 with the
/// next-hop MTU, quoting the original IPv4 header and 8 bytes.
fn mesh_frag_needed(orig: &[u8], mtu: u16) -> Vec<u8> {
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&orig[14..14 + 20 + 8]);
    let c = rfc1071(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 20 + icmp.len() as u8, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&NODE1);
    ip.extend_from_slice(&CLIENT);
    let c = rfc1071(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = [CLIENT_MAC, NODE1_MAC].concat();
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn routing_mesh_answers_oversize_df_packets_with_frag_needed_from_the_published_address() {
    let t = mesh_tables();
    assert_eq!(t.networks[0].mtu, 1450);
    let mut st = WorkerState::for_tables(&t);
    // Both modes, and both a local and a remote task (the connection is
    // not scheduled: the answer comes before the balancer).
    for (i, port) in [30080u16, 30081].into_iter().enumerate() {
        let big = client_tcp(port, 41000 + i as u16, 1450 - 40 + 1, true);
        assert_eq!(u16::from_be_bytes([big[16], big[17]]), 1451);
        let (v, out) = run(&t, &mut st, UPLINK, &big, 0);
        assert_eq!(v, Verdict::Tx(UPLINK), "port {port}");
        let want = mesh_frag_needed(&big, 1450);
        assert_eq!(out.len(), 14 + 20 + 8 + 28);
        assert_eq!(out, want, "port {port}");
        // And etherparse reads it as what it is, checksums right.
        let p = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = p.transport else { panic!("not ICMP") };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1450 }
            )
        );
        assert_eq!(icmp.header().checksum, icmp.icmp_type().calc_checksum(icmp.payload()));
        // No connection was opened for it.
        assert_eq!(st.lb.services[i].new_conns, 0);
    }
    assert_eq!(st.lb.mesh.frag_needed, 2);
    // Without DF: dropped as before (the balancer does not fragment).
    let big = client_tcp(30080, 41005, 1411, false);
    assert_eq!(run(&t, &mut st, UPLINK, &big, 0).0, Verdict::Drop(D::MtuExceeded));
    // Exactly the MTU goes through (to T3 or T2, balanced).
    let fits = client_tcp(30080, 41006, 1410, true);
    let (v, _) = run(&t, &mut st, UPLINK, &fits, 0);
    assert!(matches!(v, Verdict::Tx(TASK3) | Verdict::Tx(UPLINK)), "{v:?}");
    assert_eq!(st.lb.services[0].new_conns, 1);
    assert_eq!(st.lb.mesh.frag_needed, 2);
}

#[test]
fn routing_mesh_frag_needed_is_rate_limited_per_worker_and_counted() {
    use meshplane_dataplane::lb::{ICMP_BURST, ICMP_PER_SEC};
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    let big = client_tcp(30080, 42000, 1500, true);
    let burst = ICMP_BURST as usize;
    let mut verdicts: Vec<Verdict> = (0..burst + 10).map(|_| run(&t, &mut st, UPLINK, &big, 0).0).collect();
    assert!(verdicts[..burst].iter().all(|v| *v == Verdict::Tx(UPLINK)), "{verdicts:?}");
    assert!(verdicts[burst..].iter().all(|v| *v == Verdict::Drop(D::IcmpRateLimited)), "{verdicts:?}");
    // Three token periods later, three more.
    let later = 3 * SECOND / ICMP_PER_SEC;
    verdicts = (0..5).map(|_| run(&t, &mut st, UPLINK, &big, later).0).collect();
    let sent = verdicts.iter().filter(|v| **v == Verdict::Tx(UPLINK)).count();
    assert_eq!(sent, 3, "{verdicts:?}");
    assert_eq!(st.lb.mesh.frag_needed, burst as u64 + 3);
    assert_eq!(st.stats.dropped(D::IcmpRateLimited), 12);
    // A second later the bucket is full again, no fuller.
    verdicts = (0..burst + 1).map(|_| run(&t, &mut st, UPLINK, &big, later + SECOND).0).collect();
    assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Tx(UPLINK)).count(), burst);
}

/// A SYN (or SYN-ACK with `ack`) between these MACs, addresses and ports,
/// with an MSS option, and the window scale and SACK-permitted a Linux
/// client sends after it.
fn syn_mss(
    (dst, src): ([u8; 6], [u8; 6]),
    (sip, dip): ([u8; 4], [u8; 4]),
    (sport, dport): (u16, u16),
    mss: Option<u16>,
    ack: bool,
) -> Vec<u8> {
    use etherparse::TcpOptionElement as O;
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src, dst).ipv4(sip, dip, 64).tcp(sport, dport, 7000, 64240).syn();
    let b = if ack { b.ack(1) } else { b };
    let opts: Vec<O> = mss
        .map(O::MaximumSegmentSize)
        .into_iter()
        .chain([O::Noop, O::WindowScale(7), O::SelectiveAcknowledgementPermitted, O::Noop, O::Noop])
        .collect();
    b.options(&opts).unwrap().write(&mut f, &[]).unwrap();
    f
}

#[test]
fn routing_mesh_clamps_the_mss_of_syns_and_syn_acks_to_the_network_mtu() {
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    let (to_node1, to_t3, to_t2) = ((NODE1_MAC, CLIENT_MAC), (T3_MAC, NODE1_APP_MAC), (T2_MAC, NODE1_APP_MAC));
    let to_client = (CLIENT_MAC, NODE1_MAC);
    let syn = |macs, ips, ports, mss| syn_mss(macs, ips, ports, mss, false);
    let syn_ack = |macs, ips, ports, mss| syn_mss(macs, ips, ports, mss, true);
    // Each step: what it is, the input port and frame, the verdict, the
    // frame that comes out (inside VXLAN to node 2 if `vx`), the clamps
    // counted so far. The expected frames' checksums are etherparse's,
    // computed whole.
    #[rustfmt::skip]
    let steps = [
        ("nat, local task: the client (MTU 9000) announces 8960, T3 gets 1410 (1450 - 40)",
            UPLINK, syn(to_node1, (CLIENT, NODE1), (43001, 30080), Some(8960)),
            Verdict::Tx(TASK3), false, syn(to_t3, (NODE1_APP, T3), (43001, 8080), Some(1410)), 1),
        ("its SYN-ACK: T3 announces 65495 (loopback-sized), the client gets 1410",
            TASK3, syn_ack((NODE1_APP_MAC, T3_MAC), (T3, NODE1_APP), (8080, 43001), Some(65495)),
            Verdict::Tx(UPLINK), false, syn_ack(to_client, (NODE1, CLIENT), (30080, 43001), Some(1410)), 2),
        ("preserve-source, local task T3 (round robin of its own)",
            UPLINK, syn(to_node1, (CLIENT, NODE1), (43002, 30081), Some(1460)),
            Verdict::Tx(TASK3), false, syn(to_t3, (CLIENT, T3), (43002, 8080), Some(1410)), 3),
        ("then remote task T2, a smaller MSS: untouched inside the VXLAN frame",
            UPLINK, syn(to_node1, (CLIENT, NODE1), (43003, 30081), Some(1200)),
            Verdict::Tx(UPLINK), true, syn(to_t2, (CLIENT, T2), (43003, 8080), Some(1200)), 3),
        ("its SYN-ACK, returned by node 2 over VXLAN announcing 8960: clamped on its way to the client",
            UPLINK, from_node2(&syn_ack((NODE1_APP_MAC, NODE2_APP_MAC), (T2, CLIENT), (8080, 43003), Some(8960))),
            Verdict::Tx(UPLINK), false, syn_ack(to_client, (NODE1, CLIENT), (30081, 43003), Some(1410)), 4),
        ("a SYN without the option (RFC 9293's 536 applies): untouched",
            UPLINK, syn(to_node1, (CLIENT, NODE1), (43004, 30081), None),
            Verdict::Tx(TASK3), false, syn(to_t3, (CLIENT, T3), (43004, 8080), None), 4),
        ("nat, remote task T2: clamped before the overlay",
            UPLINK, syn(to_node1, (CLIENT, NODE1), (43005, 30080), Some(8960)),
            Verdict::Tx(UPLINK), true, syn(to_t2, (NODE1_APP, T2), (43005, 8080), Some(1410)), 5),
    ];
    for (what, port, input, verdict, vx, want, clamped) in steps {
        let (v, out) = run(&t, &mut st, port, &input, 0);
        assert_eq!(v, verdict, "{what}");
        let out = if vx {
            let (vni, inner) = decap(&out);
            assert_eq!(vni, 4096, "{what}");
            inner
        } else {
            out
        };
        assert_eq!(out, want, "{what}");
        assert_eq!(st.lb.mesh.mss_clamped, clamped, "{what}");
    }
}

const EVERY_PORT: &str = r#"
[[service]]
name = "web"
protocol = "tcp"
network = "app"
vip = "198.19.0.100"
port = 0
scheduler = "rr"
[[service.backend]]
ip = "198.19.0.3"
[[service.backend]]
ip = "198.19.0.2"
"#;

fn udp(dst: [u8; 6], src: [u8; 6], sip: [u8; 4], dip: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst).ipv4(sip, dip, 64).udp(sport, dport).write(&mut f, b"q").unwrap();
    f
}

#[test]
fn an_every_port_vip_carries_each_tcp_and_udp_port_untranslated() {
    let t = tables_with(EVERY_PORT);
    let mut st = WorkerState::for_tables(&t);
    // Through the fast path (`run`) and the general path alone (on a copy
    // of the state): the same verdicts and bytes.
    let mut go = |port: u16, f: &[u8], now: u64| run_agreeing(&t, &mut st, port, f, now);
    // TCP 80 → T3:80 (local), TCP 5432 → T2:5432 (node 2), UDP 53 → T3:53.
    let (v, out) = go(TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true), 0);
    assert_eq!((v, out), (Verdict::Tx(TASK3), tcp(T3_MAC, T1_MAC, T1, T3, 40001, 80, true)));
    let (v, out) = go(TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 40002, 5432, true), 0);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(decap(&out), (4096, tcp(T2_MAC, T1_MAC, T1, T2, 40002, 5432, true)));
    let (v, out) = go(TASK1, &udp(GW_MAC, T1_MAC, T1, VIP, 40003, 53), 0);
    assert_eq!((v, out), (Verdict::Tx(TASK3), udp(T3_MAC, T1_MAC, T1, T3, 40003, 53)));
    // Later packets of the 5432 connection stay on T2, on its port.
    let (v, out) = go(TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 40002, 5432, false), SECOND);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(decap(&out), (4096, tcp(T2_MAC, T1_MAC, T1, T2, 40002, 5432, false)));
    // Replies come from the VIP and the port asked.
    let (v, out) = go(TASK3, &tcp(T1_MAC, T3_MAC, T3, T1, 80, 40001, false), SECOND);
    assert_eq!((v, out), (Verdict::Tx(TASK1), tcp(T1_MAC, GW_MAC, VIP, T1, 80, 40001, false)));
    let (v, out) = go(TASK3, &udp(T1_MAC, T3_MAC, T3, T1, 53, 40003), SECOND);
    assert_eq!((v, out), (Verdict::Tx(TASK1), udp(T1_MAC, GW_MAC, VIP, T1, 53, 40003)));
    assert_eq!(st.lb.services[0].new_conns, 3);
}

const HAIRPIN: &str = r#"
[[service]]
name = "web"
protocol = "tcp"
network = "app"
vip = "198.19.0.100"
port = 80
target_port = 8080
scheduler = "rr"
[[service.backend]]
ip = "198.19.0.1"
[[service.backend]]
ip = "198.19.0.3"
"#;

#[test]
fn a_task_balanced_to_itself_through_its_vip_is_answered_from_the_vip() {
    const GW: [u8; 4] = [198, 19, 0, 254];
    let every_port = EVERY_PORT.replace("198.19.0.2\"", "198.19.0.1\"");
    for (svc, vport, tport) in [(HAIRPIN.to_string(), 80, 8080), (every_port, 5432, 5432)] {
        let t = tables_with(&svc);
        let mut st = WorkerState::for_tables(&t);
        let mut go = |port: u16, f: &[u8], now: u64| run_agreeing(&t, &mut st, port, f, now);
        let mut served = 0;
        for i in 0..20u16 {
            let cp = 41000 + i;
            let (v, out) = go(TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, cp, vport, true), 0);
            if v == Verdict::Tx(TASK3) || v == Verdict::Tx(UPLINK) {
                continue; // the other backend
            }
            // To T1 itself: from the gateway, on a port of its own.
            assert_eq!(v, Verdict::Tx(TASK1), "{svc}");
            let hp = u16::from_be_bytes([out[34], out[35]]);
            assert_eq!(out, tcp(T1_MAC, GW_MAC, GW, T1, hp, tport, true), "DNAT to itself, SNAT to the gateway");
            // Its answer, to the gateway, comes back from the VIP:port asked.
            let (v, back) = go(TASK1, &tcp(GW_MAC, T1_MAC, T1, GW, tport, hp, false), SECOND);
            assert_eq!((v, back), (Verdict::Tx(TASK1), tcp(T1_MAC, GW_MAC, VIP, T1, vport, cp, false)));
            // The connection's next packet takes the same way.
            let (v, out) = go(TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, cp, vport, false), 2 * SECOND);
            assert_eq!((v, out), (Verdict::Tx(TASK1), tcp(T1_MAC, GW_MAC, GW, T1, hp, tport, false)));
            served += 1;
        }
        assert_eq!(served, 10, "rr: every other connection is the task's own");
        // An answer to a gateway port nobody holds is no route.
        let (v, _) = go(TASK1, &tcp(GW_MAC, T1_MAC, T1, GW, tport, 3333, false), 3 * SECOND);
        assert_eq!(v, Verdict::Drop(D::NoRoute));
        assert_eq!(st.lb.egress_stats().hairpin_conns, 10);
    }
}

#[test]
fn a_task_reaches_a_published_port_of_its_own_node() {
    // T1 calls 198.18.0.1:30080 (nat) and :30081 (preserve-source, taken
    // in nat mode: a backend would answer a task's address directly): the
    // routing mesh, SNAT to this node's address in the network; the answer
    // comes back to T1's port from the published address and the gateway.
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    for (port, sport) in [(30080, 41001), (30081, 41002)] {
        let syn = tcp(GW_MAC, T1_MAC, T1, NODE1, sport, port, true);
        let (v, out) = run(&t, &mut st, TASK1, &syn, 0);
        let to_t3 = tcp(T3_MAC, NODE1_APP_MAC, NODE1_APP, T3, sport, 8080, true);
        if v == Verdict::Tx(TASK3) {
            assert_eq!(out, to_t3, "port {port}");
            let reply = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, sport, false);
            let (v, back) = run(&t, &mut st, TASK3, &reply, SECOND);
            assert_eq!((v, back), (Verdict::Tx(TASK1), tcp(T1_MAC, GW_MAC, NODE1, T1, port, sport, false)));
        } else {
            assert_eq!(v, Verdict::Tx(UPLINK), "port {port}");
            assert_eq!(decap(&out), (4096, tcp(T2_MAC, NODE1_APP_MAC, NODE1_APP, T2, sport, 8080, true)));
            let back = from_node2(&tcp(NODE1_APP_MAC, T2_MAC, T2, NODE1_APP, 8080, sport, false));
            let (v, out) = run(&t, &mut st, UPLINK, &back, SECOND);
            assert_eq!((v, out), (Verdict::Tx(TASK1), tcp(T1_MAC, GW_MAC, NODE1, T1, port, sport, false)));
        }
    }
}

#[test]
fn the_nodes_own_processes_reach_a_published_port_over_the_host_link() {
    // The node's nftables send 127.0.0.1:30080 to meshplane's end of the
    // host link (198.18.99.2), from the kernel's end (198.18.99.1): the
    // routing mesh in nat mode, the answer back over the link from
    // 198.18.99.2:30080.
    const LINK: [u8; 4] = [198, 18, 99, 2];
    const KERNEL: [u8; 4] = [198, 18, 99, 1];
    const LINK_MAC: [u8; 6] = [2, 0x4d, 0x50, 0, 0, 2];
    const KERNEL_MAC: [u8; 6] = [2, 0x4d, 0x50, 0, 0, 1];
    let t = host_link_tables();
    let hp = t.host_port.expect("a host port");
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(LINK_MAC, KERNEL_MAC, KERNEL, LINK, 45000, 30080, true);
    let (v, out) = run(&t, &mut st, hp, &syn, 0);
    assert_eq!(v, Verdict::Tx(TASK3), "rr: T3 first");
    assert_eq!(out, tcp(T3_MAC, NODE1_APP_MAC, NODE1_APP, T3, 45000, 8080, true));
    let reply = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, 45000, false);
    let (v, back) = run(&t, &mut st, TASK3, &reply, SECOND);
    assert_eq!((v, back), (Verdict::Tx(hp), tcp(KERNEL_MAC, LINK_MAC, LINK, KERNEL, 30080, 45000, false)));
    // Another port of the link's address is no one's.
    let other = tcp(LINK_MAC, KERNEL_MAC, KERNEL, LINK, 45001, 30999, true);
    assert_eq!(run(&t, &mut st, hp, &other, SECOND).0, Verdict::Drop(D::EgressNoConnection));
}

#[test]
fn the_routing_mesh_answers_on_every_address_of_the_node() {
    // A second address (198.18.0.21, node.mesh_addrs): connections to it
    // are balanced and answered from it; those to the data-path address
    // still from that; ARP for it is answered with the data MAC.
    const SECOND_ADDR: [u8; 4] = [198, 18, 0, 21];
    let base = base_with_node_ip().replacen(
        "data_mac = \"02:00:00:00:00:01\"",
        "data_mac = \"02:00:00:00:00:01\"\nmesh_addrs = [\"198.18.0.21\"]",
        1,
    );
    let spec: TablesSpec = toml::from_str(&format!("{base}\n{MESH}")).expect("spec");
    let t = Tables::compile(&spec).expect("tables");
    assert_eq!(t.mesh_addrs, [core::net::Ipv4Addr::from(SECOND_ADDR)]);
    let mut st = WorkerState::for_tables(&t);
    for (addr, sport) in [(SECOND_ADDR, 40001), (NODE1, 40003)] {
        let syn = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, addr, sport, 30080, true);
        let (v, out) = run(&t, &mut st, UPLINK, &syn, 0);
        assert_eq!(v, Verdict::Tx(TASK3), "rr: T3 (local) for each, {addr:?}");
        assert_eq!(out, tcp(T3_MAC, NODE1_APP_MAC, NODE1_APP, T3, sport, 8080, true));
        let reply = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, sport, false);
        let (v, back) = run(&t, &mut st, TASK3, &reply, 0);
        assert_eq!((v, back), (Verdict::Tx(UPLINK), tcp(CLIENT_MAC, NODE1_MAC, addr, CLIENT, 30080, sport, false)));
        // (rr: the other backend in between.)
        let other = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, addr, sport + 1, 30080, true);
        assert_eq!(run(&t, &mut st, UPLINK, &other, 0).0, Verdict::Tx(UPLINK));
    }
    // An address of a cluster network is refused.
    let bad = base_with_node_ip().replacen(
        "data_mac = \"02:00:00:00:00:01\"",
        "data_mac = \"02:00:00:00:00:01\"\nmesh_addrs = [\"198.19.0.77\"]",
        1,
    );
    let spec: TablesSpec = toml::from_str(&format!("{bad}\n{MESH}")).expect("spec");
    let e = Tables::compile(&spec).expect_err("refused").to_string();
    assert!(e.contains("lies in the cluster subnet"), "{e}");
}

#[test]
fn a_backend_that_refuses_is_passed_over_and_its_reset_held_back() {
    // rr over T3 (local) and T2. T3's server is gone: its kernel answers
    // the SYN with a reset. The reset is held back (backend_refused), the
    // client's retransmitted SYN goes to T2, and so does the next new
    // connection (T3 passed over on that port for 10 s); after that T3
    // is tried again.
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn, 0).0, Verdict::Tx(TASK3));
    let refusal = rst(T1_MAC, T3_MAC, T3, T1, 8080, 40001);
    assert_eq!(run(&t, &mut st, TASK3, &refusal, 0).0, Verdict::Drop(D::BackendRefused));
    assert_eq!(run(&t, &mut st, TASK1, &syn, SECOND).0, Verdict::Tx(UPLINK), "the retransmitted SYN: T2");
    let syn2 = tcp(GW_MAC, T1_MAC, T1, VIP, 40002, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn2, SECOND).0, Verdict::Tx(UPLINK), "T3 passed over");
    assert_eq!(st.lb.services[0].backends[0].refused, 1);
    let syn3 = tcp(GW_MAC, T1_MAC, T1, VIP, 40003, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn3, 12 * SECOND).0, Verdict::Tx(TASK3), "tried again after 10 s");
    // When every backend refuses, the reset reaches the client (from the
    // VIP): it is refused, not left waiting.
    let one = tables_with(&WEB.replace("[[service.backend]]\nip = \"198.19.0.2\"\n", ""));
    let mut st = WorkerState::for_tables(&one);
    assert_eq!(run(&one, &mut st, TASK1, &syn, 0).0, Verdict::Tx(TASK3));
    let (v, out) = run(&one, &mut st, TASK3, &refusal, 0);
    assert_eq!(v, Verdict::Tx(TASK1));
    assert_eq!(&out[26..30], &VIP, "from the VIP");
}

#[test]
fn a_backends_reset_closes_the_connection_so_a_reused_port_is_scheduled_again() {
    // rr: T3, then T2. T3 resets an established connection (its server
    // died with it unaccepted); the reset closes both entries, and the
    // client reusing its port (a reset leaves no TIME_WAIT) is a new
    // connection, scheduled again: T2, not the dead connection's T3.
    use meshplane_dataplane::lb::conntrack::CtState::{Close, Established};
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    let syn = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true);
    assert_eq!(run(&t, &mut st, TASK1, &syn, 0).0, Verdict::Tx(TASK3));
    assert_eq!(run(&t, &mut st, TASK3, &tcp(T1_MAC, T3_MAC, T3, T1, 8080, 40001, false), 0).0, Verdict::Tx(TASK1));
    let request = tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, false);
    assert_eq!(run(&t, &mut st, TASK1, &request, 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Established, Established]);
    let (v, out) = run(&t, &mut st, TASK3, &rst(T1_MAC, T3_MAC, T3, T1, 8080, 40001), 0);
    assert_eq!((v, &out[26..30]), (Verdict::Tx(TASK1), &VIP[..]), "the reset reaches the client, from the VIP");
    assert_eq!(states(&st, 0), [Close, Close], "one connection, one state");
    assert_eq!(run(&t, &mut st, TASK1, &syn, SECOND).0, Verdict::Tx(UPLINK), "the reused port: T2");
    assert_eq!(st.lb.services[0].new_conns, 2);
}

#[test]
fn a_reset_established_connections_reused_port_gets_passive_health_too() {
    // What `wrk` saw across a task's death (e2e health_checks): Maglev
    // sends the client's port to T3; T3's server dies with the connection
    // accepted by its kernel but not by the server, so T3 resets it. The
    // client's next SYN from the same port is scheduled again (the same
    // hash: T3), T3's kernel refuses it, and that reset is held back
    // (passive health), not passed to the client; the retransmitted SYN
    // goes to T2 (over VXLAN). Before, the reused port kept the old
    // connection's established entry and the refusal reached the client.
    let mesh = MESH.replace("scheduler = \"rr\"", "scheduler = \"mh\"");
    let spec: TablesSpec = toml::from_str(&format!("{}\n{mesh}", base_with_node_ip())).expect("spec parses");
    let t = Tables::compile(&spec).expect("tables compile");
    let syn = |p| tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, p, 30080, true);
    let to_t3 = |p| run(&t, &mut WorkerState::for_tables(&t), UPLINK, &syn(p), 0).0 == Verdict::Tx(TASK3);
    let port = (40000..41000).find(|&p| to_t3(p)).expect("a client port Maglev sends to T3");
    let mut st = WorkerState::for_tables(&t);
    assert_eq!(run(&t, &mut st, UPLINK, &syn(port), 0).0, Verdict::Tx(TASK3));
    let reply = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, port, false);
    assert_eq!(run(&t, &mut st, TASK3, &reply, 0).0, Verdict::Tx(UPLINK));
    let request = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, port, 30080, false);
    assert_eq!(run(&t, &mut st, UPLINK, &request, 0).0, Verdict::Tx(TASK3));
    let reset = rst(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, port);
    assert_eq!(run(&t, &mut st, TASK3, &reset, 0).0, Verdict::Tx(UPLINK), "an established connection's reset");
    assert_eq!(st.lb.services[0].backends[0].refused, 0, "not a refusal");
    assert_eq!(run(&t, &mut st, UPLINK, &syn(port), SECOND).0, Verdict::Tx(TASK3), "the same hash: T3");
    assert_eq!(run(&t, &mut st, TASK3, &reset, SECOND).0, Verdict::Drop(D::BackendRefused));
    assert_eq!(st.lb.services[0].backends[0].refused, 1);
    let (v, out) = run(&t, &mut st, UPLINK, &syn(port), 2 * SECOND);
    assert_eq!(v, Verdict::Tx(UPLINK), "the retransmitted SYN: T2");
    assert_eq!(decap(&out).1[30..34], T2);
    assert_eq!(st.lb.services[0].new_conns, 3);
}

#[test]
fn a_clients_reset_closes_the_connection_and_frees_its_nat_port_within_the_close_timeout() {
    // The backend does not answer a reset: the client's reset closes both
    // entries (one connection, one state), so 10 s later the connection
    // and its source port on this node are gone. Before, the reply entry
    // stayed established for 900 s holding the port, and a client ending
    // its connections with resets ran out of its share.
    use meshplane_dataplane::lb::conntrack::CtState::{Close, Established};
    let t = one_backend_nat("tcp");
    let mut st = WorkerState::for_tables(&t);
    let (client, backend) = (CLIENT.into(), T3.into());
    let sport = 40000u16;
    assert_eq!(
        run(&t, &mut st, UPLINK, &tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, sport, 30053, true), 0).0,
        Verdict::Tx(TASK3)
    );
    let reply = tcp(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 53, sport, false);
    assert_eq!(run(&t, &mut st, TASK3, &reply, 0).0, Verdict::Tx(UPLINK));
    let request = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, sport, 30053, false);
    assert_eq!(run(&t, &mut st, UPLINK, &request, 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Established, Established]);
    let reset = rst(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, sport, 30053);
    assert_eq!(run(&t, &mut st, UPLINK, &reset, SECOND).0, Verdict::Tx(TASK3), "the reset reaches the backend");
    assert_eq!(states(&st, SECOND), [Close, Close], "one connection, one state");
    assert_eq!(st.lb.nat_ports_held(client, backend), 1);
    st.lb.sweep(12 * SECOND, usize::MAX);
    assert_eq!((st.lb.conntrack.len(), st.lb.nat_ports_held(client, backend)), (0, 0), "gone after the close timeout");
}

#[test]
fn a_clients_reset_closes_a_vip_connection_and_a_preserve_source_one() {
    use meshplane_dataplane::lb::conntrack::CtState::{Close, Established};
    // VIP (rr: T3).
    let t = tables_with(WEB);
    let mut st = WorkerState::for_tables(&t);
    assert_eq!(run(&t, &mut st, TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, true), 0).0, Verdict::Tx(TASK3));
    assert_eq!(run(&t, &mut st, TASK3, &tcp(T1_MAC, T3_MAC, T3, T1, 8080, 40001, false), 0).0, Verdict::Tx(TASK1));
    assert_eq!(run(&t, &mut st, TASK1, &tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, false), 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Established, Established]);
    assert_eq!(run(&t, &mut st, TASK1, &rst(GW_MAC, T1_MAC, T1, VIP, 40001, 80), 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Close, Close]);
    // The routing mesh in preserve-source mode (port 30081, rr: T3).
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    let c = |syn| tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30081, syn);
    assert_eq!(run(&t, &mut st, UPLINK, &c(true), 0).0, Verdict::Tx(TASK3));
    let reply = tcp(GW_MAC, T3_MAC, T3, CLIENT, 8080, 40001, false);
    assert_eq!(run(&t, &mut st, TASK3, &reply, 0).0, Verdict::Tx(UPLINK));
    assert_eq!(run(&t, &mut st, UPLINK, &c(false), 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Established, Established]);
    assert_eq!(
        run(&t, &mut st, UPLINK, &rst(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30081), 0).0,
        Verdict::Tx(TASK3)
    );
    assert_eq!(states(&st, 0), [Close, Close]);
    // The task's node when node 2 was the ingress: its way back closes too.
    let mut st = WorkerState::for_tables(&t);
    let other = [198, 18, 5, 6];
    let inbound = |syn| from_node2(&tcp(T3_MAC, NODE2_APP_MAC, other, T3, 50000, 8080, syn));
    assert_eq!(run(&t, &mut st, UPLINK, &inbound(true), 0).0, Verdict::Tx(TASK3));
    assert_eq!(run(&t, &mut st, TASK3, &tcp(GW_MAC, T3_MAC, T3, other, 8080, 50000, false), 0).0, Verdict::Tx(UPLINK));
    assert_eq!(run(&t, &mut st, UPLINK, &inbound(false), 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Established]);
    let reset = from_node2(&rst(T3_MAC, NODE2_APP_MAC, other, T3, 50000, 8080));
    assert_eq!(run(&t, &mut st, UPLINK, &reset, 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Close]);
}

#[test]
fn a_reused_tuple_to_the_same_backend_has_one_reply_entry_that_lives_as_long_as_it() {
    // One backend (as `mh` gives the same backend for a tuple again): the
    // client resets its connection and reuses its port. The new
    // connection's reply entry has the old one's key; the old one goes
    // (with its forward entry), so the new one is found, established,
    // and still turns T3's answers back into the VIP's after the closed
    // entry's 10 s. Before, the old reply entry stayed beside it and was
    // found first: 10 s later T3's data reached the client from T3.
    let one = tables_with(&WEB.replace("[[service.backend]]\nip = \"198.19.0.2\"\n", ""));
    let mut st = WorkerState::for_tables(&one);
    let c = |syn| tcp(GW_MAC, T1_MAC, T1, VIP, 40001, 80, syn);
    let answer = tcp(T1_MAC, T3_MAC, T3, T1, 8080, 40001, false);
    for (round, at) in [(0, 0), (1, SECOND)] {
        assert_eq!(run(&one, &mut st, TASK1, &c(true), at).0, Verdict::Tx(TASK3), "round {round}");
        assert_eq!(run(&one, &mut st, TASK3, &answer, at).0, Verdict::Tx(TASK1), "round {round}");
        assert_eq!(run(&one, &mut st, TASK1, &c(false), at).0, Verdict::Tx(TASK3), "round {round}");
        assert_eq!(st.lb.conntrack.len(), 2, "round {round}: one connection's two entries");
        if round == 0 {
            assert_eq!(run(&one, &mut st, TASK1, &rst(GW_MAC, T1_MAC, T1, VIP, 40001, 80), at).0, Verdict::Tx(TASK3));
        }
    }
    let (v, out) = run(&one, &mut st, TASK3, &answer, 30 * SECOND);
    assert_eq!((v, &out[26..30]), (Verdict::Tx(TASK1), &VIP[..]), "30 s later, still from the VIP");
    assert_eq!(st.lb.services[0].backends[0].active, 1);
}

#[test]
fn the_nodes_own_process_refused_by_a_backend_is_sent_elsewhere() {
    // Passive health for a client over the host link (its connections'
    // forward keys hold the link's address): T3 refuses the SYN, the
    // reset is held back and both entries go, so the retransmitted SYN
    // is scheduled again (rr: T2). Before, the forward entry was not
    // found, stayed, and took every retransmission back to T3, whose
    // resets were then dropped: the client hung.
    let t = host_link_tables();
    let hp = t.host_port.expect("a host port");
    let mut st = WorkerState::for_tables(&t);
    let syn =
        tcp([2, 0x4d, 0x50, 0, 0, 2], [2, 0x4d, 0x50, 0, 0, 1], [198, 18, 99, 1], [198, 18, 99, 2], 45000, 30080, true);
    assert_eq!(run(&t, &mut st, hp, &syn, 0).0, Verdict::Tx(TASK3), "rr: T3 first");
    let refusal = rst(NODE1_APP_MAC, T3_MAC, T3, NODE1_APP, 8080, 45000);
    assert_eq!(run(&t, &mut st, TASK3, &refusal, 0).0, Verdict::Drop(D::BackendRefused));
    assert_eq!(st.lb.conntrack.len(), 0, "both entries gone");
    assert_eq!(run(&t, &mut st, hp, &syn, SECOND).0, Verdict::Tx(UPLINK), "the retransmitted SYN: T2");
}

#[test]
fn a_preserve_source_way_back_opens_anew_on_a_reused_tuple() {
    // The task's node when node 2 was the ingress: the client resets and
    // reuses its port. The new SYN makes the way back anew (not closed),
    // so after 30 s of quiet the task's answer still goes back to node 2.
    // Before, it kept the closed state and its 10 s, and the answer found
    // no way back.
    use meshplane_dataplane::lb::conntrack::CtState::{Close, Established, SynRecv};
    let t = mesh_tables();
    let mut st = WorkerState::for_tables(&t);
    let other = [198, 18, 5, 6];
    let inbound = |syn| from_node2(&tcp(T3_MAC, NODE2_APP_MAC, other, T3, 50000, 8080, syn));
    let answer = tcp(GW_MAC, T3_MAC, T3, other, 8080, 50000, false);
    assert_eq!(run(&t, &mut st, UPLINK, &inbound(true), 0).0, Verdict::Tx(TASK3));
    assert_eq!(run(&t, &mut st, TASK3, &answer, 0).0, Verdict::Tx(UPLINK));
    let reset = from_node2(&rst(T3_MAC, NODE2_APP_MAC, other, T3, 50000, 8080));
    assert_eq!(run(&t, &mut st, UPLINK, &reset, 0).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, 0), [Close]);
    assert_eq!(run(&t, &mut st, UPLINK, &inbound(true), SECOND).0, Verdict::Tx(TASK3));
    assert_eq!(states(&st, SECOND), [SynRecv]);
    assert_eq!(run(&t, &mut st, TASK3, &answer, SECOND).0, Verdict::Tx(UPLINK));
    assert_eq!(states(&st, SECOND), [Established]);
    let (v, out) = run(&t, &mut st, TASK3, &answer, 40 * SECOND);
    assert_eq!(v, Verdict::Tx(UPLINK), "40 s later, still back to node 2");
    assert_eq!(decap(&out).1[30..34], other);
}

/// The routing-mesh tables with egress and a host link: meshplane's end
/// 198.18.99.2 (02:4d:50:00:00:02), the kernel's 198.18.99.1
/// (02:4d:50:00:00:01).
fn host_link_tables() -> Tables {
    let egress = "[node.egress]\nports = \"61000-61063\"\nroute = [{ prefix = \"0.0.0.0/0\", mac = \"02:00:00:00:00:fe\" }]\n\
        [node.egress.host_link]\nip = \"198.18.99.2\"\npeer_ip = \"198.18.99.1\"\nmac = \"02:4d:50:00:00:02\"\npeer_mac = \"02:4d:50:00:00:01\"\n";
    let spec: TablesSpec = toml::from_str(&format!("{}\n{MESH}\n{egress}", base_with_node_ip())).expect("spec");
    Tables::compile(&spec).expect("tables")
}
