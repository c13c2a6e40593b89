//! The routed underlay: for every peer's data-path address, the next hop
//! and its MAC from the kernel's FIB and neighbour table of the node's
//! namespace (netlink, through `rtnetlink`), followed as they change.
//!
//! A thread of its own (`mp-underlay`, a current-thread tokio runtime)
//! holds one netlink socket subscribed to `RTNLGRP_IPV4_ROUTE` and
//! `RTNLGRP_NEIGH`. On every notification, every change of the peer set
//! and every few seconds it asks the kernel, per peer, the route
//! (`RTM_GETROUTE` to the address: the gateway, or none when the peer is
//! on a connected subnet, and the output interface) and reads the
//! neighbour table for that hop. When a peer's MAC changes it calls the
//! node back, which compiles and publishes the tables again (the packet
//! path never asks: it reads the MAC in the peer's encapsulation template).
//!
//! A hop the kernel has no MAC for (no entry, `FAILED`), or one gone
//! `STALE`, is handed to the kernel to resolve: an `RTM_NEWNEIGH` with
//! `NTF_USE`, which does what the kernel does when a packet of its own
//! uses the entry (starts ARP, or re-verifies a stale entry with a unicast
//! probe). No datagram is sent to the peer, no socket is bound, the kernel
//! keeps its own timers and retries, and the answer arrives as a neighbour
//! notification. (A UDP send toward the peer would do the same but puts a
//! datagram on the wire to a port nobody asked for.)
//!
//! With an AF_XDP uplink the kernel holds the data NIC's address, so its
//! FIB and neighbour table are those of the data NIC. With a TAP uplink
//! the kernel needs an interface of its own on the same segment as the
//! TAP (the bridge the TAP is on, in a real host) with a route toward the
//! peers. Where the kernel has no route to a peer (a node whose only data
//! path is the TAP on one L2 segment), the peer's own data MAC stays in
//! use, as before.
//!
//! With egress on ([`Underlay::set_egress`]) each round also dumps the
//! main routing table's IPv4 unicast routes out of the data NIC (AF_XDP:
//! the NIC; TAP: the interface the kernel routes the data-path address
//! through), keeps the lowest-metric route per prefix, and resolves each
//! gateway's MAC exactly as a peer's next hop; destinations on a
//! connected prefix that the workers found no MAC for
//! ([`Underlay::want`]) are resolved the same way. [`Underlay::egress`]
//! gives both (the tables' `[node.egress]` route and neighbour lists); a
//! change calls the node back as a peer's does. A gateway the kernel has
//! no MAC for yet keeps its prefix's last MAC (or leaves the prefix out:
//! the longest remaining prefix serves); multipath routes are left out.

use futures_util::{FutureExt, StreamExt, TryStreamExt};
use meshplane_dataplane::tables::egress::{EgressRouteSpec, MAX_ROUTES};
use meshplane_dataplane::tables::{NeighbourSpec, Subnet};
use meshplane_dataplane::wire::MacAddr;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How often every peer is looked up again without a notification (and a
/// stale next hop re-verified at most).
const REFRESH: Duration = Duration::from_secs(5);
/// How soon an unresolved next hop is looked at again (the kernel's
/// answer normally arrives as a notification first).
const RETRY: Duration = Duration::from_millis(250);
/// How long one round of lookups may take (the kernel answers in
/// microseconds; a lost answer must not stop the following).
const ROUND: Duration = Duration::from_secs(2);
/// How often one next hop is handed to the kernel to resolve, at most.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Why the underlay could not be read.
#[derive(Debug, Error)]
pub(crate) enum UnderlayError {
    /// The netlink socket could not be opened or subscribed.
    #[error("opening a netlink socket for route and neighbour notifications: {0}")]
    Socket(#[source] std::io::Error),
    /// The thread could not be started.
    #[error("starting the underlay thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The kernel refused the route lookup (e.g. no route: unreachable).
    #[error("the kernel's route to {peer}: {source}")]
    Route {
        /// The peer looked up.
        peer: Ipv4Addr,
        /// What netlink said.
        #[source]
        source: rtnetlink::Error,
    },
    /// The route the kernel gave is not a unicast route out of an interface.
    #[error("the kernel's route to {0} is not a unicast route out of an interface")]
    NotUnicast(Ipv4Addr),
    /// The route leaves through another interface than the data NIC.
    #[error("the kernel routes {peer} out of interface {oif}, not the data NIC (interface {want}): fix the routes")]
    OtherInterface {
        /// The peer looked up.
        peer: Ipv4Addr,
        /// The route's interface.
        oif: u32,
        /// The data NIC's.
        want: u32,
    },
    /// The neighbour table could not be read.
    #[error("reading the kernel's neighbour table: {0}")]
    Neighbours(#[source] rtnetlink::Error),
    /// The routing table could not be read.
    #[error("dumping the kernel's routes: {0}")]
    Routes(#[source] rtnetlink::Error),
    /// The kernel refused to resolve a next hop.
    #[error("asking the kernel to resolve {ip}: {source}")]
    Probe {
        /// The next hop.
        ip: Ipv4Addr,
        /// What netlink said.
        #[source]
        source: rtnetlink::Error,
    },
}

/// How one peer is reached: its next hop and that hop's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hop {
    /// The gateway, or `None` when the peer is on a connected subnet.
    pub(crate) via: Option<Ipv4Addr>,
    /// The kernel's output interface.
    pub(crate) ifindex: u32,
    /// The next hop's MAC, once the kernel knows it.
    pub(crate) mac: Option<MacAddr>,
}

impl Hop {
    /// The address whose MAC the frames go to.
    fn next(&self, peer: Ipv4Addr) -> Ipv4Addr {
        self.via.unwrap_or(peer)
    }
}

/// Routes and on-link neighbours toward the world (egress), as resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct World {
    /// (prefix, length) → the gateway's MAC, longest prefix first.
    routes: Vec<((Ipv4Addr, u8), MacAddr)>,
    /// On-link destination → MAC, in address order.
    neigh: Vec<(Ipv4Addr, MacAddr)>,
}

/// What the thread and the node share.
struct Inner {
    peers: Mutex<BTreeSet<Ipv4Addr>>,
    hops: Mutex<BTreeMap<Ipv4Addr, Hop>>,
    /// Egress on: the data-path address (its route names the kernel's
    /// interface on the data segment when `oif` is not given).
    egress: Mutex<Option<Ipv4Addr>>,
    /// On-link destinations the workers found no MAC for.
    wanted: Mutex<BTreeSet<Ipv4Addr>>,
    world: Mutex<World>,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
    /// The interface every route to a peer must leave through (the data
    /// NIC, when the kernel holds it: AF_XDP).
    oif: Option<u32>,
}

/// The resolver: started once per node, told the peers, asked their MACs.
pub(crate) struct Underlay {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A callback when some peer's MAC changed.
pub(crate) type OnChange = Box<dyn Fn() + Send + Sync>;

impl Underlay {
    /// Starts the resolver in the calling thread's network namespace;
    /// `on_change` runs (on the resolver's thread) whenever a peer's
    /// next-hop MAC changes. With `oif`, a route to a peer out of another
    /// interface is refused (logged; the peer keeps its own MAC).
    pub(crate) fn start(on_change: OnChange, oif: Option<u32>) -> Result<Underlay, UnderlayError> {
        let inner = Arc::new(Inner {
            peers: Mutex::new(BTreeSet::new()),
            hops: Mutex::new(BTreeMap::new()),
            egress: Mutex::new(None),
            wanted: Mutex::new(BTreeSet::new()),
            world: Mutex::new(World::default()),
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            oif,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let th = inner.clone();
        let thread = std::thread::Builder::new()
            .name("mp-underlay".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(UnderlayError::Socket(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut started = Some(tx);
                    while !th.stop.load(Ordering::Acquire) {
                        let groups = [MulticastGroup::Ipv4Route, MulticastGroup::Neigh];
                        match rtnetlink::new_multicast_connection(&groups) {
                            Ok((conn, handle, events)) => {
                                let conn = tokio::spawn(conn);
                                if let Some(tx) = started.take() {
                                    let _ = tx.send(Ok(()));
                                }
                                follow(&th, &handle, events, &on_change).await;
                                conn.abort();
                            }
                            Err(e) => match started.take() {
                                Some(tx) => {
                                    let _ = tx.send(Err(UnderlayError::Socket(e)));
                                    return;
                                }
                                None => tracing::warn!("underlay: {}", UnderlayError::Socket(e)),
                            },
                        }
                        // The socket closed (or could not be opened again):
                        // a new one in a second.
                        tokio::select! {
                            () = th.wake.notified() => {}
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                });
            })
            .map_err(UnderlayError::Thread)?;
        match rx.recv() {
            Ok(Ok(())) => Ok(Underlay { inner, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(UnderlayError::Thread(std::io::Error::other("the underlay thread ended at start")))
            }
        }
    }

    /// The peers to follow (the others are forgotten).
    pub(crate) fn watch(&self, peers: impl IntoIterator<Item = Ipv4Addr>) {
        let new: BTreeSet<Ipv4Addr> = peers.into_iter().collect();
        let mut p = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if *p != new {
            *p = new;
            drop(p);
            self.inner.wake.notify_one();
        }
    }

    /// How `peer` is reached, as last resolved.
    pub(crate) fn hop(&self, peer: Ipv4Addr) -> Option<Hop> {
        self.inner.hops.lock().unwrap_or_else(PoisonError::into_inner).get(&peer).copied()
    }

    /// Egress on (`Some(data-path address)`) or off: the routes toward
    /// the world are followed too.
    pub(crate) fn set_egress(&self, data_ip: Option<Ipv4Addr>) {
        let mut e = self.inner.egress.lock().unwrap_or_else(PoisonError::into_inner);
        if *e != data_ip {
            *e = data_ip;
            drop(e);
            self.inner.wake.notify_one();
        }
    }

    /// On-link destinations to resolve besides the routes' gateways (the
    /// workers' misses; the caller keeps a bounded set, this replaces it).
    pub(crate) fn want(&self, dsts: &[Ipv4Addr]) {
        let new: BTreeSet<Ipv4Addr> = dsts.iter().copied().collect();
        let mut w = self.inner.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if *w != new {
            *w = new;
            drop(w);
            self.inner.wake.notify_one();
        }
    }

    /// The routes toward the world (each with its gateway's MAC) and the
    /// on-link destinations resolved, as `[node.egress]` takes them.
    pub(crate) fn egress(&self) -> (Vec<EgressRouteSpec>, Vec<NeighbourSpec>) {
        let w = self.inner.world.lock().unwrap_or_else(PoisonError::into_inner);
        (
            w.routes
                .iter()
                .map(|&((addr, prefix), mac)| EgressRouteSpec { prefix: Subnet { addr, prefix }, mac })
                .collect(),
            w.neigh.iter().map(|&(ip, mac)| NeighbourSpec { ip, mac }).collect(),
        )
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        // (Dropped on its own thread, by the last owner in a callback, it
        // ends by itself after the callback.)
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// The resolver's loop: resolve, publish a change, wait for a
/// notification, a new peer set, a retry or the refresh.
async fn follow<E: futures_util::Stream + Unpin>(inner: &Inner, h: &Handle, mut events: E, on_change: &OnChange) {
    let mut probed: HashMap<(u32, Ipv4Addr), Instant> = HashMap::new();
    let mut warned: BTreeSet<Ipv4Addr> = BTreeSet::new();
    while !inner.stop.load(Ordering::Acquire) {
        let peers: Vec<Ipv4Addr> = inner.peers.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
        let egress = *inner.egress.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted: Vec<Ipv4Addr> =
            inner.wanted.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
        let last_world = inner.world.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let round = tokio::time::timeout(ROUND, async {
            let neigh = if peers.is_empty() && egress.is_none() { HashMap::new() } else { neighbours(h).await? };
            let hops = resolve(h, &neigh, &peers, inner.oif, &mut probed, &mut warned).await?;
            let world = match egress {
                Some(data_ip) => {
                    let at = Toward { oif: inner.oif, data_ip };
                    Some(world(h, &neigh, at, &wanted, &last_world, &mut probed).await?)
                }
                None => None,
            };
            Ok::<_, UnderlayError>((hops, world))
        })
        .await;
        let answered = matches!(round, Ok(Ok(_)));
        let (world_now, world_unresolved) = match &round {
            Ok(Ok((_, Some((w, unresolved))))) => (w.clone(), *unresolved),
            Ok(Ok((_, None))) => (World::default(), false),
            // The routes in use stay as they are.
            _ => (last_world.clone(), false),
        };
        let mut hops = match round.map(|r| r.map(|(hops, _)| hops)) {
            Ok(Ok(hops)) => hops,
            Ok(Err(e)) => {
                // The hops in use stay as they are.
                tracing::warn!("underlay: {e}; trying again");
                BTreeMap::clone(&inner.hops.lock().unwrap_or_else(PoisonError::into_inner))
            }
            Err(_) => {
                tracing::warn!("underlay: the kernel did not answer within {ROUND:?}; trying again");
                BTreeMap::clone(&inner.hops.lock().unwrap_or_else(PoisonError::into_inner))
            }
        };
        let unresolved = hops.values().any(|x| x.mac.is_none()) || !answered || world_unresolved;
        let changed = {
            let mut cur = inner.hops.lock().unwrap_or_else(PoisonError::into_inner);
            for (peer, hop) in &mut hops {
                if cur.get(peer) != Some(hop) {
                    tracing::info!(
                        "underlay: peer {peer} via {} (ifindex {}), next-hop MAC {}",
                        hop.via.map_or("direct".to_owned(), |g| g.to_string()),
                        hop.ifindex,
                        hop.mac.map_or("unresolved".to_owned(), |m| m.to_string())
                    );
                }
                // Until the kernel knows the new next hop's MAC, the last
                // one this peer had stays in use (a gateway that was
                // reachable a moment ago beats the peer's own MAC).
                if hop.mac.is_none() {
                    hop.mac = cur.get(peer).and_then(|h| h.mac);
                }
            }
            let macs = |m: &BTreeMap<Ipv4Addr, Hop>| m.iter().map(|(k, v)| (*k, v.mac)).collect::<Vec<_>>();
            let changed = macs(&cur) != macs(&hops);
            *cur = hops;
            changed
        };
        let world_changed = {
            let mut cur = inner.world.lock().unwrap_or_else(PoisonError::into_inner);
            let changed = *cur != world_now;
            if changed {
                let routes: Vec<String> =
                    world_now.routes.iter().map(|((a, l), m)| format!("{a}/{l} MAC {m}")).collect();
                let neigh: Vec<String> = world_now.neigh.iter().map(|(a, m)| format!("{a} MAC {m}")).collect();
                tracing::info!(
                    "underlay: egress routes [{}], on-link neighbours [{}]",
                    routes.join(", "),
                    neigh.join(", ")
                );
                *cur = world_now;
            }
            changed
        };
        let changed = changed || world_changed;
        if changed {
            on_change();
        }
        let wait = if unresolved { RETRY } else { REFRESH };
        tokio::select! {
            () = inner.wake.notified() => {}
            ev = events.next() => if ev.is_none() {
                tracing::warn!("underlay: the netlink socket closed; opening another");
                return;
            },
            () = tokio::time::sleep(wait) => {}
        }
        // One lookup for a burst of notifications.
        while let Some(Some(_)) = events.next().now_or_never() {}
    }
}

/// Every peer's hop as the kernel has it now (peers without a route are
/// left out; a hop's MAC is `None` until the kernel knows it); next hops
/// without a usable MAC handed to the kernel to resolve.
async fn resolve(
    h: &Handle,
    neigh: &Neighbours,
    peers: &[Ipv4Addr],
    want_oif: Option<u32>,
    probed: &mut Probed,
    warned: &mut BTreeSet<Ipv4Addr>,
) -> Result<BTreeMap<Ipv4Addr, Hop>, UnderlayError> {
    let mut out = BTreeMap::new();
    for &peer in peers {
        let r = route(h, peer).await.and_then(|(via, oif)| match want_oif {
            Some(want) if want != oif => Err(UnderlayError::OtherInterface { peer, oif, want }),
            _ => Ok((via, oif)),
        });
        let (via, ifindex) = match r {
            Ok(r) => {
                warned.remove(&peer);
                r
            }
            Err(e) => {
                if warned.insert(peer) {
                    tracing::info!("underlay: {e}; using the peer's own MAC (one L2 segment)");
                }
                continue;
            }
        };
        let mut hop = Hop { via, ifindex, mac: None };
        hop.mac = next_hop_mac(h, neigh, ifindex, hop.next(peer), probed).await;
        out.insert(peer, hop);
    }
    probed.retain(|_, t| t.elapsed() < REFRESH * 2);
    Ok(out)
}

/// The neighbour table: (interface, address) → (state, usable MAC).
type Neighbours = HashMap<(u32, Ipv4Addr), (NeighbourState, Option<MacAddr>)>;
/// When each (interface, next hop) was last handed to the kernel.
type Probed = HashMap<(u32, Ipv4Addr), Instant>;

/// The MAC of next hop `next` on interface `ifindex` from the neighbour
/// table; a missing, failed or stale entry is handed to the kernel to
/// resolve (the answer comes as a notification).
async fn next_hop_mac(
    h: &Handle,
    neigh: &Neighbours,
    ifindex: u32,
    next: Ipv4Addr,
    probed: &mut Probed,
) -> Option<MacAddr> {
    let entry = neigh.get(&(ifindex, next));
    let state = entry.map(|e| e.0);
    // No entry: asking creates one (INCOMPLETE), so this does not
    // repeat; a failed one is retried once a second, a stale one
    // re-verified every few seconds.
    let (need, every) = match state {
        None => (true, Duration::ZERO),
        Some(NeighbourState::Failed | NeighbourState::None) => (true, PROBE_EVERY),
        Some(NeighbourState::Stale) => (true, REFRESH),
        _ => (false, PROBE_EVERY),
    };
    if need && probed.get(&(ifindex, next)).is_none_or(|t| t.elapsed() >= every) {
        probed.insert((ifindex, next), Instant::now());
        if let Err(e) = probe(h, ifindex, next).await {
            tracing::warn!("underlay: {e}");
        }
    }
    entry.and_then(|e| e.1)
}

/// Where the routes toward the world leave: the data NIC (`oif`, AF_XDP)
/// or the interface the kernel routes the data-path address through.
#[derive(Debug, Clone, Copy)]
struct Toward {
    oif: Option<u32>,
    data_ip: Ipv4Addr,
}

/// The main table's lowest-metric IPv4 unicast route per prefix out of
/// `oif`: (prefix, length) → gateway (`None`: on-link).
async fn main_routes(h: &Handle, oif: u32) -> Result<BTreeMap<(Ipv4Addr, u8), Option<Ipv4Addr>>, UnderlayError> {
    const MAIN: u32 = 254;
    let mut best: BTreeMap<(Ipv4Addr, u8), (u32, Option<Ipv4Addr>)> = BTreeMap::new();
    let mut s = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(r) = s.try_next().await.map_err(UnderlayError::Routes)? {
        if r.header.kind != RouteType::Unicast || r.header.address_family != AddressFamily::Inet {
            continue;
        }
        let (mut table, mut dst, mut gw, mut out, mut metric) =
            (u32::from(r.header.table), Ipv4Addr::UNSPECIFIED, None, None, 0);
        for a in &r.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                RouteAttribute::Oif(i) => out = Some(*i),
                RouteAttribute::Priority(p) => metric = *p,
                _ => {}
            }
        }
        let len = r.header.destination_prefix_length;
        if table != MAIN || out != Some(oif) || len > 32 {
            continue;
        }
        let key = (dst, len);
        if best.get(&key).is_none_or(|b| metric < b.0) {
            best.insert(key, (metric, gw));
        }
    }
    Ok(best.into_iter().map(|(k, (_, gw))| (k, gw)).collect())
}

/// True if `ip` lies in (`net`, `len`).
fn within(ip: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// `found`, else the MAC `key` had in `last` (and `unresolved` set).
fn or_last<K: PartialEq>(
    found: Option<MacAddr>,
    key: K,
    last: &[(K, MacAddr)],
    unresolved: &mut bool,
) -> Option<MacAddr> {
    found.or_else(|| {
        *unresolved = true;
        last.iter().find(|e| e.0 == key).map(|e| e.1)
    })
}

/// The routes toward the world with their gateways' MACs, and the wanted
/// on-link destinations' MACs (a gateway or destination without one
/// keeps its last MAC, or is left out); true if something is unresolved.
async fn world(
    h: &Handle,
    neigh: &Neighbours,
    at: Toward,
    wanted: &[Ipv4Addr],
    last: &World,
    probed: &mut Probed,
) -> Result<(World, bool), UnderlayError> {
    let oif = match at.oif {
        Some(o) => o,
        None => match route(h, at.data_ip).await {
            Ok((_, o)) => o,
            // No interface toward the data segment: no routes.
            Err(_) => return Ok((World::default(), false)),
        },
    };
    let routes = main_routes(h, oif).await?;
    let mut w = World::default();
    let mut unresolved = false;
    for (&prefix, &gw) in &routes {
        let Some(g) = gw else { continue };
        let found = next_hop_mac(h, neigh, oif, g, probed).await;
        if let Some(m) = or_last(found, prefix, &last.routes, &mut unresolved) {
            w.routes.push((prefix, m));
        }
    }
    // Longest prefix first; past the tables' limit the most specific go
    // (a less specific route still covers them).
    w.routes.sort_by_key(|&((net, len), _)| (core::cmp::Reverse(len), net));
    if w.routes.len() > MAX_ROUTES {
        tracing::warn!(
            "underlay: {} egress routes, the tables take {MAX_ROUTES}: the most specific left out",
            w.routes.len()
        );
        w.routes.drain(..w.routes.len() - MAX_ROUTES);
    }
    for &dst in wanted {
        // On-link if the longest prefix covering it has no gateway.
        let best = routes.iter().filter(|(p, _)| within(dst, **p)).max_by_key(|(p, _)| p.1);
        if !matches!(best, Some((_, None))) {
            continue;
        }
        let found = next_hop_mac(h, neigh, oif, dst, probed).await;
        if let Some(m) = or_last(found, dst, &last.neigh, &mut unresolved) {
            w.neigh.push((dst, m));
        }
    }
    Ok((w, unresolved))
}

/// The kernel's route to `peer`: its gateway (if any) and output interface.
async fn route(h: &Handle, peer: Ipv4Addr) -> Result<(Option<Ipv4Addr>, u32), UnderlayError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(peer, 32).build();
    let r = h
        .route()
        .get(msg)
        .execute()
        .try_next()
        .await
        .map_err(|source| UnderlayError::Route { peer, source })?
        .ok_or(UnderlayError::NotUnicast(peer))?;
    if r.header.kind != RouteType::Unicast {
        return Err(UnderlayError::NotUnicast(peer));
    }
    let mut via = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Ok((via, oif.ok_or(UnderlayError::NotUnicast(peer))?))
}

/// The IPv4 neighbour table: (interface, address) → (state, MAC).
async fn neighbours(h: &Handle) -> Result<Neighbours, UnderlayError> {
    let mut out = HashMap::new();
    let mut s = h.neighbours().get().set_address_family(AddressFamily::Inet).execute();
    while let Some(m) = s.try_next().await.map_err(UnderlayError::Neighbours)? {
        let mut ip = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
                NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(MacAddr),
                _ => {}
            }
        }
        if let Some(ip) = ip {
            // Only states that hold a MAC the kernel still stands by.
            let usable = matches!(
                m.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            out.insert((m.header.ifindex, ip), (m.header.state, mac.filter(|_| usable)));
        }
    }
    Ok(out)
}

/// Asks the kernel to resolve `ip` on interface `ifindex` (`NTF_USE`: as
/// if a packet of its own used the entry).
async fn probe(h: &Handle, ifindex: u32, ip: Ipv4Addr) -> Result<(), UnderlayError> {
    h.neighbours()
        .add(ifindex, IpAddr::V4(ip))
        .state(NeighbourState::None)
        .flags(NeighbourFlags::Use)
        .replace()
        .execute()
        .await
        .map_err(|source| UnderlayError::Probe { ip, source })
}

#[cfg(test)]
mod tests {
    //! The resolver against a real kernel, in namespaces of its own (root;
    //! skipped otherwise): `mp-ru-n` (the node) reaches 198.18.201.0/24
    //! through gateway `mp-ru-g1` (198.18.200.254), later through
    //! `mp-ru-g2` (198.18.202.254).
    use super::*;
    use std::process::Command;
    use std::sync::mpsc;

    /// Namespaces removed on drop (also when the test fails).
    struct Netns(Vec<String>);

    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    fn ip(args: &str) {
        let v: Vec<&str> = args.split_whitespace().collect();
        let o = Command::new("ip").args(&v).output().expect("running ip");
        assert!(o.status.success(), "ip {args}: {}", String::from_utf8_lossy(&o.stderr));
    }

    fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        t0.elapsed()
    }

    /// A resolver started in namespace `ns`.
    fn start_in(ns: &str, oif: Option<u32>, on_change: OnChange) -> Underlay {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(path).expect("the node's namespace");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the node's namespace");
            Underlay::start(on_change, oif)
        })
        .join()
        .expect("the starting thread")
        .expect("the resolver starts")
    }

    /// Fresh namespaces `names` (lo up), removed when the guard drops;
    /// `None` (the test skips) without root.
    fn namespaces(names: &[&str]) -> Option<Netns> {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
            eprintln!("skipped: needs root (network namespaces)");
            return None;
        }
        for n in names {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(std::process::Stdio::null()).status();
        }
        let guard = Netns(names.iter().map(|s| (*s).to_owned()).collect());
        for n in names {
            ip(&format!("netns add {n}"));
            ip(&format!("-n {n} link set lo up"));
        }
        Some(guard)
    }

    /// Interface `iface`'s index in namespace `ns`.
    fn index_of(ns: &str, iface: &str) -> u32 {
        let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", iface]).output().expect("ip");
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .next()
            .and_then(|x| x.trim().parse().ok())
            .expect("the interface's index")
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().expect("a MAC")
    }

    #[test]
    fn next_hops_learned_and_followed() {
        let Some(_guard) = namespaces(&["mp-ru-n", "mp-ru-g1", "mp-ru-g2"]) else { return };
        ip("link add a0 netns mp-ru-n type veth peer name a0 netns mp-ru-g1");
        ip("link add b0 netns mp-ru-n type veth peer name b0 netns mp-ru-g2");
        ip("-n mp-ru-g1 link set a0 address 02:00:00:00:c8:01 up");
        ip("-n mp-ru-g2 link set b0 address 02:00:00:00:ca:01 up");
        ip("-n mp-ru-g1 addr add 198.18.200.254/24 dev a0");
        ip("-n mp-ru-g2 addr add 198.18.202.254/24 dev b0");
        ip("-n mp-ru-n link set a0 up");
        ip("-n mp-ru-n link set b0 up");
        ip("-n mp-ru-n addr add 198.18.200.1/24 dev a0");
        ip("-n mp-ru-n addr add 198.18.202.1/24 dev b0");
        ip("-n mp-ru-n route add 198.18.201.0/24 via 198.18.200.254");
        // The gateway announces a new MAC (gratuitous ARP), as a router
        // failing over does; only inside its namespace.
        ip("netns exec mp-ru-g1 sysctl -qw net.ipv4.conf.all.arp_notify=1");

        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let u = start_in(
            "mp-ru-n",
            None,
            Box::new(move || {
                let _ = tx.lock().unwrap_or_else(PoisonError::into_inner).send(());
            }),
        );
        let (peer, lost) = ("198.18.201.2".parse().expect("ip"), "198.18.250.9".parse().expect("ip"));
        let neigh = || {
            String::from_utf8_lossy(&Command::new("ip").args(["-n", "mp-ru-n", "neigh"]).output().expect("ip").stdout)
                .into_owned()
        };
        assert!(!neigh().contains("198.18.200.254"), "the kernel knew the gateway before: {}", neigh());
        u.watch([peer, lost]);

        // The gateway's MAC, learned by the kernel on the resolver's request.
        let g1 = Some(Ipv4Addr::new(198, 18, 200, 254));
        let t = wait("the gateway's MAC learned", Duration::from_secs(3), || {
            u.hop(peer).is_some_and(|h| h.via == g1 && h.mac == Some(mac("02:00:00:00:c8:01")))
        });
        eprintln!("gateway resolved in {t:?}");
        assert!(neigh().contains("198.18.200.254 dev a0 lladdr 02:00:00:00:c8:01"), "{}", neigh());
        assert!(u.hop(lost).is_none(), "a peer without a route has no hop: {:?}", u.hop(lost));
        assert!(rx.recv_timeout(Duration::from_secs(1)).is_ok(), "the change was reported");
        while rx.try_recv().is_ok() {}

        // The gateway's MAC changes (past the kernel's 1 s lock time).
        std::thread::sleep(Duration::from_millis(1100));
        ip("-n mp-ru-g1 link set a0 address 02:00:00:00:c8:02");
        let t = wait("the new MAC followed", Duration::from_secs(1), || {
            u.hop(peer).is_some_and(|h| h.mac == Some(mac("02:00:00:00:c8:02")))
        });
        eprintln!("neighbour change followed in {t:?}");
        assert!(rx.recv_timeout(Duration::from_secs(1)).is_ok(), "the change was reported");

        // The route moves to the second gateway (never resolved before).
        ip("-n mp-ru-n route replace 198.18.201.0/24 via 198.18.202.254");
        let g2 = Some(Ipv4Addr::new(198, 18, 202, 254));
        let t = wait("the route change followed", Duration::from_secs(1), || {
            u.hop(peer).is_some_and(|h| h.via == g2 && h.mac == Some(mac("02:00:00:00:ca:01")))
        });
        eprintln!("route change followed in {t:?}");

        // The entry flushed from the kernel's table: learned again.
        ip("-n mp-ru-n neigh flush dev b0");
        wait("the flushed entry learned again", Duration::from_secs(1), || {
            neigh().contains("198.18.202.254 dev b0 lladdr 02:00:00:00:ca:01")
        });
        assert_eq!(u.hop(peer).and_then(|h| h.mac), Some(mac("02:00:00:00:ca:01")));

        // A peer on a connected subnet: its own MAC, no gateway.
        let direct = Ipv4Addr::new(198, 18, 202, 254);
        u.watch([peer, lost, direct]);
        wait("a directly connected peer", Duration::from_secs(1), || {
            u.hop(direct).is_some_and(|h| h.via.is_none() && h.mac == Some(mac("02:00:00:00:ca:01")))
        });

        // A resolver bound to a0 (as an AF_XDP node is to its data NIC)
        // refuses the route out of b0, and takes a0's own subnet.
        let a0 = index_of("mp-ru-n", "a0");
        let bound = start_in("mp-ru-n", Some(a0), Box::new(|| {}));
        let on_a0 = Ipv4Addr::new(198, 18, 200, 254);
        bound.watch([peer, on_a0]);
        wait("a0's neighbour through the bound resolver", Duration::from_secs(1), || {
            bound.hop(on_a0).is_some_and(|h| h.via.is_none() && h.ifindex == a0 && h.mac.is_some())
        });
        assert!(bound.hop(peer).is_none(), "a route out of another interface was taken: {:?}", bound.hop(peer));
        drop(bound);

        // Forgotten peers are no longer reported.
        u.watch([lost]);
        wait("the peer forgotten", Duration::from_secs(1), || u.hop(peer).is_none());
        drop(u);
    }

    /// `mp-en-n` (the node; data NIC a0 198.18.210.1/24, default route via
    /// the router `mp-en-r` 198.18.210.254, which also holds the on-link
    /// 198.18.210.9; b0 toward `mp-en-s` with 198.18.220.0/24 behind it).
    #[test]
    fn egress_routes_and_on_link_neighbours_learned_and_followed() {
        let Some(_guard) = namespaces(&["mp-en-n", "mp-en-r", "mp-en-s"]) else { return };
        ip("link add a0 netns mp-en-n type veth peer name a0 netns mp-en-r");
        ip("link add b0 netns mp-en-n type veth peer name b0 netns mp-en-s");
        ip("-n mp-en-r link set a0 address 02:00:00:00:d2:fe up");
        ip("-n mp-en-s link set b0 address 02:00:00:00:d4:fe up");
        ip("-n mp-en-r addr add 198.18.210.254/24 dev a0");
        ip("-n mp-en-r addr add 198.18.210.9/24 dev a0");
        ip("-n mp-en-s addr add 198.18.212.254/24 dev b0");
        ip("-n mp-en-n link set a0 up");
        ip("-n mp-en-n link set b0 up");
        ip("-n mp-en-n addr add 198.18.210.1/24 dev a0");
        ip("-n mp-en-n addr add 198.18.212.1/24 dev b0");
        ip("-n mp-en-n route add default via 198.18.210.254");
        ip("-n mp-en-n route add 198.18.220.0/24 via 198.18.212.254");
        ip("netns exec mp-en-r sysctl -qw net.ipv4.conf.all.arp_notify=1");
        let a0 = index_of("mp-en-n", "a0");

        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let u = start_in(
            "mp-en-n",
            Some(a0),
            Box::new(move || {
                let _ = tx.lock().unwrap_or_else(PoisonError::into_inner).send(());
            }),
        );
        let show = |u: &Underlay| {
            let (r, n) = u.egress();
            (
                r.iter().map(|r| format!("{} {}", r.prefix, r.mac)).collect::<Vec<_>>(),
                n.iter().map(|n| format!("{} {}", n.ip, n.mac)).collect::<Vec<_>>(),
            )
        };
        let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(show(&u), (vec![], vec![]), "egress off: nothing");
        u.set_egress(Some(Ipv4Addr::new(198, 18, 210, 1)));

        // The default route out of a0 with the router's MAC, learned on
        // the resolver's request; b0's route is not the data NIC's.
        let want_default = strs(&["0.0.0.0/0 02:00:00:00:d2:fe"]);
        let t = wait("the default route's MAC", Duration::from_secs(3), || show(&u).0 == want_default);
        eprintln!("default route resolved in {t:?}");
        assert!(rx.recv_timeout(Duration::from_secs(1)).is_ok(), "the change was reported");
        std::thread::sleep(Duration::from_millis(300));
        let neigh =
            String::from_utf8_lossy(&Command::new("ip").args(["-n", "mp-en-n", "neigh"]).output().expect("ip").stdout)
                .into_owned();
        assert!(!neigh.contains("198.18.212.254"), "b0's gateway was asked about on the data NIC: {neigh}");

        // The workers' misses: an on-link destination is resolved, one
        // behind the router is not a neighbour (the route serves it).
        u.want(&[Ipv4Addr::new(198, 18, 210, 9), Ipv4Addr::new(198, 19, 250, 1)]);
        wait("the on-link destination's MAC", Duration::from_secs(3), || {
            show(&u).1 == strs(&["198.18.210.9 02:00:00:00:d2:fe"])
        });
        assert_eq!(show(&u).0, want_default);

        // A new route, then the router's MAC changes (past the kernel's
        // 1 s lock time), then the route goes.
        while rx.try_recv().is_ok() {}
        ip("-n mp-en-n route add 198.18.230.0/24 via 198.18.210.254");
        wait("the new route", Duration::from_secs(1), || {
            show(&u).0 == strs(&["198.18.230.0/24 02:00:00:00:d2:fe", "0.0.0.0/0 02:00:00:00:d2:fe"])
        });
        assert!(rx.recv_timeout(Duration::from_secs(1)).is_ok(), "the change was reported");
        std::thread::sleep(Duration::from_millis(1100));
        ip("-n mp-en-r link set a0 address 02:00:00:00:d2:fd");
        let t = wait("the router's new MAC", Duration::from_secs(2), || {
            show(&u)
                == (
                    strs(&["198.18.230.0/24 02:00:00:00:d2:fd", "0.0.0.0/0 02:00:00:00:d2:fd"]),
                    strs(&["198.18.210.9 02:00:00:00:d2:fd"]),
                )
        });
        eprintln!("router MAC change followed in {t:?}");
        ip("-n mp-en-n route del 198.18.230.0/24");
        wait("the route removed", Duration::from_secs(1), || show(&u).0 == strs(&["0.0.0.0/0 02:00:00:00:d2:fd"]));
        // The default route moves to a gateway never resolved before (the
        // router's second address: same MAC, so it must be learned).
        ip("-n mp-en-n neigh flush dev a0");
        ip("-n mp-en-n route replace default via 198.18.210.9");
        wait("the moved default route", Duration::from_secs(2), || {
            show(&u).0 == strs(&["0.0.0.0/0 02:00:00:00:d2:fd"])
                && String::from_utf8_lossy(
                    &Command::new("ip").args(["-n", "mp-en-n", "neigh"]).output().expect("ip").stdout,
                )
                .contains("198.18.210.9 dev a0 lladdr 02:00:00:00:d2:fd")
        });

        // Unbound (a TAP node): the interface the data-path address is
        // routed through (a0); b0's route still left out.
        let tap = start_in("mp-en-n", None, Box::new(|| {}));
        tap.set_egress(Some(Ipv4Addr::new(198, 18, 210, 50)));
        wait("the TAP node's routes", Duration::from_secs(2), || {
            show(&tap).0 == strs(&["0.0.0.0/0 02:00:00:00:d2:fd"])
        });
        drop(tap);

        // Egress off: nothing.
        u.set_egress(None);
        wait("egress off", Duration::from_secs(1), || show(&u) == (vec![], vec![]));
        drop(u);
    }
}
