//! Static mode (`node run --tables FILE`): the dataplane alone, from a
//! tables file, with no control plane (as `ipvsadm` is used without an
//! orchestrator). SIGTERM or SIGINT stops it cleanly; SIGHUP reloads the
//! tables file (a bad file is reported and the old tables stay).
//!
//! Egress is the tables file's `[node.egress]`, with `--egress-addr`,
//! `--egress-ports` and `--no-egress` overriding it; with an AF_XDP uplink
//! the range is reserved from the kernel while the node runs, and a
//! reload that changes the egress address or range is refused.

use super::args::{IoKind, RunArgs};
use super::egress;
use super::workers::{open, spawn_workers, stats_writer, stop_workers, summary, worker_cores};
use anyhow::{Context, Result};
use meshplane_dataplane::io::afxdp;
use meshplane_dataplane::tables::{Tables, TablesError, TablesSpec};
use meshplane_dataplane::worker::{Bound, Shared, bind};
use std::path::Path;
use std::sync::Arc;

/// Runs the dataplane from the tables file `tables` until SIGTERM/SIGINT.
pub(crate) fn run(a: &RunArgs, tables: &Path) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let path = tables.display().to_string();
    let io = a.io.context("--io afxdp|tap is needed")?;
    let uplink = a.uplink.as_deref().context("--uplink (--data-iface) is needed")?;
    let t = load(&path, a)?;
    let cores = worker_cores(a)?;
    // The kernel's ports (it holds the egress address with AF_XDP), kept
    // until the node stops.
    let _reserved = match (&t.egress, io) {
        (Some(e), IoKind::Afxdp) => Some(egress::claim_kernel_ports(uplink, e.addr, t.data_ip, e.ports)?),
        _ => None,
    };
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
    // The tables' host link, if any, served like a task port.
    let host_link = t.egress.as_ref().and_then(|e| e.host_link.clone());
    if let Some(h) = &host_link {
        let queues = super::host_port::open_link(h, t.underlay_mtu, n, &t, a)?;
        for (k, q) in queues.into_iter().enumerate() {
            per_worker[k].push(Bound::new(&h.port, q));
        }
    }
    for ports in &per_worker {
        bind(&t, ports)?;
    }
    let names: Vec<String> = per_worker[0].iter().map(|p| format!("{}={}", p.name, p.io.name())).collect();
    let shared = Shared::new(t, n);
    let handles = spawn_workers(per_worker, &cores, &shared, a)?;
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
            SIGHUP => reload(&path, a, &shared, steering.as_ref()),
            _ => break,
        }
    }
    let reports = stop_workers(&shared, handles, stats, a.stats_file.as_deref())?;
    if let Some(h) = &host_link {
        super::host_port::close_link(h);
    }
    tracing::info!("stopped; {}", summary(&reports));
    Ok(())
}

/// The tables file `path`, with the egress flags applied.
fn load(path: &str, a: &RunArgs) -> Result<Tables, TablesError> {
    let text = std::fs::read_to_string(path).map_err(|source| TablesError::Io { path: path.into(), source })?;
    let mut spec: TablesSpec =
        toml::from_str(&text).map_err(|e| TablesError::Syntax { path: path.into(), message: e.to_string() })?;
    egress::static_override(a, &mut spec);
    Tables::compile(&spec)
}

/// SIGHUP: the tables file again, published if it keeps every port this
/// node serves and its egress address and range; else the old tables stay.
fn reload(path: &str, a: &RunArgs, shared: &Arc<Shared>, steering: Option<&afxdp::SteeringHandle>) {
    match load(path, a) {
        Ok(nt) => {
            // The worker takes only tables that keep its ports.
            let ok = shared.tables().ports.iter().all(|p| nt.port_id(&p.name).is_some());
            let same_egress = |t: &Tables| t.egress.as_ref().map(|e| (e.addr, e.ports));
            if same_egress(&shared.tables()) != same_egress(&nt) {
                tracing::warn!(
                    "{path}: the new tables change the egress address or ports (fixed while the node runs); keeping the old tables"
                );
            } else if ok {
                // The steering program learns new published ports and
                // VIPs before the worker uses the tables.
                if let Some(h) = steering
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
    }
}
