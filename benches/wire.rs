//! `wire` bench: the per-packet costs of the wire layer, measured over
//! batches of 64 frames (a worker's burst) and reported per packet.
//!
//! Each case folds the fields a pipeline would go on to use into an
//! accumulator that is `black_box`ed once per burst. `black_box`ing every
//! result struct instead measures a store-forwarding stall of the harness
//! (the struct is written in 2- and 4-byte pieces and read back in 8),
//! about 12 cycles a packet that a real pipeline, which keeps the fields in
//! registers, does not pay.
//!
//! Run: `cargo bench -p meshplane-benches --bench wire`
#![allow(missing_docs)] // criterion_group! generates undocumented public functions

use core::net::Ipv4Addr;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use meshplane_benches::{task_frame, tcp_ip_packet};
use meshplane_dataplane::wire::parse::L4;
use meshplane_dataplane::wire::rewrite::{Nat, rewrite_ipv4};
use meshplane_dataplane::wire::vxlan::{self, Classified, EncapParams, EncapTemplate};
use meshplane_dataplane::wire::{MacAddr, flow, parse_frame};

const BURST: usize = 64;

fn params() -> EncapParams {
    EncapParams {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src_ip: Ipv4Addr::new(198, 18, 0, 1),
        dst_ip: Ipv4Addr::new(198, 18, 0, 2),
        dst_port: vxlan::DEFAULT_PORT,
        vni: 4096,
        ttl: 64,
    }
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(BURST as u64));

    let udp: Vec<Vec<u8>> = (0..BURST as u16).map(task_frame).collect();
    assert!(udp.iter().all(|f| f.len() == 64));
    g.bench_function("parse_udp64", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for f in &udp {
                if let Ok(p) = parse_frame(f)
                    && let L4::Udp { src_port, dst_port } = p.l4
                {
                    acc += p.l3_end + usize::from(src_port ^ dst_port);
                }
            }
            black_box(acc)
        })
    });
    g.bench_function("parse_udp64_etherparse", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for f in &udp {
                if let Ok(p) = etherparse::SlicedPacket::from_ethernet(f)
                    && let Some(etherparse::TransportSlice::Udp(u)) = p.transport
                {
                    acc += usize::from(u.source_port() ^ u.destination_port());
                }
            }
            black_box(acc)
        })
    });

    let tpl = EncapTemplate::new(&params()).unwrap();
    let encapped: Vec<Vec<u8>> = udp
        .iter()
        .map(|inner| {
            let mut buf = vec![0u8; vxlan::ENCAP_LEN + inner.len()];
            buf[vxlan::ENCAP_LEN..].copy_from_slice(inner);
            vxlan::encap(&mut buf, vxlan::ENCAP_LEN, inner.len(), &params()).unwrap();
            buf
        })
        .collect();
    let local = params().dst_ip;
    g.bench_function("classify_vxlan", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for f in &encapped {
                if let Ok(Classified::Vxlan(d)) = vxlan::classify(f, local, vxlan::DEFAULT_PORT) {
                    acc += d.vni as usize + d.inner.start + d.inner.end;
                }
            }
            black_box(acc)
        })
    });

    // Buffers with 50 bytes of headroom in front of the inner frame, as a
    // worker's frame buffers have.
    let mut bufs: Vec<Vec<u8>> = encapped.clone();
    g.bench_function("encap_outer_header", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for buf in bufs.iter_mut() {
                let inner_len = buf.len() - vxlan::ENCAP_LEN;
                let h = flow::flow_hash(&buf[vxlan::ENCAP_LEN..]);
                acc += tpl.write(buf, vxlan::ENCAP_LEN, inner_len, vxlan::src_port_for_hash(h)).unwrap_or(1);
            }
            black_box(acc)
        })
    });
    g.bench_function("encap_outer_header_no_hash", |b| {
        b.iter(|| {
            let mut acc = 0usize;
            for buf in bufs.iter_mut() {
                let inner_len = buf.len() - vxlan::ENCAP_LEN;
                acc += tpl.write(buf, vxlan::ENCAP_LEN, inner_len, 50000).unwrap_or(1);
            }
            black_box(acc)
        })
    });

    let dnat = Nat { dst_addr: Some(Ipv4Addr::new(198, 19, 0, 23)), dst_port: Some(8080), ..Nat::default() };
    let full_nat = Nat { src_addr: Some(Ipv4Addr::new(198, 19, 255, 1)), src_port: Some(61000), ..dnat };
    let tcp: Vec<Vec<u8>> = (0..BURST as u16).map(tcp_ip_packet).collect();
    // Rewriting a packet to the values it already has does the same work as
    // a real rewrite (no short cut for unchanged fields), so the burst is
    // rewritten in place, with no per-iteration copies.
    for (name, nat) in [("nat_dnat_tcp", dnat), ("nat_snat_dnat_tcp", full_nat)] {
        let mut pkts = tcp.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut ok = 0usize;
                for p in pkts.iter_mut() {
                    ok += usize::from(rewrite_ipv4(p, &nat).is_ok());
                }
                black_box(ok)
            })
        });
    }
    // What an AF_XDP task port pays per frame for tasks with transmit
    // offloads on: every IPv4 TCP/UDP checksum recomputed on receipt.
    let mut small = udp.clone();
    g.bench_function("complete_checksums_udp64", |b| {
        b.iter(|| {
            for f in small.iter_mut() {
                meshplane_dataplane::wire::rewrite::complete_frame_checksums(f);
            }
            black_box(small[0][40])
        })
    });
    let mut mtu: Vec<Vec<u8>> = (0..BURST)
        .map(|i| {
            let mut f = Vec::new();
            etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 2])
                .ipv4([198, 19, 0, 1], [198, 19, 0, 2], 64)
                .tcp(40000 + i as u16, 5001, 1, 65535)
                .ack(1)
                .write(&mut f, &[i as u8; 1398])
                .expect("builds");
            f
        })
        .collect();
    g.bench_function("complete_checksums_tcp1450", |b| {
        b.iter(|| {
            for f in mtu.iter_mut() {
                meshplane_dataplane::wire::rewrite::complete_frame_checksums(f);
            }
            black_box(mtu[0][50])
        })
    });
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
