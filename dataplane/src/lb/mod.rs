//! The L4 load balancer: consistent hashing, schedulers, connection
//! tracking, and the services built on them.
//!
//! Internal VIPs today: a task's TCP/UDP packet to a service's VIP:port
//! (which proxy ARP resolves to the network gateway's MAC) is DNATed to a
//! backend chosen by the service's scheduler, at the client's own node
//! (distributed, as Swarm's IPVS does), and the connection is tracked in
//! both directions; the backend's replies are reversed (source back to the
//! VIP:port) when they are delivered to the client. The routing mesh
//! (published ports) is not built yet.

pub mod conntrack;
pub mod maglev;
pub mod sched;
pub mod service;

use crate::pipeline::{DropReason, Frame, Verdict};
use crate::tables::{NetId, Tables};
use crate::wire::flow;
use crate::wire::ipv4::protocol;
use crate::wire::rewrite::{Nat, rewrite_ipv4};
use conntrack::{Conntrack, CtConfig, CtState, CtValue, FlowKey, Inserted};
use core::net::Ipv4Addr;
use sched::SchedState;

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
#[derive(Debug)]
pub struct LbState {
    /// Connection table.
    pub conntrack: Conntrack,
    sched: Vec<SchedState>,
    /// Counters, by service index.
    pub services: Vec<ServiceStats>,
}

impl LbState {
    /// State with a connection table of `cfg`, for no services yet (see
    /// [`LbState::sync`]).
    pub fn new(cfg: CtConfig) -> Self {
        LbState { conntrack: Conntrack::new(cfg), sched: Vec::new(), services: Vec::new() }
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
        }
    }

    /// Releases what a tracked connection held (its backend's load).
    fn release(&mut self, v: CtValue) {
        release(&mut self.services, v);
    }

    /// Frees expired connections among the next `budget` entries (a
    /// worker calls this between bursts), releasing their backends.
    pub fn sweep(&mut self, now: u64, budget: usize) {
        let LbState { conntrack, services, .. } = self;
        conntrack.sweep(now, budget, |v| release(services, v));
    }
}

/// Releases what a tracked connection held: its backend's load (the
/// forward entry holds it; the reply entry holds nothing).
fn release(services: &mut [ServiceStats], v: CtValue) {
    if v.flags & CT_REPLY == 0
        && let Some(b) = services.get_mut(v.service as usize).and_then(|s| s.backends.get_mut(v.backend as usize))
    {
        b.active = b.active.saturating_sub(1);
    }
}

/// The schedulers' view of a service: weights from the tables, loads from
/// this worker's counters.
struct View<'a> {
    backends: &'a [service::Backend],
    stats: &'a [BackendStats],
}

impl sched::Backends for View<'_> {
    fn count(&self) -> usize {
        self.backends.len()
    }
    fn weight(&self, i: usize) -> u32 {
        self.backends.get(i).map_or(0, |b| b.weight)
    }
    fn active(&self, i: usize) -> u32 {
        self.stats.get(i).map_or(0, |b| b.active)
    }
}

/// The 5-tuple of the IPv4 TCP/UDP packet at `ip` (no options: the caller
/// checked), and its TCP flags (0 for UDP).
fn tuple(d: &[u8], ip: usize) -> Option<(FlowKey, u8)> {
    let h = d.get(ip..)?.first_chunk::<34>()?;
    let key = FlowKey {
        src: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
        dst: u32::from_be_bytes([h[16], h[17], h[18], h[19]]),
        sport: u16::from_be_bytes([h[20], h[21]]),
        dport: u16::from_be_bytes([h[22], h[23]]),
        proto: h[9],
    };
    let flags = if h[9] == protocol::TCP { h[33] } else { 0 };
    Some((key, flags))
}

/// A task's packet to the VIP of service `svc` (an untagged IPv4 TCP/UDP
/// frame without options, to the gateway MAC, already validated and
/// checked against its source): picks or recalls the backend, DNATs to it,
/// readdresses the frame from the gateway to the backend's MAC, and sends
/// it on (a local port, or VXLAN to the backend's node).
pub(crate) fn to_vip(frame: &mut Frame<'_>, net: NetId, svc: u32, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    use DropReason as D;
    let Some(s) = t.services.list.get(svc as usize) else { return Verdict::Drop(D::NoBackend) };
    if lb.services.len() <= svc as usize {
        return Verdict::Drop(D::LbNotSynced);
    }
    let Some((key, flags)) = tuple(frame.data(), 14) else { return Verdict::Drop(D::Malformed) };
    let len = frame.len() as u64;
    // A tracked connection keeps its backend (drained ones too), as long
    // as that backend is still in the service (the entry remembers its
    // address: indices change when tables do). A connection whose backend
    // is gone is scheduled again at once, never blackholed: UDP simply
    // moves, and a TCP segment reaching a new backend mid-connection is
    // answered with a reset by that backend's stack.
    let known = match lb.conntrack.lookup_or_expired(&key, now, flags) {
        Ok(v) if v.service == svc && s.backends.get(v.backend as usize).is_some_and(|b| u32::from(b.ip) == v.peer) => {
            Some(v.backend)
        }
        Ok(_) => None,
        Err(old) => {
            if let Some(old) = old {
                lb.release(old);
            }
            None
        }
    };
    let b = match known {
        Some(b) => b,
        None => {
            let fh = flow::hash2(flow::DEFAULT_SEED, (u64::from(key.src) << 32) | u64::from(key.dst), {
                (u64::from(key.sport) << 24) | (u64::from(key.dport) << 8) | u64::from(key.proto)
            });
            let sh = flow::hash2(flow::DEFAULT_SEED, u64::from(key.src), 0);
            let (Some(stats), Some(st)) = (lb.services.get(svc as usize), lb.sched.get_mut(svc as usize)) else {
                return Verdict::Drop(D::LbNotSynced);
            };
            let view = View { backends: &s.backends, stats: &stats.backends };
            let Some(b) = sched::pick(s.scheduler, &view, st, s.maglev.as_ref(), fh, sh) else {
                return Verdict::Drop(D::NoBackend);
            };
            let b = b as u32;
            let be = &s.backends[b as usize];
            // A SYN opens; a segment of a connection the table lost (a
            // restart, an eviction) is taken as established, as IPVS's
            // sloppy TCP does.
            let state =
                if key.proto == protocol::TCP { conntrack::next_state(CtState::SynRecv, flags) } else { CtState::Udp };
            let fwd = CtValue { service: svc, backend: b, peer: u32::from(be.ip), port: be.port, state, flags: 0 };
            match lb.conntrack.insert(&key, fwd, now) {
                Inserted::Guarded => {}
                r => {
                    if let Inserted::Fresh(Some(old)) | Inserted::Evicted(old) = r {
                        lb.release(old);
                    }
                    let rev_key = FlowKey {
                        src: u32::from(be.ip),
                        dst: key.src,
                        sport: be.port,
                        dport: key.sport,
                        proto: key.proto,
                    };
                    let rev = CtValue { peer: u32::from(s.vip), port: s.port, flags: CT_REPLY, ..fwd };
                    if let Inserted::Fresh(Some(old)) | Inserted::Evicted(old) = lb.conntrack.insert(&rev_key, rev, now)
                    {
                        lb.release(old);
                    }
                    if let Some(bs) = lb.services.get_mut(svc as usize).and_then(|x| x.backends.get_mut(b as usize)) {
                        bs.active += 1;
                    }
                }
            }
            if let Some(x) = lb.services.get_mut(svc as usize) {
                x.new_conns += 1;
                if let Some(bs) = x.backends.get_mut(b as usize) {
                    bs.new_conns += 1;
                }
            }
            b
        }
    };
    let Some(be) = s.backends.get(b as usize) else { return Verdict::Drop(D::NoBackend) };
    if let Some(x) = lb.services.get_mut(svc as usize) {
        x.packets += 1;
        x.bytes += len;
        if let Some(bs) = x.backends.get_mut(b as usize) {
            bs.packets += 1;
            bs.bytes += len;
        }
    }
    let nat = Nat { src_addr: None, dst_addr: Some(be.ip), src_port: None, dst_port: Some(be.port) };
    let gw = t.networks[usize::from(net)].gateway_mac;
    let d = frame.data_mut();
    if rewrite_ipv4(&mut d[14..], &nat).is_err() {
        return Verdict::Drop(D::Malformed);
    }
    d[0..6].copy_from_slice(&be.mac.0);
    d[6..12].copy_from_slice(&gw.0);
    crate::overlay::switch(frame, net, be.mac, now, t, lb)
}

/// A TCP/UDP packet about to be delivered to a local task in network
/// `net`: if it is the reply direction of a balanced connection, its
/// source becomes the VIP:port again and its source MAC the gateway's.
/// Returns false if the packet could not be rewritten (malformed).
pub(crate) fn on_delivery(frame: &mut Frame<'_>, net: NetId, now: u64, t: &Tables, lb: &mut LbState) -> bool {
    let d = frame.data();
    if d.len() < 34 || d[12..15] != [0x08, 0x00, 0x45] || !matches!(d[23], protocol::TCP | protocol::UDP) {
        return true;
    }
    let Some((key, flags)) = tuple(d, 14) else { return true };
    let v = match lb.conntrack.lookup_or_expired(&key, now, flags) {
        Ok(v) if v.flags & CT_REPLY != 0 => v,
        Ok(_) => return true,
        Err(old) => {
            if let Some(old) = old {
                lb.release(old);
            }
            return true;
        }
    };
    let nat = Nat { src_addr: Some(Ipv4Addr::from(v.peer)), dst_addr: None, src_port: Some(v.port), dst_port: None };
    let gw = t.networks[usize::from(net)].gateway_mac;
    let d = frame.data_mut();
    if rewrite_ipv4(&mut d[14..], &nat).is_err() {
        return false;
    }
    d[6..12].copy_from_slice(&gw.0);
    true
}
