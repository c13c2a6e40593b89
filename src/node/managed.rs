//! Managed mode (`node run` without `--tables`): the pinned workers start
//! on the uplink alone, the control thread (`control::cluster::Control`,
//! on a tokio runtime of its own) joins or resumes the cluster and
//! publishes this node's tables on every change; the dataplane makes the
//! ports of the node's tasks (`task_port`) and removes them when the
//! tasks go. Each peer's MAC in the control plane's tables is replaced
//! with the kernel's next hop toward it (`underlay`), and the tables are
//! published again when a next hop changes.
//!
//! Egress is on unless `--no-egress` (`egress`): the node's tables carry
//! the egress address and range from the first tables on (so that the
//! steering program takes the first replies), and the routes and
//! neighbours toward the world from the kernel's FIB (`underlay`). With
//! AF_XDP the range is reserved from the kernel while the node runs.
//!
//! The node runs the health checks of its tasks (`health`, on the
//! control thread's runtime) and proposes their transitions through the
//! control plane.
//!
//! The reaper (`reaper`) detaches container tasks whose namespace is
//! gone and finishes the CNI DELs spooled while the node was down; CNI
//! ADD waits for the outcome of making its task's port
//! (`Dataplane::task_port`).
//!
//! The embedded DNS server (`dns`) runs unless `--no-dns` or there is no
//! host link: the control plane hands it the names with every
//! publication (`Dataplane::names`), and each network in the tables gets
//! its DNS port (`fill_dns`).
//!
//! SIGTERM or SIGINT: workers stop (sockets closed, the XDP program
//! detached), the task ports this node made are removed (with the
//! resolv.conf files written for them), Raft stops, the DNS server stops
//! before the host link goes; the state directory stays as it is, and the
//! node resumes from it.

use super::args::{DEFAULT_STATE_DIR, IoKind, RunArgs, mgmt_addr};
use super::counters::{conntrack_entries, node_stats};
use super::dns::{self, Dns, DnsConfig, Upstreams};
use super::egress;
use super::health;
use super::local_publish::LocalPublish;
use super::task_port::{self, TaskPort};
use super::underlay::Underlay;
use super::workers::{open, spawn_workers, stats_writer, stop_workers, summary, worker_cores};
use crate::stats::{ConntrackEntry, NodeStats};
use anyhow::{Context, Result, bail};
use meshplane_cni::failure::Failure;
use meshplane_control::cluster::{Config, Control, Dataplane, LocalTask, PortInfo, PublishError};
use meshplane_dataplane::io::afxdp;
use meshplane_dataplane::tables::egress::{EgressSpec, HostLinkSpec, PortRange};
use meshplane_dataplane::tables::{NodeSpec, Tables, TablesSpec};
use meshplane_dataplane::wire::MacAddr;
use meshplane_dataplane::worker::{Bound, Shared};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The dataplane side of a managed node.
struct Managed {
    shared: Arc<Shared>,
    steering: Option<afxdp::SteeringHandle>,
    args: RunArgs,
    io: IoKind,
    workers: usize,
    ports: Mutex<BTreeMap<String, TaskPort>>,
    /// What making each task's port came to (CNI ADD waits for it), and
    /// the condition its waiters wait on; dropped with the task.
    outcomes: Mutex<BTreeMap<String, Result<PortInfo, Failure>>>,
    made: Condvar,
    /// The control plane's last tables and tasks, before the next hops
    /// are filled in: compiled again when a next hop changes (and the
    /// lock that keeps two publications from crossing).
    last: Mutex<Option<(TablesSpec, Vec<LocalTask>)>>,
    /// The kernel's next hops toward the peers (none if netlink could not
    /// be opened: then the peers' own MACs, one L2 segment).
    underlay: OnceLock<Underlay>,
    /// This node's egress (address and range; the routes and neighbours
    /// are filled at each publication), `None` with `--no-egress`.
    egress: Option<EgressSpec>,
    /// The health checker's counters.
    health: Arc<health::Counters>,
    /// The embedded DNS server and its ports (`None`: DNS is off).
    dns: Option<(Dns, PortRange)>,
    /// The node's own processes' way to its published ports (with the
    /// host link).
    local: Option<LocalPublish>,
    /// The data NIC whose addresses the routing mesh answers on (AF_XDP:
    /// the kernel holds them), read at each publication.
    mesh_nic: Option<String>,
}

impl Managed {
    /// Removes the interfaces this node made (at stop).
    fn remove_all(&self) {
        let ports = std::mem::take(&mut *self.ports.lock().unwrap_or_else(PoisonError::into_inner));
        for p in ports.values() {
            p.remove();
        }
    }

    /// New tasks: their ports, handed to the workers (which take them with
    /// the tables that name them).
    fn add_ports(&self, ports: &mut BTreeMap<String, TaskPort>, tasks: &[LocalTask], tables: &Tables) {
        for t in tasks {
            if ports.contains_key(&t.id) {
                continue;
            }
            let outcome = match task_port::make(self.io, self.workers, &self.args, t, tables) {
                Ok((p, queues)) => {
                    tracing::info!("task {} on port {} ({})", t.id, p.iface, t.ip);
                    for (k, q) in queues.into_iter().enumerate() {
                        self.shared.change_ports(k, vec![Bound::new(&t.id, q)], &[]);
                    }
                    let info = PortInfo {
                        host_iface: (self.io == IoKind::Afxdp).then(|| p.iface.clone()),
                        dns_search: self.dns_search(t, tables),
                    };
                    ports.insert(t.id.clone(), p);
                    Ok(info)
                }
                // Its frames are counted as unbound until a later change
                // makes the port.
                Err(e) => {
                    tracing::warn!("{e:#}");
                    Err(e.downcast_ref::<Failure>().cloned().unwrap_or_else(|| Failure::Later(format!("{e:#}"))))
                }
            };
            self.outcomes.lock().unwrap_or_else(PoisonError::into_inner).insert(t.id.clone(), outcome);
        }
        self.made.notify_all();
    }

    /// The search domains a CNI result gives task `t`, if the node serves
    /// DNS for its network (the node's own `search`).
    fn dns_search(&self, t: &LocalTask, tables: &Tables) -> Option<Vec<String>> {
        self.dns.as_ref()?;
        task_port::dns_network(t, tables)?;
        let search = task_port::node_search();
        Some(search.map(|s| s.split_whitespace().map(str::to_owned).collect()).unwrap_or_default())
    }

    /// Gone tasks: once every worker has closed their ports (at the swap
    /// to the tables without them), their interfaces go.
    fn remove_ports(&self, ports: &mut BTreeMap<String, TaskPort>, gone: Vec<String>) {
        let v = self.shared.version();
        let t0 = Instant::now();
        while (0..self.workers).any(|k| self.shared.in_use(k) < v) && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for id in gone {
            if let Some(p) = ports.remove(&id) {
                tracing::info!("task {id} gone; port {} removed", p.iface);
                p.remove();
            }
        }
    }
}

impl Managed {
    /// Each peer's next-hop MAC from the kernel (the control plane's
    /// compile leaves the peers' own data MACs, right on one L2 segment);
    /// the peers handed to the resolver to follow.
    fn fill_next_hops(&self, spec: &mut TablesSpec) {
        let Some(u) = self.underlay.get() else { return };
        u.watch(spec.node.neighbours.iter().map(|n| n.ip));
        for n in &mut spec.node.neighbours {
            if let Some(mac) = u.hop(n.ip).and_then(|h| h.mac) {
                n.mac = mac;
            }
        }
    }

    /// The last tables again, with the next hops as they are now (the
    /// resolver's callback).
    fn republish(&self) {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((spec, tasks)) = last.as_ref()
            && let Err(e) = self.apply(spec.clone(), tasks)
        {
            tracing::warn!("publishing the tables with new next hops: {e}");
        }
    }

    /// The routing mesh's addresses besides the data-path address:
    /// `--mesh-addr`, and with AF_XDP every IPv4 address of the data NIC.
    fn mesh_addrs(&self) -> Vec<Ipv4Addr> {
        let mut v = self.args.mesh_addr.clone();
        if let Some(nic) = &self.mesh_nic {
            match nic_addrs(nic) {
                Ok(a) => v.extend(a),
                Err(e) => tracing::warn!("reading {nic}'s addresses: {e}"),
            }
        }
        v
    }

    /// This node's egress with the routes and neighbours toward the world
    /// as the kernel has them now (every cluster network is in the
    /// tables, so no `cluster_subnets` are needed).
    fn fill_egress(&self, spec: &mut TablesSpec) {
        spec.node.egress = self.egress.clone().map(|mut e| {
            if let Some(u) = self.underlay.get() {
                (e.route, e.neighbour) = u.egress();
            }
            e
        });
    }

    /// Compiles `spec` with the next hops, egress and DNS ports filled in
    /// and publishes it; the task ports follow `tasks`.
    fn apply(&self, mut spec: TablesSpec, tasks: &[LocalTask]) -> Result<(), PublishError> {
        spec.node.reset_closed_ports = self.io == IoKind::Tap;
        self.fill_next_hops(&mut spec);
        self.fill_egress(&mut spec);
        fill_dns(&mut spec, self.dns.as_ref().map(|(_, ports)| *ports));
        spec.node.mesh_addrs = self.mesh_addrs();
        let tables = Tables::compile(&spec).map_err(|e| e.to_string())?;
        if let Some(l) = &self.local {
            l.update(&tables);
        }
        let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        self.add_ports(&mut ports, tasks, &tables);
        let gone: Vec<String> = ports.keys().filter(|id| !tasks.iter().any(|t| t.id == **id)).cloned().collect();
        for k in 0..self.workers {
            self.shared.change_ports(k, vec![], &gone);
        }
        if let Some(h) = &self.steering
            && let Err(e) = h.set(&afxdp::Steering::for_tables(&tables))
        {
            tracing::warn!("updating the XDP steering maps: {e}");
        }
        self.shared.publish(tables);
        if !gone.is_empty() {
            self.remove_ports(&mut ports, gone);
        }
        drop(ports);
        self.outcomes.lock().unwrap_or_else(PoisonError::into_inner).retain(|id, _| tasks.iter().any(|t| t.id == *id));
        self.made.notify_all();
        Ok(())
    }
}

impl Dataplane for Managed {
    fn publish(&self, spec: TablesSpec, tasks: Vec<LocalTask>) -> Result<(), PublishError> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let r = self.apply(spec.clone(), &tasks);
        *last = Some((spec, tasks));
        r
    }

    fn names(&self, zone: meshplane_dns::zone::Zone) {
        if let Some((d, _)) = &self.dns {
            d.set_zone(zone);
        }
    }

    fn stats(&self) -> NodeStats {
        let mut s = node_stats(&self.shared);
        s.dns = self.dns.as_ref().map(|(d, _)| d.stats());
        s
    }

    fn conntrack(&self) -> Vec<ConntrackEntry> {
        conntrack_entries(&self.shared)
    }

    fn health(&self) -> Option<crate::stats::HealthStats> {
        Some(self.health.snapshot())
    }

    fn netns_check(&self, netns: &str, ifname: &str) -> Result<u64, Failure> {
        task_port::check_netns(netns, ifname)
    }

    fn task_port(&self, id: &str, until: Instant) -> Result<PortInfo, Failure> {
        let t0 = Instant::now();
        let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = outcomes.get(id) {
                return r.clone();
            }
            let now = Instant::now();
            if now >= until {
                return Err(Failure::Later(format!(
                    "task {id}'s port was not made in {:.1} s (see the node's log)",
                    (now - t0).as_secs_f64()
                )));
            }
            outcomes = self.made.wait_timeout(outcomes, until - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn task_port_gone(&self, id: &str, until: Instant) {
        while self.ports.lock().unwrap_or_else(PoisonError::into_inner).contains_key(id) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn verify_port(&self, t: &LocalTask) -> Result<(), Failure> {
        if !self.ports.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&t.id) {
            return Err(Failure::Mismatch(format!("task {}'s port is not made (see the node's log)", t.id)));
        }
        task_port::verify(t)
    }
}

/// Every network's DNS port (from its VNI) when this node serves DNS on
/// `ports` and the tables have the host link (DNS needs it): the
/// dataplane sends the tasks' queries to the gateway there. Otherwise
/// none.
fn fill_dns(spec: &mut TablesSpec, ports: Option<PortRange>) {
    let link = spec.node.egress.as_ref().is_some_and(|e| e.host_link.is_some());
    for n in &mut spec.networks {
        n.dns_port = ports.filter(|_| link).and_then(|p| dns::port_for(p, n.vni));
    }
}

/// The IPv4 addresses of interface `nic` (`ip -j -4 addr show`).
fn nic_addrs(nic: &str) -> Result<Vec<Ipv4Addr>> {
    let out = crate::sys::output("ip", &["-j", "-4", "addr", "show", "dev", nic])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j addr: not JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}

fn mac_of(iface: &str) -> Option<MacAddr> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?.trim().parse().ok()
}

fn ifindex_of(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex")).ok()?.trim().parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The underlay MTU this node reports: `--data-path-mtu`, else the data
/// NIC's (read from sysfs, as its MAC is; a TAP the node has yet to make
/// has the kernel's default, 1500), at most what the I/O backend carries
/// (a jumbo frame: AF_XDP in several UMEM frames, multi-buffer, which the
/// ports check when they open). A given MTU above that, or above an
/// AF_XDP NIC's own, is refused: frames would be dropped.
fn underlay_mtu(a: &RunArgs, io: IoKind, uplink: &str) -> Result<u16> {
    use meshplane_control::state::MIN_UNDERLAY_MTU;
    let (max, why) = match io {
        IoKind::Afxdp => (afxdp::MAX_SG_MTU, "an AF_XDP uplink carries jumbo frames up to this"),
        IoKind::Tap => (meshplane_dataplane::io::MAX_TAP_MTU, "a TAP uplink carries jumbo frames up to this"),
    };
    let nic = nic_mtu(uplink);
    if let Some(m) = a.data_path_mtu {
        if !(MIN_UNDERLAY_MTU..=max).contains(&m) {
            bail!("--data-path-mtu {m}: {MIN_UNDERLAY_MTU} to {max} ({why})");
        }
        if io == IoKind::Afxdp
            && let Some(n) = nic.filter(|n| m > *n)
        {
            bail!("--data-path-mtu {m} is above {uplink}'s MTU {n}: raise the NIC's MTU first");
        }
        return Ok(m);
    }
    let mtu = match (io, nic) {
        (_, Some(n)) => n,
        (IoKind::Tap, None) => meshplane_control::state::DEFAULT_UNDERLAY_MTU,
        (IoKind::Afxdp, None) => bail!("reading {uplink}'s MTU (/sys/class/net/{uplink}/mtu); or give --data-path-mtu"),
    };
    if mtu < MIN_UNDERLAY_MTU {
        bail!("{uplink}'s MTU {mtu} is below {MIN_UNDERLAY_MTU}: VXLAN needs 50 bytes of it");
    }
    if mtu > max {
        tracing::warn!("{uplink}'s MTU is {mtu}, but {why}: this node's underlay MTU is {max}");
    }
    Ok(mtu.min(max))
}

/// Interface `iface`'s MTU, from sysfs (this namespace's, as `ip netns
/// exec` mounts it); `None` if there is no such interface.
fn nic_mtu(iface: &str) -> Option<u16> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()
        .map(|m| u16::try_from(m).unwrap_or(u16::MAX))
}

/// The addresses a managed node needs, from its arguments.
struct Addresses {
    uplink: String,
    data_ip: Ipv4Addr,
    advertise: SocketAddr,
    metrics: Option<SocketAddr>,
}

fn addresses(a: &RunArgs) -> Result<Addresses> {
    let uplink = a.uplink.clone().context("--data-iface (--uplink) is needed")?;
    let data_ip = a.data_path_addr.context("--data-path-addr is needed")?;
    let adv = a.advertise_addr.as_deref().context("--advertise-addr is needed (the management address)")?;
    let advertise = mgmt_addr(adv).context("--advertise-addr")?;
    let metrics: Option<SocketAddr> = match a.metrics_addr.as_deref() {
        Some("off") => None,
        Some(m) => Some(m.parse().with_context(|| format!("--metrics-addr {m:?}: IP:PORT or off"))?),
        None => Some(SocketAddr::new(advertise.ip(), crate::metrics::DEFAULT_PORT)),
    };
    if !a.task_ports.is_empty() {
        bail!("--task-port is for static mode (--tables); a managed node makes its tasks' ports");
    }
    Ok(Addresses { uplink, data_ip, advertise, metrics })
}

/// The data-path NIC's MAC: `--data-mac`, else the uplink's (AF_XDP) or
/// one made from the data-path address (TAP).
fn data_mac(a: &RunArgs, io: IoKind, ad: &Addresses) -> Result<MacAddr> {
    Ok(match (&a.data_mac, io) {
        (Some(m), _) => m.parse().map_err(|e| anyhow::anyhow!("--data-mac {m:?}: {e}"))?,
        (None, IoKind::Afxdp) => mac_of(&ad.uplink).with_context(|| format!("reading {}'s MAC", ad.uplink))?,
        (None, IoKind::Tap) => meshplane_control::state::mac_for(ad.data_ip),
    })
}

/// The tables of a node alone, before the control plane publishes: the
/// uplink only, and egress (so that the steering program takes egress
/// replies from the start).
fn first_tables(
    io: IoKind,
    ad: &Addresses,
    data_mac: MacAddr,
    underlay_mtu: u16,
    egress: Option<EgressSpec>,
) -> Result<Tables> {
    let spec = TablesSpec {
        version: 0,
        node: NodeSpec {
            data_ip: ad.data_ip,
            data_mac,
            vxlan_port: meshplane_dataplane::wire::vxlan::DEFAULT_PORT,
            underlay_mtu,
            ttl: 64,
            next_hop_mac: None,
            neighbours: vec![],
            reset_closed_ports: io == IoKind::Tap,
            egress,
            mesh_addrs: Vec::new(),
        },
        networks: vec![],
        ports: vec![],
        endpoints: vec![],
        services: vec![],
    };
    Ok(Tables::compile(&spec)?)
}

/// How often the workers' egress misses are read.
const MISS_POLL: Duration = Duration::from_millis(100);

/// With egress and the underlay resolver: a thread that hands the
/// destinations the workers found no next-hop MAC for (each worker's last
/// `egress.neigh_miss`, read every 100 ms; at most 64 kept) to the
/// resolver, until the workers stop.
fn miss_follower(shared: &Arc<Shared>, dp: &Arc<Managed>) -> Option<std::thread::JoinHandle<()>> {
    dp.egress.as_ref()?;
    dp.underlay.get()?;
    let (shared, dp) = (shared.clone(), Arc::downgrade(dp));
    let r = std::thread::Builder::new().name("mp-egress-miss".into()).spawn(move || {
        let mut misses = egress::Misses::default();
        while !shared.stopping() {
            let seen = (0..shared.workers()).filter_map(|i| shared.report(i)).map(|r| r.egress.neigh_miss);
            if misses.add(seen) {
                let Some(dp) = dp.upgrade() else { return };
                if let Some(u) = dp.underlay.get() {
                    u.want(&misses.list());
                }
            }
            std::thread::sleep(MISS_POLL);
        }
    });
    match r {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("starting the egress miss follower: {e}; on-link destinations need the kernel to know them");
            None
        }
    }
}

/// The embedded DNS server on the host link's kernel end, unless
/// `--no-dns`; without the host link (`--no-egress`, `--no-host-link`)
/// DNS is off, said once. A server that cannot start leaves the node
/// running without DNS (logged).
fn start_dns(a: &RunArgs, link: Option<&HostLinkSpec>) -> Option<(Dns, PortRange)> {
    if a.no_dns {
        return None;
    }
    let Some(link) = link else {
        tracing::info!("embedded DNS needs the host link (egress and the host link on): off");
        return None;
    };
    let ports = a.dns_ports.unwrap_or(dns::DEFAULT_PORTS);
    let upstreams = if a.dns_upstream.is_empty() {
        Upstreams::ResolvConf(PathBuf::from("/etc/resolv.conf"))
    } else {
        Upstreams::Fixed(a.dns_upstream.clone())
    };
    let cfg = DnsConfig {
        listen: link.peer_ip,
        ports,
        upstreams,
        never: vec![link.peer_ip, link.ip],
        limits: dns::Limits::default(),
    };
    match Dns::start(cfg) {
        Ok(d) => {
            tracing::info!("embedded DNS on {} ports {ports} (one per network)", link.peer_ip);
            Some((d, ports))
        }
        Err(e) => {
            tracing::warn!("{e}: no embedded DNS");
            None
        }
    }
}

/// Runs a node with its control plane until SIGTERM/SIGINT.
pub(crate) fn run(a: &RunArgs) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let io = a.io.context("--io afxdp|tap is needed")?;
    let ad = addresses(a)?;
    let name = a.name.clone().unwrap_or_else(hostname);
    let state_dir = a.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let cores = worker_cores(a)?;
    let n = cores.len();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;

    // Until the control plane publishes: this node alone, the uplink only.
    let data_mac = data_mac(a, io, &ad)?;
    let mtu = underlay_mtu(a, io, &ad.uplink)?;
    let mut egress = egress::managed(a, io, ad.data_ip);
    let host_link = super::host_port::managed(a, io, egress.is_some())?;
    if let Some(e) = &mut egress {
        e.host_link.clone_from(&host_link);
    }
    // The kernel's ports (with AF_XDP it holds the egress address), kept
    // until the node stops.
    let _reserved = match (&egress, io) {
        (Some(e), IoKind::Afxdp) => {
            let addr = e.addr.unwrap_or(ad.data_ip);
            Some(egress::claim_kernel_ports(&ad.uplink, addr, ad.data_ip, e.ports)?)
        }
        _ => None,
    };
    let t = first_tables(io, &ad, data_mac, mtu, egress.clone())?;
    let (uplinks, steering) = open(io, &ad.uplink, true, n, &t, a).context("opening the uplink")?;
    if io == IoKind::Tap {
        // The TAP is the data NIC: it carries the underlay MTU.
        crate::sys::ip(&["link", "set", "dev", &ad.uplink, "mtu", &mtu.to_string()])
            .context("setting the TAP uplink's MTU")?;
    }
    let shared = Shared::new(t, n);
    let per_worker = uplinks.into_iter().map(|p| vec![Bound::new("uplink", p)]).collect();
    let handles = spawn_workers(per_worker, &cores, &shared, a)?;
    // The host link, served like a task port (its tables port is in every
    // tables this node publishes).
    if let Some(h) = &host_link {
        let queues = super::host_port::open_link(h, mtu, n, &shared.tables(), a)?;
        for (k, q) in queues.into_iter().enumerate() {
            shared.change_ports(k, vec![Bound::new(&h.port, q)], &[]);
        }
    }
    let dns = start_dns(a, host_link.as_ref());
    let local = host_link.as_ref().map(LocalPublish::start);
    let dp = Arc::new(Managed {
        shared: shared.clone(),
        steering,
        args: a.clone(),
        io,
        workers: n,
        ports: Mutex::new(BTreeMap::new()),
        outcomes: Mutex::new(BTreeMap::new()),
        made: Condvar::new(),
        last: Mutex::new(None),
        underlay: OnceLock::new(),
        egress,
        health: Arc::default(),
        dns,
        local,
        mesh_nic: (io == IoKind::Afxdp).then(|| ad.uplink.clone()),
    });
    // The next hops toward the peers, from this namespace's kernel; a
    // change publishes the tables again.
    let weak = Arc::downgrade(&dp);
    // With AF_XDP the kernel holds the data NIC: routes to peers must
    // leave through it.
    let data_nic = match io {
        IoKind::Afxdp => ifindex_of(&ad.uplink),
        IoKind::Tap => None,
    };
    let republish = Box::new(move || {
        if let Some(dp) = weak.upgrade() {
            dp.republish();
        }
    });
    match Underlay::start(republish, data_nic) {
        Ok(u) => {
            // With egress on, the routes toward the world too.
            u.set_egress(dp.egress.as_ref().map(|_| ad.data_ip));
            let _ = dp.underlay.set(u);
        }
        Err(e) => tracing::warn!("{e}; the peers' own MACs are used (one L2 segment)"),
    }

    // The control thread.
    let cfg = Config {
        name: name.clone(),
        advertise: ad.advertise,
        data_ip: ad.data_ip,
        data_mac,
        underlay_mtu: mtu,
        gossip_port: a.gossip_port.unwrap_or(meshplane_control::cluster::GOSSIP_PORT),
        state_dir: state_dir.clone(),
        snapshot_every: 1000,
        renew_check: std::time::Duration::from_secs(30),
        gossip_key_interval: meshplane_control::cluster::gossip_loop::GOSSIP_KEY_INTERVAL,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mp-control")
        .enable_all()
        .build()
        .context("starting the control thread")?;
    let dpc: Arc<dyn Dataplane> = dp.clone();
    let control = rt.block_on(Control::start(cfg, dpc)).map_err(anyhow::Error::msg)?;
    // The health checks of this node's tasks, stopped with the runtime.
    let checks = Arc::new(health::ControlCluster { control: control.clone(), me: name.clone() });
    rt.spawn(health::run(checks, dp.health.clone()));
    // Container tasks whose namespace went, and DELs spooled meanwhile.
    rt.spawn(super::reaper::run(control.clone(), name.clone()));
    if let Some(m) = ad.metrics {
        match rt.block_on(tokio::net::TcpListener::bind(m)) {
            Ok(l) => {
                rt.spawn(crate::metrics::serve(l, control.clone()));
            }
            Err(e) => tracing::warn!("metrics on {m}: {e}; no metrics endpoint"),
        }
    }
    tracing::info!(
        "node {name} running ({io:?} I/O on {}, underlay MTU {mtu}, {n} worker{}); management {}, data {}; admin socket {}; metrics {}",
        ad.uplink,
        if n == 1 { "" } else { "s" },
        ad.advertise,
        ad.data_ip,
        state_dir.join("admin.sock").display(),
        ad.metrics.map_or("off".to_owned(), |m| format!("http://{m}/metrics"))
    );
    let stats = stats_writer(a.stats_file.clone(), &shared);
    let misses = miss_follower(&shared, &dp);

    let _ = signals.forever().next();
    tracing::info!("stopping");
    rt.block_on(control.shutdown());
    drop(control);
    rt.shutdown_timeout(Duration::from_secs(2));
    let reports = stop_workers(&shared, handles, stats, a.stats_file.as_deref())?;
    if let Some(m) = misses {
        let _ = m.join();
    }
    dp.remove_all();
    if let Some((d, _)) = &dp.dns {
        d.stop();
    }
    if let Some(l) = &dp.local {
        l.stop();
    }
    if let Some(h) = &host_link {
        super::host_port::close_link(h);
    }
    tracing::info!("stopped; {}", summary(&reports));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_ports_follow_the_vni_only_with_the_host_link_and_the_tables_take_them() {
        let mut spec: TablesSpec = toml::from_str(include_str!("../../examples/tables.toml")).expect("the example");
        let link = super::super::host_port::spec(super::super::host_port::DEFAULT_LINK).expect("link");
        spec.node.egress = Some(EgressSpec { host_link: Some(link), ..EgressSpec::default() });
        fill_dns(&mut spec, Some(dns::DEFAULT_PORTS));
        let ports: Vec<(u32, Option<u16>)> = spec.networks.iter().map(|n| (n.vni, n.dns_port)).collect();
        assert_eq!(ports, vec![(4096, Some(25300)), (4097, Some(25301))]);
        let t = Tables::compile(&spec).expect("the tables take them");
        assert_eq!(t.networks.iter().map(|n| n.dns_port).collect::<Vec<_>>(), vec![Some(25300), Some(25301)]);
        fill_dns(&mut spec, None);
        assert!(spec.networks.iter().all(|n| n.dns_port.is_none()), "DNS off: no ports");
        fill_dns(&mut spec, Some(dns::DEFAULT_PORTS));
        spec.node.egress = None;
        fill_dns(&mut spec, Some(dns::DEFAULT_PORTS));
        assert!(spec.networks.iter().all(|n| n.dns_port.is_none()), "no host link: no ports");
        Tables::compile(&spec).expect("and the tables compile");
    }
}
