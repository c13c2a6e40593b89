//! The per-packet decision: a frame in, a [`Verdict`] out.
//!
//! `process` is sans-IO: it reads the frame, the published [`Tables`] and
//! the worker's own state, may rewrite the frame in place (encapsulate into
//! headroom, decapsulate, turn a request into its reply), and says what to
//! do with it. It never allocates, never blocks and never panics on any
//! input; every drop has a [`DropReason`] and a counter.

use crate::overlay;
use crate::tables::{PortId, Tables};

/// Headroom a receive buffer should leave in front of a frame so that the
/// dataplane can encapsulate it in place (VXLAN needs 50 bytes).
pub const HEADROOM: usize = 256;

/// A frame in a buffer, with headroom in front of it: `buf[start..start + len]`.
#[derive(Debug)]
pub struct Frame<'a> {
    buf: &'a mut [u8],
    start: usize,
    len: usize,
}

impl<'a> Frame<'a> {
    /// Wraps `buf[start..start + len]`; `None` if that is out of bounds.
    #[inline]
    pub fn new(buf: &'a mut [u8], start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= buf.len()).then_some(Frame { buf, start, len })
    }
    /// An empty frame in no buffer: a placeholder for unused slots.
    #[inline]
    pub fn detached() -> Self {
        Frame { buf: Default::default(), start: 0, len: 0 }
    }
    /// The frame bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    /// The frame bytes, writable.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
    /// Offset of the frame in the buffer.
    #[inline]
    pub fn start(&self) -> usize {
        self.start
    }
    /// Frame length.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty frame.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes free in front of the frame.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }
    /// Bytes free in the buffer from the frame's start.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.start
    }
    /// The whole buffer, for in-place encapsulation.
    #[inline]
    pub(crate) fn buf_mut(&mut self) -> &mut [u8] {
        self.buf
    }
    /// The buffer, the frame's start and its length, at once.
    #[inline(always)]
    pub(crate) fn parts(&mut self) -> (&mut [u8], usize, usize) {
        (self.buf, self.start, self.len)
    }
    /// Moves the frame's window; the caller has checked the bounds.
    #[inline]
    pub(crate) fn set_window(&mut self, start: usize, len: usize) {
        debug_assert!(start + len <= self.buf.len());
        self.start = start;
        self.len = len;
    }
}

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (possibly rewritten) frame on this port.
    Tx(PortId),
    /// Drop it, for this reason.
    Drop(DropReason),
    /// Not the dataplane's (uplink traffic that is not overlay): hand it to
    /// the kernel.
    Pass,
}

macro_rules! drop_reasons {
    ($($(#[doc = $doc:literal])* $name:ident = $s:literal,)*) => {
        /// Why a frame was dropped. Each reason indexes a per-worker counter.
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $($(#[doc = $doc])* $name,)*
        }
        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();
            /// The reason's stable snake_case name (logs, metrics, `trace -v`).
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$name => $s,)* }
            }
        }
    };
}

drop_reasons! {
    /// The input port, or the port a verdict named, is not in the tables
    /// or beyond the ports the worker counts.
    UnknownPort = "unknown_port",
    /// Shorter than an Ethernet header, or a header (up to the transport
    /// header) that does not parse: nothing malformed is forwarded.
    Malformed = "malformed",
    /// A VLAN-tagged frame from a task port (tasks send untagged frames).
    VlanTagged = "vlan_tagged",
    /// A task sent from a MAC that is not the endpoint on its port.
    SrcMacSpoofed = "src_mac_spoofed",
    /// A task sent IPv4 from an address that is not its endpoint's.
    SrcIpSpoofed = "src_ip_spoofed",
    /// Broadcast or multicast other than an ARP request: no flooding.
    BroadcastNotFlooded = "broadcast_not_flooded",
    /// Unicast to a MAC not in the network's forwarding table.
    UnknownUnicast = "unknown_unicast",
    /// Unicast back to the port it came from.
    Hairpin = "hairpin",
    /// An ARP packet that is not Ethernet/IPv4 ARP.
    ArpMalformed = "arp_malformed",
    /// An ARP reply or other non-request from a task (answers come from state).
    ArpNotRequest = "arp_not_request",
    /// A gratuitous ARP or an ARP for the sender's own address.
    ArpGratuitous = "arp_gratuitous",
    /// An ARP request whose sender address is not the sending endpoint's.
    ArpSenderSpoofed = "arp_sender_spoofed",
    /// An ARP request for an address not in cluster state.
    ArpUnknownTarget = "arp_unknown_target",
    /// To the gateway MAC, but not something the gateway answers (routing
    /// beyond the network comes with the load balancer).
    NoRoute = "no_route",
    /// An IPv4 packet larger than the network MTU that is not answered with
    /// fragmentation-needed: no DF (the fast path does not fragment), or
    /// RFC 1122 forbids the ICMP error (ICMP error, later fragment, source
    /// not one host, destination a group).
    MtuExceeded = "mtu_exceeded",
    /// A non-IPv4 frame larger than the network MTU allows.
    Oversize = "oversize",
    /// Not enough headroom in the buffer to encapsulate.
    NoHeadroom = "no_headroom",
    /// VXLAN for us without the I flag.
    VxlanNoIFlag = "vxlan_no_i_flag",
    /// VXLAN for us that is truncated or has a bad length.
    VxlanMalformed = "vxlan_malformed",
    /// VXLAN for us whose outer IPv4 header checksum is wrong.
    VxlanBadChecksum = "vxlan_bad_checksum",
    /// A fragmented IPv4 datagram to our VXLAN address (never reassembled).
    VxlanFragment = "vxlan_fragment",
    /// VXLAN with a VNI no network has.
    UnknownVni = "unknown_vni",
    /// VXLAN from an outer source that is not a known VTEP (spoofed).
    UnknownVtep = "unknown_vtep",
    /// An inner frame whose headers do not parse.
    InnerMalformed = "inner_malformed",
    /// An inner frame with a VLAN tag (RFC 7348 section 6.1).
    InnerVlanTagged = "inner_vlan_tagged",
    /// An inner ARP packet whose sender is not what cluster state says
    /// (ARP is answered from state, never learned from the overlay).
    InnerArpSpoofed = "inner_arp_spoofed",
    /// An inner frame to a broadcast or multicast MAC (no flooding).
    InnerBroadcast = "inner_broadcast",
    /// An inner frame to a MAC that is not local in the frame's network
    /// (unknown, remote, or another network's).
    InnerDstNotLocal = "inner_dst_not_local",
    /// An inner frame whose source MAC is not an endpoint behind the VTEP
    /// that sent it.
    InnerSrcSpoofed = "inner_src_spoofed",
    /// To a service VIP whose backends all have weight 0 (or none), and
    /// the connection is not tracked.
    NoBackend = "no_backend",
    /// A routing-mesh connection in `nat` mode found no free source port
    /// on this node's address toward its backend.
    NatPortsExhausted = "nat_ports_exhausted",
    /// A frame to this node's own address in a network (the routing mesh's
    /// reply direction) that belongs to no tracked connection.
    NoConnection = "no_connection",
    /// To a service VIP, but the worker's balancer state was not sized for
    /// these tables (`WorkerState::sync` not called: an I/O layer bug).
    LbNotSynced = "lb_not_synced",
}

/// Packet and byte counters of one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames transmitted.
    pub tx_packets: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
}

/// A worker's counters. Sized when the worker starts; never grows.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Drops by [`DropReason`] (index = `reason as usize`).
    pub drops: [u64; DropReason::COUNT],
    /// Frames handed to the kernel.
    pub passed: u64,
    /// Per-port counters, by [`PortId`].
    pub ports: Vec<PortCounters>,
}

impl Stats {
    /// Drops for one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Everything a worker owns and writes.
#[derive(Debug, Clone)]
pub struct WorkerState {
    /// Counters.
    pub stats: Stats,
    /// The load balancer's connection table, scheduler state and counters.
    pub lb: crate::lb::LbState,
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
            lb: crate::lb::LbState::new(ct),
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
    let v = decide::<FAST>(frame, in_port, now, t, &mut overlay::fast::BurstCache::new(t, in_port), &mut st.lb);
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
    cache: &mut overlay::fast::BurstCache<'_>,
    lb: &mut crate::lb::LbState,
) -> Verdict {
    if in_port == crate::tables::UPLINK {
        if FAST && let Some(v) = overlay::fast::uplink_vxlan(frame, t, cache) {
            return v;
        }
        overlay::from_uplink(frame, now, t, lb)
    } else {
        if FAST && let Some(v) = overlay::fast::task_unicast(frame, in_port, t, cache) {
            return v;
        }
        if FAST && let Some(v) = overlay::fast::task_vip(frame, now, t, cache, lb) {
            return v;
        }
        overlay::from_task(frame, in_port, now, t, lb)
    }
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
/// exactly those of [`process`] frame by frame (tested, and fuzzed by
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
    let bytes = if in_port == crate::tables::UPLINK {
        let mut cache = overlay::fast::BurstCache::new(t, crate::tables::UPLINK);
        let flows = (!t.services.list.is_empty()).then_some(t.vxlan_port);
        burst_loop(frames, verdicts, st, flows, |f, lb, _| {
            decide::<true>(f, crate::tables::UPLINK, now, t, &mut cache, lb)
        })
    } else {
        let mut cache = overlay::fast::BurstCache::new(t, in_port);
        match cache.lb_port() {
            Some(pf) => {
                // A task in a network with services: first pass, each
                // frame's checks and 5-tuple for the VIP fast path, its
                // conntrack bucket prefetched; second pass, the decisions.
                let mut bytes = 0;
                for (fs, vs) in frames.chunks_mut(VIP_PASS).zip(verdicts.chunks_mut(VIP_PASS)) {
                    let mut pre = [None; VIP_PASS];
                    for (i, p) in pre.iter_mut().enumerate().take(fs.len()) {
                        if let Some(next) = fs.get(i + LOOKAHEAD) {
                            touch(next);
                        }
                        *p = overlay::fast::vip_pre(&fs[i], pf, &st.lb.conntrack);
                        if let Some(p) = p.as_mut() {
                            st.lb.conntrack.prefetch_probe(&p.probe);
                            overlay::fast::note_opening(p, pf, t);
                        }
                    }
                    bytes += burst_loop(fs, vs, st, None, |f, lb, i| match &pre[i] {
                        Some(p) => match overlay::fast::vip_hit(f, p, pf, now, t, lb) {
                            Some(v) => v,
                            None => overlay::from_task(f, in_port, now, t, lb),
                        },
                        None => decide::<true>(f, in_port, now, t, &mut cache, lb),
                    });
                }
                bytes
            }
            None => {
                burst_loop(frames, verdicts, st, None, |f, lb, _| decide::<true>(f, in_port, now, t, &mut cache, lb))
            }
        }
    };
    if let Some(rx) = st.stats.ports.get_mut(usize::from(in_port)) {
        rx.rx_packets += n as u64;
        rx.rx_bytes += bytes;
    }
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
    mut decide: impl FnMut(&mut Frame<'_>, &mut crate::lb::LbState, usize) -> Verdict,
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
    crate::wire::prefetch(f.buf.as_ptr().wrapping_add(f.start));
}

/// Prefetches the conntrack bucket of the flow a frame most likely looks
/// up (a hint): the 5-tuple of an IPv4 TCP or UDP packet without options at
/// the frame's fixed offsets, or of the one inside it if it is VXLAN (a
/// reply from a task on another node). Frames of any other shape prefetch
/// nothing; a wrong guess costs a wasted prefetch, never a wrong verdict.
#[inline(always)]
fn prefetch_flow(f: &Frame<'_>, vxlan_port: u16, lb: &crate::lb::LbState) {
    let d = f.data();
    let key = |h: &[u8]| -> Option<crate::lb::conntrack::FlowKey> {
        let h = h.first_chunk::<38>()?;
        (h[12] == 0x08 && h[13] == 0 && h[14] == 0x45 && matches!(h[23], 6 | 17)).then(|| {
            crate::lb::conntrack::FlowKey {
                src: u32::from_be_bytes([h[26], h[27], h[28], h[29]]),
                dst: u32::from_be_bytes([h[30], h[31], h[32], h[33]]),
                sport: u16::from_be_bytes([h[34], h[35]]),
                dport: u16::from_be_bytes([h[36], h[37]]),
                proto: h[23],
            }
        })
    };
    let Some(k) = key(d) else { return };
    use crate::lb::conntrack::Bucket;
    // Inside VXLAN, mostly replies to a local client (found by their
    // destination); else a routing-mesh client's packet (by its source).
    let (k, by) = if k.proto == 17 && k.dport == vxlan_port {
        match d.get(crate::wire::vxlan::ENCAP_LEN..).and_then(key) {
            Some(inner) => (inner, Bucket::Dst),
            None => return,
        }
    } else {
        (k, Bucket::Src)
    };
    lb.conntrack.prefetch_probe(&lb.conntrack.probe_in(&k, by));
}
