//! `lb` bench: the load balancer's parts on their own.
//!
//! - `maglev_build_1000`: building the Maglev table of 1000 backends at
//!   M = 65537 (control side, per service change). Target < 10 ms.
//! - `conntrack_hit_1M` / `conntrack_hit_10M`: looking up an established
//!   flow in a per-worker table holding 1 M / 10 M flows, bursts of 64
//!   different flows spread over the whole table (so mostly cache misses,
//!   as at that scale in a worker).
//!
//! - `established_vip_encap`: a task's packets of 64 established
//!   connections to a VIP: conntrack hit, DNAT, VXLAN encapsulation to the
//!   backend's node, counters (`process_burst`). Target < 40 ns.
//! - `new_flow_vip_encap`: 64 new connections per burst: Maglev choice,
//!   two conntrack inserts (both directions), DNAT, encapsulation, in a
//!   table of 2 M entries (117 MB, so inserts miss in DRAM). Target
//!   < 100 ns. `new_flow_vip_encap_64k`: the same with a table of 64 K
//!   entries (3.6 MB, in cache): the CPU's share alone.
//!
//! Only the `process_burst` call is timed in the last two (the frames are
//! rewritten in place, so each burst gets fresh copies first, untimed).
//!
//! Run: `cargo bench -p meshplane-benches --bench lb`
#![allow(missing_docs)] // criterion_group! generates undocumented public functions

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use meshplane_dataplane::lb::conntrack::{
    Bucket, Conntrack, CtConfig, CtState, CtValue, FlowKey, Inserted, SECOND, tcp_flags,
};
use meshplane_dataplane::tables::maglev::{DEFAULT_SIZE, Maglev, MaglevBackend};

fn maglev(c: &mut Criterion) {
    let backends: Vec<MaglevBackend> =
        (0..1000u64).map(|i| MaglevBackend { id: (0xc613_0000 + i) << 16 | 8080, weight: 1 }).collect();
    let mut g = c.benchmark_group("lb");
    g.sample_size(20);
    g.bench_function("maglev_build_1000", |b| {
        b.iter(|| black_box(Maglev::build(black_box(&backends), DEFAULT_SIZE, 0x5eed).expect("builds")))
    });
    g.finish();
}

fn key(i: u32) -> FlowKey {
    // Clients from 198.18.0.0/15 to one VIP, 64 K source ports each.
    FlowKey { src: 0xc612_0000 | (i >> 16), dst: 0xc613_ff01, sport: i as u16, dport: 80, proto: 6 }
}

fn conntrack(c: &mut Criterion) {
    let mut g = c.benchmark_group("lb");
    g.throughput(Throughput::Elements(64));
    for (name, n) in [("conntrack_hit_1M", 1u32 << 20), ("conntrack_hit_10M", 10_000_000)] {
        // Sized as a worker should be for that many flows: twice as many
        // entries (a set-associative table at load 1/2 evicts well under 1%
        // of flows for lack of a way; at 0.8 about 5%).
        let mut ct = Conntrack::new(CtConfig { capacity: n as usize * 2, ..bench_ct() });
        let v = CtValue { service: 1, state: CtState::Established, ..CtValue::ZERO };
        for i in 0..n {
            ct.insert_probe(&ct.probe(&key(i)), CtValue { backend: i % 1000, ..v }, 0, true);
        }
        let mut next = 0u32;
        g.bench_function(BenchmarkId::new(name, n), |b| {
            b.iter(|| {
                let mut acc = 0u32;
                for _ in 0..64 {
                    // A stride coprime with n walks the whole table.
                    next = (next + 2_654_435_761 % n) % n;
                    if let Ok(v) = ct.lookup_probe(&ct.probe(&key(next)), 1, tcp_flags::ACK) {
                        acc = acc.wrapping_add(v.backend);
                    }
                }
                black_box(acc)
            })
        });
        eprintln!("{name}: {} flows inserted, {} evicted", n, ct.stats.evicted);
        assert!(ct.stats.evicted < u64::from(n) / 50, "the table holds the flows: {:?}", ct.stats);
    }
    g.finish();
}

/// New flows as the target names them: the Maglev choice and the
/// conntrack inserts (forward entry through the flood guard, reply entry),
/// 64 new flows a burst in two passes as the data path runs them (pass
/// one: both keys probed, their one bucket prefetched, the Maglev lookup;
/// pass two: the inserts). `_2M`: a 2 M-entry table (64 MiB, twice the L3
/// cache: the buckets miss in DRAM); `_64k`: 64 K entries (2 MiB).
fn new_flow(c: &mut Criterion) {
    let mut g = c.benchmark_group("lb");
    g.throughput(Throughput::Elements(64));
    let backends: Vec<MaglevBackend> =
        (0..100u64).map(|i| MaglevBackend { id: (0xc613_0000 + i) << 16 | 8080, weight: 1 }).collect();
    let m = Maglev::build(&backends, DEFAULT_SIZE, 0x5eed).expect("builds");
    for (name, capacity) in [("new_flow_maglev_insert_2M", 1usize << 21), ("new_flow_maglev_insert_64k", 1 << 16)] {
        let mut ct = Conntrack::new(CtConfig { capacity, ..bench_ct() });
        let mut next = 0u32;
        // One second a burst: a key comes round again after 65536 bursts,
        // long after its SYN-only entry (60 s) expired.
        let mut now = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                now += SECOND;
                let mut probes = [None; 64];
                for p in probes.iter_mut() {
                    next = next.wrapping_add(1);
                    let k = key(next);
                    // As the data path does: the forward key's bucket by its
                    // source, the reply's by its destination (the same
                    // client endpoint: the same bucket, prefetched once).
                    let fp = ct.probe_in(&k, Bucket::Src);
                    ct.prefetch_probe(&fp);
                    let h = meshplane_dataplane::wire::flow::hash2(
                        0x5eed,
                        u64::from(k.src) << 32 | u64::from(k.dst),
                        u64::from(k.sport) << 16,
                    );
                    let Some(be) = m.lookup(h) else { continue };
                    let rk = FlowKey { src: 0xc613_0000 + be, dst: k.src, sport: 8080, dport: k.sport, proto: 6 };
                    let rp = ct.probe_in(&rk, Bucket::Dst);
                    *p = Some((fp, rp, be));
                }
                for (fp, rp, be) in probes.iter().flatten() {
                    let v = CtValue {
                        service: 1,
                        backend: *be,
                        peer: 0xc613_0000 + be,
                        port: 8080,
                        state: CtState::SynRecv,
                        ..CtValue::ZERO
                    };
                    if ct.insert_probe(fp, v, now, true) != Inserted::Guarded {
                        ct.insert_probe(rp, CtValue { flags: 1, ..v }, now, false);
                    }
                }
                black_box(ct.stats.inserted)
            })
        });
        eprintln!("{name}: conntrack {:?}", ct.stats);
    }
    g.finish();
}

fn vip(c: &mut Criterion) {
    use meshplane_dataplane::packet::{DropReason, Frame, HEADROOM, Verdict};
    use meshplane_dataplane::pipeline::{WorkerState, process_burst};
    use meshplane_dataplane::tables::UPLINK;
    use std::time::{Duration, Instant};
    const BURST: usize = 64;
    let t = meshplane_benches::lb_tables();
    let task1 = t.port_id("task1").expect("task1");
    let mut g = c.benchmark_group("lb");
    g.throughput(Throughput::Elements(BURST as u64));
    // 2 M entries (117 MB: new flows miss in DRAM), and 64 K (3.6 MB: the
    // table in cache, the CPU's share alone).
    // Established: the same 64 connections every burst (`_64k_conns`: 64
    // of 64 K connections, the most one client has to one VIP port, spread
    // over the 2 M-entry table, a different 64 each burst, so the lookups
    // miss in cache as they would on a busy node).
    for (name, new_flows, capacity) in [
        ("established_vip_encap", false, 1 << 21),
        ("established_vip_encap_64k_conns", false, 1 << 21),
        ("new_flow_vip_encap", true, 1 << 21),
        ("new_flow_vip_encap_64k", true, 1 << 16),
    ] {
        let many = name.ends_with("_64k_conns");
        let mut st = WorkerState::with_conntrack(t.ports.len(), CtConfig { capacity, ..bench_ct() });
        st.sync(&t);
        let mut bufs: Vec<Vec<u8>> = (0..BURST).map(|_| vec![0u8; HEADROOM + 2048]).collect();
        let mut verdicts = [Verdict::Pass; BURST];
        let mut sport = 1024u16;
        // One second per burst: a source port comes round again after
        // about 1000 s, when its SYN-only entry (60 s) has long expired.
        let mut now = 0u64;
        if many {
            // Open every connection (SYN), 64 per burst.
            for chunk in (1024..=u16::MAX).collect::<Vec<_>>().chunks(BURST) {
                let fs: Vec<Vec<u8>> = chunk.iter().map(|&p| meshplane_benches::vip_frame(p, true)).collect();
                for (buf, f) in bufs.iter_mut().zip(&fs) {
                    buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
                }
                let mut it = bufs.iter_mut();
                let mut frames: Vec<Frame<'_>> = fs
                    .iter()
                    .map(|f| Frame::new(it.next().expect("BURST buffers"), HEADROOM, f.len()).expect("fits"))
                    .collect();
                process_burst(&mut frames, task1, now, &t, &mut st, &mut verdicts);
            }
        }
        let mut next = 0u32;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut lens = [0usize; BURST];
                    for (i, buf) in bufs.iter_mut().enumerate() {
                        // Established: the same 64 connections every burst.
                        // New: 64 SYNs of connections not tracked (the
                        // source port moves on).
                        let f = if new_flows {
                            sport = sport.wrapping_add(1).max(1024);
                            meshplane_benches::vip_frame(sport, true)
                        } else if many {
                            // A stride coprime with 64512 walks them all.
                            next = (next + 40_503) % 64_512;
                            meshplane_benches::vip_frame(1024 + next as u16, false)
                        } else {
                            meshplane_benches::vip_frame(40000 + i as u16, false)
                        };
                        buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(&f);
                        lens[i] = f.len();
                    }
                    let mut it = bufs.iter_mut();
                    let mut frames: [Frame<'_>; BURST] = core::array::from_fn(|i| {
                        Frame::new(it.next().expect("BURST buffers"), HEADROOM, lens[i]).expect("fits")
                    });
                    // Connections tracked for good stay live (60 s after
                    // a SYN, 900 s once established): a millisecond a burst.
                    now += if new_flows { 1_000_000_000 } else { 1_000_000 };
                    let start = Instant::now();
                    process_burst(&mut frames, task1, now, &t, &mut st, &mut verdicts);
                    total += start.elapsed();
                    // (`_64k_conns`: the few connections whose entries a
                    // full bucket evicted while they opened come back as
                    // unconfirmed pickups, which find no room in a bucket
                    // of confirmed connections: dropped, as on a node.)
                    let ok = |v: &Verdict| {
                        *v == Verdict::Tx(UPLINK) || (many && *v == Verdict::Drop(DropReason::UnconfirmedNoRoom))
                    };
                    assert!(verdicts.iter().all(ok), "{name}: {verdicts:?}");
                }
                total
            })
        });
        let s = &st.lb.services[0];
        eprintln!("{name}: {} connections, {} packets; conntrack {:?}", s.new_conns, s.packets, st.lb.conntrack.stats);
    }
    g.finish();
}

criterion_group!(benches, maglev, conntrack, new_flow, vip);
criterion_main!(benches);

/// The benches' table settings: a fixed seed (the same buckets every run)
/// and no flood guard (they open connections far faster than a second's
/// budget, at one fixed time).
fn bench_ct() -> CtConfig {
    CtConfig { max_new_per_sec: 0, seed: 0x636f_6e6e_7472_6163, ..CtConfig::default() }
}
