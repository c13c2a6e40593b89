//! The per-packet path allocates nothing: a counting global allocator
//! around `process` over frames that take every path (encap, decap, local
//! switching, proxy ARP, gateway echo, fragmentation-needed, drops, pass).
//!
//! Only allocations made on the thread that runs the packet path are
//! counted: the test harness's own threads allocate when they please.

use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pcap;
use meshplane_dataplane::pipeline::{WorkerState, process, process_burst};
use meshplane_dataplane::tables::{Tables, UPLINK};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread whose allocations are counted (a const-initialised
    /// `Cell` needs no allocation and no destructor, so the allocator may
    /// read it).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTED.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator, which
// upholds GlobalAlloc's contract; the counter has no effect on memory.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same layout, forwarded to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: ptr came from System with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn load(name: &str) -> Vec<Vec<u8>> {
    let p = format!("{}/../examples/trace/{name}", env!("CARGO_MANIFEST_DIR"));
    pcap::read(std::fs::File::open(p).unwrap()).unwrap().into_iter().map(|r| r.data).collect()
}

#[test]
fn per_packet_path_does_not_allocate() {
    let t = Tables::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml")).unwrap();
    let task1 = t.port_id("task1").unwrap();
    let mut inputs: Vec<(u16, Vec<u8>)> = load("task1-in.pcap").into_iter().map(|f| (task1, f)).collect();
    inputs.extend(load("uplink-in.pcap").into_iter().map(|f| (UPLINK, f)));
    inputs.push((task1, vec![0u8; 5])); // malformed
    inputs.push((42, vec![0u8; 64])); // unknown port
    let mut st = WorkerState::new(t.ports.len());
    let mut buf = vec![0u8; HEADROOM + 2048];
    let mut verdicts = [0usize; 3];

    COUNTED.with(|c| c.set(true));
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..100 {
        for (port, f) in &inputs {
            buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
            let Some(mut frame) = Frame::new(&mut buf, HEADROOM, f.len()) else { continue };
            match process(&mut frame, *port, 0, &t, &mut st) {
                Verdict::Tx(_) => verdicts[0] += 1,
                Verdict::Drop(_) => verdicts[1] += 1,
                Verdict::Pass => verdicts[2] += 1,
            }
        }
    }
    // And as a worker calls it: bursts per port (the frames and the
    // verdicts array are made outside the counted calls, as a worker has
    // them before it starts).
    COUNTED.with(|c| c.set(false));
    let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|_| vec![0u8; HEADROOM + 2048]).collect();
    let mut burst_verdicts = vec![Verdict::Pass; inputs.len()];
    for port in [task1, UPLINK] {
        for _ in 0..10 {
            let mut frames: Vec<Frame<'_>> = bufs
                .iter_mut()
                .zip(inputs.iter().filter(|(p, _)| *p == port))
                .map(|(b, (_, f))| {
                    b[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
                    Frame::new(b, HEADROOM, f.len()).unwrap()
                })
                .collect();
            COUNTED.with(|c| c.set(true));
            process_burst(&mut frames, port, 0, &t, &mut st, &mut burst_verdicts);
            COUNTED.with(|c| c.set(false));
            assert!(burst_verdicts[..frames.len()].iter().any(|v| matches!(v, Verdict::Tx(_))));
        }
    }
    COUNTED.with(|c| c.set(true));
    let after = ALLOCS.load(Ordering::Relaxed);
    assert_eq!(after - before, 0, "the packet path allocated");
    // Every kind of verdict was exercised.
    assert!(verdicts.iter().all(|&n| n > 0), "{verdicts:?}");
    // And the counter is live: allocating is seen.
    let v: Vec<u8> = Vec::with_capacity(std::hint::black_box(16));
    assert!(ALLOCS.load(Ordering::Relaxed) > after);
    drop(v);
}
