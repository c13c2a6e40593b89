//! What both modes of a node share: opening a port's queues, the
//! workers' cores and threads, the stats writer, and stopping.

use super::args::{IoKind, RunArgs};
use super::counters::write_stats;
use anyhow::{Context, Result, bail};
use meshplane_dataplane::io::{Port, afxdp};
use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::worker::{Bound, Report, Shared, Worker, WorkerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A port's queues, and the uplink's steering handle.
pub(crate) type Opened = (Vec<Box<dyn Port>>, Option<afxdp::SteeringHandle>);

/// Opens `n` queues of a port (one per worker); for an AF_XDP uplink also
/// the handle to its steering maps (rewritten when the tables change).
pub(crate) fn open(kind: IoKind, iface: &str, uplink: bool, n: usize, t: &Tables, a: &RunArgs) -> Result<Opened> {
    Ok(match kind {
        IoKind::Tap => {
            use meshplane_dataplane::io::tap::{TapPort, TapRole};
            let v = TapPort::open_queues(iface, n, if uplink { TapRole::Uplink } else { TapRole::Task })?;
            (v.into_iter().map(|p| Box::new(p) as Box<dyn Port>).collect(), None)
        }
        IoKind::Afxdp => {
            let steer = uplink.then(|| afxdp::Steering::for_tables(t));
            let cfg = afxdp::AfXdpConfig {
                generic: a.xdp_generic,
                busy_poll: a.busy_poll,
                complete_checksums: !uplink,
                ring: a.xdp_ring,
                frames: a.xdp_frames,
                // Frames larger than one UMEM frame as chains of them.
                multi_buffer: t.underlay_mtu > afxdp::MAX_MTU,
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
    for &c in &a.cores {
        crate::sys::check_core(c).context("--cores")?;
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

/// Starts one worker thread per entry of `per_worker` (worker k serves
/// queue k of every port), on the matching core.
pub(crate) fn spawn_workers(
    per_worker: Vec<Vec<Bound>>,
    cores: &[Option<usize>],
    shared: &Arc<Shared>,
    a: &RunArgs,
) -> Result<WorkerHandles> {
    let mut handles = Vec::new();
    for (k, (ports, core)) in per_worker.into_iter().zip(cores).enumerate() {
        let cfg = WorkerConfig {
            core: *core,
            busy_poll: a.busy_poll,
            conntrack: meshplane_dataplane::lb::conntrack::CtConfig {
                capacity: a.conntrack,
                max_new_per_sec: a.max_new_conns_per_sec,
                ..Default::default()
            },
            fd_spin: a.spin_us.map_or(meshplane_dataplane::worker::DEFAULT_FD_SPIN, std::time::Duration::from_micros),
            nice: Some(a.worker_nice.unwrap_or(meshplane_dataplane::worker::DEFAULT_WORKER_NICE)),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(k, ports, shared.clone(), cfg)?;
        let h = std::thread::Builder::new()
            .name(format!("mp-worker-{k}"))
            .spawn(move || worker.run())
            .context("starting a worker thread")?;
        handles.push(h);
    }
    Ok(handles)
}

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
