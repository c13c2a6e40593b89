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
    const GW: [u8; 6] = [0x02, 0x42, 0xc6, 0x13, 0x00, 0xfe];
    const T1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
    const NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let mut take = |n: usize| {
            let (a, b) = ops.split_at(n.min(ops.len()));
            ops = b;
            a
        };
        let (port, frame, service): (u16, Vec<u8>, Option<usize>) = match op % 6 {
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
