//! `pipeline` bench: whole-frame costs of the overlay pipeline
//! (`process_burst`, the worker's entry point, counters included), bursts
//! of 64 frames of 64 different flows, with the example tables
//! (examples/tables.toml). Only the `process_burst` call is timed.
//!
//! Run: `cargo bench -p meshplane-benches --bench pipeline`
//!
//! Frames sit in their own buffers with headroom, as in a UMEM. Encap and
//! decap leave the frame bytes as they were (they write into headroom or
//! move the window), so each iteration re-wraps the same bytes. The proxy
//! ARP case rewrites the request into the reply, so it copies the 42-byte
//! request back first (in a worker, the NIC writes each new frame).
#![allow(missing_docs)] // criterion_group! generates undocumented public functions

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use meshplane_benches::{arp_request, task_frame, uplink_frame};
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process, process_burst};
use meshplane_dataplane::tables::{Tables, UPLINK};
use std::time::Instant;

const BURST: usize = 64;

fn tables() -> Tables {
    Tables::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml")).unwrap()
}

struct Burst {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
}

impl Burst {
    fn new(frames: Vec<Vec<u8>>) -> Self {
        let lens = frames.iter().map(|f| f.len()).collect();
        let bufs = frames
            .into_iter()
            .map(|f| {
                let mut b = vec![0u8; HEADROOM + 2048];
                b[HEADROOM..HEADROOM + f.len()].copy_from_slice(&f);
                b
            })
            .collect();
        Burst { bufs, lens }
    }
}

fn bench_case(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    port: u16,
    frames: Vec<Vec<u8>>,
    expect: Verdict,
    restore: bool,
) {
    let t = tables();
    let originals = frames.clone();
    let mut burst = Burst::new(frames);
    let mut st = WorkerState::new(t.ports.len());
    // Check once that the case does what it claims.
    {
        let mut f = Frame::new(&mut burst.bufs[0], HEADROOM, burst.lens[0]).unwrap();
        assert_eq!(process(&mut f, port, 0, &t, &mut st), expect, "{name}");
        burst.bufs[0][HEADROOM..HEADROOM + originals[0].len()].copy_from_slice(&originals[0]);
    }
    let mut verdicts = [Verdict::Pass; BURST];
    c.bench_function(name, |b| {
        // Only `process_burst` is timed (two clock reads per burst of 64,
        // well under 1 ns a packet): restoring the ARP requests, wrapping
        // the buffers as `Frame`s (the I/O layer's work, measured end to end
        // with it) and checking the verdicts are not the pipeline's.
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut sent = 0usize;
            for _ in 0..iters {
                if restore {
                    for (buf, o) in burst.bufs.iter_mut().zip(&originals) {
                        buf[HEADROOM..HEADROOM + o.len()].copy_from_slice(o);
                    }
                }
                // A fixed array, as a worker's burst is: no allocation per burst.
                let mut bufs = burst.bufs.iter_mut();
                let mut frames: [Frame<'_>; BURST] = core::array::from_fn(|i| {
                    Frame::new(bufs.next().expect("BURST buffers"), HEADROOM, burst.lens[i]).expect("frame fits")
                });
                let start = Instant::now();
                process_burst(&mut frames, port, 0, &t, &mut st, &mut verdicts);
                total += start.elapsed();
                sent += verdicts.iter().map(|v| usize::from(matches!(v, Verdict::Tx(_)))).sum::<usize>();
            }
            assert_eq!(sent, BURST * iters as usize, "{name}: every frame is sent");
            black_box(sent);
            total
        })
    });
}

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BURST as u64));
    let task1 = tables().port_id("task1").unwrap();
    bench_case(
        &mut g,
        "encap_task_to_remote",
        task1,
        (0..BURST as u16).map(task_frame).collect(),
        Verdict::Tx(UPLINK),
        false,
    );
    bench_case(
        &mut g,
        "decap_uplink_to_local",
        UPLINK,
        (0..BURST as u16).map(uplink_frame).collect(),
        Verdict::Tx(task1),
        false,
    );
    bench_case(&mut g, "arp_proxy", task1, vec![arp_request(); BURST], Verdict::Tx(task1), true);
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
