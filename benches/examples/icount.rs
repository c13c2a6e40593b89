//! Instructions per packet of the pipeline, for valgrind's callgrind (which
//! counts instructions exactly, whatever else the machine is doing):
//!
//! ```sh
//! cargo build --release -p meshplane-benches --example icount
//! scripts/icount            # runs this under callgrind, prints per-packet counts
//! ```
//!
//! `icount CASE BURSTS` runs BURSTS bursts of 64 frames of CASE (encap,
//! decap, arp) through `process_burst`, or (nat) through `rewrite_ipv4`;
//! `wrap` is the harness alone (wrapping 64 buffers as frames, counting
//! verdicts), to subtract from the others.

use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process_burst};
use meshplane_dataplane::tables::{Tables, UPLINK};
use meshplane_dataplane::wire::rewrite::{Nat, rewrite_ipv4};

const BURST: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (case, bursts) = match (args.get(1), args.get(2).and_then(|n| n.parse::<usize>().ok())) {
        (Some(c), Some(n)) => (c.as_str(), n),
        _ => {
            eprintln!("usage: icount encap|decap|arp|wrap|vip|vip-new|nat BURSTS");
            std::process::exit(2);
        }
    };
    if case == "nat" {
        nat(bursts);
        return;
    }
    if case == "vip" || case == "vip-new" {
        vip(case == "vip-new", bursts);
        return;
    }
    let t = Tables::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml")).expect("example tables");
    let task1 = t.port_id("task1").expect("task1");
    let (port, frames, restore): (u16, Vec<Vec<u8>>, bool) = match case {
        "encap" | "wrap" => (task1, (0..BURST as u16).map(meshplane_benches::task_frame).collect(), false),
        "decap" => (UPLINK, (0..BURST as u16).map(meshplane_benches::uplink_frame).collect(), false),
        "arp" => (task1, vec![meshplane_benches::arp_request(); BURST], true),
        other => {
            eprintln!("unknown case {other:?}: encap, decap, arp, wrap, vip, vip-new or nat");
            std::process::exit(2);
        }
    };
    let mut bufs: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut b = vec![0u8; HEADROOM + 2048];
            b[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
            b
        })
        .collect();
    let mut st = WorkerState::new(t.ports.len());
    let mut verdicts = [Verdict::Pass; BURST];
    let mut sent = 0usize;
    for _ in 0..bursts {
        if restore {
            for (b, f) in bufs.iter_mut().zip(&frames) {
                b[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
            }
        }
        let mut it = bufs.iter_mut();
        let mut burst: [Frame<'_>; BURST] =
            core::array::from_fn(|i| Frame::new(it.next().expect("buffers"), HEADROOM, frames[i].len()).expect("fits"));
        if case == "wrap" {
            // The harness alone: wrapping the buffers, counting verdicts.
            std::hint::black_box(&mut burst);
        } else {
            process_burst(&mut burst, port, 0, &t, &mut st, &mut verdicts);
        }
        sent += verdicts.iter().filter(|v| matches!(v, Verdict::Tx(_))).count();
    }
    println!("{case}: {bursts} bursts, {sent} frames sent");
}

/// SNAT + DNAT of 64 TCP packets per burst (the `wire/nat_snat_dnat_tcp` case).
fn nat(bursts: usize) {
    let nat = Nat {
        src_addr: Some(core::net::Ipv4Addr::new(198, 19, 255, 1)),
        dst_addr: Some(core::net::Ipv4Addr::new(198, 19, 0, 23)),
        src_port: Some(61000),
        dst_port: Some(8080),
    };
    let mut pkts: Vec<Vec<u8>> = (0..BURST as u16).map(meshplane_benches::tcp_ip_packet).collect();
    let mut ok = 0usize;
    for _ in 0..bursts {
        for p in pkts.iter_mut() {
            ok += usize::from(rewrite_ipv4(p, &nat).is_ok());
        }
    }
    println!("nat: {bursts} bursts, {ok} rewritten");
}

/// A task's packets to a VIP (the `lb` bench's cases): established
/// connections (`vip`), or new ones (`vip-new`, SYNs of untracked
/// connections), each DNATed and encapsulated to node 2.
fn vip(new_flows: bool, bursts: usize) {
    let t = meshplane_benches::lb_tables();
    let task1 = t.port_id("task1").expect("task1");
    let mut st = WorkerState::with_conntrack(
        t.ports.len(),
        meshplane_dataplane::lb::conntrack::CtConfig {
            capacity: 1 << 16,
            max_new_per_sec: 0,
            seed: 0x636f_6e6e_7472_6163,
            ..Default::default()
        },
    );
    st.sync(&t);
    let mut bufs: Vec<Vec<u8>> = (0..BURST).map(|_| vec![0u8; HEADROOM + 2048]).collect();
    let mut verdicts = [Verdict::Pass; BURST];
    let (mut sport, mut now, mut sent) = (1024u16, 0u64, 0usize);
    let frames: Vec<Vec<u8>> = (0..BURST as u16).map(|i| meshplane_benches::vip_frame(40000 + i, false)).collect();
    for _ in 0..bursts {
        for (i, b) in bufs.iter_mut().enumerate() {
            if new_flows {
                sport = sport.wrapping_add(1).max(1024);
                b[HEADROOM..HEADROOM + frames[i].len()].copy_from_slice(&meshplane_benches::vip_frame(sport, true));
            } else {
                b[HEADROOM..HEADROOM + frames[i].len()].copy_from_slice(&frames[i]);
            }
        }
        now += 1_000_000_000;
        let mut it = bufs.iter_mut();
        let mut burst: [Frame<'_>; BURST] =
            core::array::from_fn(|i| Frame::new(it.next().expect("buffers"), HEADROOM, frames[i].len()).expect("fits"));
        process_burst(&mut burst, task1, now, &t, &mut st, &mut verdicts);
        sent += verdicts.iter().filter(|v| matches!(v, Verdict::Tx(_))).count();
    }
    println!("vip: {bursts} bursts, {sent} frames sent");
}
