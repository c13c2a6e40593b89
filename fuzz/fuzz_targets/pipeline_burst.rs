//! Bursts of arbitrary frames through `process_burst` (the worker's entry
//! point, which keeps per-burst state: the input port's fast-path facts,
//! the last VNI looked up, transmit counters per run of frames to one
//! port) against `process_general` frame by frame: the same verdicts, the
//! same bytes, the same counters.
//!
//! Input: byte 0 picks the input port (modulo ports + 1, so unknown ports
//! occur too); then frames, each a 2-byte little-endian length (modulo
//! 2048) and that many bytes (fewer at the end), up to 64 frames.
#![no_main]

#[path = "common.rs"]
mod common;

use common::tables;
use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{process_burst, process_general};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else { return };
    let t = tables();
    let in_port = u16::from(sel) % (t.ports.len() as u16 + 1);
    let mut inputs: Vec<&[u8]> = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>()
        && inputs.len() < 64
    {
        let n = (usize::from(u16::from_le_bytes(*len)) % 2048).min(tail.len());
        let (f, tail) = tail.split_at(n);
        inputs.push(f);
        rest = tail;
    }

    let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|f| [&[0u8; HEADROOM][..], f].concat()).collect();
    let mut frames: Vec<Frame<'_>> =
        bufs.iter_mut().zip(&inputs).map(|(b, f)| Frame::new(b, HEADROOM, f.len()).expect("fits")).collect();
    let mut verdicts = vec![Verdict::Pass; frames.len()];
    let mut st = common::worker(t);
    process_burst(&mut frames, in_port, 0, t, &mut st, &mut verdicts);

    let mut gst = common::worker(t);
    for ((f, v), input) in frames.iter().zip(&verdicts).zip(&inputs) {
        let mut gbuf = [&[0u8; HEADROOM][..], input].concat();
        let mut g = Frame::new(&mut gbuf, HEADROOM, input.len()).expect("fits");
        let gv = process_general(&mut g, in_port, 0, t, &mut gst);
        assert_eq!(*v, gv, "burst and general path disagree on the verdict");
        if matches!(gv, Verdict::Tx(_)) {
            assert_eq!(f.data(), g.data(), "burst and general path sent different bytes");
        }
    }
    assert_eq!(st.stats.drops, gst.stats.drops);
    assert_eq!(st.stats.passed, gst.stats.passed);
    assert_eq!(st.stats.ports, gst.stats.ports);
});
