//! Straight-line fast paths for the two common frames: from a task, unicast
//! IPv4 (no options, not a fragment) carrying TCP, UDP or ICMP, from the
//! port's own endpoint, within the MTU, to another endpoint of the same
//! network ([`task_unicast`]); from the uplink, the same kind of frame
//! inside VXLAN from a known VTEP ([`uplink_vxlan`]). Every check is done once, on a fixed-size header array; any
//! frame that is not exactly that returns `None` and takes the general path
//! ([`super::from_task`]), which gives the same verdict and bytes for every
//! frame the fast path accepts (`pipeline::process_general` is fuzzed
//! against `pipeline::process`).

use crate::lb::conntrack::{Bucket, FlowKey, Probe};
use crate::pipeline::{Frame, Verdict};
use crate::tables::{Location, PortFast, PortId, Tables, UPLINK, VniNet, mac_key_at, vni_key_at};
use crate::wire::ipv4::protocol;
use crate::wire::{flow, vxlan};

/// The fast path's verdict, or `None` for "take the general path".
#[inline(always)]
pub(crate) fn task_unicast(
    frame: &mut Frame<'_>,
    in_port: PortId,
    t: &Tables,
    cache: &BurstCache<'_>,
) -> Option<Verdict> {
    let pf = cache.port?;
    let (buf, start, len) = frame.parts();
    let (head, rest) = buf.split_at_mut_checked(start)?;
    let d = rest.get(..len)?;
    let h = d.first_chunk::<42>()?;
    let total = from_port(h, d, pf)?;
    let key = mac_key_at(pf.net, h.first_chunk::<8>()?);
    if key == pf.gateway_key {
        return None;
    }
    match *t.fdb.get(&key)? {
        Location::Local(p) if p != in_port => Some(Verdict::Tx(p)),
        Location::Remote(i) => {
            let tpl = t.templates.get(i as usize)?;
            let hash = flow::hash_ipv4_at_fixed_offsets(flow::DEFAULT_SEED, h.first_chunk::<38>()?);
            // The outer IPv4 packet is the inner frame (total + 14) and 36
            // bytes of outer IPv4, UDP and VXLAN headers; total <= MTU <=
            // underlay MTU - 50, so it fits.
            let ip_len = u16::try_from(total + vxlan::ENCAP_LEN).ok()?;
            tpl.write_header(head.last_chunk_mut::<{ vxlan::ENCAP_LEN }>()?, ip_len, vxlan::src_port_for_hash(hash));
            frame.set_window(start - vxlan::ENCAP_LEN, len + vxlan::ENCAP_LEN);
            Some(Verdict::Tx(UPLINK))
        }
        Location::Local(_) => None,
    }
}

/// What both task fast paths check, on the frame `d` with its first 42
/// bytes `h`: unicast destination; source MAC, EtherType and IPv4 source
/// the port's own; IPv4 without options; not a fragment; the frame exactly
/// the packet (no trailing bytes to trim; at 42 bytes or more that makes
/// the total at least 28), within the network MTU, its transport header
/// sane. The IPv4 total length, or `None`.
#[inline(always)]
fn from_port(h: &[u8; 42], d: &[u8], pf: &PortFast) -> Option<usize> {
    let total = usize::from(u16::from_be_bytes([h[16], h[17]]));
    let ok = h[0] & 1 == 0
        && h[6..14] == pf.l2
        && h[14] == 0x45
        && h[20] & 0x3f == 0
        && h[21] == 0
        && h[26..30] == pf.ip
        && total + 14 == d.len()
        && total <= usize::from(pf.mtu)
        && transport_ok(d, 14, total);
    ok.then_some(total)
}

/// The fast path for a task's packet to a service VIP (the internal load
/// balancer): the same checks as [`task_unicast`] ([`vip_pre`]), then for
/// an established connection whose backend is on another node (the common
/// case), a conntrack hit on a backend the service still has, DNAT and
/// encapsulation; a new connection goes to [`new_vip_flow`] ([`vip_hit`]).
/// `None` (with nothing changed or counted) for anything else: the general
/// path (`lb::to_vip`) decides, with the same result for every frame this
/// accepts. The conntrack lookup refreshes the entry; doing that twice
/// (here and in the general path) gives the same state.
#[inline(always)]
pub(crate) fn task_vip(
    frame: &mut Frame<'_>,
    now: u64,
    t: &Tables,
    cache: &BurstCache<'_>,
    lb: &mut crate::lb::LbState,
) -> Option<Verdict> {
    let pf = cache.lb_port?;
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
pub(crate) fn vip_pre(frame: &Frame<'_>, pf: &PortFast, ct: &crate::lb::conntrack::Conntrack) -> Option<VipPre> {
    let d = frame.data();
    let h = d.first_chunk::<42>()?;
    let total = from_port(h, d, pf)?;
    if mac_key_at(pf.net, h.first_chunk::<8>()?) != pf.gateway_key || !matches!(h[23], protocol::TCP | protocol::UDP) {
        return None;
    }
    // The 5-tuple from the checked fixed-size header (what `lb::tuple`
    // reads through its own checks on the general path).
    let key = FlowKey {
        src: u32::from_be_bytes([h[26], h[27], h[28], h[29]]),
        dst: u32::from_be_bytes([h[30], h[31], h[32], h[33]]),
        sport: u16::from_be_bytes([h[34], h[35]]),
        dport: u16::from_be_bytes([h[36], h[37]]),
        proto: h[23],
    };
    let flags = if h[23] == protocol::TCP { *d.get(47)? } else { 0 };
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
    use crate::lb::conntrack::tcp_flags::{ACK, SYN};
    if pre.flags & (SYN | ACK) != SYN {
        return;
    }
    let key = pre.probe.key();
    let Some(svc) = t.services.at(pf.net, key.dst.to_be_bytes(), key.dport, key.proto) else { return };
    pre.svc = svc;
    if let Some(s) = t.services.list.get(svc as usize)
        && let Some((b, _)) = crate::lb::stateless_choice(s, &key)
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
    lb: &mut crate::lb::LbState,
) -> Option<Verdict> {
    let key = pre.probe.key();
    let total = usize::from(pre.total);
    let Some(v) = lb.lookup_probe(&pre.probe, now, pre.flags) else {
        return new_vip_flow(frame, total, pf, pre, now, t, lb);
    };
    // The entry names the service: no VIP lookup, but the service must
    // still have this VIP (VIP keys map to one service each, so this is
    // the service the general path would find) and the backend.
    let s = t.services.list.get(v.service as usize)?;
    let be = s.backends.get(v.backend as usize)?;
    if s.vip != Some((core::net::Ipv4Addr::from(key.dst), key.dport))
        || s.net != pf.net
        || s.proto != key.proto
        || v.flags & crate::lb::CT_REPLY != 0
        || u32::from(be.ip) != v.peer
    {
        return None;
    }
    let len = frame.len();
    let verdict = vip_remote(frame, total, &key, be, t)?;
    crate::lb::count(lb, v.service, v.backend, len);
    Some(verdict)
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
    lb: &mut crate::lb::LbState,
) -> Option<Verdict> {
    let key = &pre.probe.key();
    let svc = match pre.svc {
        NO_SERVICE => t.services.at(pf.net, key.dst.to_be_bytes(), key.dport, key.proto)?,
        svc => svc,
    };
    let s = t.services.list.get(svc as usize)?;
    // From here on the connection is decided and tracked: no more `None`.
    let b = match crate::lb::open_vip(lb, s, svc, key, pre.flags, now, Some(pre.probe), pre.chosen) {
        Ok(b) => b,
        Err(e) => return Some(Verdict::Drop(e)),
    };
    let len = frame.len();
    if let Some(be) = s.backends.get(b as usize)
        && let Some(v) = vip_remote(frame, total, key, be, t)
    {
        crate::lb::count(lb, svc, b, len);
        return Some(v);
    }
    Some(crate::lb::vip_tail(frame, pf.net, s, svc, b, now, t, lb))
}

/// DNAT of the frame with 5-tuple `key` (to a VIP of the service `be`
/// belongs to, checked by the caller) to backend `be`, its MACs, and
/// encapsulation toward the backend's node, for a backend on another node.
/// `None` (nothing changed) for anything else.
#[inline(always)]
fn vip_remote(
    frame: &mut Frame<'_>,
    total: usize,
    key: &FlowKey,
    be: &crate::lb::service::Backend,
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
    let csum_at = if key.proto == protocol::TCP { 14 + 20 + 16 } else { 14 + 20 + 6 };
    if d.len() < csum_at + 2 || d.len() < 38 {
        return None;
    }
    // DNAT with the checksum differences computed when the tables were
    // compiled: the packet's destination is the VIP (the caller checked),
    // so `~m + m'` is known (what `wire::rewrite::rewrite_ipv4` computes
    // per packet, with the same result: RFC 1624, UDP's 0 kept).
    let [ip_delta, l4_delta] = be.vip_csum;
    use crate::wire::rewrite::{apply_delta, transport_csum};
    let ipc = apply_delta(u16::from_ne_bytes([d[24], d[25]]), ip_delta);
    d[24..26].copy_from_slice(&ipc.to_ne_bytes());
    d[30..34].copy_from_slice(&be.ip.octets());
    d[36..38].copy_from_slice(&be.port.to_be_bytes());
    let l4c = transport_csum(key.proto, u16::from_ne_bytes([d[csum_at], d[csum_at + 1]]), l4_delta);
    d[csum_at..csum_at + 2].copy_from_slice(&l4c.to_ne_bytes());
    // To the backend's MAC, from the client's own (see `lb::vip_tail`).
    d[0..6].copy_from_slice(&be.mac.0);
    // `flow::hash_ipv4_at_fixed_offsets` of the rewritten frame (not a
    // fragment; TCP or UDP), from the values just written.
    let hash = flow::hash2(
        flow::DEFAULT_SEED,
        (u64::from(key.src) << 32) | u64::from(u32::from(be.ip)),
        (((u64::from(key.sport) << 16) | u64::from(be.port)) << 8) | u64::from(key.proto),
    );
    tpl.write_header(hdr, ip_len, vxlan::src_port_for_hash(hash));
    frame.set_window(start - vxlan::ENCAP_LEN, len + vxlan::ENCAP_LEN);
    Some(Verdict::Tx(UPLINK))
}

/// Checks the transport header of the IPv4 packet whose header starts at
/// `ip` in `d` (no options; total length `total`), exactly as far as
/// `parse_frame` would: UDP length, TCP data offset, ICMP header. The one
/// copy of that check every fixed-offset path uses.
#[inline(always)]
pub(crate) fn transport_ok(d: &[u8], ip: usize, total: usize) -> bool {
    let Some(l4) = total.checked_sub(20) else { return false };
    let at = |o: usize| d.get(ip + 20 + o).copied();
    match d.get(ip + 9).copied() {
        Some(protocol::UDP) => {
            l4 >= 8
                && matches!((at(4), at(5)), (Some(a), Some(b)) if (8..=l4).contains(&usize::from(u16::from_be_bytes([a, b]))))
        }
        Some(protocol::TCP) => l4 >= 20 && at(12).is_some_and(|b| (20..=l4).contains(&(usize::from(b >> 4) * 4))),
        Some(protocol::ICMP) => l4 >= 8,
        _ => false,
    }
}

/// The fast path for VXLAN from a known VTEP carrying unicast IPv4 (no
/// options, not a fragment, TCP/UDP/ICMP) from an endpoint behind that VTEP
/// to a local endpoint of the same network, outer and inner headers without
/// options or trailing bytes. `None` for anything else: the general path
/// ([`super::from_uplink`]) decides, with the same result for every frame
/// this accepts.
#[inline(always)]
pub(crate) fn uplink_vxlan(frame: &mut Frame<'_>, t: &Tables, cache: &mut BurstCache<'_>) -> Option<Verdict> {
    const IN: usize = vxlan::ENCAP_LEN;
    let (buf, start, len) = frame.parts();
    let d = buf.get(start..)?.get(..len)?;
    let h = d.first_chunk::<{ IN + 42 }>()?;
    // Outer: IPv4 without options, not a fragment, UDP to our address and
    // VXLAN port, I flag set.
    if h[12] != 0x08
        || h[13] != 0x00
        || h[14] != 0x45
        || h[20] & 0x3f != 0
        || h[21] != 0
        || h[23] != protocol::UDP
        || h[30..34] != t.data_ip.octets()
        || h[36..38] != t.vxlan_port.to_be_bytes()
        || h[42] & vxlan::FLAG_I == 0
    {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([h[16], h[17]]));
    let udp_len = usize::from(u16::from_be_bytes([h[38], h[39]]));
    if total + 14 != len || udp_len + 20 != total || !vxlan::ipv4_header_ok(h[14..].first_chunk::<20>()?) {
        return None;
    }
    let inner_len = len - IN;
    let key = vni_key_at(h[46..].first_chunk::<4>()?);
    let VniNet { net, mtu, lb } = if cache.vni_key == key {
        cache.vni
    } else {
        let v = *t.by_vni.get(&key)?;
        (cache.vni_key, cache.vni) = (key, v);
        v
    };
    // In a network with services, replies are reversed: the general path.
    if lb {
        return None;
    }
    // The outer source need not be looked up in the VTEP set: the inner
    // source must be an endpoint behind exactly this VTEP (checked below),
    // which only a known VTEP has.
    let outer_src = [h[26], h[27], h[28], h[29]];
    // Inner: unicast IPv4 without options, not a fragment, exactly the frame.
    let ih = &h[IN..];
    if ih[0] & 1 != 0 || ih[12] != 0x08 || ih[13] != 0x00 || ih[14] != 0x45 || ih[20] & 0x3f != 0 || ih[21] != 0 {
        return None;
    }
    let itotal = usize::from(u16::from_be_bytes([ih[16], ih[17]]));
    if itotal + 14 != inner_len || itotal > usize::from(mtu) || !transport_ok(d, IN + 14, itotal) {
        return None;
    }
    let Location::Local(out) = *t.fdb.get(&mac_key_at(net, ih.first_chunk::<8>()?))? else { return None };
    let Location::Remote(i) = *t.fdb.get(&mac_key_at(net, ih[6..].first_chunk::<8>()?))? else { return None };
    if t.template_vtep.get(i as usize)?.octets() != outer_src {
        return None;
    }
    frame.set_window(start + IN, inner_len);
    Some(Verdict::Tx(out))
}

/// What the fast paths look up once per burst rather than once per frame:
/// the input port's [`PortFast`], and the last VNI the uplink fast path
/// looked up with what it maps to (the frames of one burst from the uplink
/// mostly carry one VNI). Lives for one burst, within which the tables do
/// not change.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BurstCache<'t> {
    /// The input port's facts, if it is in a network without services.
    port: Option<&'t PortFast>,
    /// The input port's facts, if it is in a network with services.
    lb_port: Option<&'t PortFast>,
    /// `vni_key` of the VNI, or `u64::MAX` (no VNI's key) when empty.
    vni_key: u64,
    vni: VniNet,
}

impl<'t> BurstCache<'t> {
    /// The input port's facts if it is a task port in a network with
    /// services.
    #[inline(always)]
    pub(crate) fn lb_port(&self) -> Option<&'t PortFast> {
        self.lb_port
    }

    /// An empty cache for a burst received on `in_port`.
    #[inline(always)]
    pub(crate) fn new(t: &'t Tables, in_port: PortId) -> Self {
        let pf = t.ports.get(usize::from(in_port)).and_then(|p| p.fast.as_ref());
        BurstCache {
            // A port in a network with services takes the general path,
            // but for established connections to a VIP ([`task_vip`]).
            port: pf.filter(|p| !p.lb),
            lb_port: pf.filter(|p| p.lb),
            vni_key: u64::MAX,
            vni: VniNet { net: 0, mtu: 0, lb: false },
        }
    }
}
