//! Straight-line fast paths for the two common frames: from a task, unicast
//! IPv4 (no options, not a fragment) carrying TCP, UDP or ICMP, from the
//! port's own endpoint, within the MTU, to another endpoint of the same
//! network ([`task_unicast`]); from the uplink, the same kind of frame
//! inside VXLAN from a known VTEP ([`uplink_vxlan`]). Every check is done
//! once, on the fixed-offset view of the frame's head (`wire::frame`); any
//! frame that is not exactly that returns `None` and takes the general path
//! (`pipeline::task`, `pipeline::uplink`), which gives the same verdict and
//! bytes for every frame the fast path accepts (`pipeline::process_general`
//! is fuzzed against `pipeline::process`).

use crate::packet::{Frame, Verdict};
use crate::tables::{Location, PortFast, PortId, Tables, UPLINK, VniNet, mac_key_at, vni_key_at};
use crate::wire::frame::{HEAD_LEN, Head, transport_ok};
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
    let h = Head::new(d)?;
    let total = pf.admit(&h, d)?;
    let key = mac_key_at(pf.net, h.dst_mac_word());
    if key == pf.gateway_key {
        return None;
    }
    match *t.fdb.get(&key)? {
        Location::Local(p) if p != in_port => Some(Verdict::Tx(p)),
        Location::Remote(i) => {
            let tpl = t.templates.get(i as usize)?;
            let hash = flow::hash_ipv4_at_fixed_offsets(flow::DEFAULT_SEED, h.through_ports());
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

/// The fast path for VXLAN from a known VTEP carrying unicast IPv4 (no
/// options, not a fragment, TCP/UDP/ICMP) from an endpoint behind that VTEP
/// to a local endpoint of the same network, outer and inner headers without
/// options or trailing bytes. `None` for anything else: the general path
/// (`pipeline::uplink`) decides, with the same result for every frame
/// this accepts.
#[inline(always)]
pub(crate) fn uplink_vxlan(frame: &mut Frame<'_>, t: &Tables, cache: &mut BurstCache<'_>) -> Option<Verdict> {
    const IN: usize = vxlan::ENCAP_LEN;
    let (buf, start, len) = frame.parts();
    let d = buf.get(start..)?.get(..len)?;
    let h = d.first_chunk::<{ IN + HEAD_LEN }>()?;
    let (outer, ih) = (Head::new(h)?, Head::new(&h[IN..])?);
    // Outer: IPv4 without options, not a fragment, UDP to our address and
    // VXLAN port, I flag set (the VXLAN header follows the outer head).
    if !outer.is_plain_ipv4()
        || outer.protocol() != protocol::UDP
        || outer.dst_ip() != t.data_ip.octets()
        || outer.dst_port() != t.vxlan_port
        || h[HEAD_LEN] & vxlan::FLAG_I == 0
    {
        return None;
    }
    let total = outer.total_len();
    if total + 14 != len || outer.udp_len() + 20 != total || !vxlan::ipv4_header_ok(h[14..].first_chunk::<20>()?) {
        return None;
    }
    let inner_len = len - IN;
    let key = vni_key_at(h[HEAD_LEN + 4..].first_chunk::<4>()?);
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
    let outer_src = outer.src_ip();
    // Inner: unicast IPv4 without options, not a fragment, exactly the frame.
    if ih.dst_is_group() || !ih.is_plain_ipv4() {
        return None;
    }
    let itotal = ih.total_len();
    if itotal + 14 != inner_len || itotal > usize::from(mtu) || !transport_ok(d, IN + 14, itotal) {
        return None;
    }
    let Location::Local(out) = *t.fdb.get(&mac_key_at(net, ih.dst_mac_word()))? else { return None };
    let Location::Remote(i) = *t.fdb.get(&mac_key_at(net, ih.src_mac_and_type()))? else { return None };
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
