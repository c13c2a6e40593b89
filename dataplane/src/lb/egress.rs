//! Egress: a task's connections to addresses outside every cluster network
//! leave through its own node, source-NATed to the node's egress address
//! (as Swarm's `docker_gwbridge` masquerades to the host's), and their
//! replies come back on the uplink to the task.
//!
//! State is the balancer's connection table. A connection has two
//! entries: the forward one (`Bucket::Src`, the task's 5-tuple: the SNAT
//! address and port) and the reply one (`Bucket::Tuple`, the reply's
//! 5-tuple toward the egress address: the task's address, port and MAC).
//! The table is the port allocator, as Linux's `nf_nat` does it: a
//! candidate port is free when its reply key is not tracked, so a port is
//! unique per (protocol, destination address and port) and serves many
//! destinations at once. Candidates start at a keyed offset (RFC 6056
//! algorithm 3: ports cannot be guessed), a bounded number are tried, and
//! an unconfirmed holder gives way; one task holds at most half the range
//! toward one destination address.
//!
//! ICMP echo is mapped by identifier; ICMP errors about an egress
//! connection (fragmentation-needed, time-exceeded, unreachable) are
//! translated back to the task, quoted packet included (RFC 5508), so path
//! MTU discovery and `traceroute` work from a task; the TTL of what leaves
//! is decremented, and a packet whose TTL runs out is answered with
//! time-exceeded from the gateway.

use super::conntrack::{self, Bucket, CtState, CtValue, FlowKey};
use super::{CT_EGRESS, CT_REPLY, LbState, NatShares, Next, opening_state, tuple};
use crate::packet::{DropReason as D, Frame, UPLINK, Verdict};
use crate::tables::egress::{Dest, HOST_PORTS, HostLinkSpec, PortRange};
use crate::tables::{Location, NetId, Tables, mac_key};
use crate::wire::frame::field;
use crate::wire::icmp_nat::{self, Quote};
use crate::wire::icmpv4::kind;
use crate::wire::ipv4::protocol;
use crate::wire::rewrite::{Nat, rewrite_ipv4};
use crate::wire::{MacAddr, ethernet, flow};
use core::net::Ipv4Addr;

/// Egress counters of one worker (also their form in the node's stats,
/// `report::WorkerStats::egress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressStats {
    /// Connections opened.
    pub new_conns: u64,
    /// Packets sent out (task to the world).
    pub tx_packets: u64,
    /// Bytes sent out.
    pub tx_bytes: u64,
    /// Replies delivered to tasks.
    pub rx_packets: u64,
    /// Bytes of replies delivered.
    pub rx_bytes: u64,
    /// ICMP errors from the world translated back to a task.
    pub icmp_in: u64,
    /// ICMP errors from a task translated out.
    pub icmp_out: u64,
    /// Time-exceeded sent to tasks (TTL ran out at the gateway).
    pub time_exceeded: u64,
    /// Port allocations that needed more than one round of candidates
    /// (the range toward one destination is filling up).
    pub alloc_slow: u64,
    /// Hairpin connections: a task balanced to itself through its own
    /// service's VIP, source-NATed to the gateway (`Way::Hairpin`).
    #[serde(default)]
    pub hairpin_conns: u64,
    /// DNS queries (flows) sent to the node's DNS server (`Way::Dns`;
    /// their packets count in `tx_packets`/`rx_packets`).
    #[serde(default)]
    pub dns_conns: u64,
    /// The last destination that found no next hop's MAC (dropped
    /// `egress_no_next_hop`): the node asks the kernel to resolve it.
    pub neigh_miss: Option<Ipv4Addr>,
}

/// A worker's egress state: counters, per-task port shares, and the
/// random source of the second round of candidates.
#[derive(Debug, Clone)]
pub(crate) struct EgressState {
    pub(crate) stats: EgressStats,
    /// Ports held per (task address, destination address).
    pub(super) shares: NatShares,
    rng: u64,
    seed: u64,
}

impl EgressState {
    pub(super) fn new(seed: u64) -> EgressState {
        let seed = seed ^ 0x6567_7265_7373_2121;
        EgressState { stats: EgressStats::default(), shares: NatShares::new(seed), rng: seed | 1, seed }
    }

    /// The next value of a xorshift64 generator.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// Candidates one round of the allocator tries.
const ROUND: u32 = 16;
/// Ranges of at most this many ports are searched whole when two rounds
/// found nothing free.
const SMALL_RANGE: u32 = 256;

/// Where an egress connection goes (its entries' `backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Out of the uplink, to the world.
    Out = 0,
    /// Through the host link, to an address of the node's host.
    Host = 1,
    /// Through the host link to the kernel's end, for the data-path
    /// address (which the kernel does not hold: a TAP uplink).
    HostDnat = 2,
    /// A DNS query to the network's gateway, through the host link to the
    /// node's DNS server for the network (the kernel's end, the network's
    /// DNS port); its answers come back from the gateway's port 53.
    Dns = 3,
    /// A task's connection to its own service's VIP balanced to itself
    /// (hairpin): source-NATed to its network's gateway, so that its
    /// answer comes back through the balancer.
    Hairpin = 4,
}

impl Way {
    fn of(backend: u32) -> Way {
        match backend {
            1 => Way::Host,
            2 => Way::HostDnat,
            3 => Way::Dns,
            4 => Way::Hairpin,
            _ => Way::Out,
        }
    }
}

/// The port DNS queries are sent to (on the gateway).
const DNS_PORT: u16 = 53;

/// The reply key of a connection of `key` (from a task) translated to
/// `snat`:`port` and sent to `to` (address, port): from there to the SNAT
/// address.
#[inline(always)]
fn reply_key(key: &FlowKey, to: (u32, u16), snat: u32, port: u16) -> FlowKey {
    FlowKey { src: to.0, dst: snat, sport: to.1, dport: port, proto: key.proto }
}

/// The forward key of the connection whose reply entry (key `k`, value
/// `v`) is an egress one: a `HostDnat` connection was to the data-path
/// address, a `Dns` one to its network's gateway on port 53.
#[inline(always)]
pub(super) fn forward_key(k: &FlowKey, v: &CtValue, t: &Tables) -> FlowKey {
    let (dst, dport) = match Way::of(v.backend) {
        Way::HostDnat => (u32::from(t.data_ip), k.sport),
        Way::Dns => {
            let gw = t.networks.get(v.service as usize).map_or(0, |n| u32::from(n.gateway_ip));
            (gw, DNS_PORT)
        }
        Way::Out | Way::Host | Way::Hairpin => (k.src, k.sport),
    };
    FlowKey { src: v.peer, dst, sport: v.port, dport, proto: k.proto }
}

/// What a task's packet to its gateway is, for egress.
enum Kind {
    /// TCP or UDP (its flags).
    Flow(u8),
    /// An ICMP echo request.
    Echo,
    /// An ICMP error about a packet from the world.
    Error(Quote),
}

/// A task's IPv4 packet to its gateway MAC, for an address outside its
/// network that is not a VIP nor a tracked routing-mesh reply (`net`: the
/// task's network). `None` when the node has no egress (the caller drops
/// it as `no_route`). Otherwise: sent out of the uplink source-NATed, or
/// time-exceeded from the gateway (`Next::TimeExceeded`), or a counted
/// drop.
pub(crate) fn from_task(frame: &mut Frame<'_>, net: NetId, now: u64, t: &Tables, lb: &mut LbState) -> Option<Next> {
    t.egress.as_ref()?;
    Some(Next::of(out(frame, net, now, t, lb)))
}

fn out(frame: &mut Frame<'_>, net: NetId, now: u64, t: &Tables, lb: &mut LbState) -> Result<Next, D> {
    let e = t.egress.as_ref().ok_or(D::NoRoute)?;
    let d = frame.data();
    let ip = d.get(ethernet::HEADER_LEN..).ok_or(D::Malformed)?;
    let (key, what) = classify_out(d, ip)?;
    let live = ttl_left(frame)?;
    if let Kind::Error(q) = what {
        if !live {
            return Err(D::TtlExceeded);
        }
        return error_out(frame, &q, now, t, lb);
    }
    let flags = match what {
        Kind::Flow(f) => f,
        _ => 0,
    };
    let fp = lb.conntrack.probe_in(&key, Bucket::Src);
    let found = match lb.lookup(&fp, now, flags) {
        Some(v) if v.flags == CT_EGRESS && matches!(Way::of(v.backend), Way::Out | Way::Host | Way::HostDnat) => {
            let to = match (Way::of(v.backend), &e.host_link) {
                (Way::HostDnat, Some(h)) => u32::from(h.peer_ip),
                _ => key.dst,
            };
            if keep_reply(lb, &key, &v, flags, (to, key.dport), net, frame_src_mac(frame), now) {
                Some(v)
            } else {
                // Its port is another connection's now: this one starts
                // again with a new port.
                if let Some(old) = lb.conntrack.remove_probe(&fp) {
                    lb.release(&key, old);
                }
                None
            }
        }
        Some(_) => return Err(D::NoRoute),
        None => None,
    };
    let (snat, port, way) = match found {
        Some(v) => (v.peer, v.port2, Way::of(v.backend)),
        None => {
            let way = match t.egress_class(Ipv4Addr::from(key.dst), key.proto, key.dport) {
                Some(Dest::Outside) => Way::Out,
                // (To the host's end, or to the data address that the host
                // link DNATs there.)
                Some(Dest::Host)
                    if e.host_link.as_ref().is_some_and(|h| {
                        h.peer_ip == Ipv4Addr::from(key.dst) || (h.dnat_data_ip && key.dst == u32::from(t.data_ip))
                    }) && matches!(key.proto, protocol::TCP | protocol::UDP)
                        && t.networks.iter().any(|nw| nw.dns_port == Some(key.dport)) =>
                {
                    return Err(D::EgressToDns);
                }
                Some(Dest::Host) if e.host_link.is_some() => {
                    let dnat = e.host_link.as_ref().is_some_and(|h| h.dnat_data_ip) && key.dst == u32::from(t.data_ip);
                    if dnat { Way::HostDnat } else { Way::Host }
                }
                Some(Dest::Vtep) => return Err(D::EgressToVtep),
                Some(Dest::Hairpin) => return Err(D::EgressHairpin),
                Some(Dest::Cluster | Dest::Host) | None => return Err(D::NoRoute),
            };
            if !live {
                return Ok(Next::TimeExceeded);
            }
            let (snat, range, to) = match (way, &e.host_link) {
                (Way::Out | Way::Dns | Way::Hairpin, _) | (_, None) => {
                    hop(t, key.dst, lb)?;
                    (u32::from(e.addr), e.ports, key.dst)
                }
                (Way::Host, Some(h)) => (u32::from(h.ip), HOST_PORTS, key.dst),
                (Way::HostDnat, Some(h)) => (u32::from(h.ip), HOST_PORTS, u32::from(h.peer_ip)),
            };
            let state = match what {
                Kind::Flow(f) if key.proto == protocol::TCP => opening_state(f),
                Kind::Echo => CtState::Icmp,
                _ => CtState::Udp,
            };
            let port =
                open(lb, t, &fp, &key, ((to, key.dport), snat, range, way), state, net, frame_src_mac(frame), now)?;
            (snat, port, way)
        }
    };
    if !live {
        return Ok(Next::TimeExceeded);
    }
    if way != Way::Out
        && let (Some(h), Some(hp)) = (&e.host_link, t.host_port)
    {
        return to_host(frame, &key, h, hp, way, port, lb);
    }
    let mac = hop(t, key.dst, lb)?;
    let nat = Nat { src_addr: Some(Ipv4Addr::from(snat)), ..Nat::default() };
    translate_out(frame, key.proto, &nat, port, (mac, t.data_mac))?;
    lb.egress.stats.tx_packets += 1;
    lb.egress.stats.tx_bytes += frame.len() as u64;
    Ok(Next::Done(Verdict::Tx(UPLINK)))
}

/// A source-NAT mapping of the host-port kind (`Way::Dns`,
/// `Way::Hairpin`): where the packet goes after translation (`to`), the
/// address it comes from (`snat`, ports from `HOST_PORTS`), the way, and
/// the state of a new datagram flow.
struct Mapping {
    to: (u32, u16),
    snat: u32,
    way: Way,
    datagram: CtState,
}

/// The source port of `key`'s mapping `m` (tracked as an egress
/// connection with its reply half kept, or opened), or the drop.
#[allow(clippy::too_many_arguments)]
fn mapping(
    lb: &mut LbState,
    t: &Tables,
    key: &FlowKey,
    flags: u8,
    m: &Mapping,
    net: NetId,
    mac: [u8; 6],
    now: u64,
) -> Result<u16, D> {
    let fp = lb.conntrack.probe_in(key, Bucket::Src);
    match lb.lookup(&fp, now, flags) {
        Some(v) if v.flags == CT_EGRESS && Way::of(v.backend) == m.way => {
            if keep_reply(lb, key, &v, flags, m.to, net, mac, now) {
                return Ok(v.port2);
            }
            if let Some(old) = lb.conntrack.remove_probe(&fp) {
                lb.release(key, old);
            }
        }
        Some(_) => return Err(D::NoRoute),
        None => {}
    }
    let state = if key.proto == protocol::TCP { opening_state(flags) } else { m.datagram };
    open(lb, t, &fp, key, (m.to, m.snat, HOST_PORTS, m.way), state, net, mac, now)
}

/// A task's DNS query (TCP or UDP to its gateway's port 53; `net`: the
/// task's network, `port`: the network's DNS port): to the node's DNS
/// server on the kernel's end of the host link, source-NATed to
/// meshplane's end as a connection to the host is. The TTL is neither
/// checked nor decremented (the packet is for the gateway). Without a
/// host link: `no_route`.
pub(crate) fn to_dns(frame: &mut Frame<'_>, net: NetId, port: u16, now: u64, t: &Tables, lb: &mut LbState) -> Next {
    Next::of(dns_out(frame, net, port, now, t, lb))
}

fn dns_out(frame: &mut Frame<'_>, net: NetId, port: u16, now: u64, t: &Tables, lb: &mut LbState) -> Result<Next, D> {
    let (Some(h), Some(hp)) = (t.egress.as_ref().and_then(|e| e.host_link.as_ref()), t.host_port) else {
        return Err(D::NoRoute);
    };
    let (key, flags) = tuple(frame.data()).ok_or(D::Malformed)?;
    let to = (u32::from(h.peer_ip), port);
    let m = Mapping { to, snat: u32::from(h.ip), way: Way::Dns, datagram: CtState::Dns };
    let sport = mapping(lb, t, &key, flags, &m, net, frame_src_mac(frame), now)?;
    let nat = Nat { src_addr: Some(h.ip), dst_addr: Some(h.peer_ip), src_port: Some(sport), dst_port: Some(port) };
    let d = frame.data_mut();
    rewrite_ipv4(&mut d[field::VER_IHL..], &nat).map_err(|_| D::Malformed)?;
    d[field::DST_MAC].copy_from_slice(&h.peer_mac.0);
    d[field::SRC_MAC].copy_from_slice(&h.mac.0);
    lb.egress.stats.tx_packets += 1;
    lb.egress.stats.tx_bytes += frame.len() as u64;
    Ok(Next::Done(Verdict::Tx(hp)))
}

/// A task's packet to a VIP balanced to the task itself (`be`; the port
/// kept for an every-port VIP): DNATed to it and source-NATed to its
/// network's gateway, on a port of the gateway tracked as an egress
/// connection (`Way::Hairpin`) whose key is the packet after the DNAT.
/// The task's answer goes to the gateway and comes back through
/// [`hairpin_back`].
pub(crate) fn hairpin(
    frame: &mut Frame<'_>,
    net: NetId,
    be: &crate::tables::services::Backend,
    keep_port: bool,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Next {
    Next::of(hairpin_out(frame, net, be, keep_port, now, t, lb))
}

fn hairpin_out(
    frame: &mut Frame<'_>,
    net: NetId,
    be: &crate::tables::services::Backend,
    keep_port: bool,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Result<Next, D> {
    let nw = t.networks.get(usize::from(net)).ok_or(D::NoRoute)?;
    let (key, flags) = tuple(frame.data()).ok_or(D::Malformed)?;
    let bport = if keep_port { key.dport } else { be.port };
    // The connection as the task will see it: to itself, from the gateway.
    let inner = FlowKey { dst: u32::from(be.ip), dport: bport, ..key };
    let to = (inner.dst, bport);
    let m = Mapping { to, snat: u32::from(nw.gateway_ip), way: Way::Hairpin, datagram: CtState::Udp };
    let sport = mapping(lb, t, &inner, flags, &m, net, frame_src_mac(frame), now)?;
    let nat = Nat {
        src_addr: Some(nw.gateway_ip),
        dst_addr: Some(be.ip),
        src_port: Some(sport),
        dst_port: (!keep_port).then_some(bport),
    };
    let d = frame.data_mut();
    rewrite_ipv4(&mut d[field::VER_IHL..], &nat).map_err(|_| D::Malformed)?;
    d[field::DST_MAC].copy_from_slice(&be.mac.0);
    d[field::SRC_MAC].copy_from_slice(&nw.gateway_mac.0);
    Ok(Next::Switch { net, dst: be.mac })
}

/// A task's packet to its network's gateway: the answer of a hairpin
/// connection ([`hairpin`]) has its destination put back (the task, on
/// the port it connected from) and is switched to it, where delivery
/// gives it the VIP's address as its source (`lb::on_delivery`). `None`
/// for anything else.
pub(crate) fn hairpin_back(frame: &mut Frame<'_>, net: NetId, now: u64, t: &Tables, lb: &mut LbState) -> Option<Next> {
    let (key, flags) = tuple(frame.data())?;
    let nw = t.networks.get(usize::from(net))?;
    if key.dst != u32::from(nw.gateway_ip) || !HOST_PORTS.contains(key.dport) {
        return None;
    }
    let v =
        reply(lb, &key, flags, now, t).filter(|v| Way::of(v.backend) == Way::Hairpin && v.service == u32::from(net))?;
    let nat = Nat { dst_addr: Some(Ipv4Addr::from(v.peer)), dst_port: Some(v.port), ..Nat::default() };
    let d = frame.data_mut();
    if rewrite_ipv4(&mut d[field::VER_IHL..], &nat).is_err() {
        return Some(Next::Done(Verdict::Drop(D::Malformed)));
    }
    d[field::DST_MAC].copy_from_slice(&v.mac);
    Some(Next::Switch { net, dst: MacAddr(v.mac) })
}

/// The reply half of the egress connection whose forward entry (key
/// `key`, value `v`) a task's packet just hit: refreshed, or put back if
/// it was lost (evicted from a full table; expired while only the task
/// spoke, as a one-way UDP stream does), so the next reply still finds
/// the task. A reset from the task (TCP `flags`) closes it too: no answer
/// comes to a reset, and it would otherwise stay established, holding
/// its port, for 900 s. A bare SYN (the task reusing its port after a
/// close) opens it again: else it kept its closing state and timeout,
/// and a reused connection idle past it lost its way back. False if its
/// key is another connection's now (the forward entry is stale).
#[allow(clippy::too_many_arguments)]
fn keep_reply(
    lb: &mut LbState,
    key: &FlowKey,
    v: &CtValue,
    flags: u8,
    to: (u32, u16),
    net: NetId,
    mac: [u8; 6],
    now: u64,
) -> bool {
    let rp = lb.conntrack.probe_in(&reply_key(key, to, v.peer, v.port2), Bucket::Tuple);
    match lb.conntrack.lookup_probe(&rp, now, flags & (conntrack::tcp_flags::RST | conntrack::tcp_flags::SYN)) {
        Ok(r) => r.flags == CT_EGRESS | CT_REPLY && r.peer == key.src && r.port == key.sport,
        Err(old) => {
            if let Some(old) = old {
                lb.release(&rp.key(), old);
            }
            let rv = CtValue {
                service: u32::from(net),
                backend: v.backend,
                peer: key.src,
                port: key.sport,
                mac,
                state: v.state,
                flags: CT_EGRESS | CT_REPLY,
                ..CtValue::ZERO
            };
            let back = lb.insert_probe(&rp, rv, now, false, usize::MAX).is_ok();
            if back {
                lb.egress.shares.count(key.src, to.0, true);
            }
            back
        }
    }
}

/// A task's packet to its host, through the host link: source-NATed to
/// the link's address (and for `HostDnat` to the kernel's end), TTL − 1.
fn to_host(
    frame: &mut Frame<'_>,
    key: &FlowKey,
    h: &HostLinkSpec,
    host_port: crate::packet::PortId,
    way: Way,
    port: u16,
    lb: &mut LbState,
) -> Result<Next, D> {
    let nat = Nat {
        src_addr: Some(h.ip),
        dst_addr: (way == Way::HostDnat).then_some(h.peer_ip),
        src_port: None,
        dst_port: None,
    };
    translate_out(frame, key.proto, &nat, port, (h.peer_mac, h.mac))?;
    lb.egress.stats.tx_packets += 1;
    lb.egress.stats.tx_bytes += frame.len() as u64;
    Ok(Next::Done(Verdict::Tx(host_port)))
}

/// A task's packet (IP protocol `proto`) translated on its way out:
/// `nat`'s addresses, `port` as its source port (an echo's identifier),
/// TTL − 1, and the MACs (destination, source).
fn translate_out(
    frame: &mut Frame<'_>,
    proto: u8,
    nat: &Nat,
    port: u16,
    (dst, src): (MacAddr, MacAddr),
) -> Result<(), D> {
    let d = frame.data_mut();
    let ip = &mut d[field::VER_IHL..];
    let r = if proto == protocol::ICMP {
        icmp_nat::rewrite_echo(ip, nat, port)
    } else {
        rewrite_ipv4(ip, &Nat { src_port: Some(port), ..*nat })
    };
    r.map_err(|_| D::Malformed)?;
    icmp_nat::dec_ttl(ip).map_err(|_| D::Malformed)?;
    d[field::DST_MAC].copy_from_slice(&dst.0);
    d[field::SRC_MAC].copy_from_slice(&src.0);
    Ok(())
}

/// The task's source MAC (to deliver replies to).
fn frame_src_mac(frame: &Frame<'_>) -> [u8; 6] {
    frame.data().get(field::SRC_MAC).and_then(|m| m.try_into().ok()).unwrap_or_default()
}

/// Whether the packet may cross the gateway: a TTL of 1 or less ends
/// there (answered with time-exceeded).
#[inline(always)]
fn ttl_left(frame: &Frame<'_>) -> Result<bool, D> {
    frame.data().get(field::VER_IHL + 8).map(|&ttl| ttl > 1).ok_or(D::Malformed)
}

/// The next hop's MAC toward `dst`, or the drop (remembering the miss for
/// the node to resolve).
#[inline(always)]
fn hop(t: &Tables, dst: u32, lb: &mut LbState) -> Result<MacAddr, D> {
    t.egress_hop(Ipv4Addr::from(dst)).ok_or_else(|| {
        lb.egress.stats.neigh_miss = Some(Ipv4Addr::from(dst));
        D::EgressNoNextHop
    })
}

/// The key and kind of a task's packet for egress (`d`: the frame, `ip`:
/// its IPv4 packet): plain TCP/UDP, an ICMP echo request (its identifier
/// as the source port), or an ICMP error about a packet from the world.
/// Fragments and other protocols are not translated.
fn classify_out(d: &[u8], ip: &[u8]) -> Result<(FlowKey, Kind), D> {
    if let Some((key, flags)) = tuple(d) {
        return Ok((key, Kind::Flow(flags)));
    }
    let src = u32::from_be_bytes(ip.get(12..16).and_then(|s| s.try_into().ok()).ok_or(D::Malformed)?);
    let dst = u32::from_be_bytes(ip.get(16..20).and_then(|s| s.try_into().ok()).ok_or(D::Malformed)?);
    if ip.get(9) != Some(&protocol::ICMP) {
        return Err(D::EgressUnsupported);
    }
    if let Ok((kind::ECHO_REQUEST, id)) = icmp_nat::echo_id(ip) {
        return Ok((FlowKey { src, dst, sport: id, dport: 0, proto: protocol::ICMP }, Kind::Echo));
    }
    let q = icmp_nat::quote(ip).map_err(|_| D::EgressUnsupported)?;
    Ok((FlowKey { src, dst, sport: 0, dport: 0, proto: protocol::ICMP }, Kind::Error(q)))
}

/// Opens an egress connection of `key` (its forward probe `fp`) from the
/// task with MAC `mac` in network `net`: a source port on `snat` from
/// `range`, both entries tracked (through the flood guard). The port.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // once a connection
fn open(
    lb: &mut LbState,
    t: &Tables,
    fp: &conntrack::Probe,
    key: &FlowKey,
    (to, snat, range, way): ((u32, u16), u32, PortRange, Way),
    state: CtState,
    net: NetId,
    mac: [u8; 6],
    now: u64,
) -> Result<u16, D> {
    let half = (range.len() / 2).min(u32::from(u16::MAX)) as u16;
    if lb.egress.shares.held(key.src, to.0) >= half {
        return Err(D::EgressTaskLimit);
    }
    let port = alloc_port(lb, t, key, to, snat, range, now)?;
    let (service, backend) = (u32::from(net), way as u32);
    let f = CtValue { service, backend, peer: snat, port2: port, state, flags: CT_EGRESS, ..CtValue::ZERO };
    let rv = CtValue {
        service,
        backend,
        peer: key.src,
        port: key.sport,
        mac,
        state,
        flags: CT_EGRESS | CT_REPLY,
        ..CtValue::ZERO
    };
    let rp = lb.conntrack.probe_in(&reply_key(key, to, snat, port), Bucket::Tuple);
    let at = lb.insert_probe(fp, f, now, true, usize::MAX)?;
    if let Err(e) = lb.insert_probe(&rp, rv, now, false, at) {
        if let Some(v) = lb.conntrack.remove_probe(fp) {
            lb.release(&fp.key(), v);
        }
        return Err(e);
    }
    lb.egress.shares.count(key.src, to.0, true);
    match way {
        Way::Dns => lb.egress.stats.dns_conns += 1,
        Way::Hairpin => lb.egress.stats.hairpin_conns += 1,
        Way::Out | Way::Host | Way::HostDnat => lb.egress.stats.new_conns += 1,
    }
    Ok(port)
}

/// A free source port on `snat` for a new connection of `key`, from
/// `range` (see the module's doc): the task's own port if it is in range
/// and free, else a round from a keyed offset, then a round from a random
/// one (then, for a small range, the whole range); a port held by an unconfirmed connection gives way (both its
/// entries) when nothing is free. A published port of this node's
/// data-path address is never handed out (its replies are the mesh's).
fn alloc_port(
    lb: &mut LbState,
    t: &Tables,
    key: &FlowKey,
    to: (u32, u16),
    snat: u32,
    range: PortRange,
    now: u64,
) -> Result<u16, D> {
    let n = range.len();
    // A published port is the routing mesh's on the data-path address,
    // and on the host link's (the node's own processes call it there).
    let link = t.egress.as_ref().and_then(|e| e.host_link.as_ref()).map(|h| u32::from(h.ip));
    let shared_with_mesh = t.is_mesh_addr(Ipv4Addr::from(snat)) || link == Some(snat);
    let off = flow::hash2(
        lb.egress.seed,
        (u64::from(key.src) << 32) | u64::from(key.dst),
        (u64::from(key.sport) << 32) | (u64::from(key.dport) << 16) | u64::from(key.proto),
    ) % n;
    let off2 = (lb.egress.next_random() % u64::from(n)) as u32;
    let own = range.contains(key.sport).then_some(key.sport);
    let first = (0..ROUND).map(|i| range.lo + ((off + i) % n) as u16);
    let second = (0..ROUND).map(|i| range.lo + ((off2 + i) % n) as u16);
    // A small range is searched whole at last (its size bounds the work).
    let rest = (0..if n <= SMALL_RANGE { n } else { 0 }).map(|i| range.lo + ((off + ROUND + i) % n) as u16);
    let mut unconfirmed = None;
    for (i, port) in own.into_iter().chain(first).chain(second).chain(rest).enumerate() {
        if shared_with_mesh && key.proto != protocol::ICMP && t.services.published(port, key.proto).is_some() {
            continue;
        }
        let rp = lb.conntrack.probe_in(&reply_key(key, to, snat, port), Bucket::Tuple);
        match lb.conntrack.peek_probe(&rp, now) {
            None => {
                if i > ROUND as usize {
                    lb.egress.stats.alloc_slow += 1;
                }
                return Ok(port);
            }
            Some(v) if v.state == CtState::Unconfirmed && unconfirmed.is_none() => unconfirmed = Some((port, rp)),
            Some(_) => {}
        }
    }
    let (port, rp) = unconfirmed.ok_or(D::EgressPortsExhausted)?;
    if let Some(v) = lb.conntrack.evict_probe(&rp, now) {
        let rk = rp.key();
        lb.release(&rk, v);
        if v.flags & CT_EGRESS != 0 {
            let fp = lb.conntrack.probe_in(&forward_key(&rk, &v, t), Bucket::Src);
            if let Some(f) = lb.conntrack.evict_probe(&fp, now) {
                lb.release(&fp.key(), f);
            }
        }
    }
    lb.egress.stats.alloc_slow += 1;
    Ok(port)
}

/// A task's ICMP error about a packet it got from the world through
/// egress (a port unreachable answering a UDP reply): translated to come
/// from the egress address about the packet as the world sent it.
fn error_out(frame: &mut Frame<'_>, q: &Quote, now: u64, t: &Tables, lb: &mut LbState) -> Result<Next, D> {
    // The quoted packet went from the world (q.src) to the task (q.dst):
    // the connection's forward key is the reverse.
    let fk = FlowKey { src: u32::from(q.dst), dst: u32::from(q.src), sport: q.dport, dport: q.sport, proto: q.proto };
    let fp = lb.conntrack.probe_in(&fk, Bucket::Src);
    let v = lb.conntrack.peek_probe(&fp, now).filter(|v| v.flags == CT_EGRESS).ok_or(D::EgressUnsupported)?;
    let mac = hop(t, fk.dst, lb)?;
    let snat = Ipv4Addr::from(v.peer);
    let d = frame.data_mut();
    let ip = &mut d[field::VER_IHL..];
    let outer = Nat { src_addr: Some(snat), ..Nat::default() };
    icmp_nat::rewrite_error(ip, q, &outer, None, Some((snat, v.port2))).map_err(|_| D::Malformed)?;
    icmp_nat::dec_ttl(ip).map_err(|_| D::Malformed)?;
    d[field::DST_MAC].copy_from_slice(&mac.0);
    d[field::SRC_MAC].copy_from_slice(&t.data_mac.0);
    lb.egress.stats.icmp_out += 1;
    Ok(Next::Done(Verdict::Tx(UPLINK)))
}

/// A frame from the uplink to the egress address: a reply of an egress
/// connection (TCP/UDP to a port of the range, an echo reply to an
/// identifier of it, an ICMP error quoting a packet egress sent) goes to
/// its task. `None` for what is not egress's (to another address, another
/// port, a published port inside the range; ICMP about the kernel's own
/// packets), which the uplink's later steps take.
pub(crate) fn from_outside(frame: &mut Frame<'_>, now: u64, t: &Tables, lb: &mut LbState) -> Option<Verdict> {
    let e = t.egress.as_ref()?;
    replies(frame, e.addr, e.ports, now, t, lb)
}

/// A frame from the host link (the node's kernel): a reply of a task's
/// connection to its host goes to the task; anything else (the kernel's
/// own chatter, connections it tries to open) is dropped, counted.
pub(crate) fn from_host(frame: &mut Frame<'_>, now: u64, t: &Tables, lb: &mut LbState) -> Verdict {
    let Some(h) = t.egress.as_ref().and_then(|e| e.host_link.as_ref()) else {
        return Verdict::Drop(D::UnknownPort);
    };
    if frame.data().get(field::SRC_MAC) != Some(&h.peer_mac.0[..]) {
        return Verdict::Drop(D::SrcMacSpoofed);
    }
    if let Some(v) = crate::overlay::arp::answer(frame, h.ip, h.mac, t.host_port.unwrap_or(UPLINK)) {
        return v;
    }
    replies(frame, h.ip, HOST_PORTS, now, t, lb).unwrap_or(Verdict::Drop(D::EgressNoConnection))
}

/// A frame to `addr` (the egress address, or the host link's), whose
/// connections use the ports of `range`: see [`from_outside`].
fn replies(
    frame: &mut Frame<'_>,
    addr: Ipv4Addr,
    range: PortRange,
    now: u64,
    t: &Tables,
    lb: &mut LbState,
) -> Option<Verdict> {
    let d = frame.data();
    let ip = d.get(ethernet::HEADER_LEN..)?;
    if ip.get(16..20)? != addr.octets() {
        return None;
    }
    let r = if let Some((key, flags)) = tuple(d) {
        if !range.contains(key.dport) {
            return None;
        }
        match reply(lb, &key, flags, now, t) {
            Some(v) => deliver(frame, &v, None, t, lb),
            None if addr == t.data_ip && t.services.published(key.dport, key.proto).is_some() => {
                return None;
            }
            None => Err(D::EgressNoConnection),
        }
    } else if ip.get(9) == Some(&protocol::ICMP) {
        let src = u32::from_be_bytes(ip.get(12..16)?.try_into().ok()?);
        if let Ok((kind::ECHO_REPLY, id)) = icmp_nat::echo_id(ip) {
            if !range.contains(id) {
                return None;
            }
            let key = FlowKey { src, dst: u32::from(addr), sport: 0, dport: id, proto: protocol::ICMP };
            match reply(lb, &key, 0, now, t) {
                Some(v) => deliver(frame, &v, None, t, lb),
                None => Err(D::EgressNoConnection),
            }
        } else {
            let q = icmp_nat::quote(ip).ok()?;
            if q.src != addr || !range.contains(q.sport) {
                return None;
            }
            // The connection's reply key: from the quoted packet's
            // destination back to the egress address. An error neither
            // refreshes nor confirms it (it may be spoofed).
            let rk = FlowKey {
                src: u32::from(q.dst),
                dst: u32::from(q.src),
                sport: q.dport,
                dport: q.sport,
                proto: q.proto,
            };
            let rp = lb.conntrack.probe_in(&rk, Bucket::Tuple);
            match lb.conntrack.peek_probe(&rp, now).filter(|v| v.flags == CT_EGRESS | CT_REPLY) {
                Some(v) => deliver(frame, &v, Some(&q), t, lb),
                None => Err(D::EgressNoConnection),
            }
        }
    } else {
        return None;
    };
    Some(r.unwrap_or_else(Verdict::Drop))
}

/// The live egress reply entry of `key` (a reply confirms its connection).
fn reply(lb: &mut LbState, key: &FlowKey, flags: u8, now: u64, t: &Tables) -> Option<CtValue> {
    let p = lb.conntrack.probe_in(key, Bucket::Tuple);
    lb.lookup_reply(&p, now, flags, t).filter(|v| v.flags == CT_EGRESS | CT_REPLY)
}

/// Readdresses a reply (or, with `quote`, an ICMP error about the
/// connection) to the task of the egress reply entry `v` and sends it to
/// the task's port, from its network's gateway.
fn deliver(
    frame: &mut Frame<'_>,
    v: &CtValue,
    quote: Option<&Quote>,
    t: &Tables,
    lb: &mut LbState,
) -> Result<Verdict, D> {
    let net = NetId::try_from(v.service).map_err(|_| D::EgressNoConnection)?;
    let nw = t.networks.get(usize::from(net)).ok_or(D::EgressNoConnection)?;
    let Some(Location::Local(p)) = t.fdb.get(&mac_key(net, MacAddr(v.mac))).copied() else {
        return Err(D::EgressNoConnection);
    };
    let task = Ipv4Addr::from(v.peer);
    let d = frame.data_mut();
    let ip = &mut d[field::VER_IHL..];
    // A connection to the data-path address that went to the kernel's end
    // of the host link comes back from the data-path address; a DNS query
    // is answered by the gateway, from port 53 (an ICMP error about it
    // quotes the query as the task sent it).
    let (from, from_port) = match Way::of(v.backend) {
        Way::HostDnat => (Some(t.data_ip), None),
        Way::Dns => (Some(nw.gateway_ip), Some(DNS_PORT)),
        Way::Out | Way::Host | Way::Hairpin => (None, None),
    };
    let to_task = Nat { dst_addr: Some(task), src_addr: from, ..Nat::default() };
    let r = match (quote, ip.get(9).copied()) {
        (Some(q), _) => {
            let inner_dst = from.zip(from_port);
            icmp_nat::rewrite_error(ip, q, &to_task, Some((task, v.port)), inner_dst)
        }
        (None, Some(protocol::ICMP)) => icmp_nat::rewrite_echo(ip, &to_task, v.port),
        (None, _) => rewrite_ipv4(ip, &Nat { dst_port: Some(v.port), src_port: from_port, ..to_task }),
    };
    r.map_err(|_| D::Malformed)?;
    d[field::DST_MAC].copy_from_slice(&v.mac);
    d[field::SRC_MAC].copy_from_slice(&nw.gateway_mac.0);
    if quote.is_some() {
        lb.egress.stats.icmp_in += 1;
    } else {
        lb.egress.stats.rx_packets += 1;
        lb.egress.stats.rx_bytes += frame.len() as u64;
    }
    Ok(Verdict::Tx(p))
}
