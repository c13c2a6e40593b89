//! The L4 load balancer: consistent hashing, schedulers, connection
//! tracking, and the services built on them.
//!
//! Internal VIPs: a task's TCP/UDP packet to a service's VIP:port (which
//! proxy ARP resolves to the network gateway's MAC) is DNATed to a backend
//! chosen by the service's scheduler, at the client's own node
//! (distributed, as Swarm's IPVS does), and the connection is tracked in
//! both directions; the backend's replies are reversed (source back to the
//! VIP:port) when they are delivered to the client. The routing mesh:
//! published ports on the data-path address, in `nat` or
//! `preserve-source` mode (see ARCHITECTURE.md).

pub mod conntrack;
pub mod egress;
pub(crate) mod fast;
#[allow(unsafe_code)] // mmap/madvise of the connection table; each block has a SAFETY comment
mod hugemem;
pub mod sched;

use crate::packet::{DropReason, Frame, Verdict};
use crate::tables::services as service;
use crate::tables::{Location, NetId, Tables};
use crate::wire::frame::{Head, field};
use crate::wire::ipv4::protocol;
use crate::wire::rewrite::{Nat, rewrite_ipv4};
use crate::wire::{MacAddr, flow, tcp};
use conntrack::{Bucket, Conntrack, CtConfig, CtState, CtValue, FlowKey, Inserted};
use core::net::Ipv4Addr;
use sched::SchedState;

/// What happens to a frame after the balancer: the pipeline carries it out
/// (the balancer never calls the overlay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Decided: this verdict.
    Done(Verdict),
    /// Readdressed: switch it in network `net` to the endpoint with MAC
    /// `dst` (a local port, or VXLAN to its node).
    Switch {
        /// The network.
        net: NetId,
        /// The destination endpoint's MAC.
        dst: MacAddr,
    },
    /// A routing-mesh client's packet too large for the service's network,
    /// with DF: answer it with ICMP fragmentation-needed, next-hop MTU
    /// `mtu`, from the published address (the pipeline does, through the
    /// gateway's builder and [`LbState::icmp_allow`]).
    FragNeeded {
        /// What fits: the network MTU.
        mtu: u16,
    },
    /// An egress packet whose TTL ran out at the gateway: answer it with
    /// ICMP time-exceeded from the gateway (the pipeline does, back to
    /// the task's port).
    TimeExceeded,
}

impl Next {
    /// The next step a balancer step gave, or a drop for its error.
    #[inline(always)]
    fn of(r: Result<Next, DropReason>) -> Next {
        r.unwrap_or_else(|e| Next::Done(Verdict::Drop(e)))
    }
}

/// `CtValue::flags` bit: the entry is a reply direction (un-DNAT on
/// delivery to the client).
pub const CT_REPLY: u8 = 1;

/// Counters of one backend, per worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Packets balanced to it (client to backend).
    pub packets: u64,
    /// Bytes balanced to it.
    pub bytes: u64,
    /// Connections scheduled to it.
    pub new_conns: u64,
    /// Connections to it this worker tracks now (the `lc`/`wlc` load).
    pub active: u32,
    /// New connections it refused (a reset answering the SYN).
    pub refused: u64,
    /// Until when (ns) this worker schedules no new connection to it on
    /// `refused_port` (its port that refused), unless no other backend
    /// is left (see `refused`); 0: never.
    pub refused_until: u64,
    /// The backend port that refused.
    pub refused_port: u16,
}

/// How long a backend that refused a connection is passed over (or until
/// the tables change): the health check's business after that.
pub const REFUSED_HOLD: u64 = 10 * conntrack::SECOND;

impl BackendStats {
    /// Whether new connections to its port `port` pass it over at `now`.
    #[inline(always)]
    fn refusing(&self, port: u16, now: u64) -> bool {
        self.refused_until > now && self.refused_port == port
    }
}

/// Counters of one service, per worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets to the VIP.
    pub packets: u64,
    /// Bytes to the VIP.
    pub bytes: u64,
    /// New connections.
    pub new_conns: u64,
    /// Per backend, by index in the service.
    pub backends: Vec<BackendStats>,
}

/// A worker's load-balancer state: its connection table, the schedulers'
/// state and the counters, per service of the tables it was synced with.
#[derive(Debug, Clone)]
pub struct LbState {
    /// Connection table.
    pub conntrack: Conntrack,
    sched: Vec<SchedState>,
    /// Counters, by service index.
    pub services: Vec<ServiceStats>,
    /// `nat` source ports held, per client and backend address.
    nat: NatShares,
    /// The routing mesh's ICMP and MSS counters.
    pub mesh: MeshStats,
    /// The ICMP errors' token bucket.
    icmp: TokenBucket,
    /// Egress: counters and port shares.
    pub(crate) egress: egress::EgressState,
}

/// The routing mesh's ICMP and MSS counters, per worker (rate-limited
/// errors are the drop reason `icmp_rate_limited`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// ICMP fragmentation-needed sent to clients.
    pub frag_needed: u64,
    /// SYNs and SYN-ACKs whose MSS option was lowered to the network
    /// MTU − 40.
    pub mss_clamped: u64,
}

/// ICMP errors a worker sends per second at most: the kernel's
/// `net.ipv4.icmp_msgs_per_sec` default.
pub const ICMP_PER_SEC: u64 = 1000;
/// ICMP errors a worker may send at once after a quiet time: the kernel's
/// `net.ipv4.icmp_msgs_burst` default.
pub const ICMP_BURST: u32 = 50;

/// A token bucket: [`ICMP_BURST`] tokens, one more every
/// 1 s / [`ICMP_PER_SEC`].
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: u32,
    /// When the last token was added (ns).
    last: u64,
}

impl TokenBucket {
    const FULL: TokenBucket = TokenBucket { tokens: ICMP_BURST, last: 0 };
    /// The nanoseconds between two tokens.
    const EVERY: u64 = conntrack::SECOND / ICMP_PER_SEC;

    /// Takes a token at `now` (ns) if there is one.
    fn take(&mut self, now: u64) -> bool {
        let since = now.saturating_sub(self.last);
        let add = since / Self::EVERY;
        if add > 0 {
            self.tokens = u64::from(self.tokens).saturating_add(add).min(u64::from(ICMP_BURST)) as u32;
            self.last = now - since % Self::EVERY;
        }
        match self.tokens.checked_sub(1) {
            Some(t) => {
                self.tokens = t;
                true
            }
            None => false,
        }
    }
}

/// `nat` mode's source ports on this node's address: each backend address
/// has its own pool (a port is unique only together with the backend's
/// address and port, the reply's source), of which one client address
/// holds at most [`NAT_PORTS_PER_CLIENT`] at once, counted here per
/// (client, backend) address pair: in a fixed array indexed by a hash of
/// the pair, seeded with the connection table's random seed (pairs that
/// share a slot share its count; nobody outside can choose to share one).
#[derive(Debug, Clone)]
struct NatShares {
    held: Vec<u16>,
    seed: u64,
}

/// Slots of [`NatShares`] (a power of two).
const NAT_SHARE_SLOTS: usize = 1 << 14;

/// Ports of the `nat` pool: 1024-65535.
const NAT_POOL: u16 = 64512;

/// The most `nat` source ports one client address holds toward one backend
/// address at once: half the backend's pool, so that no client can take
/// all of it (a real client's own ephemeral range, 28 232 ports on Linux,
/// fits under it).
pub const NAT_PORTS_PER_CLIENT: u16 = NAT_POOL / 2;

impl NatShares {
    fn new(seed: u64) -> NatShares {
        NatShares { held: vec![0; NAT_SHARE_SLOTS], seed: seed ^ 0x6e61_7473_6861_7265 }
    }

    /// The slot of a client and backend address.
    #[inline(always)]
    fn slot(&self, client: u32, backend: u32) -> usize {
        flow::hash2(self.seed, (u64::from(client) << 32) | u64::from(backend), 0) as usize & (NAT_SHARE_SLOTS - 1)
    }

    /// Ports the client holds toward the backend (with the pairs that share
    /// its slot).
    fn held(&self, client: u32, backend: u32) -> u16 {
        self.held.get(self.slot(client, backend)).copied().unwrap_or(0)
    }

    /// One more (`true`) or one fewer held.
    fn count(&mut self, client: u32, backend: u32, more: bool) {
        let i = self.slot(client, backend);
        if let Some(n) = self.held.get_mut(i) {
            *n = if more { n.saturating_add(1) } else { n.saturating_sub(1) };
        }
    }
}

impl LbState {
    /// State with a connection table of `cfg`, for no services yet (see
    /// [`LbState::sync`]).
    pub fn new(cfg: CtConfig) -> Self {
        LbState {
            conntrack: Conntrack::new(cfg),
            sched: Vec::new(),
            services: Vec::new(),
            nat: NatShares::new(cfg.seed),
            mesh: MeshStats::default(),
            icmp: TokenBucket::FULL,
            egress: egress::EgressState::new(cfg.seed),
        }
    }

    /// Whether the routing mesh may send an ICMP error at `now` (ns): the
    /// worker's token bucket ([`ICMP_PER_SEC`], burst [`ICMP_BURST`]).
    pub(crate) fn icmp_allow(&mut self, now: u64) -> bool {
        self.icmp.take(now)
    }

    /// This worker's egress counters.
    pub fn egress_stats(&self) -> egress::EgressStats {
        self.egress.stats
    }

    /// The egress ports a task address holds toward a destination address
    /// on this worker (diagnostics, tests).
    pub fn egress_ports_held(&self, task: Ipv4Addr, dst: Ipv4Addr) -> u16 {
        self.egress.shares.held(u32::from(task), u32::from(dst))
    }

    /// The `nat` source ports a client address holds toward a backend
    /// address on this worker (diagnostics, tests).
    pub fn nat_ports_held(&self, client: Ipv4Addr, backend: Ipv4Addr) -> u16 {
        self.nat.held(u32::from(client), u32::from(backend))
    }

    /// Sizes the per-service state for `t` (when a worker starts or picks
    /// up new tables; never on the packet path). Counters of services that
    /// keep their index are kept.
    pub fn sync(&mut self, t: &Tables) {
        let list = &t.services.list;
        self.sched.resize(list.len(), SchedState::default());
        self.services.resize(list.len(), ServiceStats::default());
        for (s, st) in list.iter().zip(&mut self.services) {
            st.backends.resize(s.backends.len(), BackendStats::default());
            // The backends' indices may mean others now: forget refusals.
            for b in &mut st.backends {
                b.refused_until = 0;
            }
        }
    }

    /// Releases what a tracked connection's entry (key `k`, value `v`)
    /// held (its backend's load, its `nat` port).
    pub(crate) fn release(&mut self, k: &FlowKey, v: CtValue) {
        release(&mut self.services, &mut self.nat, &mut self.egress.shares, k, v);
    }

    /// The live entry of a probed key, refreshed (see
    /// `Conntrack::lookup_probe`); an expired one is freed and what it held
    /// released.
    #[inline(always)]
    pub(crate) fn lookup(&mut self, p: &conntrack::Probe, now: u64, flags: u8) -> Option<CtValue> {
        match self.conntrack.lookup_probe(p, now, flags) {
            Ok(v) => Some(v),
            Err(old) => {
                if let Some(old) = old {
                    self.release(&p.key(), old);
                }
                None
            }
        }
    }

    /// [`LbState::lookup`] of a balanced connection's forward entry, but
    /// a bare SYN on the tuple of a connection that is closing or closed
    /// (FIN or RST seen: a client reusing its port) starts a new
    /// connection, scheduled again, as IPVS's `conn_reuse_mode` 1 does:
    /// the old entry is dropped and `None` returned. Otherwise a client
    /// that cycles through its ports keeps landing on its old backends
    /// (one added since never gets its share).
    #[inline(always)]
    pub(crate) fn lookup_forward(&mut self, p: &conntrack::Probe, now: u64, flags: u8, t: &Tables) -> Option<CtValue> {
        if self.take_reused(p, now, flags, t).is_some() {
            return None;
        }
        self.lookup_open(p, now, flags, t)
    }

    /// [`LbState::lookup`] of a balanced connection's forward entry: a
    /// reset from the client closes the connection's reply entry too (one
    /// connection, one state, as in `nf_conntrack`). The backend does not
    /// answer a reset, so otherwise the reply entry stayed established for
    /// its 900 s, and in `nat` mode held the client's source port on this
    /// node as long: a client that ends its connections with a reset (an
    /// abortive close, as load testers and many health checkers do) at
    /// more than 36 a second to one backend ran out of its share of ports.
    #[inline(always)]
    fn lookup_open(&mut self, p: &conntrack::Probe, now: u64, flags: u8, t: &Tables) -> Option<CtValue> {
        let v = self.lookup(p, now, flags)?;
        if flags & conntrack::tcp_flags::RST != 0 {
            self.close_reply(&p.key(), &v, t, now);
        }
        Some(v)
    }

    /// For [`LbState::lookup_forward`]: a bare SYN on the tuple of a
    /// balanced connection that is closing or closed removes the
    /// connection, its forward entry and its reply entry (released); the
    /// forward entry's value is returned. Else nothing changes. The reply
    /// entry goes too: the new connection's may have the same key (the
    /// same backend again: always with `mh`), and in `nat` mode it holds
    /// the client's source port on this node, which the new connection
    /// takes again instead of holding a second one.
    #[inline(always)]
    fn take_reused(&mut self, p: &conntrack::Probe, now: u64, flags: u8, t: &Tables) -> Option<CtValue> {
        use conntrack::tcp_flags::{ACK, SYN};
        if flags & (SYN | ACK) != SYN {
            return None;
        }
        self.take_reused_syn(p, now, t)
    }

    /// [`LbState::take_reused`] of a bare SYN: out of the per-packet path
    /// (once a connection).
    #[inline(never)]
    fn take_reused_syn(&mut self, p: &conntrack::Probe, now: u64, t: &Tables) -> Option<CtValue> {
        // Balanced connections only (VIP and routing mesh): an egress
        // mapping keeps its port, whatever its state.
        let balanced_closing = |v: CtValue| {
            matches!(v.state, CtState::Fin | CtState::Close) && v.flags & (CT_EGRESS | CT_REPLY | CT_PS_RETURN) == 0
        };
        if !self.conntrack.peek_probe(p, now).is_some_and(balanced_closing) {
            return None;
        }
        let k = p.key();
        let old = self.conntrack.remove_probe(p)?;
        self.release(&k, old);
        if let Some(rp) = self.reply_probe(&k, &old, t, now)
            && let Some(r) = self.conntrack.remove_probe(&rp)
        {
            self.release(&rp.key(), r);
        }
        Some(old)
    }

    /// [`LbState::lookup`] of a reply-direction packet's entry
    /// (`Conntrack::lookup_reply_probe`): a reply confirms an unconfirmed
    /// connection, both its entries (the tables tell where its forward
    /// entry's packets went).
    #[inline(always)]
    fn lookup_reply(&mut self, p: &conntrack::Probe, now: u64, flags: u8, t: &Tables) -> Option<CtValue> {
        match self.conntrack.lookup_reply_probe(p, now, flags) {
            Ok((v, confirmed)) => {
                if confirmed && v.flags & CT_REPLY != 0 {
                    self.confirm_forward(&p.key(), &v, t, now);
                } else if flags & conntrack::tcp_flags::RST != 0 && v.flags & CT_REPLY != 0 {
                    self.close_forward(&p.key(), &v, t, now);
                }
                Some(v)
            }
            Err(old) => {
                if let Some(old) = old {
                    self.release(&p.key(), old);
                }
                None
            }
        }
    }

    /// Confirms the forward entry of the connection whose reply entry (key
    /// `k`, value `v`) a reply just confirmed, with the state the reply
    /// entry took.
    #[inline(never)] // once a connection
    fn confirm_forward(&mut self, k: &FlowKey, v: &CtValue, t: &Tables, now: u64) {
        if let Some(fp) = forward_probe(&self.conntrack, k, v, t, now) {
            self.conntrack.confirm_probe(&fp, v.state, now);
        }
    }

    /// Closes the forward entry of the connection whose reply entry (key
    /// `k`, value `v`) just saw a reset from the backend (or, for egress,
    /// the destination), if that entry is this connection's (its packets
    /// go to the reset's sender; not a newer connection of a reused tuple,
    /// scheduled elsewhere). Otherwise the forward entry stayed established
    /// while the reply entry closed: a client reusing its port (a reset
    /// leaves it no TIME_WAIT) kept the dead connection's backend instead
    /// of being scheduled again, and that backend's reset to the new SYN,
    /// met by a closed reply entry, reached the client past passive health.
    #[cold]
    #[inline(never)]
    fn close_forward(&mut self, k: &FlowKey, v: &CtValue, t: &Tables, now: u64) {
        let Some(fp) = forward_probe(&self.conntrack, k, v, t, now) else { return };
        let ours = |f: CtValue| {
            f.flags & CT_REPLY == 0
                && if v.flags & CT_EGRESS != 0 {
                    f.peer == k.dst && f.port2 == k.dport
                } else {
                    f.peer == k.src && f.port == k.sport
                }
        };
        if self.conntrack.peek_probe(&fp, now).is_some_and(ours) {
            self.conntrack.close_probe(&fp, now);
        }
    }

    /// Closes the reply entry of the balanced connection whose forward
    /// entry (key `k`, value `v`) just saw a reset from the client (see
    /// [`LbState::lookup_open`]).
    #[cold]
    #[inline(never)]
    fn close_reply(&mut self, k: &FlowKey, v: &CtValue, t: &Tables, now: u64) {
        if let Some(rp) = self.reply_probe(k, v, t, now) {
            self.conntrack.close_probe(&rp, now);
        }
    }

    /// The probe of the live reply entry of the balanced connection whose
    /// forward entry is `k` → `v`, if that entry is this connection's (its
    /// value leads back to the client, or to the VIP the client
    /// addressed): in `nat` mode from the backend to this node's address
    /// in the service's network on the connection's source port there;
    /// else from the backend to the client ([`partner`]).
    fn reply_probe(&self, k: &FlowKey, v: &CtValue, t: &Tables, now: u64) -> Option<conntrack::Probe> {
        if v.flags & (CT_REPLY | CT_EGRESS | CT_PS_RETURN) != 0 {
            return None;
        }
        let rp = if v.flags & CT_MESH_NAT != 0 {
            let s = t.services.list.get(v.service as usize)?;
            let node = t.networks.get(usize::from(s.net))?.node_ip?;
            let rk = FlowKey { src: v.peer, dst: u32::from(node), sport: v.port, dport: v.port2, proto: k.proto };
            self.conntrack.probe_in(&rk, Bucket::Tuple)
        } else {
            partner(&self.conntrack, k, v)?
        };
        let ours = |r: CtValue| {
            r.flags & CT_REPLY != 0
                && if v.flags & (CT_MESH_NAT | CT_MESH_PS) != 0 {
                    r.peer == k.src && r.port == k.sport
                } else {
                    r.peer == k.dst
                }
        };
        self.conntrack.peek_probe(&rp, now).is_some_and(ours).then_some(rp)
    }

    /// Inserts an entry for a probed key (through the flood guard, or not),
    /// releasing what an entry it displaces held, leaving the entry at index
    /// `keep` alone (see `Conntrack::insert_keeping`). A live entry it
    /// evicts takes the other half of its connection with it when that
    /// half shares its bucket, so that no connection is left tracked in one
    /// direction only. The new entry's index, or why it was not inserted:
    /// the flood guard refused it, or an unconfirmed entry found no room.
    #[inline(always)]
    fn insert_probe(
        &mut self,
        p: &conntrack::Probe,
        v: CtValue,
        now: u64,
        guarded: bool,
        keep: usize,
    ) -> Result<usize, DropReason> {
        let (r, old_key, at) = self.conntrack.insert_keeping(p, v, now, guarded, keep);
        match r {
            Inserted::Guarded => return Err(DropReason::NewConnRateLimited),
            Inserted::NoRoom => return Err(DropReason::UnconfirmedNoRoom),
            Inserted::Fresh(None) => {}
            // A replaced entry's connection is over (its key reused): what
            // it held goes, not its other half (which may be the new one).
            Inserted::Fresh(Some(old)) | Inserted::Replaced(old) => self.release(&old_key, old),
            Inserted::Evicted(old) => {
                self.release(&old_key, old);
                if let Some(pp) = partner(&self.conntrack, &old_key, &old)
                    && pp.key() != p.key()
                    && let Some(v) = self.conntrack.evict_probe(&pp, now)
                {
                    self.release(&pp.key(), v);
                }
            }
        }
        Ok(at)
    }

    /// Frees expired connections among the next `budget` entries (a
    /// worker calls this between bursts), releasing their backends.
    pub fn sweep(&mut self, now: u64, budget: usize) {
        let LbState { conntrack, services, nat, egress, .. } = self;
        conntrack.sweep(now, budget, |k, v| release(services, nat, &mut egress.shares, k, v));
    }
}

/// The probe of the other half of the connection whose entry (key `k`,
/// value `v`) an insert evicted, when that half shares its bucket: the
/// reply entry of a VIP or `preserve-source` forward entry (from the
/// backend, `v.peer`:`v.port`, to the client), or the forward entry of a
/// VIP reply entry (from the client to the VIP, `v.peer`:`v.port`).
/// `None` for the rest (`nat` connections keep their halves in two
/// buckets; a `preserve-source` reply's forward key holds this node's
/// data-path address, which the entry does not keep).
fn partner(ct: &Conntrack, k: &FlowKey, v: &CtValue) -> Option<conntrack::Probe> {
    if v.flags & CT_REPLY == 0 {
        if v.flags & (CT_MESH_NAT | CT_EGRESS) != 0 {
            return None;
        }
        let rk = FlowKey { src: v.peer, dst: k.src, sport: v.port, dport: k.sport, proto: k.proto };
        Some(ct.probe_in(&rk, Bucket::Dst))
    } else if v.flags & (CT_MESH_NAT | CT_MESH_PS | CT_PS_RETURN | CT_EGRESS) == 0 {
        let fk = FlowKey { src: k.dst, dst: v.peer, sport: k.dport, dport: v.port, proto: k.proto };
        Some(ct.probe_in(&fk, Bucket::Src))
    } else {
        None
    }
}

/// The probe of the forward entry of the connection whose reply entry is
/// `k` → `v`, where this node has one: an egress connection's (the task
/// to the destination); a routing-mesh connection's (the client to the
/// published address it connected to: the data-path address, one of
/// `mesh_addrs`, or for the node's own processes the host link's address,
/// the one whose entry is live); a VIP connection's (the client to the
/// VIP). `None` for a `preserve-source` return entry (the task's node has
/// no forward entry) or a routing-mesh one not found.
fn forward_probe(ct: &Conntrack, k: &FlowKey, v: &CtValue, t: &Tables, now: u64) -> Option<conntrack::Probe> {
    if v.flags & CT_PS_RETURN != 0 {
        None
    } else if v.flags & CT_EGRESS != 0 {
        Some(ct.probe_in(&egress::forward_key(k, v, t), Bucket::Src))
    } else if v.flags & (CT_MESH_NAT | CT_MESH_PS) != 0 {
        let to = |a: Ipv4Addr| {
            let fk = FlowKey { src: v.peer, dst: u32::from(a), sport: v.port, dport: v.port2, proto: k.proto };
            ct.probe_in(&fk, Bucket::Src)
        };
        let host = t.egress.as_ref().and_then(|e| e.host_link.as_ref()).map(|h| h.ip);
        if t.mesh_addrs.is_empty() && host.is_none() {
            return Some(to(t.data_ip));
        }
        core::iter::once(t.data_ip)
            .chain(t.mesh_addrs.iter().copied())
            .chain(host)
            .map(to)
            .find(|p| ct.peek_probe(p, now).is_some())
    } else {
        let fk = FlowKey { src: k.dst, dst: v.peer, sport: k.dport, dport: v.port, proto: k.proto };
        Some(ct.probe_in(&fk, Bucket::Src))
    }
}

/// Releases what a tracked connection's entry (key `k`, value `v`) held:
/// its backend's load (the forward entry holds it), its `nat` source port
/// (the reply entry of a `nat` connection, from the backend `k.src` to
/// this node, holds it for the client `v.peer`), its egress port (the
/// reply entry of an egress connection, from the destination `k.src`,
/// holds it for the task `v.peer`).
fn release(services: &mut [ServiceStats], nat: &mut NatShares, egress: &mut NatShares, k: &FlowKey, v: CtValue) {
    if v.flags & CT_EGRESS != 0 {
        if v.flags & CT_REPLY != 0 {
            egress.count(v.peer, k.src, false);
        }
    } else if v.flags & CT_REPLY == 0 {
        if let Some(b) = services.get_mut(v.service as usize).and_then(|s| s.backends.get_mut(v.backend as usize)) {
            b.active = b.active.saturating_sub(1);
        }
    } else if v.flags & CT_MESH_NAT != 0 {
        nat.count(v.peer, k.src, false);
    }
}

/// The schedulers' view of a service: weights from the tables, loads from
/// this worker's counters.
struct View<'a> {
    backends: &'a [service::Backend],
    stats: &'a [BackendStats],
    /// Pass over backends refusing this port now (`None`: take them too).
    avoid: Option<(u16, u64)>,
}

impl sched::Backends for View<'_> {
    fn count(&self) -> usize {
        self.backends.len()
    }
    fn weight(&self, i: usize) -> u32 {
        if let Some((port, now)) = self.avoid
            && self.stats.get(i).is_some_and(|b| b.refusing(port, now))
        {
            return 0;
        }
        self.backends.get(i).map_or(0, |b| b.weight)
    }
    fn active(&self, i: usize) -> u32 {
        self.stats.get(i).map_or(0, |b| b.active)
    }
}

/// The 5-tuple and TCP flags (0 for UDP) of a frame the balancer handles:
/// untagged IPv4 without options, not a fragment, carrying TCP or UDP
/// (`None` for anything else: the only frames balanced).
#[inline]
pub(crate) fn tuple(d: &[u8]) -> Option<(FlowKey, u8)> {
    let h = Head::new(d)?;
    if !h.is_plain_ipv4() || !matches!(h.protocol(), protocol::TCP | protocol::UDP) {
        return None;
    }
    let flags = if h.protocol() == protocol::TCP { *d.get(field::TCP_FLAGS)? } else { 0 };
    Some((FlowKey::of(&h), flags))
}

/// The index of a tracked connection's backend (`v.peer`) in the service
/// now: where the entry says, else (the tables changed: a backend added or
/// removed before it moves the others) wherever it is, found by address;
/// `None` if it is gone. A connection keeps its backend across table
/// changes, as IPVS keeps a connection when real servers are added.
#[inline(always)]
fn backend_of(s: &service::Service, v: &CtValue) -> Option<u32> {
    if s.backends.get(v.backend as usize).is_some_and(|b| u32::from(b.ip) == v.peer) {
        return Some(v.backend);
    }
    s.backends.iter().position(|b| u32::from(b.ip) == v.peer).and_then(|i| u32::try_from(i).ok())
}

/// A packet's connection identity: its 5-tuple, TCP flags and time.
struct Packet {
    key: FlowKey,
    flags: u8,
    now: u64,
}

/// The connection's backend: the tracked one if it is still in the
/// service (the entry remembers its address: indices change when tables
/// do), else a new choice by the service's scheduler, tracked in both
/// directions: `fwd` completes the forward entry and `rev` gives the key
/// and value of the reply entry, for the chosen backend. A connection
/// whose backend is gone is scheduled again at once, never blackholed: UDP
/// simply moves, and a TCP segment reaching a new backend mid-connection
/// is answered with a reset by that backend's stack.
///
/// `found` is what looking the key up (`LbState::lookup`) gave.
fn connection(
    lb: &mut LbState,
    s: &service::Service,
    svc: u32,
    p: &Packet,
    found: Option<CtValue>,
    fwd: impl FnOnce(&service::Backend, CtValue, &mut LbState) -> Result<CtValue, DropReason>,
    rev: impl FnOnce(&service::Backend, &CtValue) -> (FlowKey, CtValue),
) -> Result<(u32, CtValue), DropReason> {
    let (key, flags, now) = (&p.key, p.flags, p.now);
    match found {
        Some(v)
            if v.service == svc
                && v.flags & CT_REPLY == 0
                && let Some(b) = backend_of(s, &v) =>
        {
            return Ok((b, CtValue { backend: b, ..v }));
        }
        Some(stale) => {
            // Tracked, but its backend is gone (or the key is another
            // entry's): replace it rather than track the key twice.
            let p = lb.conntrack.probe_in(key, Bucket::Src);
            if lb.conntrack.remove_probe(&p).is_some() {
                lb.release(key, stale);
            }
        }
        None => {}
    }
    let (b, base) = schedule(lb, s, svc, key, flags, None, now)?;
    let be = &s.backends[b as usize];
    let f = fwd(be, base, lb)?;
    let fp = lb.conntrack.probe_in(key, Bucket::Src);
    let (rk, rv) = rev(be, &f);
    track(lb, svc, b, &fp, f, &rk, rv, now)?;
    Ok((b, f))
}

/// A new connection of `key` to service `svc`: the backend its scheduler
/// picks (or `chosen`, what [`stateless_choice`] gave for it) and the forward entry's value for it (before any mode adds NAT
/// state). The index is in range of `s.backends`.
#[inline(always)]
fn schedule(
    lb: &mut LbState,
    s: &service::Service,
    svc: u32,
    key: &FlowKey,
    flags: u8,
    chosen: Option<u32>,
    now: u64,
) -> Result<(u32, CtValue), DropReason> {
    let (Some(stats), Some(st)) = (lb.services.get(svc as usize), lb.sched.get_mut(svc as usize)) else {
        return Err(DropReason::LbNotSynced);
    };
    let port = backend_port(s, key);
    let refusing = |i: usize| stats.backends.get(i).is_some_and(|b| b.refusing(port, now));
    let b = match (chosen, s.scheduler) {
        // What `stateless_choice` gave for this key, already.
        (Some(b), _) if !refusing(b as usize) => Some(b as usize),
        // The Maglev table alone decides (what `sched::pick` does for
        // them, without the call): the one hash each reads.
        (_, sched::Scheduler::Mh | sched::Scheduler::Sh) => {
            stateless_choice(s, key).map(|(i, _)| if refusing(i) { maglev_avoiding(s, key, i, &refusing) } else { i })
        }
        _ => {
            let mut view = View { backends: &s.backends, stats: &stats.backends, avoid: Some((port, now)) };
            sched::pick(s.scheduler, &view, st, s.maglev.as_ref(), 0, 0).or_else(|| {
                // Every backend refusing: take them as they are.
                view.avoid = None;
                sched::pick(s.scheduler, &view, st, s.maglev.as_ref(), 0, 0)
            })
        }
    };
    let b = b.ok_or(DropReason::NoBackend)?;
    let be = s.backends.get(b).ok_or(DropReason::NoBackend)?;
    // A SYN opens; a segment of a connection the table does not know (lost
    // in a restart or an eviction, or spoofed) is picked up unconfirmed,
    // until the backend answers (see `conntrack`).
    let state = if key.proto == protocol::TCP { opening_state(flags) } else { CtState::Udp };
    let b = b as u32;
    Ok((b, CtValue { service: svc, backend: b, peer: u32::from(be.ip), port: be.port, state, ..CtValue::ZERO }))
}

/// The backend port a new connection of `key` to service `s` goes to: the
/// VIP's (`vip_target`), or for the routing mesh the target port (the same
/// for every backend of a service).
#[inline(always)]
fn backend_port(s: &service::Service, key: &FlowKey) -> u16 {
    match (s.vip, s.backends.first()) {
        (Some((ip, _)), Some(be)) if u32::from(ip) == key.dst => s.vip_target(be, key.dport),
        (_, Some(be)) => be.port,
        (_, None) => 0,
    }
}

/// Another backend than `first` for a Maglev service, by the table with
/// the key's hash moved on (up to 8 times), that is not refusing; `first`
/// if every one tried is.
#[cold]
fn maglev_avoiding(s: &service::Service, key: &FlowKey, first: usize, refusing: &dyn Fn(usize) -> bool) -> usize {
    let Some(m) = s.maglev.as_ref() else { return first };
    let h = if s.scheduler == sched::Scheduler::Sh { src_hash(key) } else { flow_hash(key) };
    (1..=8u32)
        .filter_map(|k| m.lookup(h.wrapping_add(k.wrapping_mul(0x9e37_79b9))).map(|i| i as usize))
        .find(|&i| !refusing(i))
        .unwrap_or(first)
}

/// Passive health: a backend's reset answering the SYN of a balanced
/// connection it never accepted (`key`, `flags`: the reset; `by`: the
/// reply entry's bucket) means it refuses connections on that port (its
/// server died, before its health check says so). The backend is passed
/// over by this worker for [`REFUSED_HOLD`] on that port, and if another
/// backend can take the connection, both entries are dropped and true
/// returned: the caller holds the reset back (`backend_refused`), so the
/// client's next SYN is a new connection, scheduled elsewhere, and the
/// client sees a retransmission, not an error. False (the reset goes on
/// as any reply) for anything else, or when every backend refuses.
#[inline(never)] // a refusal is rare
pub(crate) fn refused(lb: &mut LbState, key: &FlowKey, by: Bucket, flags: u8, now: u64, t: &Tables) -> bool {
    use conntrack::tcp_flags::RST;
    if flags & RST == 0 || key.proto != protocol::TCP {
        return false;
    }
    let p = lb.conntrack.probe_in(key, by);
    let Some(v) = lb.conntrack.peek_probe(&p, now) else { return false };
    if v.flags & CT_REPLY == 0 || v.flags & (CT_EGRESS | CT_PS_RETURN) != 0 || v.state != CtState::SynRecv {
        return false;
    }
    let Some(s) = t.services.list.get(v.service as usize) else { return false };
    // The backend is the reset's sender, found by address (the entry's
    // index may be another backend's since the tables changed).
    let Some(bi) = s.backends.iter().position(|b| u32::from(b.ip) == key.src) else { return false };
    let Some(stats) = lb.services.get_mut(v.service as usize) else { return false };
    if let Some(b) = stats.backends.get_mut(bi) {
        b.refused += 1;
        b.refused_until = now + REFUSED_HOLD;
        b.refused_port = key.sport;
    }
    let others =
        s.backends.iter().enumerate().any(|(i, b)| {
            i != bi && b.weight > 0 && !stats.backends.get(i).is_some_and(|x| x.refusing(key.sport, now))
        });
    if !others {
        return false;
    }
    // Both entries go: the forward one first (found from the reply's).
    if let Some(fp) = forward_probe(&lb.conntrack, key, &v, t, now)
        && let Some(f) = lb.conntrack.remove_probe(&fp)
    {
        lb.release(&fp.key(), f);
    }
    if let Some(r) = lb.conntrack.remove_probe(&p) {
        lb.release(key, r);
    }
    true
}

/// The state of a new TCP connection's entries, from its first segment's
/// flags: a SYN (without ACK) opens it; anything else is picked up
/// unconfirmed.
#[inline(always)]
fn opening_state(flags: u8) -> CtState {
    use conntrack::tcp_flags::{ACK, RST, SYN};
    if flags & (SYN | ACK | RST) == SYN { CtState::SynRecv } else { CtState::Unconfirmed }
}

/// Tracks a new connection to backend `b` of service `svc`: the forward
/// entry `f` under the probed key `fp` through the flood guard, and only
/// if it is admitted the reply entry `rk` → `rv` (a connection is tracked
/// in both directions or not at all), the backend's load and the new
/// connection. A connection not tracked is not balanced either: the
/// caller drops its packet (why: the guard, or no room for an
/// unconfirmed connection).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn track(
    lb: &mut LbState,
    svc: u32,
    b: u32,
    fp: &conntrack::Probe,
    f: CtValue,
    rk: &FlowKey,
    rv: CtValue,
    now: u64,
) -> Result<(), DropReason> {
    let rp = lb.conntrack.probe_in(rk, reply_bucket(rv.flags));
    track_probed(lb, svc, b, fp, f, &rp, rv, now)
}

/// [`track`] of a probed reply key.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn track_probed(
    lb: &mut LbState,
    svc: u32,
    b: u32,
    fp: &conntrack::Probe,
    f: CtValue,
    rp: &conntrack::Probe,
    rv: CtValue,
    now: u64,
) -> Result<(), DropReason> {
    let at = lb.insert_probe(fp, f, now, true, usize::MAX)?;
    // The reply may go in the same bucket: it must not evict the forward
    // entry just made.
    if let Err(e) = lb.insert_probe(rp, rv, now, false, at) {
        // (Only an unconfirmed reply entry finds no room.) Both
        // directions or neither. Nothing was counted for the forward
        // entry yet (its backend's load is counted below): nothing to
        // release.
        lb.conntrack.remove_probe(fp);
        return Err(e);
    }
    if rv.flags & CT_MESH_NAT != 0 {
        lb.nat.count(rv.peer, rp.key().src, true);
    }
    if let Some(x) = lb.services.get_mut(svc as usize) {
        x.new_conns += 1;
        if let Some(bs) = x.backends.get_mut(b as usize) {
            bs.new_conns += 1;
            bs.active += 1;
        }
    }
    Ok(())
}

/// The hash `mh` reads for a new connection of `key`: of the 5-tuple.
#[inline(always)]
fn flow_hash(key: &FlowKey) -> u32 {
    flow::hash2(
        flow::DEFAULT_SEED,
        (u64::from(key.src) << 32) | u64::from(key.dst),
        (u64::from(key.sport) << 24) | (u64::from(key.dport) << 8) | u64::from(key.proto),
    )
}

/// The source-address hash `sh` reads.
#[inline(always)]
fn src_hash(key: &FlowKey) -> u32 {
    flow::hash2(flow::DEFAULT_SEED, u64::from(key.src), 0)
}

/// The backend a new connection of `key` to service `s` would get if its
/// scheduler needs no state (`mh`, `sh`: the Maglev table alone decides),
/// else `None`: its index and the backend. What `sched::pick` answers for
/// these schedulers, without the call: new connections use it, and the
/// burst loop's first pass, to note the choice while the bucket prefetches
/// are in flight (`fast::note_opening`).
#[inline(always)]
pub(crate) fn stateless_choice<'s>(s: &'s service::Service, key: &FlowKey) -> Option<(usize, &'s service::Backend)> {
    let m = s.maglev.as_ref()?;
    let i = match s.scheduler {
        sched::Scheduler::Mh => m.lookup(flow_hash(key))?,
        sched::Scheduler::Sh => m.lookup(src_hash(key))?,
        _ => return None,
    } as usize;
    Some((i, s.backends.get(i)?))
}

/// Counts a packet balanced to backend `b` of service `svc`.
#[inline(always)]
pub(crate) fn count(lb: &mut LbState, svc: u32, b: u32, len: usize) {
    if let Some(x) = lb.services.get_mut(svc as usize) {
        x.packets += 1;
        x.bytes += len as u64;
        if let Some(bs) = x.backends.get_mut(b as usize) {
            bs.packets += 1;
            bs.bytes += len as u64;
        }
    }
}

/// Rewrites the IPv4 packet of an Ethernet frame and its MACs (the source
/// MAC only if `src_mac` is given).
fn readdress(frame: &mut Frame<'_>, nat: &Nat, dst_mac: [u8; 6], src_mac: Option<[u8; 6]>) -> Result<(), DropReason> {
    let d = frame.data_mut();
    let ip = d.get_mut(field::VER_IHL..).ok_or(DropReason::Malformed)?;
    rewrite_ipv4(ip, nat).map_err(|_| DropReason::Malformed)?;
    d[field::DST_MAC].copy_from_slice(&dst_mac);
    if let Some(m) = src_mac {
        d[field::SRC_MAC].copy_from_slice(&m);
    }
    Ok(())
}

fn verdict(r: Result<Verdict, DropReason>) -> Verdict {
    r.unwrap_or_else(Verdict::Drop)
}

/// A task's packet to the VIP of service `svc` (an untagged IPv4 TCP/UDP
/// frame without options, to the gateway MAC, already validated and
/// checked against its source): picks or recalls the backend, DNATs to it,
/// readdresses the frame from the gateway to the backend's MAC, and sends
/// it on (a local port, or VXLAN to the backend's node).
pub(crate) fn to_vip(frame: &mut Frame<'_>, net: NetId, svc: u32, now: u64, t: &Tables, lb: &mut LbState) -> Next {
    Next::of(vip_inner(frame, net, svc, now, t, lb))
}

fn vip_inner(
    frame: &mut Frame<'_>,
    net: NetId,
    svc: u32,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Result<Next, DropReason> {
    let s = t.services.list.get(svc as usize).ok_or(DropReason::NoBackend)?;
    let (key, flags) = tuple(frame.data()).ok_or(DropReason::Malformed)?;
    let found = lb.lookup_forward(&lb.conntrack.probe_in(&key, Bucket::Src), now, flags, t);
    let b = vip_connection(lb, s, svc, &key, flags, now, found)?;
    Ok(vip_tail(frame, net, s, svc, b, now, t, lb))
}

/// The backend of a task's connection `key` to the VIP of service `svc`
/// (`s`), given what looking it up gave (`found`): see `connection`. The
/// reply entry maps the backend's replies back to the VIP:port.
#[inline(never)] // a new connection costs far more than a call
pub(crate) fn vip_connection(
    lb: &mut LbState,
    s: &service::Service,
    svc: u32,
    key: &FlowKey,
    flags: u8,
    now: u64,
    found: Option<CtValue>,
) -> Result<u32, DropReason> {
    let vip = s.vip.ok_or(DropReason::NoRoute)?;
    if found.is_some() {
        let p = Packet { key: *key, flags, now };
        let fwd =
            |be: &service::Backend, f: CtValue, _: &mut LbState| Ok(CtValue { port: s.vip_target(be, key.dport), ..f });
        return connection(lb, s, svc, &p, found, fwd, |_, f| vip_reply(vip, key, f)).map(|(b, _)| b);
    }
    open_vip(lb, s, svc, key, flags, now, None, None)
}

/// The reply entry of a VIP connection of `key` to `vip` whose forward
/// entry is `f` (its backend's address and port): its key (from the
/// backend to the client) and value (the VIP:port the replies' source
/// becomes).
#[inline(always)]
fn vip_reply(vip: (Ipv4Addr, u16), key: &FlowKey, f: &CtValue) -> (FlowKey, CtValue) {
    let rk = FlowKey { src: f.peer, dst: key.src, sport: f.port, dport: key.sport, proto: key.proto };
    (rk, vip_reply_value(vip, key, f))
}

/// The reply entry's value of a VIP connection of `key` to `vip` whose
/// forward entry is `f` (an every-port VIP answers from the port asked).
#[inline(always)]
fn vip_reply_value(vip: (Ipv4Addr, u16), key: &FlowKey, f: &CtValue) -> CtValue {
    let port = if vip.1 == 0 { key.dport } else { vip.1 };
    CtValue { peer: u32::from(vip.0), port, flags: CT_REPLY, ..*f }
}

/// [`vip_connection`] of a key with nothing tracked (the common case, and
/// the fast path's): what `connection` does then, without its generality.
/// The fast path hands over what it already knows: the key's probe, and
/// for a stateless scheduler the backend [`stateless_choice`] gave (the
/// same answer, computed once).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn open_vip(
    lb: &mut LbState,
    s: &service::Service,
    svc: u32,
    key: &FlowKey,
    flags: u8,
    now: u64,
    probe: Option<conntrack::Probe>,
    chosen: Option<u32>,
) -> Result<u32, DropReason> {
    let vip = s.vip.ok_or(DropReason::NoRoute)?;
    let fp = probe.unwrap_or_else(|| lb.conntrack.probe_in(key, Bucket::Src));
    let (b, f) = schedule(lb, s, svc, key, flags, chosen, now)?;
    let f = match s.backends.get(b as usize) {
        Some(be) => CtValue { port: s.vip_target(be, key.dport), ..f },
        None => f,
    };
    // The reply (from the backend to the client) goes in the forward
    // entry's bucket: the same probe but for the key, no hash.
    let rp = fp.reply_from(f.peer, f.port);
    track_probed(lb, svc, b, &fp, f, &rp, vip_reply_value(vip, key, &f), now)?;
    Ok(b)
}

/// A task's packet to a VIP, its backend `b` chosen: counted, DNATed,
/// readdressed to the backend's MAC (from the client's own), to be
/// switched on (a local port, or VXLAN to the backend's node). A task
/// that is itself the backend chosen (hairpin) gets its packet from the
/// gateway (`egress::hairpin`), or its answer would never come back
/// through the balancer.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // the general tail: kept out of the fast path's loop
pub(crate) fn vip_tail(
    frame: &mut Frame<'_>,
    net: NetId,
    s: &service::Service,
    svc: u32,
    b: u32,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Next {
    let Some(be) = s.backends.get(b as usize) else { return Next::Done(Verdict::Drop(DropReason::NoBackend)) };
    count(lb, svc, b, frame.len());
    if frame.data().get(field::SRC_IP) == Some(&be.ip.octets()[..]) {
        return egress::hairpin(frame, net, be, s.vip_target_is_port(), now, t, lb);
    }
    // An every-port VIP keeps the port.
    let dst_port = (!matches!(s.vip, Some((_, 0)))).then_some(be.port);
    let nat = Nat { src_addr: None, dst_addr: Some(be.ip), src_port: None, dst_port };
    // The source MAC stays the client's: the frame crosses the overlay as
    // the client's own (as with Swarm's IPVS in the client's namespace),
    // which is what the backend's node accepts from the client's VTEP.
    if let Err(e) = readdress(frame, &nat, be.mac.0, None) {
        return Next::Done(Verdict::Drop(e));
    }
    Next::Switch { net, dst: be.mac }
}

// A connection entry keeps five bits of flags.
const _: () = assert!((CT_REPLY | CT_MESH_NAT | CT_MESH_PS | CT_PS_RETURN | CT_EGRESS) & !conntrack::FLAG_MASK == 0);

/// `CtValue::flags`: a routing-mesh connection in `nat` mode.
pub const CT_MESH_NAT: u8 = 2;
/// `CtValue::flags`: a routing-mesh connection in `preserve-source` mode.
pub const CT_MESH_PS: u8 = 4;
/// `CtValue::flags`, at a task's node: a `preserve-source` connection that
/// came in through another node; replies go back through it (`peer` is
/// that node's VTEP, `mac` its MAC in the network).
pub const CT_PS_RETURN: u8 = 8;
/// `CtValue::flags`: a task's connection out of the cluster (egress,
/// source-NATed to the node's egress address or its host link).
pub const CT_EGRESS: u8 = 16;

/// A client's packet from the uplink to this node's data-path address and
/// the published port of service `pubd.service` (an untagged IPv4 TCP/UDP
/// frame without options, the whole frame): the routing mesh. Picks or
/// recalls the backend; DNATs to it, and in `nat` mode SNATs to this
/// node's address in the service's network; readdresses it from this
/// node's MAC in the network, to be switched there.
pub(crate) fn from_client(
    frame: &mut Frame<'_>,
    pubd: service::Published,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Next {
    Next::of(client_inner(frame, pubd, now, t, lb))
}

fn client_inner(
    frame: &mut Frame<'_>,
    pubd: service::Published,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Result<Next, DropReason> {
    use DropReason as D;
    let svc = pubd.service;
    let s = t.services.list.get(svc as usize).ok_or(D::NoBackend)?;
    let nw = &t.networks[usize::from(s.net)];
    let (Some(node_ip), Some(node_mac)) = (nw.node_ip, nw.node_mac) else { return Err(D::NoRoute) };
    let d = frame.data();
    let h = Head::new(d).ok_or(D::Malformed)?;
    let total = if frame.is_super() { frame.wire_len().saturating_sub(14) } else { h.total_len() };
    if total > usize::from(nw.mtu) {
        // Answered from the published address if DF is set (the pipeline
        // builds it); without DF dropped (the balancer does not fragment).
        return if h.dont_frag() { Ok(Next::FragNeeded { mtu: nw.mtu }) } else { Err(D::MtuExceeded) };
    }
    let (key, flags) = tuple(d).ok_or(D::Malformed)?;
    let client_mac = h.src_mac().0;
    let pport = key.dport;
    let nat_mode = pubd.mode == service::MeshMode::Nat;
    let node = u32::from(node_ip);
    // In nat mode the reply comes back to node_ip:snat; the client's
    // own source port is kept unless another connection to the same
    // backend holds it, else one of a few others derived from it.
    let probe = lb.conntrack.probe_in(&key, Bucket::Src);
    // A client reusing its port: the old connection goes, both entries
    // (in nat mode its reply entry holds the port, which the new one
    // takes again).
    let found = lb.lookup_forward(&probe, now, flags, t);
    let (b, f) = connection(
        lb,
        s,
        svc,
        &Packet { key, flags, now },
        found,
        |be, f, lb| {
            let port = if nat_mode { nat_port(lb, &key, be, node, t.data_ip, now)? } else { key.sport };
            let flags = if nat_mode { CT_MESH_NAT } else { CT_MESH_PS };
            Ok(CtValue { port2: port, mac: client_mac, flags, ..f })
        },
        |be, f| {
            let (dst, dport) = if nat_mode { (node, f.port2) } else { (key.src, key.sport) };
            let rk = FlowKey { src: u32::from(be.ip), dst, sport: be.port, dport, proto: key.proto };
            let flags = CT_REPLY | if nat_mode { CT_MESH_NAT } else { CT_MESH_PS };
            (rk, CtValue { peer: key.src, port: key.sport, port2: pport, mac: client_mac, flags, ..*f })
        },
    )?;
    count(lb, svc, b, frame.len());
    let be = &s.backends[b as usize];
    let nat = Nat {
        src_addr: nat_mode.then_some(node_ip),
        dst_addr: Some(be.ip),
        src_port: nat_mode.then_some(f.port2),
        dst_port: Some(be.port),
    };
    readdress(frame, &nat, be.mac.0, Some(node_mac.0))?;
    clamp_syn(frame, flags, nw.mtu, &mut lb.mesh);
    Ok(Next::Switch { net: s.net, dst: be.mac })
}

/// Lowers the MSS a routing-mesh SYN or SYN-ACK (TCP `flags`, of the
/// frame: untagged IPv4 without options) announces to what fits network
/// MTU `mtu` (`mtu` − 40, as `iptables -j TCPMSS --clamp-mss-to-pmtu`),
/// counted. A SYN without the option is left as it is (see
/// `wire::tcp::clamp_mss`). A super-frame is never a SYN.
#[inline(always)]
fn clamp_syn(frame: &mut Frame<'_>, flags: u8, mtu: u16, mesh: &mut MeshStats) {
    if flags & conntrack::tcp_flags::SYN == 0 || frame.is_super() {
        return;
    }
    let d = frame.data_mut();
    if d.get(field::PROTOCOL) == Some(&protocol::TCP)
        && let Some(seg) = d.get_mut(field::L4..)
        && tcp::clamp_mss(seg, mtu.saturating_sub(40)).is_some()
    {
        mesh.mss_clamped += 1;
    }
}

/// Candidate `nat` source ports a connection tries: its client's own port
/// first, then ports derived from it.
const NAT_TRIES: u32 = 16;

/// A source port on this node's address `node` (in the service's network)
/// for a new `nat` connection of `key` to backend `be`, from the backend's
/// pool (see [`NatShares`]): the client's own port if it is free toward
/// this backend, else the first free of a few derived from it; if none is
/// free, one held by a connection no reply has confirmed (an unconfirmed
/// pickup, perhaps spoofed), which gives way, both its entries
/// (`data_ip`: the published address, its forward entry's destination).
/// Refused (counted drops) when the client already holds its share, or
/// every candidate is held by a confirmed connection.
fn nat_port(
    lb: &mut LbState,
    key: &FlowKey,
    be: &service::Backend,
    node: u32,
    data_ip: Ipv4Addr,
    now: u64,
) -> Result<u16, DropReason> {
    let backend = u32::from(be.ip);
    if lb.nat.held(key.src, backend) >= NAT_PORTS_PER_CLIENT {
        return Err(DropReason::NatClientLimit);
    }
    let probe = |ct: &Conntrack, p: u16| {
        let rk = FlowKey { src: backend, dst: node, sport: be.port, dport: p, proto: key.proto };
        ct.probe_in(&rk, Bucket::Tuple)
    };
    let derived = (0..NAT_TRIES).map(|i| 1024 + ((u32::from(key.sport) + i * 7919) % u32::from(NAT_POOL)) as u16);
    let mut unconfirmed = None;
    for port in core::iter::once(key.sport).chain(derived) {
        let rp = probe(&lb.conntrack, port);
        match lb.conntrack.peek_probe(&rp, now) {
            None => return Ok(port),
            Some(v) if v.state == CtState::Unconfirmed && unconfirmed.is_none() => unconfirmed = Some((port, rp)),
            Some(_) => {}
        }
    }
    let (port, rp) = unconfirmed.ok_or(DropReason::NatPortsExhausted)?;
    if let Some(v) = lb.conntrack.evict_probe(&rp, now) {
        lb.release(&rp.key(), v);
        let fk = FlowKey { src: v.peer, dst: u32::from(data_ip), sport: v.port, dport: v.port2, proto: key.proto };
        let fp = lb.conntrack.probe_in(&fk, Bucket::Src);
        if lb.conntrack.peek_probe(&fp, now).is_some_and(|f| f.flags & CT_MESH_NAT != 0 && f.port2 == port)
            && let Some(f) = lb.conntrack.evict_probe(&fp, now)
        {
            lb.release(&fk, f);
        }
    }
    Ok(port)
}

/// A frame of network `net` to this node's own MAC there: the reply
/// direction of a routing-mesh connection (in `nat` mode to this node's
/// address; in `preserve-source` mode returned by the task's node). The
/// client's connection is restored (source: this node's data-path address
/// and the published port) and the frame goes out of the uplink to the
/// client's next hop.
pub(crate) fn to_node(frame: &mut Frame<'_>, net: NetId, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    let Some((key, flags)) = tuple(frame.data()) else {
        return Verdict::Drop(DropReason::NoConnection);
    };
    // A `nat` reply is to this node's own address (its entry hashed by the
    // whole tuple); a `preserve-source` one to the client.
    let node_ip = t.networks.get(usize::from(net)).and_then(|n| n.node_ip);
    let by = if node_ip == Some(Ipv4Addr::from(key.dst)) { Bucket::Tuple } else { Bucket::Dst };
    if refused(lb, &key, by, flags, now, t) {
        return Verdict::Drop(DropReason::BackendRefused);
    }
    match reply_entry(lb, &key, by, flags, now, t) {
        Some(v) if v.flags & (CT_MESH_NAT | CT_MESH_PS) != 0 => {
            let mtu = t.networks.get(usize::from(net)).map_or(0, |n| n.mtu);
            verdict(to_client(frame, &v, flags, mtu, now, t, lb))
        }
        _ => Verdict::Drop(DropReason::NoConnection),
    }
}

/// The tracked reply entry of `key` (in the bucket `by` chooses), if any;
/// a reply confirms an unconfirmed connection (`LbState::lookup_reply`).
#[inline(always)]
fn reply_entry(lb: &mut LbState, key: &FlowKey, by: Bucket, flags: u8, now: u64, t: &Tables) -> Option<CtValue> {
    lb.lookup_reply(&lb.conntrack.probe_in(key, by), now, flags, t).filter(|v| v.flags & CT_REPLY != 0)
}

/// The bucket of a reply entry with `flags`: a connection's reply shares
/// its forward entry's bucket ([`Bucket::Dst`]) but for a source-NAT one,
/// whose replies all go to this node's address ([`Bucket::Tuple`]).
#[inline(always)]
fn reply_bucket(flags: u8) -> Bucket {
    if flags & CT_MESH_NAT != 0 { Bucket::Tuple } else { Bucket::Dst }
}

/// Readdresses a routing-mesh reply to the client (`v` is its reply entry)
/// and sends it out of the uplink; a SYN-ACK's MSS is clamped to network
/// MTU `mtu` (TCP `flags`).
fn to_client(
    frame: &mut Frame<'_>,
    v: &CtValue,
    flags: u8,
    mtu: u16,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Result<Verdict, DropReason> {
    let src = mesh_addr_of(&lb.conntrack, v, frame, now, t);
    let mesh = &mut lb.mesh;
    let nat = Nat {
        src_addr: Some(src),
        dst_addr: Some(Ipv4Addr::from(v.peer)),
        src_port: Some(v.port2),
        dst_port: Some(v.port),
    };
    // The node's own kernel as the client (over the host link): back
    // over the link, from meshplane's end of it (what it connected to).
    if let Some(h) = t.egress.as_ref().and_then(|e| e.host_link.as_ref())
        && v.peer == u32::from(h.peer_ip)
        && let Some(hp) = t.host_port
    {
        readdress(frame, &Nat { src_addr: Some(h.ip), ..nat }, h.peer_mac.0, Some(h.mac.0))?;
        clamp_syn(frame, flags, mtu, mesh);
        return Ok(Verdict::Tx(hp));
    }
    // A task of this node as the client (it called its own node's
    // published port): to its port, from its network's gateway.
    if let Some((p, gw)) = local_client(t, v) {
        readdress(frame, &nat, v.mac, Some(gw.0))?;
        clamp_syn(frame, flags, mtu, mesh);
        return Ok(Verdict::Tx(p));
    }
    readdress(frame, &nat, v.mac, Some(t.data_mac.0))?;
    clamp_syn(frame, flags, mtu, mesh);
    Ok(Verdict::Tx(crate::tables::UPLINK))
}

/// The address of this node a routing-mesh client connected to (`v`: the
/// connection's reply entry; `frame`: its reply, whose protocol it is):
/// the data-path address, or the one of `mesh_addrs` whose forward entry
/// (client to that address and the published port) is tracked. Only a
/// node with more mesh addresses looks (one probe per extra address).
#[inline(always)]
fn mesh_addr_of(ct: &Conntrack, v: &CtValue, frame: &Frame<'_>, now: u64, t: &Tables) -> Ipv4Addr {
    if t.mesh_addrs.is_empty() {
        return t.data_ip;
    }
    let proto = frame.data().get(field::PROTOCOL).copied().unwrap_or(protocol::TCP);
    for &a in &t.mesh_addrs {
        let fk = FlowKey { src: v.peer, dst: u32::from(a), sport: v.port, dport: v.port2, proto };
        if ct.peek_probe(&ct.probe_in(&fk, Bucket::Src), now).is_some() {
            return a;
        }
    }
    t.data_ip
}

/// The port and gateway MAC of a routing-mesh client that is a task of
/// this node (reply entry `v`: its address and MAC), if it is one.
#[inline(always)]
fn local_client(t: &Tables, v: &CtValue) -> Option<(crate::packet::PortId, MacAddr)> {
    let ip = Ipv4Addr::from(v.peer);
    let (i, nw) = t.networks.iter().enumerate().find(|(_, n)| n.subnet.contains(ip))?;
    let net = NetId::try_from(i).ok()?;
    match t.fdb.get(&crate::tables::mac_key(net, MacAddr(v.mac))) {
        Some(&Location::Local(p)) => Some((p, nw.gateway_mac)),
        _ => None,
    }
}

/// A task's packet to the gateway MAC for an address outside its network
/// (not the gateway's, not a VIP): the reply of a `preserve-source`
/// connection, whose client is outside. At the node it came in through,
/// it goes back to the client; at another node, back to that node.
/// `None`: not a tracked reply (no route).
pub(crate) fn routed(frame: &mut Frame<'_>, net: NetId, now: u64, t: &Tables, lb: &mut LbState) -> Option<Next> {
    let (key, flags) = tuple(frame.data())?;
    if refused(lb, &key, Bucket::Dst, flags, now, t) {
        return Some(Next::Done(Verdict::Drop(DropReason::BackendRefused)));
    }
    let v = reply_entry(lb, &key, Bucket::Dst, flags, now, t)?;
    Some(if v.flags & CT_MESH_PS != 0 {
        let mtu = t.networks.get(usize::from(net)).map_or(0, |n| n.mtu);
        Next::Done(verdict(to_client(frame, &v, flags, mtu, now, t, lb)))
    } else if v.flags & CT_PS_RETURN != 0 {
        // Back to the ingress node, to its MAC in this network, from this
        // node's own MAC there (an endpoint behind this node's VTEP, as the
        // ingress node checks; this node needs a `node_ip` in the network).
        let Some(me) = t.networks[usize::from(net)].node_mac else {
            return Some(Next::Done(Verdict::Drop(DropReason::NoRoute)));
        };
        let d = frame.data_mut();
        d[field::DST_MAC].copy_from_slice(&v.mac);
        d[field::SRC_MAC].copy_from_slice(&me.0);
        Next::Switch { net, dst: MacAddr(v.mac) }
    } else {
        Next::Done(Verdict::Drop(DropReason::NoRoute))
    })
}

/// A TCP/UDP packet about to be delivered to a local task in network
/// `net`, which has services (`outer_src`: the VTEP it came from, if it
/// came over VXLAN). The reply direction of a balanced connection to a VIP
/// gets its source back (the VIP:port, from the gateway's MAC); a
/// `preserve-source` connection from another node's routing mesh (the
/// source is outside the network) is remembered so that the task's
/// replies return through that node. The drop if the packet could not be
/// rewritten (malformed), or is a backend's refusal held back
/// ([`refused`]).
pub(crate) fn on_delivery(
    frame: &mut Frame<'_>,
    net: NetId,
    outer_src: Option<Ipv4Addr>,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Result<(), DropReason> {
    let Some((key, flags)) = tuple(frame.data()) else { return Ok(()) };
    let nw = &t.networks[usize::from(net)];
    if let Some(vtep) = outer_src
        && !nw.subnet.contains(Ipv4Addr::from(key.src))
    {
        // Remember (or refresh) the way back, keyed as the reply will be;
        // a reset from the client closes it, and a bare SYN (a connection
        // opening, perhaps on a reused tuple, perhaps through another
        // node) makes it anew, replacing the old one.
        use conntrack::tcp_flags::{ACK, RST, SYN};
        let rk = FlowKey { src: key.dst, dst: key.src, sport: key.dport, dport: key.sport, proto: key.proto };
        let mac = Head::new(frame.data()).map_or([0; 6], |h| h.src_mac().0);
        let rp = lb.conntrack.probe_in(&rk, Bucket::Dst);
        let opening = key.proto == protocol::TCP && flags & (SYN | ACK) == SYN;
        if opening || lb.lookup(&rp, now, flags & RST).is_none() {
            let v = CtValue {
                peer: u32::from(vtep),
                mac,
                state: if key.proto == protocol::TCP { opening_state(flags) } else { CtState::Udp },
                flags: CT_REPLY | CT_PS_RETURN,
                ..CtValue::ZERO
            };
            // Not tracked (the guard, no room): the task's replies find no
            // way back and are dropped, counted, where they come out.
            let _ = lb.insert_probe(&rp, v, now, true, usize::MAX);
        }
        return Ok(());
    }
    if refused(lb, &key, Bucket::Dst, flags, now, t) {
        return Err(DropReason::BackendRefused);
    }
    let Some(v) = reply_entry(lb, &key, Bucket::Dst, flags, now, t) else { return Ok(()) };
    if v.flags & (CT_MESH_NAT | CT_MESH_PS | CT_PS_RETURN) != 0 {
        return Ok(());
    }
    let nat = Nat { src_addr: Some(Ipv4Addr::from(v.peer)), dst_addr: None, src_port: Some(v.port), dst_port: None };
    let gw = nw.gateway_mac;
    let d = frame.data_mut();
    if rewrite_ipv4(&mut d[field::VER_IHL..], &nat).is_err() {
        return Err(DropReason::Malformed);
    }
    d[field::SRC_MAC].copy_from_slice(&gw.0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward key of connection `i` of one client socket
    /// (198.18.0.9:40000) to VIP 198.19.0.(100 + i):80, its reply key
    /// from backend 198.19.0.(10 + i):8080, and the two values.
    fn conn(i: u32) -> (FlowKey, CtValue, FlowKey, CtValue) {
        let (client, vip, be) = (0xc612_0009, 0xc613_0064 + i, 0xc613_000a + i);
        let f = CtValue { service: i, peer: be, port: 8080, state: CtState::SynRecv, ..CtValue::ZERO };
        let fk = FlowKey { src: client, dst: vip, sport: 40000, dport: 80, proto: 6 };
        let rk = FlowKey { src: be, dst: client, sport: 8080, dport: 40000, proto: 6 };
        (fk, f, rk, CtValue { peer: vip, port: 80, flags: CT_REPLY, ..f })
    }

    #[test]
    fn an_evicted_connection_goes_whole() {
        // One bucket of 8 ways: a socket's 4 connections fill it (both
        // halves of each share it). A fifth evicts the oldest connection,
        // both its halves, and is tracked both ways itself.
        let mut lb = LbState::new(CtConfig { capacity: conntrack::WAYS, ..CtConfig::default() });
        let ms = 1 << conntrack::TICK_SHIFT;
        for i in 0..5 {
            let (fk, f, rk, r) = conn(i);
            let fp = lb.conntrack.probe_in(&fk, Bucket::Src);
            let rp = fp.reply_from(rk.src, rk.sport);
            assert_eq!(rp, lb.conntrack.probe_in(&rk, Bucket::Dst));
            // The first is the oldest; its reply is then seen again, last,
            // so its forward entry alone is the oldest entry (without the
            // pair rule, the fifth connection's reply would evict another
            // connection's half, the oldest left).
            let at = match i {
                0 => 0,
                4 => 11 * ms,
                _ => 10 * ms,
            };
            assert!(track_probed(&mut lb, i, 0, &fp, f, &rp, r, at).is_ok());
            if i == 3 {
                let (_, _, r0, _) = conn(0);
                assert!(lb.lookup(&lb.conntrack.probe_in(&r0, Bucket::Dst), 11 * ms, 0x10).is_some());
            }
        }
        let now = 11 * ms;
        let has = |lb: &LbState, k: &FlowKey, by| lb.conntrack.contains_probe(&lb.conntrack.probe_in(k, by), now);
        let (f0, _, r0, _) = conn(0);
        assert!(!has(&lb, &f0, Bucket::Src) && !has(&lb, &r0, Bucket::Dst), "connection 0 gone whole");
        for i in 1..5 {
            let (fk, _, rk, _) = conn(i);
            assert!(has(&lb, &fk, Bucket::Src) && has(&lb, &rk, Bucket::Dst), "connection {i} both ways");
        }
        assert_eq!((lb.conntrack.len(), lb.conntrack.stats.evicted), (8, 2));
    }

    #[test]
    fn a_new_connection_never_evicts_its_own_half() {
        // The bucket is full of entries seen in this same tick: the reply
        // must not take the way its forward entry was just put in.
        let mut lb = LbState::new(CtConfig { capacity: conntrack::WAYS, ..CtConfig::default() });
        for i in 0..4 {
            let (fk, f, rk, r) = conn(i);
            let fp = lb.conntrack.probe_in(&fk, Bucket::Src);
            assert!(track_probed(&mut lb, i, 0, &fp, f, &fp.reply_from(rk.src, rk.sport), r, 0).is_ok());
        }
        let (fk, f, rk, r) = conn(9);
        let fp = lb.conntrack.probe_in(&fk, Bucket::Src);
        let rp = fp.reply_from(rk.src, rk.sport);
        assert!(track_probed(&mut lb, 9, 0, &fp, f, &rp, r, 0).is_ok());
        assert!(lb.conntrack.contains_probe(&fp, 0) && lb.conntrack.contains_probe(&rp, 0));
        assert_eq!(lb.conntrack.len(), 8);
    }
}
