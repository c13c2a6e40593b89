//! `wire` bench: the per-packet costs of the wire layer.
#![allow(missing_docs)] // criterion_group! generates undocumented public functions
//!
//! Run: `cargo bench -p meshplane-benches --bench wire`
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("noop", |b| b.iter(|| black_box(1)));
    g.finish();
}
criterion_group!(benches, wire);
criterion_main!(benches);
