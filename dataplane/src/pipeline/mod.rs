//! The per-packet decision: a frame in, a [`Verdict`] out.
//!
//! `process` is sans-IO: it reads the frame, the published [`Tables`] and
//! the worker's own state, may rewrite the frame in place (encapsulate into
//! headroom, decapsulate, turn a request into its reply), and says what to
//! do with it. It never allocates, never blocks and never panics on any
//! input; every drop has a [`DropReason`] and a counter.

mod burst;
mod task;
mod uplink;

use crate::packet::{DropReason, Frame, PortCounters, Stats, UPLINK, Verdict};
pub use burst::{FLOW_LOOKAHEAD, LOOKAHEAD, VIP_PASS, process_burst};

use crate::lb::{LbState, Next};
use crate::overlay::fast::BurstCache;
use crate::overlay::{self, gateway};
use crate::tables::services::{MeshMode, Published};
use crate::tables::{Location, NetId, PortId, Tables};
use crate::wire::MacAddr;
use crate::wire::ethernet;
use crate::wire::frame::plain_ipv4;
use crate::wire::ipv4::protocol;
use core::net::Ipv4Addr;

/// Everything a worker owns and writes.
#[derive(Debug, Clone)]
pub struct WorkerState {
    /// Counters.
    pub stats: Stats,
    /// The load balancer's connection table, scheduler state and counters.
    pub lb: LbState,
}

/// Connection-table entries of [`WorkerState::new`] (small: for tools and
/// tests; workers size theirs with [`WorkerState::with_conntrack`]).
pub const DEFAULT_CONNTRACK: usize = 4096;

impl WorkerState {
    /// State for a worker serving up to `max_ports` ports (ports beyond it
    /// are counted as [`DropReason::UnknownPort`]), with a small connection
    /// table and no per-service state: call [`WorkerState::sync`] with the
    /// tables before balancing.
    pub fn new(max_ports: usize) -> Self {
        Self::with_conntrack(
            max_ports,
            crate::lb::conntrack::CtConfig { capacity: DEFAULT_CONNTRACK, ..Default::default() },
        )
    }

    /// [`WorkerState::new`] with a connection table of `ct`.
    pub fn with_conntrack(max_ports: usize, ct: crate::lb::conntrack::CtConfig) -> Self {
        WorkerState {
            stats: Stats { drops: [0; DropReason::COUNT], passed: 0, ports: vec![PortCounters::default(); max_ports] },
            lb: LbState::new(ct),
        }
    }

    /// State sized for `t`: its ports and services.
    pub fn for_tables(t: &Tables) -> Self {
        let mut st = Self::new(t.ports.len());
        st.sync(t);
        st
    }

    /// Sizes the per-service state for new tables (when the worker picks
    /// them up; never on the packet path).
    pub fn sync(&mut self, t: &Tables) {
        self.lb.sync(t);
    }
}

/// Decides what happens to `frame`, received on `in_port` at time `now`
/// (nanoseconds, read once per burst), and counts it.
#[inline(always)]
pub fn process(frame: &mut Frame<'_>, in_port: PortId, now: u64, t: &Tables, st: &mut WorkerState) -> Verdict {
    process_counted::<true>(frame, in_port, now, t, st)
}

/// [`process`] without the fast paths: every frame through the general
/// code. Same verdicts and bytes for every input (the `pipeline` fuzz
/// target checks that); for differential testing, not for workers.
pub fn process_general(frame: &mut Frame<'_>, in_port: PortId, now: u64, t: &Tables, st: &mut WorkerState) -> Verdict {
    process_counted::<false>(frame, in_port, now, t, st)
}

#[inline(always)]
fn process_counted<const FAST: bool>(
    frame: &mut Frame<'_>,
    in_port: PortId,
    now: u64,
    t: &Tables,
    st: &mut WorkerState,
) -> Verdict {
    if !count_rx(st, in_port, frame.len()) {
        return Verdict::Drop(DropReason::UnknownPort);
    }
    let v = decide::<FAST>(frame, in_port, now, t, &mut BurstCache::new(t, in_port), &mut st.lb);
    count(st, frame, v)
}

/// Counts a received frame; false (and a drop counted) for a port beyond
/// the worker's counters.
#[inline(always)]
fn count_rx(st: &mut WorkerState, in_port: PortId, len: usize) -> bool {
    match st.stats.ports.get_mut(usize::from(in_port)) {
        Some(rx) => {
            rx.rx_packets += 1;
            rx.rx_bytes += len as u64;
            true
        }
        None => {
            st.stats.drops[DropReason::UnknownPort as usize] += 1;
            false
        }
    }
}

#[inline(always)]
fn decide<const FAST: bool>(
    frame: &mut Frame<'_>,
    in_port: PortId,
    now: u64,
    t: &Tables,
    cache: &mut BurstCache<'_>,
    lb: &mut LbState,
) -> Verdict {
    if frame.is_super() {
        return super_frame(frame, in_port, now, t, cache, lb);
    }
    decide_plain::<FAST>(frame, in_port, now, t, cache, lb)
}

#[inline(always)]
fn decide_plain<const FAST: bool>(
    frame: &mut Frame<'_>,
    in_port: PortId,
    now: u64,
    t: &Tables,
    cache: &mut BurstCache<'_>,
    lb: &mut LbState,
) -> Verdict {
    if in_port == UPLINK {
        uplink::decide::<FAST>(frame, now, t, cache, lb)
    } else if t.host_port == Some(in_port) {
        from_host(frame, now, t, lb)
    } else {
        task::decide::<FAST>(frame, in_port, now, t, cache, lb)
    }
}

/// A frame from the host link (the node's kernel): the replies of tasks'
/// connections to the host (`lb::egress::from_host`), and the node's own
/// processes calling a published port (its nftables send 127.0.0.1:PUB
/// and its addresses' PUB to meshplane's end of the link): the routing
/// mesh with the kernel's end as the client, in `nat` mode, whose answer
/// goes back over the link (`lb::to_client`).
fn from_host(frame: &mut Frame<'_>, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    if let Some(h) = t.egress.as_ref().and_then(|e| e.host_link.as_ref())
        && let Some((ip, total)) = plain_ipv4(frame.data())
        && ip.dst_ip() == h.ip.octets()
        && ip.src_ip() == h.peer_ip.octets()
        && frame.data().get(crate::wire::frame::field::SRC_MAC) == Some(&h.peer_mac.0[..])
        && matches!(ip.protocol(), protocol::TCP | protocol::UDP)
        && let Some(pubd) = t.services.published(ip.dst_port(), ip.protocol())
    {
        frame.truncate(total + ethernet::HEADER_LEN);
        let pubd = Published { mode: MeshMode::Nat, ..pubd };
        let next = crate::lb::from_client(frame, pubd, now, t, lb);
        return follow(frame, next, now, t, lb);
    }
    crate::lb::egress::from_host(frame, now, t, lb)
}

/// A TCP super-frame ([`Frame::is_super`]): one decision for all its
/// segments, through the general path (no fast path takes it). Its TCP
/// checksum is partial: the field holds the pseudo-header's sum, which
/// covers the addresses but not the ports. The balancer's NAT updates a
/// complete checksum incrementally (RFC 1624: `C' = ~(~C + Δ)`), so the
/// field is complemented before it and back after it, and the ports'
/// share of Δ taken out again: the pseudo-header sum of the new
/// addresses, as the kernel's `inet_proto_csum_replace4` leaves a
/// partial checksum.
#[cold]
#[inline(never)]
fn super_frame(
    frame: &mut Frame<'_>,
    in_port: PortId,
    now: u64,
    t: &Tables,
    cache: &mut BurstCache<'_>,
    lb: &mut LbState,
) -> Verdict {
    let o = frame.offload();
    let (tcp, field) = (o.csum_at as usize, o.csum_at as usize + usize::from(o.csum_offset));
    let rd = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let buf = frame.buf_mut();
    if buf.len() < (tcp + 4).max(field + 2) {
        return Verdict::Drop(DropReason::Malformed);
    }
    let ports = [rd(buf, tcp), rd(buf, tcp + 2)];
    let partial = rd(buf, field);
    buf[field..field + 2].copy_from_slice(&(!partial).to_be_bytes());
    let v = decide_plain::<false>(frame, in_port, now, t, cache, lb);
    // A step that answered with a frame of its own made it plain.
    if frame.is_super() {
        let buf = frame.buf_mut();
        let mut acc = u32::from(!rd(buf, field));
        for (i, old) in ports.iter().enumerate() {
            acc += u32::from(!rd(buf, tcp + 2 * i)) + u32::from(*old);
        }
        buf[field..field + 2].copy_from_slice(&crate::wire::checksum::fold(acc).to_be_bytes());
    }
    v
}

/// Counts a verdict (a `Tx` to a port beyond the counters becomes a drop).
#[inline(always)]
fn count(st: &mut WorkerState, frame: &Frame<'_>, v: Verdict) -> Verdict {
    match v {
        Verdict::Tx(p) => match st.stats.ports.get_mut(usize::from(p)) {
            Some(tx) => {
                tx.tx_packets += 1;
                tx.tx_bytes += frame.len() as u64;
            }
            None => {
                st.stats.drops[DropReason::UnknownPort as usize] += 1;
                return Verdict::Drop(DropReason::UnknownPort);
            }
        },
        Verdict::Drop(r) => st.stats.drops[r as usize] += 1,
        Verdict::Pass => st.stats.passed += 1,
    }
    v
}

/// Carries out what the balancer decided: its verdict, or switching the
/// readdressed frame within its network.
#[inline(always)]
fn follow(frame: &mut Frame<'_>, next: Next, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    match next {
        Next::Done(v) => v,
        Next::Switch { net, dst } => switch(frame, net, dst, now, t, lb),
        Next::FragNeeded { mtu } => {
            // From the published address, back to the client's next hop.
            let from = gateway::Origin { ip: t.data_ip, mac: t.data_mac, broadcast: None };
            let v = gateway::frag_needed_from(frame, UPLINK, from, mtu, || lb.icmp_allow(now));
            if matches!(v, Verdict::Tx(_)) {
                lb.mesh.frag_needed += 1;
            }
            v
        }
        // Answered where the packet came in (`task::to_gateway`); never
        // reaches here.
        Next::TimeExceeded => Verdict::Drop(DropReason::TtlExceeded),
    }
}

/// Sends a frame of network `net` to the endpoint with MAC `dst`: to its
/// local port ([`deliver`]), or encapsulated to its node. The frame is an
/// untagged frame whose headers up to the transport header parse.
#[inline]
fn switch(frame: &mut Frame<'_>, net: NetId, dst: MacAddr, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    match overlay::locate(t, net, dst) {
        Some(Location::Local(p)) => deliver(frame, net, p, None, now, t, lb),
        Some(Location::Remote(i)) => overlay::encap_flow(frame, t, i),
        None => Verdict::Drop(DropReason::UnknownUnicast),
    }
}

/// Hands a frame to local port `p` of network `net` (`outer_src`: the VTEP
/// it came from over VXLAN, if it did); in a network with services, the
/// balancer sees it first (see `lb::on_delivery`: balanced replies get
/// their VIP back).
#[inline]
fn deliver(
    frame: &mut Frame<'_>,
    net: NetId,
    p: PortId,
    outer_src: Option<Ipv4Addr>,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Verdict {
    let has_services = t.networks.get(usize::from(net)).is_some_and(|n| n.has_services);
    if has_services && let Err(d) = crate::lb::on_delivery(frame, net, outer_src, now, t, lb) {
        return Verdict::Drop(d);
    }
    Verdict::Tx(p)
}
