//! The load balancer under arbitrary traffic and arbitrary backend
//! changes: frames (well-formed connections to the VIP and to the published
//! ports in both modes, replies, and raw bytes) interleaved with weight
//! changes, removals and re-additions of backends and the passing of time.
//! No panic; every frame sent toward a service goes to a backend the
//! service has at that moment (drained ones included: they keep their
//! connections), with that backend's port; and the fast paths agree with
//! the general path (`process_general` on a copy of the worker's state):
//! same verdict, bytes and counters. A client's oversize packet is
//! answered with frag-needed quoting it; a SYN's MSS is clamped to the
//! network's MTU.
//!
//! Egress (the tables have `[node.egress]`, a 64-port range): tasks'
//! TCP, UDP and pings to outside addresses leave from the egress address
//! and the data MAC with a port of the range, and the reply to what left
//! (tried on a copy of the state) comes back to the very task and port
//! that sent it: no two live connections share a mapping. Replies, ICMP
//! errors quoting egress packets (mutated or truncated), and raw frames
//! to the egress address come in from the outside too.
//!
//! Input: byte 0 picks the scheduler (low bits) and a flood guard (top
//! bit); then a sequence of operations, each a selector byte and its
//! operands.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::lb::conntrack::{CtConfig, SECOND};
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process, process_general};
use meshplane_dataplane::tables::{Tables, TablesSpec, UPLINK};
use meshplane_dataplane::wire::vxlan::{self, Classified};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

const BACKENDS: [&str; 3] = ["198.19.0.3", "198.19.0.2", "198.19.0.4"];

/// The example tables with node_ip in app, one more remote endpoint, and
/// three services on the same backends: a VIP, a nat and a
/// preserve-source published port.
fn spec(weights: [Option<u32>; 3], sched: &str) -> String {
    let base = include_str!("../../examples/tables.toml").replace(
        "gateway_mac = \"02:42:c6:13:00:fe\"",
        "gateway_mac = \"02:42:c6:13:00:fe\"\nnode_ip = \"198.19.0.250\"",
    );
    let base = base.replace(
        "[[node.neighbours]]",
        "[node.egress]\nports = \"61000-61063\"\nroute = [{ prefix = \"0.0.0.0/0\", mac = \"02:00:00:00:00:fe\" }]\n[[node.neighbours]]",
    );
    let mut s = format!(
        "{base}\n[[endpoint]]\nnetwork = \"app\"\nip = \"198.19.0.4\"\nmac = \"02:00:00:00:01:04\"\nvtep = \"198.18.0.2\"\n"
    );
    for (name, extra) in [
        ("vip", "vip = \"198.19.0.100\"\nport = 80\ntarget_port = 8080\n"),
        ("nat", "target_port = 8080\npublished = [{ port = 30080 }]\n"),
        ("ps", "target_port = 8080\npublished = [{ port = 30081, mode = \"preserve-source\" }]\n"),
    ] {
        s += &format!(
            "[[service]]\nname = \"{name}\"\nprotocol = \"tcp\"\nnetwork = \"app\"\nscheduler = \"{sched}\"\nmaglev_size = 257\n{extra}"
        );
        for (ip, w) in BACKENDS.iter().zip(weights) {
            if let Some(w) = w {
                s += &format!("[[service.backend]]\nip = \"{ip}\"\nweight = {w}\n");
            }
        }
    }
    s
}

/// Compiled once per (weights, scheduler) and kept: compiling is the
/// control plane's work, and would otherwise dominate every run.
fn tables(weights: [Option<u32>; 3], sched: &'static str) -> &'static Tables {
    type Cache = HashMap<([Option<u32>; 3], &'static str), &'static Tables>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().expect("not poisoned");
    cache.entry((weights, sched)).or_insert_with(|| {
        let spec: TablesSpec = toml::from_str(&spec(weights, sched)).expect("spec parses");
        Box::leak(Box::new(Tables::compile(&spec).expect("tables compile")))
    })
}

fn tcp(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).tcp(sport, dport, 1, 1024);
    let b = match flags % 4 {
        0 => b.syn(),
        1 => b.ack(1),
        2 => b.fin().ack(1),
        _ => b.rst(),
    };
    b.write(&mut f, b"x").expect("builds");
    f
}

/// A SYN announcing `mss` (then window scale and SACK-permitted).
fn syn_mss(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    mss: u16,
) -> Vec<u8> {
    use etherparse::TcpOptionElement as O;
    let mut f = Vec::new();
    let opts = [O::MaximumSegmentSize(mss), O::Noop, O::WindowScale(7), O::SelectiveAcknowledgementPermitted];
    let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).tcp(sport, dport, 1, 1024).syn();
    b.options(&opts).expect("fits").write(&mut f, &[]).expect("builds");
    f
}

/// A segment with `n` bytes of payload (DF set, as etherparse does).
fn tcp_sized(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    n: usize,
) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).tcp(sport, dport, 1, 1024);
    b.ack(1).write(&mut f, &vec![0; n]).expect("builds");
    f
}

const GW: [u8; 6] = [0x02, 0x42, 0xc6, 0x13, 0x00, 0xfe];
const T1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const T3_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
const NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];

fn udp(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).udp(sport, dport);
    b.write(&mut f, b"d").expect("builds");
    f
}

fn echo(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], id: u16, reply: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64);
    let b = if reply { b.icmpv4_echo_reply(id, 1) } else { b.icmpv4_echo_request(id, 1) };
    b.write(&mut f, b"p").expect("builds");
    f
}

/// An ICMP error of type `kind` from the router to node 1 quoting the
/// first `n` bytes of the IPv4 packet of `quoted`.
fn icmp_error(kind: u8, quoted: &[u8], n: usize) -> Vec<u8> {
    let mut icmp = vec![kind, 4, 0, 0, 0, 0, 5, 0];
    icmp.extend_from_slice(&quoted[14..(14 + n).min(quoted.len())]);
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(ROUTER_MAC, NODE1_MAC)
        .ipv4([198, 18, 2, 1], [198, 18, 0, 1], 64)
        .write(&mut f, etherparse::IpNumber::ICMP, &icmp)
        .expect("builds");
    f
}

/// A task's egress frame `f` from task port `tport`, run on a copy of the
/// state: if it leaves the uplink, it does so from the egress address and
/// the data MAC with a port (or echo id) of the range, and the reply to it
/// comes back to the same task, address and port.
fn egress(f: &[u8], tport: u16, now: u64, t: &Tables, st: &WorkerState) {
    let mut st = st.clone();
    let mut buf = vec![0u8; HEADROOM + f.len()];
    buf[HEADROOM..].copy_from_slice(f);
    let Some(mut fr) = Frame::new(&mut buf, HEADROOM, f.len()) else { return };
    if process(&mut fr, tport, now, t, &mut st) != Verdict::Tx(UPLINK) {
        return;
    }
    let out = fr.data().to_vec();
    let e = t.egress.as_ref().expect("egress");
    assert_eq!((&out[6..12], &out[26..30]), (&t.data_mac.0[..], &e.addr.octets()[..]), "from the egress address");
    let proto = out[23];
    let (mapped, reply) = match proto {
        6 | 17 => {
            let p = u16::from_be_bytes([out[34], out[35]]);
            let dport = u16::from_be_bytes([out[36], out[37]]);
            let src = [out[30], out[31], out[32], out[33]];
            let r = if proto == 6 {
                tcp(NODE1_MAC, ROUTER_MAC, src, e.addr.octets(), dport, p, 1)
            } else {
                udp(NODE1_MAC, ROUTER_MAC, src, e.addr.octets(), dport, p)
            };
            (p, r)
        }
        _ => {
            let id = u16::from_be_bytes([out[38], out[39]]);
            (id, echo(NODE1_MAC, ROUTER_MAC, [out[30], out[31], out[32], out[33]], e.addr.octets(), id, true))
        }
    };
    assert!(e.ports.contains(mapped), "port {mapped} outside the range");
    let mut rbuf = vec![0u8; HEADROOM + reply.len()];
    rbuf[HEADROOM..].copy_from_slice(&reply);
    let mut r = Frame::new(&mut rbuf, HEADROOM, reply.len()).expect("fits");
    let v = process(&mut r, UPLINK, now, t, &mut st);
    assert_eq!(v, Verdict::Tx(tport), "the reply goes back to the task that sent it");
    let back = r.data();
    assert_eq!(&back[30..34], &f[26..30], "to the task's address");
    let (sent_port, back_port) = match proto {
        6 | 17 => ([f[34], f[35]], [back[36], back[37]]),
        _ => ([f[38], f[39]], [back[38], back[39]]),
    };
    assert_eq!(sent_port, back_port, "to the task's own port (or echo id)");
}

fuzz_target!(|data: &[u8]| {
    let scheds = ["rr", "wrr", "lc", "wlc", "sh", "mh"];
    let Some((&first, mut ops)) = data.split_first() else { return };
    let sched = scheds[usize::from(first & 0x7f) % scheds.len()];
    let mut weights = [Some(1), Some(1), Some(1)];
    let mut t = tables(weights, sched);
    // A small connection table, so that eviction happens too, and half the
    // time a flood guard of 4 new connections a second.
    let guard = if first & 0x80 != 0 { 4 } else { 0 };
    let ct = CtConfig { capacity: 64, max_new_per_sec: guard, seed: 1, ..CtConfig::default() };
    let mut st = WorkerState::with_conntrack(t.ports.len(), ct);
    st.sync(t);
    let mut now = 0u64;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let mut take = |n: usize| {
            let (a, b) = ops.split_at(n.min(ops.len()));
            ops = b;
            a
        };
        let (port, frame, service): (u16, Vec<u8>, Option<usize>) = match op % 8 {
            0 => {
                // Task 1 to the VIP.
                let b = take(3);
                let sport = u16::from_le_bytes([*b.first().unwrap_or(&0), *b.get(1).unwrap_or(&0)]);
                (1, tcp(GW, T1_MAC, [198, 19, 0, 1], [198, 19, 0, 100], sport, 80, *b.get(2).unwrap_or(&0)), Some(0))
            }
            1 => {
                // A client to a published port (nat or preserve-source);
                // bit 1 of the last byte: its SYN announces an MSS (from
                // the client byte), bit 2: 1500 bytes of payload with DF
                // (too large for the network: frag-needed).
                let b = take(4);
                let sport = u16::from_le_bytes([*b.first().unwrap_or(&0), *b.get(1).unwrap_or(&0)]);
                let sel = *b.get(3).unwrap_or(&0);
                let which = usize::from(sel & 1);
                let c = *b.get(2).unwrap_or(&0);
                let client = [198, 18, 5, c];
                let (dst, src, ip) = (NODE1_MAC, [2, 0, 0, 0, 5, 5], [198, 18, 0, 1]);
                let dport = 30080 + which as u16;
                let f = match (sel & 2 != 0, sel & 4 != 0) {
                    (_, true) => tcp_sized(dst, src, client, ip, sport, dport, 1500),
                    (true, false) => syn_mss(dst, src, client, ip, sport, dport, 1000 + u16::from(c) * 40),
                    _ => tcp(dst, src, client, ip, sport, dport, 0),
                };
                (UPLINK, f, Some(1 + which))
            }
            2 => {
                // Weight change, removal (None) or return of a backend.
                let b = take(2);
                let i = usize::from(*b.first().unwrap_or(&0)) % 3;
                let w = *b.get(1).unwrap_or(&0);
                weights[i] = if w >= 250 { None } else { Some(u32::from(w % 4)) };
                t = tables(weights, sched);
                st.sync(t);
                continue;
            }
            3 => {
                now += u64::from(*take(1).first().unwrap_or(&0)) * 4 * SECOND;
                continue;
            }
            6 => {
                // A task (1 or 3) to an outside address: TCP, UDP or a
                // ping; what leaves is checked, and its reply tried.
                let b = take(5);
                let g = |i: usize| *b.get(i).unwrap_or(&0);
                let (tport, mac, ip) =
                    if g(0) & 1 == 0 { (1, T1_MAC, [198, 19, 0, 1]) } else { (2, T3_MAC, [198, 19, 0, 3]) };
                let dst = [198, 18, 3, g(1) % 4];
                let sport = u16::from_le_bytes([g(2), g(3) % 8]);
                let f = match g(0) >> 1 & 3 {
                    0 => tcp(GW, mac, ip, dst, sport, 80, g(4)),
                    1 => udp(GW, mac, ip, dst, sport, 53),
                    _ => echo(GW, mac, ip, dst, sport, false),
                };
                egress(&f, tport, now, t, &st);
                (tport, f, None)
            }
            7 => {
                // From the outside to the egress address: a reply to a
                // port of the range (or near it), or an ICMP error quoting
                // an egress packet (its bytes mutated, its length cut).
                let b = take(6);
                let g = |i: usize| *b.get(i).unwrap_or(&0);
                let src = [198, 18, 3, g(1) % 4];
                let port = 60990 + u16::from(g(2) % 96);
                let f = match g(0) % 4 {
                    0 => tcp(NODE1_MAC, ROUTER_MAC, src, [198, 18, 0, 1], 80, port, g(3)),
                    1 => udp(NODE1_MAC, ROUTER_MAC, src, [198, 18, 0, 1], 53, port),
                    2 => echo(NODE1_MAC, ROUTER_MAC, src, [198, 18, 0, 1], port, true),
                    _ => {
                        let quoted = tcp(ROUTER_MAC, NODE1_MAC, [198, 18, 0, 1], src, port, 80, 0);
                        let mut e = icmp_error(g(3) % 13, &quoted, 28 + usize::from(g(4) % 20));
                        if let Some(x) = e.get_mut(34 + usize::from(g(5))) {
                            *x ^= g(4);
                        }
                        e
                    }
                };
                (UPLINK, f, None)
            }
            _ => {
                // Raw bytes on a port.
                let b = take(1);
                let port = u16::from(*b.first().unwrap_or(&0)) % (t.ports.len() as u16 + 1);
                let n = usize::from(*take(1).first().unwrap_or(&0));
                (port, take(n).to_vec(), None)
            }
        };
        let mut buf = vec![0u8; HEADROOM + frame.len()];
        buf[HEADROOM..].copy_from_slice(&frame);
        let Some(mut f) = Frame::new(&mut buf, HEADROOM, frame.len()) else { continue };
        let mut general = st.clone();
        let v = process(&mut f, port, now, t, &mut st);
        let mut gbuf = vec![0u8; HEADROOM + frame.len()];
        gbuf[HEADROOM..].copy_from_slice(&frame);
        let mut g = Frame::new(&mut gbuf, HEADROOM, frame.len()).expect("fits");
        let gv = process_general(&mut g, port, now, t, &mut general);
        assert_eq!(v, gv, "fast and general paths disagree");
        if matches!(v, Verdict::Tx(_)) {
            assert_eq!(f.data(), g.data(), "fast and general paths sent different bytes");
        }
        assert_eq!(st.stats.drops, general.stats.drops);
        assert_eq!(st.stats.ports, general.stats.ports);
        assert_eq!(st.lb.services, general.lb.services);
        assert_eq!(st.lb.mesh, general.lb.mesh);
        assert_eq!(st.lb.egress_stats(), general.lb.egress_stats());
        let (Some(svc), Verdict::Tx(out)) = (service, v) else { continue };
        // Where did it go? The frame itself, or the frame inside VXLAN; or
        // (a published port's oversize packet) ICMP back to the client.
        let sent = f.data();
        if out == UPLINK && sent.get(23) == Some(&1) {
            assert_eq!(
                (sent[34], sent[35], &sent[26..30], &sent[30..34]),
                (3, 4, &[198, 18, 0, 1][..], &frame[26..30])
            );
            assert_eq!(&sent[42..62], &frame[14..34], "the quote is the client's header");
            continue;
        }
        // A SYN's MSS fits the network (1450 − 40) when it announced one.
        let inner = if out == UPLINK {
            match vxlan::classify(sent, core::net::Ipv4Addr::new(198, 18, 0, 2), 4789) {
                Ok(Classified::Vxlan(d)) => &sent[d.inner],
                _ => panic!("a balanced frame to the uplink is VXLAN to node 2"),
            }
        } else {
            sent
        };
        if inner.get(47).is_some_and(|f| f & 2 != 0) && inner.get(54) == Some(&2) {
            assert!(u16::from_be_bytes([inner[56], inner[57]]) <= 1410, "MSS not clamped");
        }
        let dst = core::net::Ipv4Addr::new(inner[30], inner[31], inner[32], inner[33]);
        let dport = u16::from_be_bytes([inner[36], inner[37]]);
        let s = &t.services.list[svc];
        assert!(
            s.backends.iter().any(|b| b.ip == dst && b.port == dport),
            "{}: sent to {dst}:{dport}, not a backend of the service now ({:?})",
            s.name,
            s.backends
        );
    }
});
