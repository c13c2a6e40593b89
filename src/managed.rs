//! `meshplane node run` with its control plane: the pinned workers start
//! on the uplink alone, the control thread (`control::cluster::Control`,
//! on a tokio runtime of its own) joins or resumes the cluster and
//! publishes this node's tables on every change; the dataplane makes the
//! ports of the node's tasks (a veth pair, or a TAP device, with one end
//! in the task's namespace, addressed, with its default route through the
//! network's gateway) and removes them when the tasks go.
//!
//! SIGTERM or SIGINT: workers stop (sockets closed, the XDP program
//! detached), the task ports this node made are removed, Raft stops; the
//! state directory stays as it is, and the node resumes from it.

use crate::node::{IoKind, RunArgs};
use anyhow::{Context, Result, bail};
use meshplane_control::cluster::{Config, Control, Dataplane, LocalTask, PublishError};
use meshplane_dataplane::io::afxdp;
use meshplane_dataplane::tables::{NodeSpec, Tables, TablesSpec};
use meshplane_dataplane::wire::MacAddr;
use meshplane_dataplane::worker::{Bound, Shared, Worker, WorkerConfig};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The default state directory.
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/meshplane";

/// Keys of a node configuration file (`--config node.toml`): the long
/// flags' names with `_`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    advertise_addr: Option<String>,
    data_path_addr: Option<Ipv4Addr>,
    data_iface: Option<String>,
    data_mac: Option<String>,
    data_path_port: Option<u16>,
    gossip_port: Option<u16>,
    metrics_addr: Option<String>,
    io: Option<IoKind>,
    cores: Option<Vec<usize>>,
    workers: Option<usize>,
    busy_poll: Option<bool>,
    state_dir: Option<PathBuf>,
    conntrack: Option<usize>,
    stats_file: Option<PathBuf>,
}

/// The arguments with the configuration file's values where no flag was
/// given.
pub(crate) fn with_config_file(a: &RunArgs) -> Result<RunArgs> {
    let mut a = a.clone();
    let Some(path) = &a.config else { return Ok(a) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: FileConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    a.name = a.name.or(f.name);
    a.advertise_addr = a.advertise_addr.or(f.advertise_addr);
    a.data_path_addr = a.data_path_addr.or(f.data_path_addr);
    a.uplink = a.uplink.or(f.data_iface);
    a.data_mac = a.data_mac.or(f.data_mac);
    a.data_path_port = a.data_path_port.or(f.data_path_port);
    a.gossip_port = a.gossip_port.or(f.gossip_port);
    a.metrics_addr = a.metrics_addr.or(f.metrics_addr);
    a.io = a.io.or(f.io);
    if a.cores.is_empty() && a.workers.is_none() {
        a.cores = f.cores.unwrap_or_default();
        a.workers = f.workers;
    }
    a.busy_poll |= f.busy_poll.unwrap_or(false);
    a.state_dir = a.state_dir.or(f.state_dir);
    if let Some(c) = f.conntrack {
        a.conntrack = c;
    }
    a.stats_file = a.stats_file.or(f.stats_file);
    Ok(a)
}

use crate::lab::{ip, sh};

/// The name of a task's port on the node's side: `mpt` and a hash of the
/// task id (interface names are at most 15 bytes).
fn host_name(task: &str) -> String {
    let h = task.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("mpt{h:08x}")
}

/// A task port this node serves.
struct TaskPort {
    /// The interface on the node's side (veth) or the TAP device.
    iface: String,
    /// Made by this node (removed when the task goes).
    made: bool,
}

/// The dataplane side of a managed node.
struct Managed {
    shared: Arc<Shared>,
    steering: Option<afxdp::SteeringHandle>,
    args: RunArgs,
    io: IoKind,
    workers: usize,
    vxlan_port: Option<u16>,
    ports: Mutex<BTreeMap<String, TaskPort>>,
}

impl Managed {
    /// Makes the port of task `t` in its namespace and opens its queues.
    fn make_port(
        &self,
        t: &LocalTask,
        tables: &Tables,
    ) -> Result<(TaskPort, Vec<Box<dyn meshplane_dataplane::io::Port>>)> {
        let Some(ns) = &t.netns else {
            // No namespace: an interface named after the task, wired up by
            // someone else, is served if it exists.
            let (qs, _) = crate::node::open(self.io, &t.id, false, self.workers, tables, &self.args)
                .with_context(|| format!("task {}: no --netns and no interface {:?}", t.id, t.id))?;
            return Ok((TaskPort { iface: t.id.clone(), made: false }, qs));
        };
        let host = host_name(&t.id);
        let n = self.workers.to_string();
        let peer = format!("{host}p");
        // A port left by a node that crashed goes first.
        let _ = ip(&format!("link del {host}"));
        let queues = match self.io {
            IoKind::Afxdp => {
                ip(&format!(
                    "link add {host} numrxqueues {n} numtxqueues {n} type veth peer name {peer} numrxqueues {n} numtxqueues {n} netns {ns}"
                ))?;
                ip(&format!("link set {host} up"))
                    .and_then(|()| sh(&["ethtool", "-K", &host, "tx", "off"]))
                    .and_then(|()| crate::node::open(self.io, &host, false, self.workers, tables, &self.args))
                    .map(|(q, _)| q)
                    .inspect_err(|_| {
                        let _ = ip(&format!("link del {host}"));
                    })?
            }
            IoKind::Tap => {
                let (q, _) = crate::node::open(self.io, &host, false, self.workers, tables, &self.args)?;
                ip(&format!("link set {host} netns {ns}"))?;
                ip(&format!("-n {ns} link set {host} name {peer}"))?;
                q
            }
        };
        // In the task's namespace: eth0 if it has none, its address, MAC,
        // MTU, the default route through the gateway; transmit checksums
        // computed (the dataplane forwards, it does not complete them).
        let name = if ip(&format!("-n {ns} link set {peer} name eth0")).is_ok() { "eth0" } else { peer.as_str() };
        let setup = ip(&format!("-n {ns} link set {name} address {} mtu {} up", t.mac, t.mtu))
            .and_then(|()| ip(&format!("-n {ns} addr add {}/{} dev {name}", t.ip, t.prefix)))
            .and_then(|()| ip(&format!("-n {ns} route replace default via {}", t.gateway)))
            .and_then(|()| sh(&["ip", "netns", "exec", ns, "ethtool", "-K", name, "tx", "off"]));
        if let Err(e) = setup {
            if self.io == IoKind::Afxdp {
                let _ = ip(&format!("link del {host}"));
            }
            return Err(e.context(format!("task {}: setting up its interface in {ns}", t.id)));
        }
        Ok((TaskPort { iface: host, made: self.io == IoKind::Afxdp }, queues))
    }

    /// Removes the interfaces this node made (at stop).
    fn remove_all(&self) {
        let ports = std::mem::take(&mut *self.ports.lock().unwrap_or_else(PoisonError::into_inner));
        for p in ports.values().filter(|p| p.made) {
            let _ = ip(&format!("link del {}", p.iface));
        }
    }
}

impl Dataplane for Managed {
    fn publish(&self, mut spec: TablesSpec, tasks: Vec<LocalTask>) -> Result<(), PublishError> {
        if let Some(p) = self.vxlan_port {
            spec.node.vxlan_port = p;
        }
        spec.node.reset_closed_ports = self.io == IoKind::Tap;
        let tables = Tables::compile(&spec).map_err(|e| e.to_string())?;
        let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        // New tasks: their ports first (the workers take them with the
        // tables that name them).
        for t in &tasks {
            if ports.contains_key(&t.id) {
                continue;
            }
            match self.make_port(t, &tables) {
                Ok((p, queues)) => {
                    tracing::info!("task {} on port {} ({})", t.id, p.iface, t.ip);
                    for (k, q) in queues.into_iter().enumerate() {
                        self.shared.change_ports(k, vec![Bound::new(&t.id, q)], &[]);
                    }
                    ports.insert(t.id.clone(), p);
                }
                // Its frames are counted as unbound until a later change
                // makes the port.
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
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
            // The workers close the gone ports at the swap; then their
            // interfaces go.
            let v = self.shared.version();
            let t0 = Instant::now();
            while (0..self.workers).any(|k| self.shared.in_use(k) < v) && t0.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(5));
            }
            for id in gone {
                if let Some(p) = ports.remove(&id) {
                    tracing::info!("task {id} gone; port {} removed", p.iface);
                    if p.made {
                        let _ = ip(&format!("link del {}", p.iface));
                    }
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> serde_json::Value {
        crate::node::stats_json(&self.shared)
    }

    fn conntrack(&self) -> serde_json::Value {
        use meshplane_dataplane::lb::conntrack::CtState;
        let t = self.shared.tables();
        let dumps = self.shared.conntrack(Duration::from_millis(500));
        let mut out = Vec::new();
        for (w, entries) in dumps.iter().enumerate() {
            for e in entries {
                let (k, v) = (&e.key, &e.value);
                let svc = t.services.list.get(v.service as usize);
                let reply = v.flags & meshplane_dataplane::lb::CT_REPLY != 0;
                let backend = svc
                    .and_then(|s| s.backends.get(v.backend as usize))
                    .map(|b| format!("{}:{}", b.ip, b.port))
                    .unwrap_or_default();
                out.push(serde_json::json!({
                    "worker": w,
                    "proto": if k.proto == 6 { "tcp" } else if k.proto == 17 { "udp" } else { "other" },
                    "src": format!("{}:{}", Ipv4Addr::from(k.src), k.sport),
                    "dst": format!("{}:{}", Ipv4Addr::from(k.dst), k.dport),
                    "direction": if reply { "reply" } else { "forward" },
                    "service": svc.map(|s| s.name.clone()),
                    "backend": backend,
                    "state": match v.state {
                        CtState::Udp => "udp",
                        CtState::SynRecv => "syn_recv",
                        CtState::Established => "established",
                        CtState::Fin => "fin_wait",
                        CtState::Close => "close",
                    },
                    "expires_in_s": e.expires_in / 1_000_000_000,
                }));
            }
        }
        serde_json::Value::Array(out)
    }
}

fn mac_of(iface: &str) -> Option<MacAddr> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?.trim().parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Runs a node with its control plane until SIGTERM/SIGINT.
pub(crate) fn run(a: &RunArgs) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let io = a.io.context("--io afxdp|tap is needed")?;
    let uplink = a.uplink.clone().context("--data-iface (--uplink) is needed")?;
    let data_ip = a.data_path_addr.context("--data-path-addr is needed")?;
    let adv = a.advertise_addr.as_deref().context("--advertise-addr is needed (the management address)")?;
    let advertise = crate::admin::mgmt_addr(adv).context("--advertise-addr")?;
    let metrics: Option<SocketAddr> = match a.metrics_addr.as_deref() {
        Some("off") => None,
        Some(m) => Some(m.parse().with_context(|| format!("--metrics-addr {m:?}: IP:PORT or off"))?),
        None => Some(SocketAddr::new(advertise.ip(), crate::metrics::DEFAULT_PORT)),
    };
    let name = a.name.clone().unwrap_or_else(hostname);
    let state_dir = a.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if !a.task_ports.is_empty() {
        bail!("--task-port is for static mode (--tables); a managed node makes its tasks' ports");
    }
    let cores = crate::node::worker_cores(a)?;
    let n = cores.len();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;

    // Until the control plane publishes: this node alone, the uplink only.
    let data_mac = match (&a.data_mac, io) {
        (Some(m), _) => m.parse().map_err(|e| anyhow::anyhow!("--data-mac {m:?}: {e}"))?,
        (None, IoKind::Afxdp) => mac_of(&uplink).with_context(|| format!("reading {uplink}'s MAC"))?,
        (None, IoKind::Tap) => meshplane_control::state::mac_for(data_ip),
    };
    let spec = TablesSpec {
        version: 0,
        node: NodeSpec {
            data_ip,
            data_mac,
            vxlan_port: a.data_path_port.unwrap_or(meshplane_dataplane::wire::vxlan::DEFAULT_PORT),
            underlay_mtu: 1500,
            ttl: 64,
            next_hop_mac: None,
            neighbours: vec![],
            reset_closed_ports: io == IoKind::Tap,
        },
        networks: vec![],
        ports: vec![],
        endpoints: vec![],
        services: vec![],
    };
    let t = Tables::compile(&spec)?;
    let (uplinks, steering) = crate::node::open(io, &uplink, true, n, &t, a).context("opening the uplink")?;
    let shared = Shared::new(t, n);
    let mut handles = Vec::new();
    for (k, (p, core)) in uplinks.into_iter().zip(&cores).enumerate() {
        let cfg = WorkerConfig {
            core: *core,
            busy_poll: a.busy_poll,
            conntrack: meshplane_dataplane::lb::conntrack::CtConfig { capacity: a.conntrack, ..Default::default() },
            ..WorkerConfig::default()
        };
        let worker = Worker::new(k, vec![Bound::new("uplink", p)], shared.clone(), cfg)?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("mp-worker-{k}"))
                .spawn(move || worker.run())
                .context("starting a worker thread")?,
        );
    }
    let dp = Arc::new(Managed {
        shared: shared.clone(),
        steering,
        args: a.clone(),
        io,
        workers: n,
        vxlan_port: a.data_path_port,
        ports: Mutex::new(BTreeMap::new()),
    });

    // The control thread.
    let cfg = Config {
        name: name.clone(),
        advertise,
        data_ip,
        data_mac,
        gossip_port: a.gossip_port.unwrap_or(meshplane_control::cluster::GOSSIP_PORT),
        state_dir: state_dir.clone(),
        snapshot_every: 1000,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mp-control")
        .enable_all()
        .build()
        .context("starting the control thread")?;
    let dpc: Arc<dyn Dataplane> = dp.clone();
    let control = rt.block_on(Control::start(cfg, dpc)).map_err(anyhow::Error::msg)?;
    if let Some(m) = metrics {
        match rt.block_on(tokio::net::TcpListener::bind(m)) {
            Ok(l) => {
                rt.spawn(crate::metrics::serve(l, control.clone()));
            }
            Err(e) => tracing::warn!("metrics on {m}: {e}; no metrics endpoint"),
        }
    }
    tracing::info!(
        "node {name} running ({io:?} I/O on {uplink}, {n} worker{}); management {advertise}, data {data_ip}; admin socket {}; metrics {}",
        if n == 1 { "" } else { "s" },
        state_dir.join("admin.sock").display(),
        metrics.map_or("off".to_owned(), |m| format!("http://{m}/metrics"))
    );
    let stats = crate::node::stats_writer(a.stats_file.clone(), &shared);

    let _ = signals.forever().next();
    tracing::info!("stopping");
    rt.block_on(control.shutdown());
    drop(control);
    rt.shutdown_timeout(Duration::from_secs(2));
    let reports = crate::node::stop_workers(&shared, handles, stats, a.stats_file.as_deref())?;
    dp.remove_all();
    tracing::info!("stopped; {}", crate::node::summary(&reports));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_flags_win() {
        let f: FileConfig = toml::from_str(include_str!("../examples/node.toml")).expect("examples/node.toml");
        assert_eq!(f.name.as_deref(), Some("node1"));
        assert_eq!(f.io, Some(IoKind::Afxdp));
        assert_eq!(f.cores, Some(vec![1]));
        let bad = toml::from_str::<FileConfig>("nmae = \"x\"");
        assert!(bad.is_err_and(|e| e.to_string().contains("nmae")), "an unknown key is refused by name");
    }

    #[test]
    fn task_port_names_fit_an_interface_name() {
        let a = host_name("web.1");
        assert!(a.len() <= 15 && a.starts_with("mpt"));
        assert_ne!(a, host_name("web.2"));
        assert_eq!(a, host_name("web.1"));
    }
}
