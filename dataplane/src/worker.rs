//! A dataplane worker: one thread, pinned to a core, polling its ports.
//!
//! The loop: for each port, receive a burst (up to 64 frames), run the
//! pipeline over it in place, transmit each frame where its verdict says
//! (back out of the same port without a copy where the port allows, else a
//! copy into the other port), then push the transmit queues out. Between
//! rounds the worker picks up a newer [`Tables`] version (an atomic pointer
//! swap; the old tables are freed when the last worker drops its `Arc`),
//! sweeps a little of its connection table, and publishes its counters.
//!
//! Idle policy: after a round with no frames the worker keeps polling
//! (busy) for [`WorkerConfig::spin`], then waits on its ports' file
//! descriptors (mio, with a timeout so it still notices new tables and the
//! stop flag) so that an idle node does not burn a core, unless
//! [`WorkerConfig::busy_poll`] is set.

use crate::io::{BURST, IoStats, Port};
use crate::lb::ServiceStats;
use crate::lb::conntrack::{CtConfig, CtStats};
use crate::pipeline::{DropReason, Stats, Verdict, WorkerState, process_burst};
use crate::tables::{PortId, Tables};
use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What the workers share with the thread that runs them: the current
/// tables, a stop flag, and each worker's published counters.
#[derive(Debug)]
pub struct Shared {
    tables: ArcSwap<Tables>,
    version: AtomicU64,
    stop: AtomicBool,
    reports: Vec<CachePadded<Mutex<Report>>>,
}

impl Shared {
    /// Shared state for `workers` workers starting with `tables`.
    pub fn new(tables: Tables, workers: usize) -> Arc<Shared> {
        Arc::new(Shared {
            tables: ArcSwap::from_pointee(tables),
            version: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            reports: (0..workers).map(|_| CachePadded::new(Mutex::new(Report::default()))).collect(),
        })
    }

    /// Publishes new tables: workers move to them between bursts.
    pub fn publish(&self, tables: Tables) {
        self.tables.store(Arc::new(tables));
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The tables version (1 at start, one more per [`Shared::publish`]).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current tables.
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    /// Asks every worker to stop after its current round.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// True once [`Shared::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Worker `i`'s last published counters.
    pub fn report(&self, i: usize) -> Option<Report> {
        self.reports.get(i).map(|r| r.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.reports.len()
    }
}

/// A worker's counters as it last published them.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The pipeline's counters (drops by reason, per tables port).
    pub stats: Option<Stats>,
    /// Per I/O port: the tables port it serves and the port's own counters.
    pub io: Vec<(String, IoStats)>,
    /// Per service, by index in the tables the worker uses.
    pub services: Vec<ServiceStats>,
    /// The connection table's counters.
    pub conntrack: CtStats,
    /// Live connection-table entries.
    pub conntrack_len: usize,
    /// Frames sent toward a tables port this worker has no I/O port for.
    pub unbound: u64,
    /// Rounds that received at least one frame.
    pub busy_rounds: u64,
    /// Times the worker went to sleep waiting for frames.
    pub idle_waits: u64,
    /// The tables version in use.
    pub tables_version: u64,
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// CPU core to pin the thread to (none: not pinned).
    pub core: Option<usize>,
    /// Never sleep: poll continuously (lowest latency, one core at 100%).
    pub busy_poll: bool,
    /// How long to keep polling after the last frame before sleeping.
    pub spin: Duration,
    /// Longest sleep (the stop flag and new tables are noticed within it).
    pub max_wait: Duration,
    /// The connection table.
    pub conntrack: CtConfig,
    /// How often counters are published.
    pub report_every: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            core: None,
            busy_poll: false,
            spin: Duration::from_millis(2),
            max_wait: Duration::from_millis(50),
            conntrack: CtConfig::default(),
            report_every: Duration::from_millis(100),
        }
    }
}

/// Entries of the connection table swept per round.
const SWEEP_BUDGET: usize = 64;

/// An I/O port and the tables port it serves (`uplink`, or a task port's
/// name).
pub struct Bound {
    /// The tables port's name.
    pub name: String,
    /// The I/O port.
    pub io: Box<dyn Port>,
}

impl Bound {
    /// `io` serving the tables port `name`.
    pub fn new(name: &str, io: Box<dyn Port>) -> Bound {
        Bound { name: name.to_owned(), io }
    }
}

/// A worker: its ports, its state, and where it publishes.
pub struct Worker {
    index: usize,
    ports: Vec<Bound>,
    shared: Arc<Shared>,
    cfg: WorkerConfig,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.ports.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("Worker").field("index", &self.index).field("ports", &names).finish()
    }
}

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An I/O port's name is not a port of the tables.
    #[error("port {0:?} is not in the tables (ports there: {1})")]
    UnknownPort(String, String),
    /// Two I/O ports for one tables port.
    #[error("port {0:?} is given twice")]
    DuplicatePort(String),
    /// The idle wait could not be set up.
    #[error("worker {0}: setting up the idle wait: {1}")]
    Poll(usize, std::io::Error),
}

/// Maps tables ports to I/O ports and back by name: per tables port, the
/// I/O port index, and per I/O port, the tables port id. Every I/O port
/// must name a tables port, once.
pub fn bind(t: &Tables, ports: &[Bound]) -> Result<(Vec<Option<usize>>, Vec<PortId>), WorkerError> {
    let mut io_of = vec![None; t.ports.len()];
    let mut table_of = Vec::with_capacity(ports.len());
    for (k, p) in ports.iter().enumerate() {
        let Some(id) = t.port_id(&p.name) else {
            let names: Vec<&str> = t.ports.iter().map(|x| x.name.as_str()).collect();
            return Err(WorkerError::UnknownPort(p.name.clone(), names.join(", ")));
        };
        if io_of[usize::from(id)].replace(k).is_some() {
            return Err(WorkerError::DuplicatePort(p.name.clone()));
        }
        table_of.push(id);
    }
    Ok((io_of, table_of))
}

impl Worker {
    /// Worker `index` of `shared`, over `ports`. Checks their names against
    /// the current tables.
    pub fn new(index: usize, ports: Vec<Bound>, shared: Arc<Shared>, cfg: WorkerConfig) -> Result<Worker, WorkerError> {
        bind(&shared.tables(), &ports)?;
        Ok(Worker { index, ports, shared, cfg })
    }

    /// Runs until [`Shared::stop`]; returns the final counters (also
    /// published).
    pub fn run(mut self) -> Result<Report, WorkerError> {
        if let Some(core) = self.cfg.core {
            // Best effort: an absent core leaves the thread unpinned.
            let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
        }
        let mut poll = mio::Poll::new().map_err(|e| WorkerError::Poll(self.index, e))?;
        for (k, p) in self.ports.iter().enumerate() {
            let fd = p.io.fd();
            if fd >= 0 {
                poll.registry()
                    .register(&mut mio::unix::SourceFd(&fd), mio::Token(k), mio::Interest::READABLE)
                    .map_err(|e| WorkerError::Poll(self.index, e))?;
            }
        }
        let mut events = mio::Events::with_capacity(self.ports.len().max(1));
        let epoch = Instant::now();
        // The clock starts at 1 s: conntrack times are never 0.
        let clock = || epoch.elapsed().as_nanos() as u64 + 1_000_000_000;

        let mut version = self.shared.version();
        let mut t = self.shared.tables();
        let mut st = WorkerState::with_conntrack(t.ports.len(), self.cfg.conntrack);
        st.sync(&t);
        let (mut io_of, mut table_of) = bind(&t, &self.ports)?;
        let mut report = Report { tables_version: version, ..Report::default() };
        let mut verdicts = [Verdict::Pass; BURST];
        let mut last_frame = clock();
        let mut last_report = 0u64;
        let spin = self.cfg.spin.as_nanos() as u64;
        let report_every = self.cfg.report_every.as_nanos() as u64;

        while !self.shared.stopping() {
            let v = self.shared.version();
            if v != version {
                let nt = self.shared.tables();
                // Tables without one of our ports are not taken (the
                // publisher validates before publishing); the old ones stay.
                if let Ok((a, b)) = bind(&nt, &self.ports) {
                    (io_of, table_of) = (a, b);
                    // New ports keep counting: the counters grow to the new
                    // tables' ports (between bursts, not per packet).
                    if st.stats.ports.len() < nt.ports.len() {
                        st.stats.ports.resize(nt.ports.len(), Default::default());
                    }
                    st.sync(&nt);
                    t = nt;
                }
                version = v;
                report.tables_version = v;
            }
            let now = clock();
            let mut got = 0;
            for i in 0..self.ports.len() {
                let (before, rest) = self.ports.split_at_mut(i);
                let Some((port, after)) = rest.split_first_mut() else { break };
                let in_port = table_of[i];
                let (t, st, io_of, verdicts, unbound) = (&*t, &mut st, &io_of, &mut verdicts, &mut report.unbound);
                got += port.io.rx_burst(&mut |frames, back| {
                    process_burst(frames, in_port, now, t, st, verdicts);
                    for (j, v) in verdicts.iter().take(frames.len()).enumerate() {
                        let Verdict::Tx(p) = *v else { continue };
                        match io_of.get(usize::from(p)).copied().flatten() {
                            Some(k) if k == i => back[j] = true,
                            Some(k) if k < i => {
                                before[k].io.tx_copy(frames[j].data());
                            }
                            Some(k) => {
                                after[k - i - 1].io.tx_copy(frames[j].data());
                            }
                            None => *unbound += 1,
                        }
                    }
                });
            }
            for p in &mut self.ports {
                p.io.flush();
            }
            st.lb.sweep(now, SWEEP_BUDGET);
            if got > 0 {
                last_frame = now;
                report.busy_rounds += 1;
            } else if !self.cfg.busy_poll && now.saturating_sub(last_frame) > spin {
                report.idle_waits += 1;
                // Publish before sleeping: an idle worker's counters are
                // current.
                self.publish(&mut report, &st);
                last_report = now;
                match poll.poll(&mut events, Some(self.cfg.max_wait)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(WorkerError::Poll(self.index, e)),
                }
                continue;
            }
            if now.saturating_sub(last_report) > report_every {
                self.publish(&mut report, &st);
                last_report = now;
            }
        }
        self.publish(&mut report, &st);
        Ok(report)
    }

    /// Copies the counters into the shared report (skipped if a reader
    /// holds it: the worker never waits).
    fn publish(&self, report: &mut Report, st: &WorkerState) {
        report.stats = Some(st.stats.clone());
        report.io.clear();
        report.io.extend(self.ports.iter().map(|p| (p.name.clone(), p.io.stats())));
        report.services.clone_from(&st.lb.services);
        report.conntrack = st.lb.conntrack.stats;
        report.conntrack_len = st.lb.conntrack.len();
        if let Some(slot) = self.shared.reports.get(self.index)
            && let Ok(mut r) = slot.try_lock()
        {
            r.clone_from(report);
        }
    }
}

/// Drops by reason, named, leaving out zeros (for logs and summaries).
pub fn drops_named(stats: &Stats) -> Vec<(&'static str, u64)> {
    DropReason::ALL.iter().map(|r| (r.name(), stats.dropped(*r))).filter(|(_, n)| *n > 0).collect()
}
