//! `wire` bench: the per-packet costs of the wire layer, measured over
//! batches of 64 frames (a worker's burst) and reported per packet.
//!
//! Run: `cargo bench -p meshplane-benches --bench wire`
#![allow(missing_docs)] // criterion_group! generates undocumented public functions

use core::net::Ipv4Addr;
use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};
use meshplane_dataplane::wire::rewrite::{Nat, rewrite_ipv4};
use meshplane_dataplane::wire::vxlan::{self, EncapParams, EncapTemplate};
use meshplane_dataplane::wire::{MacAddr, flow, parse_frame};

const BURST: usize = 64;

/// A 64-byte Ethernet/IPv4/UDP frame (22 bytes of payload), flow `i`.
fn udp64(i: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 19, 0, 1], [198, 19, 0, 2], 64)
        .udp(10000 + i, 5001)
        .write(&mut f, &[0x5a; 22])
        .unwrap();
    assert_eq!(f.len(), 64);
    f
}

fn tcp_ip_packet(i: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ipv4([198, 18, 1, 1], [198, 18, 255, 1], 64)
        .tcp(20000 + i, 30080, 1, 64000)
        .ack(1)
        .write(&mut f, &[0x5a; 6])
        .unwrap();
    f
}

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

    let udp: Vec<Vec<u8>> = (0..BURST as u16).map(udp64).collect();
    g.bench_function("parse_udp64", |b| {
        b.iter(|| {
            for f in &udp {
                black_box(parse_frame(black_box(f)).ok());
            }
        })
    });
    g.bench_function("parse_udp64_etherparse", |b| {
        b.iter(|| {
            for f in &udp {
                black_box(etherparse::SlicedPacket::from_ethernet(black_box(f)).is_ok());
            }
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
            for f in &encapped {
                black_box(vxlan::classify(black_box(f), local, vxlan::DEFAULT_PORT).ok());
            }
        })
    });

    // Buffers with 50 bytes of headroom in front of the inner frame, as a
    // worker's frame buffers have.
    let mut bufs: Vec<Vec<u8>> = encapped.clone();
    g.bench_function("encap_outer_header", |b| {
        b.iter(|| {
            for buf in bufs.iter_mut() {
                let inner_len = buf.len() - vxlan::ENCAP_LEN;
                let h = flow::flow_hash(&buf[vxlan::ENCAP_LEN..]);
                black_box(tpl.write(buf, vxlan::ENCAP_LEN, inner_len, vxlan::src_port_for_hash(h)).ok());
            }
        })
    });
    g.bench_function("encap_outer_header_no_hash", |b| {
        b.iter(|| {
            for buf in bufs.iter_mut() {
                let inner_len = buf.len() - vxlan::ENCAP_LEN;
                black_box(tpl.write(buf, vxlan::ENCAP_LEN, inner_len, 50000).ok());
            }
        })
    });

    let dnat = Nat { dst_addr: Some(Ipv4Addr::new(198, 19, 0, 23)), dst_port: Some(8080), ..Nat::default() };
    let full_nat = Nat { src_addr: Some(Ipv4Addr::new(198, 19, 255, 1)), src_port: Some(61000), ..dnat };
    let tcp: Vec<Vec<u8>> = (0..BURST as u16).map(tcp_ip_packet).collect();
    for (name, nat) in [("nat_dnat_tcp", dnat), ("nat_snat_dnat_tcp", full_nat)] {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || tcp.clone(),
                |pkts| {
                    for p in pkts.iter_mut() {
                        black_box(rewrite_ipv4(black_box(p), &nat).ok());
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
