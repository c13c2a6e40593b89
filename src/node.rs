//! `meshplane node run`: the dataplane alone, from a tables file, with no
//! control plane (static mode, as `ipvsadm` is used without an
//! orchestrator). SIGTERM or SIGINT stops it cleanly; SIGHUP reloads the
//! tables file (a bad file is reported and the old tables stay).

use anyhow::{Context, Result, bail};
use meshplane_dataplane::io::{Port, afxdp};
use meshplane_dataplane::pipeline::DropReason;
use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::worker::{Bound, Report, Shared, Worker, WorkerConfig, bind};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The I/O backend.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IoKind {
    /// AF_XDP sockets (an XDP program steers only dataplane traffic to them).
    Afxdp,
    /// TAP devices (the dataplane creates them, or attaches to persistent ones).
    Tap,
}

/// Arguments of `meshplane node run`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// A node configuration file (TOML; keys as the long flags, with `_`
    /// for `-`: see examples/node.toml); flags given override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Static mode: the tables file (TOML; see examples/tables.toml); no
    /// control plane. Without it the node runs its control plane (state
    /// in --state-dir; `meshplane cluster init|join` next).
    #[arg(long)]
    pub(crate) tables: Option<PathBuf>,
    /// The data-path interface (the uplink; with `--io tap`, the TAP
    /// device to create).
    #[arg(long, visible_alias = "data-iface")]
    pub(crate) uplink: Option<String>,
    /// The node's name in the cluster (default: the host name).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Management address (Raft, joins, admin API; gossip on its IP):
    /// IP or IP:PORT (port 2377 unless given).
    #[arg(long)]
    pub(crate) advertise_addr: Option<String>,
    /// Data-path address (VXLAN, published ports).
    #[arg(long)]
    pub(crate) data_path_addr: Option<std::net::Ipv4Addr>,
    /// The data-path NIC's MAC (default: the interface's; with TAP,
    /// 02:42 and the data-path address).
    #[arg(long)]
    pub(crate) data_mac: Option<String>,
    /// VXLAN UDP port.
    #[arg(long)]
    pub(crate) data_path_port: Option<u16>,
    /// Gossip UDP port.
    #[arg(long)]
    pub(crate) gossip_port: Option<u16>,
    /// Prometheus metrics (`GET /metrics`, plain HTTP): IP:PORT, or `off`
    /// (default: the management IP, port 9323).
    #[arg(long)]
    pub(crate) metrics_addr: Option<String>,
    /// The node's state directory (identity, Raft log, admin socket).
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// A task port: the tables port NAME served by interface IFACE.
    #[arg(long = "task-port", value_name = "NAME=IFACE", value_parser = parse_task_port)]
    pub(crate) task_ports: Vec<(String, String)>,
    /// I/O backend.
    #[arg(long, value_enum)]
    pub(crate) io: Option<IoKind>,
    /// Cores to run workers on, one worker per core, pinned (one unpinned
    /// worker if omitted). Worker k serves queue k of every port; worker 0
    /// owns the connection state, and the others hand it the frames that
    /// touch it.
    #[arg(long, value_name = "LIST", value_delimiter = ',', conflicts_with = "workers")]
    pub(crate) cores: Vec<usize>,
    /// Workers to run, not pinned (the scheduler places them); `--cores`
    /// pins one per core instead.
    #[arg(long, value_name = "N")]
    pub(crate) workers: Option<usize>,
    /// Poll without ever sleeping (lowest latency; one core at 100%); with
    /// AF_XDP also sets the sockets' busy-poll options.
    #[arg(long)]
    pub(crate) busy_poll: bool,
    /// Connection-table entries per worker.
    #[arg(long, default_value_t = 1 << 20)]
    pub(crate) conntrack: usize,
    /// Write the counters as JSON to this file every half second and at
    /// exit (written to a temporary file and renamed).
    #[arg(long)]
    pub(crate) stats_file: Option<PathBuf>,
    /// AF_XDP: attach the XDP program in generic (skb) mode instead of
    /// trying native mode first.
    #[arg(long)]
    pub(crate) xdp_generic: bool,
    /// AF_XDP: entries of each ring (fill, completion, rx, tx); a power of
    /// two.
    #[arg(long, default_value_t = 2048)]
    pub(crate) xdp_ring: u32,
    /// AF_XDP: UMEM frames (2 KiB each) per socket; at least twice the
    /// ring.
    #[arg(long, default_value_t = 8192)]
    pub(crate) xdp_frames: u32,
}

fn parse_task_port(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, i)) if !n.is_empty() && !i.is_empty() => Ok((n.to_owned(), i.to_owned())),
        _ => Err(format!("expected NAME=IFACE (a tables port and an interface), got {s:?}")),
    }
}

/// A port's queues, and the uplink's steering handle.
type Opened = (Vec<Box<dyn Port>>, Option<afxdp::SteeringHandle>);

/// Opens `n` queues of a port (one per worker); for an AF_XDP uplink also
/// the handle to its steering maps (rewritten when the tables change).
pub(crate) fn open(kind: IoKind, iface: &str, uplink: bool, n: usize, t: &Tables, a: &RunArgs) -> Result<Opened> {
    Ok(match kind {
        IoKind::Tap => {
            let v = meshplane_dataplane::io::tap::TapPort::open_queues(iface, n)?;
            (v.into_iter().map(|p| Box::new(p) as Box<dyn Port>).collect(), None)
        }
        IoKind::Afxdp => {
            let steer = uplink.then(|| afxdp::Steering::for_tables(t));
            let cfg = afxdp::AfXdpConfig {
                generic: a.xdp_generic,
                busy_poll: a.busy_poll,
                ring: a.xdp_ring,
                frames: a.xdp_frames,
                ..afxdp::AfXdpConfig::default()
            };
            let queues: Vec<u32> = (0..n as u32).collect();
            let v = afxdp::AfXdpPort::open_queues(iface, &queues, &cfg, steer)?;
            let handle = match v.first() {
                Some(p) if uplink => Some(p.steering()?),
                _ => None,
            };
            (v.into_iter().map(|p| Box::new(p) as Box<dyn Port>).collect(), handle)
        }
    })
}

/// Runs the node until SIGTERM/SIGINT: static mode with `--tables`, else
/// with its control plane.
pub(crate) fn run(a: &RunArgs) -> Result<()> {
    let a = crate::managed::with_config_file(a)?;
    match &a.tables {
        Some(path) => run_static(&a, path),
        None => crate::managed::run(&a),
    }
}

fn run_static(a: &RunArgs, tables: &Path) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let path = tables.display().to_string();
    let io = a.io.context("--io afxdp|tap is needed")?;
    let uplink = a.uplink.as_deref().context("--uplink (--data-iface) is needed")?;
    let t = Tables::load(&path)?;
    let cores = worker_cores(a)?;
    let n = cores.len();
    // Signals first: a SIGTERM while the ports are being opened still
    // stops the node cleanly.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;

    // Queue k of every port belongs to worker k.
    let (uplinks, steering) = open(io, uplink, true, n, &t, a).context("opening the uplink")?;
    let mut per_worker: Vec<Vec<Bound>> = uplinks.into_iter().map(|p| vec![Bound::new("uplink", p)]).collect();
    for (name, iface) in &a.task_ports {
        let (ps, _) = open(io, iface, false, n, &t, a).with_context(|| format!("opening task port {name}"))?;
        for (k, p) in ps.into_iter().enumerate() {
            per_worker[k].push(Bound::new(name, p));
        }
    }
    for ports in &per_worker {
        bind(&t, ports)?;
    }
    let names: Vec<String> = per_worker[0].iter().map(|p| format!("{}={}", p.name, p.io.name())).collect();
    let shared = Shared::new(t, n);
    let mut handles = Vec::new();
    for (k, (ports, core)) in per_worker.into_iter().zip(cores.iter()).enumerate() {
        let cfg = WorkerConfig {
            core: *core,
            busy_poll: a.busy_poll,
            conntrack: meshplane_dataplane::lb::conntrack::CtConfig { capacity: a.conntrack, ..Default::default() },
            ..WorkerConfig::default()
        };
        let worker = Worker::new(k, ports, shared.clone(), cfg)?;
        let h = std::thread::Builder::new()
            .name(format!("mp-worker-{k}"))
            .spawn(move || worker.run())
            .context("starting a worker thread")?;
        handles.push(h);
    }
    tracing::info!(
        "node running ({:?} I/O, {n} worker{} on {}): ports {}",
        io,
        if n == 1 { "" } else { "s" },
        if a.cores.is_empty() { "any core".to_owned() } else { format!("cores {:?}", a.cores) },
        names.join(", ")
    );

    let stats = stats_writer(a.stats_file.clone(), &shared);

    for sig in signals.forever() {
        match sig {
            SIGHUP => match Tables::load(&path) {
                Ok(nt) => {
                    // The worker takes only tables that keep its ports.
                    let ok = shared.tables().ports.iter().all(|p| nt.port_id(&p.name).is_some());
                    if ok {
                        // The steering program learns new published ports
                        // and VIPs before the worker uses the tables.
                        if let Some(h) = &steering
                            && let Err(e) = h.set(&afxdp::Steering::for_tables(&nt))
                        {
                            tracing::warn!("updating the XDP steering maps: {e}");
                        }
                        shared.publish(nt);
                        tracing::info!("tables reloaded from {path} (version {})", shared.version());
                    } else {
                        tracing::warn!("{path}: the new tables drop a port this node serves; keeping the old tables");
                    }
                }
                Err(e) => tracing::warn!("reloading {path}: {e}; keeping the old tables"),
            },
            _ => break,
        }
    }
    let reports = stop_workers(&shared, handles, stats, a.stats_file.as_deref())?;
    tracing::info!("stopped; {}", summary(&reports));
    Ok(())
}

/// The fewest connection-table entries per worker: one bucket.
const MIN_CONNTRACK: usize = meshplane_dataplane::lb::conntrack::WAYS;
/// The most: 2^30 (38 GiB with the MAC side array).
const MAX_CONNTRACK: usize = 1 << 30;

/// Each worker's core (`None`: not pinned): one per `--cores` core, or
/// `--workers N` unpinned, or one unpinned.
pub(crate) fn worker_cores(a: &RunArgs) -> Result<Vec<Option<usize>>> {
    let cores: Vec<Option<usize>> = match (a.cores.is_empty(), a.workers) {
        (false, _) => a.cores.iter().map(|&c| Some(c)).collect(),
        (true, Some(0)) => bail!("--workers: at least 1"),
        (true, Some(n)) => vec![None; n],
        (true, None) => vec![None],
    };
    if cores.len() > 64 {
        bail!("at most 64 workers");
    }
    // Checked here, with the other worker settings, before any port opens.
    if !(MIN_CONNTRACK..=MAX_CONNTRACK).contains(&a.conntrack) {
        bail!(
            "--conntrack: {MIN_CONNTRACK} to {MAX_CONNTRACK} entries per worker (38 bytes each), not {}",
            a.conntrack
        );
    }
    Ok(cores)
}

/// The workers' threads.
pub(crate) type WorkerHandles = Vec<std::thread::JoinHandle<Result<Report, meshplane_dataplane::worker::WorkerError>>>;

/// The stats writer: the counters to `file` every half second until the
/// workers stop.
pub(crate) fn stats_writer(file: Option<PathBuf>, shared: &Arc<Shared>) -> Option<std::thread::JoinHandle<()>> {
    file.map(|file| {
        let shared = shared.clone();
        std::thread::spawn(move || {
            while !shared.stopping() {
                write_stats(&file, &shared);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    })
}

/// Stops the workers and the stats writer; the workers' final counters
/// (also written to the stats file).
pub(crate) fn stop_workers(
    shared: &Arc<Shared>,
    handles: WorkerHandles,
    stats: Option<std::thread::JoinHandle<()>>,
    stats_file: Option<&Path>,
) -> Result<Vec<Report>> {
    shared.stop();
    let mut reports = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => reports.push(r?),
            Err(_) => bail!("a worker thread panicked"),
        }
    }
    if let Some(h) = stats {
        let _ = h.join();
    }
    if let Some(file) = stats_file {
        write_stats(file, shared);
    }
    Ok(reports)
}

/// One line of totals over the workers.
pub(crate) fn summary(reports: &[Report]) -> String {
    let (mut rx, mut tx, mut drops) = (0u64, 0u64, 0u64);
    for r in reports {
        for (_, s) in &r.io {
            rx += s.rx;
            tx += s.tx;
        }
        drops += r.stats.as_ref().map_or(0, |s| s.total_drops());
    }
    format!("{rx} frames received, {tx} sent, {drops} dropped")
}

/// The counters file's shape (and the admin API's `stats`).
#[derive(Serialize)]
struct StatsFile<'a> {
    tables_version: u64,
    workers: Vec<WorkerStats<'a>>,
}

#[derive(Serialize)]
struct WorkerStats<'a> {
    tables_version: u64,
    ports: Vec<PortStats<'a>>,
    drops: std::collections::BTreeMap<&'static str, u64>,
    passed: u64,
    unbound: u64,
    conntrack_entries: usize,
    new_connections: u64,
    handed_off: u64,
    handed_in: u64,
    handoff_full: u64,
    busy_rounds: u64,
    idle_waits: u64,
    services: Vec<ServiceCounters>,
    /// The pipeline's counters per tables port (frames and bytes).
    traffic: Vec<Traffic>,
}

#[derive(Serialize)]
struct Traffic {
    port: String,
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
}

#[derive(Serialize)]
struct PortStats<'a> {
    name: &'a str,
    rx: u64,
    tx: u64,
    tx_full: u64,
    rx_oversize: u64,
    errors: u64,
}

#[derive(Serialize)]
struct ServiceCounters {
    name: String,
    packets: u64,
    bytes: u64,
    new_connections: u64,
    backends: Vec<BackendCounters>,
}

#[derive(Serialize)]
struct BackendCounters {
    ip: std::net::Ipv4Addr,
    port: u16,
    weight: u32,
    packets: u64,
    bytes: u64,
    new_connections: u64,
    active: u32,
}

/// Every worker's last published counters, as JSON: ports, drops by
/// reason, connection table, and per service and backend (named from the
/// tables in use).
pub(crate) fn stats_json(shared: &Arc<Shared>) -> serde_json::Value {
    let reports: Vec<Report> = (0..shared.workers()).filter_map(|i| shared.report(i)).collect();
    let t = shared.tables();
    let workers = reports
        .iter()
        .map(|r| WorkerStats {
            tables_version: r.tables_version,
            ports: r
                .io
                .iter()
                .map(|(n, s)| PortStats {
                    name: n,
                    rx: s.rx,
                    tx: s.tx,
                    tx_full: s.tx_full,
                    rx_oversize: s.rx_oversize,
                    errors: s.errors,
                })
                .collect(),
            drops: r
                .stats
                .as_ref()
                .map(|s| DropReason::ALL.iter().map(|d| (d.name(), s.dropped(*d))).filter(|(_, n)| *n > 0).collect())
                .unwrap_or_default(),
            passed: r.stats.as_ref().map_or(0, |s| s.passed),
            unbound: r.unbound,
            conntrack_entries: r.conntrack_len,
            new_connections: r.services.iter().map(|s| s.new_conns).sum(),
            handed_off: r.handed_off,
            handed_in: r.handed_in,
            handoff_full: r.handoff_full,
            busy_rounds: r.busy_rounds,
            idle_waits: r.idle_waits,
            traffic: r
                .stats
                .as_ref()
                .map(|st| {
                    st.ports
                        .iter()
                        .zip(&t.ports)
                        .map(|(c, p)| Traffic {
                            port: p.name.clone(),
                            rx_packets: c.rx_packets,
                            rx_bytes: c.rx_bytes,
                            tx_packets: c.tx_packets,
                            tx_bytes: c.tx_bytes,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            services: r
                .services
                .iter()
                .zip(&t.services.list)
                .map(|(c, s)| ServiceCounters {
                    name: s.name.clone(),
                    packets: c.packets,
                    bytes: c.bytes,
                    new_connections: c.new_conns,
                    backends: c
                        .backends
                        .iter()
                        .zip(&s.backends)
                        .map(|(c, b)| BackendCounters {
                            ip: b.ip,
                            port: b.port,
                            weight: b.weight,
                            packets: c.packets,
                            bytes: c.bytes,
                            new_connections: c.new_conns,
                            active: c.active,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    serde_json::to_value(StatsFile { tables_version: shared.version(), workers }).unwrap_or_default()
}

pub(crate) fn write_stats(file: &Path, shared: &Arc<Shared>) {
    let doc = stats_json(shared);
    let tmp = file.with_extension("tmp");
    let ok = serde_json::to_vec_pretty(&doc)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = ok {
        tracing::warn!("writing {}: {e}", file.display());
    }
}
