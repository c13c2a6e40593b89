//! The burst driver: a burst of frames from one port through the packet
//! path, as a worker runs it. Software prefetch of the frames ahead (the
//! pattern of VPP's node loops), what the fast paths need of the input
//! port looked up once per burst, transmit counters kept per run of frames
//! to one port, and for a task port in a network with services two passes
//! per [`VIP_PASS`] frames: every frame's checks and conntrack probe first
//! (buckets prefetched), then the decisions.

use super::{WorkerState, decide, follow, task};
use crate::lb::conntrack::{Bucket, FlowKey};
use crate::lb::{self, LbState};
use crate::overlay::fast::BurstCache;
use crate::packet::{DropReason, Frame, PortId, UPLINK, Verdict};
use crate::tables::{PortFast, Tables};
use crate::wire::frame::Head;
use crate::wire::ipv4::protocol;

/// How many frames ahead [`process_burst`] touches the next frames' headers.
pub const LOOKAHEAD: usize = 4;

/// How many frames ahead [`process_burst`] prefetches the conntrack bucket
/// of a frame from the uplink that may meet the load balancer.
pub const FLOW_LOOKAHEAD: usize = 8;

/// Frames a burst from a task port in a network with services takes per
/// pass: the checks and conntrack prefetches of all of them first, then
/// the decisions (so a bucket is prefetched up to this many frames ahead).
pub const VIP_PASS: usize = 32;

/// Processes a burst of frames received on one port, as a worker does:
/// `verdicts[i]` is the verdict for `frames[i]`.
///
/// While frame `i` is processed, the first header bytes of frame
/// `i + LOOKAHEAD` are prefetched, so that its cache miss overlaps with the
/// work on the current frames (the software prefetch of VPP's node loops).
/// What the fast paths need of the input port is looked up once per burst,
/// and the last VNI looked up is remembered from frame to frame (the
/// tables do not change within a burst). Verdicts, bytes and counters are
/// exactly those of [`process`](super::process) frame by frame (tested, and fuzzed by
/// `pipeline_burst`). `verdicts` shorter than `frames` processes only that
/// many frames.
#[inline]
pub fn process_burst(
    frames: &mut [Frame<'_>],
    in_port: PortId,
    now: u64,
    t: &Tables,
    st: &mut WorkerState,
    verdicts: &mut [Verdict],
) {
    let n = frames.len().min(verdicts.len());
    let (frames, verdicts) = (&mut frames[..n], &mut verdicts[..n]);
    // Received frames are counted once per burst, not per frame.
    if usize::from(in_port) >= st.stats.ports.len() {
        verdicts.fill(Verdict::Drop(DropReason::UnknownPort));
        st.stats.drops[DropReason::UnknownPort as usize] += n as u64;
        return;
    }
    // The port's side is decided once per burst, not per frame. (Two
    // passes per burst, all checks first and then all lookups, as VPP's
    // multi-packet loops do, measured slower for switching, whose tables
    // are in cache; they pay for the balancer's connection table.)
    let bytes = if in_port == UPLINK {
        uplink_burst(frames, verdicts, now, t, st)
    } else {
        let cache = BurstCache::new(t, in_port);
        match cache.lb_port() {
            Some(pf) => vip_burst(frames, verdicts, in_port, pf, cache, now, t, st),
            None => task_burst(frames, verdicts, in_port, cache, now, t, st),
        }
    };
    if let Some(rx) = st.stats.ports.get_mut(usize::from(in_port)) {
        rx.rx_packets += n as u64;
        rx.rx_bytes += bytes;
    }
}

/// A burst from the uplink. Out of line, so that its loop gets the
/// registers to itself: inlined beside the task ports' loops, its
/// received-bytes sum was measured spilled to the stack (one more load and
/// store a frame, 4-6% slower decapsulation).
#[inline(never)]
fn uplink_burst(frames: &mut [Frame<'_>], verdicts: &mut [Verdict], now: u64, t: &Tables, st: &mut WorkerState) -> u64 {
    let mut cache = BurstCache::new(t, UPLINK);
    let flows = (!t.services.list.is_empty()).then_some(t.vxlan_port);
    burst_loop(frames, verdicts, st, flows, |f, lb, _| decide::<true>(f, UPLINK, now, t, &mut cache, lb))
}

/// A burst from a task port in a network without services.
#[inline(always)]
fn task_burst(
    frames: &mut [Frame<'_>],
    verdicts: &mut [Verdict],
    in_port: PortId,
    mut cache: BurstCache<'_>,
    now: u64,
    t: &Tables,
    st: &mut WorkerState,
) -> u64 {
    burst_loop(frames, verdicts, st, None, |f, lb, _| decide::<true>(f, in_port, now, t, &mut cache, lb))
}

/// A burst from a task port in a network with services (`pf`: the port's
/// facts): per [`VIP_PASS`] frames, a first pass of each frame's checks
/// and 5-tuple for the VIP fast path, its conntrack bucket prefetched;
/// then a second pass of the decisions.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn vip_burst(
    frames: &mut [Frame<'_>],
    verdicts: &mut [Verdict],
    in_port: PortId,
    pf: &PortFast,
    mut cache: BurstCache<'_>,
    now: u64,
    t: &Tables,
    st: &mut WorkerState,
) -> u64 {
    let mut bytes = 0;
    for (fs, vs) in frames.chunks_mut(VIP_PASS).zip(verdicts.chunks_mut(VIP_PASS)) {
        let mut pre = [None; VIP_PASS];
        for (i, p) in pre.iter_mut().enumerate().take(fs.len()) {
            if let Some(next) = fs.get(i + LOOKAHEAD) {
                touch(next);
            }
            *p = if fs[i].is_super() { None } else { lb::fast::vip_pre(&fs[i], pf, &st.lb.conntrack) };
            if let Some(p) = p.as_mut() {
                st.lb.conntrack.prefetch_probe(&p.probe);
                lb::fast::note_opening(p, pf, t);
            }
        }
        bytes += burst_loop(fs, vs, st, None, |f, lb, i| match &pre[i] {
            Some(p) => match lb::fast::vip_hit(f, p, pf, now, t, lb) {
                Some(next) => follow(f, next, now, t, lb),
                None => task::from_task(f, in_port, now, t, lb),
            },
            None => decide::<true>(f, in_port, now, t, &mut cache, lb),
        });
    }
    bytes
}

/// The loop of [`process_burst`] over frames and verdicts of the same
/// length: lookahead, decision, and transmit counters kept as a run of
/// consecutive frames to one port (a burst from one port mostly goes to
/// one port) and added to the port's counters when the run ends. Returns
/// the bytes received. With `flows` (the VXLAN port; for bursts that may
/// meet the load balancer), a frame's conntrack bucket is prefetched
/// `FLOW_LOOKAHEAD` frames ahead, its header `LOOKAHEAD` frames before
/// that (so the header is in cache when its 5-tuple is read).
#[inline(always)]
fn burst_loop(
    frames: &mut [Frame<'_>],
    verdicts: &mut [Verdict],
    st: &mut WorkerState,
    flows: Option<u16>,
    mut decide: impl FnMut(&mut Frame<'_>, &mut LbState, usize) -> Verdict,
) -> u64 {
    let ahead = if flows.is_some() { FLOW_LOOKAHEAD + LOOKAHEAD } else { LOOKAHEAD };
    for f in frames.iter().take(ahead) {
        touch(f);
    }
    if let Some(port) = flows {
        for f in frames.iter().take(FLOW_LOOKAHEAD) {
            prefetch_flow(f, port, &st.lb);
        }
    }
    let mut rx_bytes = 0u64;
    // The current run: its port (already checked against the counters;
    // NO_RUN before the first), frames and bytes.
    const NO_RUN: u32 = u32::MAX;
    let mut run = NO_RUN;
    let (mut run_packets, mut run_bytes) = (0u64, 0u64);
    for i in 0..frames.len().min(verdicts.len()) {
        if let Some(next) = frames.get(i + ahead) {
            touch(next);
        }
        if let Some(port) = flows
            && let Some(next) = frames.get(i + FLOW_LOOKAHEAD)
        {
            prefetch_flow(next, port, &st.lb);
        }
        let f = &mut frames[i];
        rx_bytes += f.len() as u64;
        let mut v = decide(f, &mut st.lb, i);
        match v {
            Verdict::Tx(p) if u32::from(p) == run => {
                run_packets += 1;
                run_bytes += f.len() as u64;
            }
            Verdict::Tx(p) => {
                flush_run(st, run, run_packets, run_bytes);
                if usize::from(p) < st.stats.ports.len() {
                    (run, run_packets, run_bytes) = (u32::from(p), 1, f.len() as u64);
                } else {
                    (run, run_packets, run_bytes) = (NO_RUN, 0, 0);
                    st.stats.drops[DropReason::UnknownPort as usize] += 1;
                    v = Verdict::Drop(DropReason::UnknownPort);
                }
            }
            Verdict::Drop(r) => st.stats.drops[r as usize] += 1,
            Verdict::Pass => st.stats.passed += 1,
        }
        verdicts[i] = v;
    }
    flush_run(st, run, run_packets, run_bytes);
    rx_bytes
}

#[inline(always)]
fn flush_run(st: &mut WorkerState, port: u32, packets: u64, bytes: u64) {
    if let Some(tx) = st.stats.ports.get_mut(port as usize) {
        tx.tx_packets += packets;
        tx.tx_bytes += bytes;
    }
}

/// Prefetches the first cache line of a frame into L1 (a hint: it never
/// faults and changes nothing observable).
#[inline(always)]
fn touch(f: &Frame<'_>) {
    f.touch();
}

/// Prefetches the conntrack bucket of the flow a frame most likely looks
/// up (a hint): the 5-tuple of an IPv4 TCP or UDP packet without options at
/// the frame's fixed offsets, or of the one inside it if it is VXLAN (a
/// reply from a task on another node). Frames of any other shape prefetch
/// nothing; a wrong guess costs a wasted prefetch, never a wrong verdict.
#[inline(always)]
fn prefetch_flow(f: &Frame<'_>, vxlan_port: u16, lb: &LbState) {
    let d = f.data();
    let key = |d: &[u8]| -> Option<FlowKey> {
        let h = Head::new(d)?;
        let ok = h.bytes()[12..15] == [0x08, 0x00, 0x45] && matches!(h.protocol(), protocol::TCP | protocol::UDP);
        ok.then(|| FlowKey::of(&h))
    };
    let Some(k) = key(d) else { return };
    // Inside VXLAN, mostly replies to a local client (found by their
    // destination); else a routing-mesh client's packet (by its source).
    let (k, by) = if k.proto == protocol::UDP && k.dport == vxlan_port {
        match d.get(crate::wire::vxlan::ENCAP_LEN..).and_then(key) {
            Some(inner) => (inner, Bucket::Dst),
            None => return,
        }
    } else {
        (k, Bucket::Src)
    };
    lb.conntrack.prefetch_probe(&lb.conntrack.probe_in(&k, by));
}
