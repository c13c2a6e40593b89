//! The balancer's fast path: a task's TCP/UDP packet to a service VIP,
//! read at fixed offsets (`wire::frame`). A burst from a task port in a
//! network with services runs it in two passes (`pipeline::burst`): first
//! [`vip_pre`] and [`note_opening`] on every frame (checks, 5-tuple,
//! conntrack probe, bucket prefetched), then [`vip_hit`] on each. What it
//! cannot decide it leaves (`None`, nothing changed) to the general path
//! (`pipeline::task`), which gives the same result for every frame this
//! accepts. It returns what happens next ([`Next`]); it never calls the
//! overlay.

use super::conntrack::{Bucket, FlowKey, Probe};
use super::{LbState, Next};
use crate::packet::{Frame, Verdict};
use crate::tables::{PortFast, Tables, UPLINK, mac_key_at};
use crate::wire::frame::{Head, field};
use crate::wire::ipv4::protocol;
use crate::wire::{flow, vxlan};

/// The fast path for a task's packet to a service VIP (the internal load
/// balancer), from the port `pf` (in a network with services): the checks
/// of the overlay's task fast path ([`vip_pre`]), then for
/// an established connection whose backend is on another node (the common
/// case), a conntrack hit on a backend the service still has, DNAT and
/// encapsulation; a new connection goes to [`new_vip_flow`] ([`vip_hit`]).
/// `None` (with nothing changed or counted) for anything else: the general
/// path (`lb::to_vip`) decides, with the same result for every frame this
/// accepts. The conntrack lookup refreshes the entry; doing that twice
/// (here and in the general path) gives the same state.
#[inline(always)]
pub(crate) fn task_vip(frame: &mut Frame<'_>, now: u64, t: &Tables, pf: &PortFast, lb: &mut LbState) -> Option<Next> {
    let pre = vip_pre(frame, pf, &lb.conntrack)?;
    vip_hit(frame, &pre, pf, now, t, lb)
}

/// What the first half of [`task_vip`] learns of a frame: the conntrack
/// probe of its 5-tuple, its IPv4 total length and TCP flags. A burst from
/// a task port in a network with services computes it for every frame
/// first (and prefetches the buckets), then runs [`vip_hit`] on each.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VipPre {
    /// The 5-tuple, packed and hashed to its bucket.
    pub(crate) probe: Probe,
    total: u16,
    flags: u8,
    /// The VIP's service if [`note_opening`] looked it up, else
    /// `NO_SERVICE`.
    svc: u32,
    /// The backend `lb::stateless_choice` gave for the connection, if
    /// [`note_opening`] found one.
    chosen: Option<u32>,
}

/// [`VipPre::svc`] when the service was not looked up.
const NO_SERVICE: u32 = u32::MAX;

/// The checks of [`task_vip`] on a frame from the port `pf` (which is in a
/// network with services): from the port's own endpoint, IPv4 TCP or UDP
/// without options, not a fragment, exactly the frame, within the MTU, to
/// the gateway MAC. Reads only; `None` for anything else.
#[inline(always)]
pub(crate) fn vip_pre(frame: &Frame<'_>, pf: &PortFast, ct: &super::conntrack::Conntrack) -> Option<VipPre> {
    let d = frame.data();
    let h = Head::new(d)?;
    let total = pf.admit(&h, d)?;
    if mac_key_at(pf.net, h.dst_mac_word()) != pf.gateway_key || !matches!(h.protocol(), protocol::TCP | protocol::UDP)
    {
        return None;
    }
    // The 5-tuple from the checked head (what `lb::tuple` reads through
    // its own checks on the general path).
    let key = FlowKey::of(&h);
    let flags = if h.protocol() == protocol::TCP { *d.get(field::TCP_FLAGS)? } else { 0 };
    // `total` is at most the MTU, a u16.
    Some(VipPre {
        probe: ct.probe_in(&key, Bucket::Src),
        total: u16::try_from(total).ok()?,
        flags,
        svc: NO_SERVICE,
        chosen: None,
    })
}

/// For a frame [`vip_pre`] accepted that opens a TCP connection (SYN
/// without ACK): the VIP's service, and if its scheduler needs no state
/// (`mh`, `sh`) the backend it picks, noted for the opening
/// ([`new_vip_flow`]) while the first pass's bucket prefetches are in
/// flight (the Maglev slot's own miss overlaps with them). The reply entry
/// needs no prefetch of its own: it goes in the forward entry's bucket.
#[inline(always)]
pub(crate) fn note_opening(pre: &mut VipPre, pf: &PortFast, t: &Tables) {
    use super::conntrack::tcp_flags::{ACK, SYN};
    if pre.flags & (SYN | ACK) != SYN {
        return;
    }
    let key = pre.probe.key();
    let Some(svc) = t.services.at(pf.net, key.dst.to_be_bytes(), key.dport, key.proto) else { return };
    pre.svc = svc;
    if let Some(s) = t.services.list.get(svc as usize)
        && let Some((b, _)) = super::stateless_choice(s, &key)
    {
        pre.chosen = Some(b as u32);
    }
}

/// The second half of [`task_vip`], on a frame [`vip_pre`] accepted
/// (`pre` is its answer, from the same `lb.conntrack`).
#[inline(always)]
pub(crate) fn vip_hit(
    frame: &mut Frame<'_>,
    pre: &VipPre,
    pf: &PortFast,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Option<Next> {
    let key = pre.probe.key();
    let total = usize::from(pre.total);
    let Some(v) = lb.lookup_forward(&pre.probe, now, pre.flags, t) else {
        return new_vip_flow(frame, total, pf, pre, now, t, lb);
    };
    // The entry names the service: no VIP lookup, but the service must
    // still have this VIP (VIP keys map to one service each, so this is
    // the service the general path would find) and the backend.
    let s = t.services.list.get(v.service as usize)?;
    let be = s.backends.get(v.backend as usize)?;
    if !s.vip_is(core::net::Ipv4Addr::from(key.dst), key.dport, key.proto)
        || s.net != pf.net
        || v.flags & super::CT_REPLY != 0
        || u32::from(be.ip) != v.peer
    {
        return None;
    }
    let len = frame.len();
    let verdict = vip_remote(frame, total, &key, be, s.vip_target(be, key.dport), t)?;
    super::count(lb, v.service, v.backend, len);
    Some(Next::Done(verdict))
}

/// A task's packet to a VIP that opens a connection (the fast path's
/// lookup found none): the VIP's service schedules it and both directions
/// are tracked (`lb::open_vip`); a backend on another node is then
/// reached by DNAT and encapsulation right here, anything else through the
/// general path's own tail (`lb::vip_tail`). `None` (nothing changed)
/// only if the destination is no VIP.
#[inline(never)] // a new connection costs far more than a call
fn new_vip_flow(
    frame: &mut Frame<'_>,
    total: usize,
    pf: &PortFast,
    pre: &VipPre,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Option<Next> {
    let key = &pre.probe.key();
    let svc = match pre.svc {
        NO_SERVICE => t.services.at(pf.net, key.dst.to_be_bytes(), key.dport, key.proto)?,
        svc => svc,
    };
    let s = t.services.list.get(svc as usize)?;
    // From here on the connection is decided and tracked: no more `None`.
    let b = match super::open_vip(lb, s, svc, key, pre.flags, now, Some(pre.probe), pre.chosen) {
        Ok(b) => b,
        Err(e) => return Some(Next::Done(Verdict::Drop(e))),
    };
    let len = frame.len();
    if let Some(be) = s.backends.get(b as usize)
        && let Some(v) = vip_remote(frame, total, key, be, s.vip_target(be, key.dport), t)
    {
        super::count(lb, svc, b, len);
        return Some(Next::Done(v));
    }
    Some(super::vip_tail(frame, pf.net, s, svc, b, now, t, lb))
}

/// DNAT of the frame with 5-tuple `key` (to a VIP of the service `be`
/// belongs to, checked by the caller) to backend `be` on port `bport`, its MACs, and
/// encapsulation toward the backend's node, for a backend on another node.
/// `None` (nothing changed) for anything else.
#[inline(always)]
fn vip_remote(
    frame: &mut Frame<'_>,
    total: usize,
    key: &FlowKey,
    be: &super::service::Backend,
    bport: u16,
    t: &Tables,
) -> Option<Verdict> {
    // The backend's node's template, found when the tables were compiled
    // (the same answer as the forwarding table's for its MAC).
    let tpl = t.templates.get(be.remote? as usize)?;
    let (buf, start, len) = frame.parts();
    let (head, rest) = buf.split_at_mut_checked(start)?;
    let d = rest.get_mut(..len)?;
    let hdr = head.last_chunk_mut::<{ vxlan::ENCAP_LEN }>()?;
    let ip_len = u16::try_from(total + vxlan::ENCAP_LEN).ok()?;
    // The transport checksum: TCP's at 16 into its header, UDP's at 6 (the
    // caller checked the transport header is within the packet).
    let csum_at = if key.proto == protocol::TCP { field::TCP_CHECKSUM.start } else { field::UDP_CHECKSUM.start };
    if d.len() < csum_at + 2 || d.len() < field::DST_PORT.end {
        return None;
    }
    // DNAT with the checksum differences computed when the tables were
    // compiled: the packet's destination is the VIP (the caller checked),
    // so `~m + m'` is known (what `wire::rewrite::rewrite_ipv4` computes
    // per packet, with the same result: RFC 1624, UDP's 0 kept).
    let [ip_delta, l4_delta] = be.vip_csum;
    use crate::wire::rewrite::{apply_delta, transport_csum};
    let c = field::IP_CHECKSUM.start;
    let ipc = apply_delta(u16::from_ne_bytes([d[c], d[c + 1]]), ip_delta);
    d[field::IP_CHECKSUM].copy_from_slice(&ipc.to_ne_bytes());
    d[field::DST_IP].copy_from_slice(&be.ip.octets());
    d[field::DST_PORT].copy_from_slice(&bport.to_be_bytes());
    let l4c = transport_csum(key.proto, u16::from_ne_bytes([d[csum_at], d[csum_at + 1]]), l4_delta);
    d[csum_at..csum_at + 2].copy_from_slice(&l4c.to_ne_bytes());
    // To the backend's MAC, from the client's own (see `lb::vip_tail`).
    d[field::DST_MAC].copy_from_slice(&be.mac.0);
    // `flow::hash_ipv4_at_fixed_offsets` of the rewritten frame (not a
    // fragment; TCP or UDP), from the values just written.
    let hash = flow::hash2(
        flow::DEFAULT_SEED,
        (u64::from(key.src) << 32) | u64::from(u32::from(be.ip)),
        (((u64::from(key.sport) << 16) | u64::from(bport)) << 8) | u64::from(key.proto),
    );
    tpl.write_header(hdr, ip_len, vxlan::src_port_for_hash(hash));
    frame.set_window(start - vxlan::ENCAP_LEN, len + vxlan::ENCAP_LEN);
    Some(Verdict::Tx(UPLINK))
}
