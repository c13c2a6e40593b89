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
use crate::packet::{DropReason, Stats, Verdict};
use crate::pipeline::{WorkerState, process_burst};
use crate::tables::{PortId, Tables};
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
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
    /// The tables version each worker uses now (set when it swaps).
    in_use: Vec<CachePadded<AtomicU64>>,
    /// Each worker's waker (set when it starts): new tables, handoffs and
    /// stop wake a sleeping worker at once.
    wakers: Vec<std::sync::OnceLock<mio::Waker>>,
    /// With more than one worker: frames for worker 0, which owns the
    /// balancer's state.
    handoff: Option<Handoff>,
    /// Per worker: ports to add and to remove, taken at the next tables
    /// change (a node's tasks come and go).
    mailbox: Vec<Mutex<PortChanges>>,
    /// Per worker: a copy of its connection table asked for (the flag) and
    /// given (the slot).
    dump_wanted: Vec<AtomicBool>,
    dumps: Vec<Mutex<Vec<CtDump>>>,
}

/// One connection-table entry as a worker copied it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtDump {
    /// The flow as the entry keys it.
    pub key: crate::lb::conntrack::FlowKey,
    /// What the entry holds.
    pub value: crate::lb::conntrack::CtValue,
    /// Nanoseconds until it expires.
    pub expires_in: u64,
}

/// Entries a worker copies out at most per dump.
pub const DUMP_MAX: usize = 100_000;

/// Ports a worker is to add and remove.
#[derive(Default)]
struct PortChanges {
    add: Vec<Bound>,
    remove: Vec<String>,
}

impl std::fmt::Debug for PortChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let add: Vec<&str> = self.add.iter().map(|b| b.name.as_str()).collect();
        f.debug_struct("PortChanges").field("add", &add).field("remove", &self.remove).finish()
    }
}

/// Worker 0's inbox: frames other workers received that touch connection
/// state (a network with services, the routing mesh), so that both
/// directions of every connection meet the same connection table. The
/// buffers come from a pool allocated at start-up and go back to it.
#[derive(Debug)]
struct Handoff {
    inbox: ArrayQueue<Handed>,
    pool: ArrayQueue<Box<[u8]>>,
    /// Worker 0 is about to sleep (or sleeps): wake it after a push.
    sleeping: AtomicBool,
}

/// A frame handed to worker 0: the tables port it came in on and a copy.
#[derive(Debug)]
struct Handed {
    port: PortId,
    len: usize,
    offload: crate::packet::Offload,
    buf: Box<[u8]>,
}

/// Buffers of the handoff pool.
const HANDOFF_BUFFERS: usize = 4096;

impl Shared {
    /// Shared state for `workers` workers starting with `tables`.
    pub fn new(tables: Tables, workers: usize) -> Arc<Shared> {
        let handoff = (workers > 1).then(|| {
            let pool = ArrayQueue::new(HANDOFF_BUFFERS);
            for _ in 0..HANDOFF_BUFFERS {
                let _ = pool.push(vec![0u8; crate::io::SLOT].into_boxed_slice());
            }
            Handoff { inbox: ArrayQueue::new(HANDOFF_BUFFERS), pool, sleeping: AtomicBool::new(false) }
        });
        Arc::new(Shared {
            tables: ArcSwap::from_pointee(tables),
            version: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            reports: (0..workers).map(|_| CachePadded::new(Mutex::new(Report::default()))).collect(),
            in_use: (0..workers).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
            wakers: (0..workers).map(|_| std::sync::OnceLock::new()).collect(),
            handoff,
            mailbox: (0..workers).map(|_| Mutex::new(PortChanges::default())).collect(),
            dump_wanted: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            dumps: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
        })
    }

    /// Every worker's connection-table entries (at most [`DUMP_MAX`] each),
    /// copied by the workers between bursts; a worker that does not answer
    /// within `wait` gives none. Per worker, in worker order.
    pub fn conntrack(&self, wait: Duration) -> Vec<Vec<CtDump>> {
        for f in &self.dump_wanted {
            f.store(true, Ordering::Release);
        }
        self.wake_all();
        let t0 = Instant::now();
        while self.dump_wanted.iter().any(|f| f.load(Ordering::Acquire)) && t0.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.dump_wanted
            .iter()
            .zip(&self.dumps)
            .map(|(f, d)| {
                if f.swap(false, Ordering::AcqRel) {
                    Vec::new()
                } else {
                    std::mem::take(&mut *d.lock().unwrap_or_else(PoisonError::into_inner))
                }
            })
            .collect()
    }

    /// Gives worker `i` a port to serve (queue `i` of it), and takes the
    /// ports named in `remove` away from it (they are closed). Takes effect
    /// at the next [`Shared::publish`]; until the tables name a port, its
    /// frames wait in its rings.
    pub fn change_ports(&self, i: usize, add: Vec<Bound>, remove: &[String]) {
        if let Some(m) = self.mailbox.get(i) {
            let mut m = m.lock().unwrap_or_else(PoisonError::into_inner);
            m.add.extend(add);
            m.remove.extend(remove.iter().cloned());
        }
    }

    /// Publishes new tables: workers move to them between bursts (a
    /// sleeping worker is woken).
    pub fn publish(&self, tables: Tables) {
        self.tables.store(Arc::new(tables));
        self.version.fetch_add(1, Ordering::Release);
        self.wake_all();
    }

    fn wake_all(&self) {
        for w in self.wakers.iter().filter_map(|w| w.get()) {
            let _ = w.wake();
        }
    }

    /// The tables version worker `i` uses now (0 before it started).
    pub fn in_use(&self, i: usize) -> u64 {
        self.in_use.get(i).map_or(0, |v| v.load(Ordering::Acquire))
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
        self.wake_all();
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
    /// The routing mesh's ICMP and MSS counters.
    pub mesh: crate::lb::MeshStats,
    /// Egress counters.
    pub egress: crate::lb::egress::EgressStats,
    /// Frames sent toward a tables port this worker has no I/O port for.
    pub unbound: u64,
    /// Frames this worker handed to worker 0 (connection state).
    pub handed_off: u64,
    /// Frames dropped because worker 0's inbox was full.
    pub handoff_full: u64,
    /// Frames worker 0 took from its inbox.
    pub handed_in: u64,
    /// Rounds that received at least one frame.
    pub busy_rounds: u64,
    /// Times the worker went to sleep waiting for frames.
    pub idle_waits: u64,
    /// Times the worker yielded its core while spinning for the next
    /// frame ([`WorkerConfig::fd_spin`]).
    pub spin_yields: u64,
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
    /// When every port is drained down to a descriptor that signals the
    /// next frame, how long to keep reading the ports after the last
    /// frame before waiting for those signals, yielding the core between
    /// rounds (`sched_yield`: a task sharing the core runs first). A
    /// waiting worker is woken by an interrupt, which on a virtual
    /// machine's halted core costs tens of microseconds per request; a
    /// spin that yields measured 1.3-1.6x the requests of waiting at once
    /// under request/response (BENCHMARKS.md, issue 16). 0: wait at once.
    pub fd_spin: Duration,
    /// The worker thread's nice value (`setpriority` on its thread id;
    /// `None`: inherited). Below the tasks' 0, a worker woken by frames
    /// runs before a task that shares its core, as the kernel's softirq
    /// does: at nice 0 a burst of new connections from a client on the
    /// same core filled the AF_XDP rx ring behind the client and p99
    /// grew to 0.3-3 s (BENCHMARKS.md, issue 16). Needs `CAP_SYS_NICE`
    /// below 0; without it the worker runs as it is, with a warning.
    pub nice: Option<i32>,
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
            fd_spin: DEFAULT_FD_SPIN,
            nice: None,
            conntrack: CtConfig::default(),
            report_every: Duration::from_millis(100),
        }
    }
}

/// [`WorkerConfig::fd_spin`]'s default.
pub const DEFAULT_FD_SPIN: Duration = Duration::from_micros(100);

/// A node's [`WorkerConfig::nice`] unless configured.
pub const DEFAULT_WORKER_NICE: i32 = -10;

/// The nice values a node accepts for its workers (Linux's range).
pub const WORKER_NICE_RANGE: core::ops::RangeInclusive<i32> = -20..=19;

/// The longest [`WorkerConfig::fd_spin`] a node accepts, in microseconds
/// (one second).
pub const MAX_FD_SPIN_US: u64 = 1_000_000;

/// Nanoseconds since the last publish after which a worker publishes
/// before it waits.
const IDLE_PUBLISH_GAP: u64 = 1_000_000;

/// Entries of the connection table swept per round.
const SWEEP_BUDGET: usize = 64;

/// An I/O port and the tables port it serves (`uplink`, or a task port's
/// name).
pub struct Bound {
    /// The tables port's name.
    pub name: String,
    /// The I/O port.
    pub io: Box<dyn Port>,
    /// Drained: not read again until its descriptor signals a frame
    /// ([`Port::drained`]).
    waiting: bool,
}

impl Bound {
    /// `io` serving the tables port `name`.
    pub fn new(name: &str, io: Box<dyn Port>) -> Bound {
        Bound { name: name.to_owned(), io, waiting: false }
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

/// The token of a worker's waker.
const WAKE: mio::Token = mio::Token(usize::MAX);

/// What [`Worker::run`]'s loop keeps from round to round.
struct Run {
    /// The tables in use, and their version.
    t: Arc<Tables>,
    version: u64,
    /// The worker's state, sized for `t`.
    st: WorkerState,
    /// By table port: the index of its bound port in `Worker::ports`.
    io_of: Vec<Option<usize>>,
    /// By bound port: its table port.
    table_of: Vec<Option<PortId>>,
    report: Report,
    verdicts: [Verdict; BURST],
    /// When a frame was last received, and counters last published.
    last_frame: u64,
    last_report: u64,
}

/// [`bind`] for a running worker: a port the tables do not name maps to
/// `None` (not read) instead of an error; a second port for one tables port
/// also maps to `None`.
fn bind_lenient(t: &Tables, ports: &[Bound]) -> (Vec<Option<usize>>, Vec<Option<PortId>>) {
    let mut io_of = vec![None; t.ports.len()];
    let table_of = ports
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let id = t.port_id(&p.name)?;
            let slot = io_of.get_mut(usize::from(id))?;
            if slot.is_some() {
                return None;
            }
            *slot = Some(k);
            Some(id)
        })
        .collect();
    (io_of, table_of)
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
            // Best effort: an absent core leaves the thread unpinned. (A
            // cpu_set_t holds cores below 1024; the crate indexes it
            // unchecked, so a larger one is not passed on.)
            if core < 1024 {
                let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
            } else {
                tracing::warn!("worker {}: core {core} is past any cpu set; not pinned", self.index);
            }
        }
        if let Some(nice) = self.cfg.nice {
            set_thread_nice(self.index, nice);
        }
        let mut poll = self.register()?;
        // Worker 0 owns the connection state; the others hand it the
        // frames that need it.
        let shared = self.shared.clone();
        let handoff = shared.handoff.as_ref().filter(|_| self.index != 0);
        let inbox = shared.handoff.as_ref().filter(|_| self.index == 0);
        let mut events = mio::Events::with_capacity(self.ports.len() + 1);
        let epoch = Instant::now();
        // The clock starts at 1 s: conntrack times are never 0.
        let clock = || epoch.elapsed().as_nanos() as u64 + 1_000_000_000;
        let mut r = self.start(clock());
        let spin = self.cfg.spin.as_nanos() as u64;
        let report_every = self.cfg.report_every.as_nanos() as u64;

        while !self.shared.stopping() {
            self.pick_up_tables(&poll, &mut r);
            let now = clock();
            let mut got = self.receive(&mut r, handoff, now);
            if let Some(h) = inbox {
                got += self.handed_in(h, &mut r, now);
            }
            for p in &mut self.ports {
                p.io.flush();
            }
            r.st.lb.sweep(now, SWEEP_BUDGET);
            self.serve_dump(&r.st, now);
            if got > 0 {
                r.last_frame = now;
                r.report.busy_rounds += 1;
            } else if !self.cfg.busy_poll && now.saturating_sub(r.last_frame) > spin {
                self.idle(&mut poll, &mut events, inbox, &mut r, now, false)?;
                self.wake_ports(&events);
                continue;
            }
            // Ports drained down to their descriptors (TAP) are read again
            // when these signal: when every port waits so, the worker
            // waits with them instead of spinning on empty reads (VPP's
            // interrupt mode); otherwise it looks for their signals
            // without waiting.
            if self.ports.iter().any(|p| p.waiting) {
                // Every port drained: the worker keeps reading them for
                // `fd_spin` after the last frame, yielding the core
                // between rounds, then waits for their signals. With no
                // spin it waits at once, also right after a round with
                // frames (the wait returns at once if a port signalled
                // meanwhile).
                let fd_spin = self.cfg.fd_spin.as_nanos() as u64;
                let quiet = fd_spin == 0 || (got == 0 && now.saturating_sub(r.last_frame) > fd_spin);
                if !self.cfg.busy_poll && quiet && self.ports.iter().all(|p| p.waiting) {
                    self.idle(&mut poll, &mut events, inbox, &mut r, now, true)?;
                } else if !self.cfg.busy_poll && !quiet {
                    // Within the spin after frames: a thread that needs
                    // this core (a task sharing it) runs first. Also
                    // when a port still has frames to read: yielding
                    // only when every port is drained measured no
                    // better (TAP bulk TCP lower in two runs of two).
                    r.report.spin_yields += 1;
                    std::thread::yield_now();
                    // Every port is read again next round: a TAP read
                    // that finds nothing costs what a look at the
                    // descriptors would, and one that finds a frame
                    // saves that look (signals left from the spin
                    // end the first wait after it at once).
                    for p in &mut self.ports {
                        p.waiting = false;
                    }
                    events.clear();
                } else if poll.poll(&mut events, Some(Duration::ZERO)).is_err() {
                    events.clear();
                }
                self.wake_ports(&events);
            }
            if now.saturating_sub(r.last_report) > report_every {
                self.publish(&mut r.report, &r.st);
                r.last_report = now;
            }
        }
        self.publish(&mut r.report, &r.st);
        Ok(r.report)
    }

    /// Registers the ports' descriptors and this worker's waker.
    fn register(&self) -> Result<mio::Poll, WorkerError> {
        let poll = mio::Poll::new().map_err(|e| WorkerError::Poll(self.index, e))?;
        for p in &self.ports {
            let fd = p.io.fd();
            if fd >= 0 {
                poll.registry()
                    .register(&mut mio::unix::SourceFd(&fd), mio::Token(fd as usize), mio::Interest::READABLE)
                    .map_err(|e| WorkerError::Poll(self.index, e))?;
            }
        }
        if let Some(slot) = self.shared.wakers.get(self.index) {
            let w = mio::Waker::new(poll.registry(), WAKE).map_err(|e| WorkerError::Poll(self.index, e))?;
            let _ = slot.set(w);
        }
        Ok(poll)
    }

    /// The loop's state at the start: the current tables, state sized for
    /// them, the ports bound to them.
    fn start(&self, now: u64) -> Run {
        let version = self.shared.version();
        let t = self.shared.tables();
        let mut st = WorkerState::with_conntrack(t.ports.len(), self.cfg.conntrack);
        st.sync(&t);
        let (io_of, table_of) = bind_lenient(&t, &self.ports);
        if let Some(u) = self.shared.in_use.get(self.index) {
            u.store(version, Ordering::Release);
        }
        Run {
            t,
            st,
            version,
            io_of,
            table_of,
            report: Report { tables_version: version, ..Report::default() },
            verdicts: [Verdict::Pass; BURST],
            last_frame: now,
            last_report: 0,
        }
    }

    /// New tables, if there are: port changes first, then the tables (the
    /// publisher gives ports before the tables that name them): a port the
    /// tables do not name (yet, or any more) is not read.
    fn pick_up_tables(&mut self, poll: &mio::Poll, r: &mut Run) {
        let v = self.shared.version();
        if v == r.version {
            return;
        }
        self.take_port_changes(poll);
        let nt = self.shared.tables();
        (r.io_of, r.table_of) = bind_lenient(&nt, &self.ports);
        // New ports keep counting: the counters grow to the new tables'
        // ports (between bursts, not per packet).
        if r.st.stats.ports.len() < nt.ports.len() {
            r.st.stats.ports.resize(nt.ports.len(), Default::default());
        }
        r.st.sync(&nt);
        r.t = nt;
        r.version = v;
        r.report.tables_version = v;
        if let Some(u) = self.shared.in_use.get(self.index) {
            u.store(v, Ordering::Release);
        }
    }

    /// One burst from every bound port, each frame sent where its verdict
    /// says (`handoff`: frames that need connection state go to worker 0).
    /// The frames received.
    fn receive(&mut self, r: &mut Run, handoff: Option<&Handoff>, now: u64) -> usize {
        let mut got = 0;
        let busy_poll = self.cfg.busy_poll;
        for i in 0..self.ports.len() {
            let (before, rest) = self.ports.split_at_mut(i);
            let Some((port, after)) = rest.split_first_mut() else { break };
            let Some(in_port) = r.table_of.get(i).copied().flatten() else { continue };
            let Run { t, st, io_of, verdicts, report: rep, .. } = &mut *r;
            let t = &**t;
            let wakers = &self.shared.wakers;
            if port.waiting {
                continue;
            }
            got += port.io.rx_burst(&mut |frames, back| {
                match handoff {
                    None => process_burst(frames, in_port, now, t, st, verdicts),
                    Some(h) => {
                        // Frames that touch connection state go to
                        // worker 0 (dropped here); the runs of frames
                        // between them go through the pipeline a burst
                        // at a time (the same verdicts as frame by frame).
                        let n = frames.len().min(verdicts.len());
                        let mut pushed = false;
                        let mut run = 0;
                        for j in 0..n {
                            if !needs_state(frames[j].data(), in_port, t) {
                                continue;
                            }
                            process_burst(&mut frames[run..j], in_port, now, t, st, &mut verdicts[run..j]);
                            if hand(h, in_port, &frames[j]) {
                                rep.handed_off += 1;
                                pushed = true;
                            } else {
                                rep.handoff_full += 1;
                            }
                            verdicts[j] = Verdict::Pass;
                            run = j + 1;
                        }
                        process_burst(&mut frames[run..n], in_port, now, t, st, &mut verdicts[run..n]);
                        if pushed
                            && h.sleeping.load(Ordering::SeqCst)
                            && let Some(w) = wakers.first().and_then(|w| w.get())
                        {
                            let _ = w.wake();
                        }
                    }
                }
                // Runs of consecutive frames to one other port go out
                // together (a port may coalesce them).
                let n = frames.len().min(verdicts.len());
                let mut j = 0;
                while j < n {
                    let Verdict::Tx(p) = verdicts[j] else {
                        j += 1;
                        continue;
                    };
                    let mut m = j + 1;
                    while m < n && verdicts[m] == Verdict::Tx(p) {
                        m += 1;
                    }
                    match io_of.get(usize::from(p)).copied().flatten() {
                        Some(k) if k == i => back[j..m].fill(true),
                        Some(k) if k < i => before[k].io.tx_run(&frames[j..m]),
                        Some(k) => after[k - i - 1].io.tx_run(&frames[j..m]),
                        None => rep.unbound += (m - j) as u64,
                    }
                    j = m;
                }
            });
            // (Busy-polling reads every port every round: a ring check
            // costs less than the poll that would say which to read.)
            port.waiting = !busy_poll && port.io.drained();
        }
        got
    }

    /// Marks the ports whose descriptors signalled as worth reading; after
    /// a wait that ended with no signal at all (a timeout, a wake-up),
    /// every port (a lost edge costs at most one wait).
    fn wake_ports(&mut self, events: &mio::Events) {
        let mut any = false;
        for e in events.iter() {
            let fd = e.token().0;
            for p in self.ports.iter_mut().filter(|p| p.io.fd() >= 0 && p.io.fd() as usize == fd) {
                p.waiting = false;
                any = true;
            }
        }
        if !any && events.is_empty() {
            for p in &mut self.ports {
                p.waiting = false;
            }
        }
    }

    /// Frames the other workers handed over (worker 0). The frames taken.
    fn handed_in(&mut self, h: &Handoff, r: &mut Run, now: u64) -> usize {
        let mut got = 0;
        for _ in 0..BURST {
            let Some(mut x) = h.inbox.pop() else { break };
            got += 1;
            r.report.handed_in += 1;
            let len = x.len;
            if let Some(mut f) = crate::packet::Frame::new(&mut x.buf, crate::packet::HEADROOM, len) {
                f.set_offload(x.offload);
                if let Verdict::Tx(p) = crate::pipeline::process(&mut f, x.port, now, &r.t, &mut r.st) {
                    match r.io_of.get(usize::from(p)).copied().flatten() {
                        Some(k) => {
                            self.ports[k].io.tx_frame(&f);
                        }
                        None => r.report.unbound += 1,
                    }
                }
            }
            let _ = h.pool.push(x.buf);
        }
        got
    }

    /// A copy of the connection table, if `conntrack ls` asked for one.
    fn serve_dump(&self, st: &WorkerState, now: u64) {
        if let Some(f) = self.shared.dump_wanted.get(self.index)
            && f.load(Ordering::Acquire)
        {
            let dump: Vec<CtDump> = st
                .lb
                .conntrack
                .entries(now)
                .take(DUMP_MAX)
                .map(|(key, value, exp)| CtDump { key, value, expires_in: exp.saturating_sub(now) })
                .collect();
            if let Some(slot) = self.shared.dumps.get(self.index) {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = dump;
            }
            f.store(false, Ordering::Release);
        }
    }

    /// No frames for a while: publish the counters and sleep until a port
    /// is readable, a handoff wakes this worker, or `max_wait` passes.
    fn idle(
        &self,
        poll: &mut mio::Poll,
        events: &mut mio::Events,
        inbox: Option<&Handoff>,
        r: &mut Run,
        now: u64,
        between: bool,
    ) -> Result<(), WorkerError> {
        // Tell the other workers to wake this one after a handoff, then
        // look once more (one of the two sees the other).
        if let Some(h) = inbox {
            h.sleeping.store(true, Ordering::SeqCst);
            if !h.inbox.is_empty() {
                h.sleeping.store(false, Ordering::SeqCst);
                return Ok(());
            }
        }
        // Publish before sleeping: an idle worker's counters are current
        // (this wait included). A wait between frames (`between`: every
        // port drained, frames a moment ago) publishes only if that was
        // not done within the last millisecond (a worker that waits
        // between every request would spend more on publishing than on
        // its frames); its counters are then at most a wait behind.
        r.report.idle_waits += 1;
        if !between || now.saturating_sub(r.last_report) > IDLE_PUBLISH_GAP {
            self.publish(&mut r.report, &r.st);
            r.last_report = now;
        }
        let res = poll.poll(events, Some(self.cfg.max_wait));
        if let Some(h) = inbox {
            h.sleeping.store(false, Ordering::SeqCst);
        }
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(WorkerError::Poll(self.index, e)),
        }
    }

    /// Takes the ports the publisher added and removed (registering and
    /// deregistering their descriptors for the idle wait).
    fn take_port_changes(&mut self, poll: &mio::Poll) {
        let Some(m) = self.shared.mailbox.get(self.index) else { return };
        let changes = std::mem::take(&mut *m.lock().unwrap_or_else(PoisonError::into_inner));
        if changes.add.is_empty() && changes.remove.is_empty() {
            return;
        }
        let reg = poll.registry();
        self.ports.retain(|p| {
            let keep = !changes.remove.contains(&p.name);
            if !keep && p.io.fd() >= 0 {
                let _ = reg.deregister(&mut mio::unix::SourceFd(&p.io.fd()));
            }
            keep
        });
        for p in changes.add {
            let fd = p.io.fd();
            if fd >= 0 {
                let _ = reg.register(&mut mio::unix::SourceFd(&fd), mio::Token(fd as usize), mio::Interest::READABLE);
            }
            self.ports.push(p);
        }
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
        report.mesh = st.lb.mesh;
        report.egress = st.lb.egress_stats();
        if let Some(slot) = self.shared.reports.get(self.index)
            && let Ok(mut r) = slot.try_lock()
        {
            r.clone_from(report);
        }
    }
}

/// Sets the calling thread's nice value (worker `index`'s, for the log);
/// a failure (no `CAP_SYS_NICE` for a negative value) is logged and the
/// thread keeps the one it has.
fn set_thread_nice(index: usize, nice: i32) {
    let tid = rustix::thread::gettid();
    match rustix::process::setpriority_process(Some(tid), nice) {
        Ok(()) => tracing::debug!("worker {index}: nice {nice}"),
        Err(e) => tracing::warn!("worker {index}: cannot set nice {nice} ({e}); it runs at the inherited priority"),
    }
}

/// True if a frame received on `in_port` may touch connection state
/// (worker 0's): from a task port in a network with services, or to its
/// network's gateway MAC when the node has egress; from the host link;
/// from the uplink, VXLAN
/// of a network with services, or anything that is not VXLAN for us
/// (published ports, egress replies, and the rare rest).
fn needs_state(d: &[u8], in_port: PortId, t: &Tables) -> bool {
    let has_services = |net: crate::tables::NetId| t.networks.get(usize::from(net)).is_some_and(|n| n.has_services);
    if t.host_port == Some(in_port) {
        return true;
    }
    if in_port != crate::tables::UPLINK {
        let Some(net) = t.ports.get(usize::from(in_port)).and_then(|p| p.network) else { return false };
        return has_services(net)
            || (t.egress.is_some()
                && t.networks.get(usize::from(net)).is_some_and(|n| d.get(..6) == Some(&n.gateway_mac.0[..])));
    }
    match crate::wire::vxlan::classify(d, t.data_ip, t.vxlan_port) {
        Ok(crate::wire::vxlan::Classified::Vxlan(x)) => t.net_of_vni(x.vni).is_some_and(has_services),
        Ok(crate::wire::vxlan::Classified::NotVxlan) => true,
        // Malformed VXLAN for us: dropped (and counted) where it came in.
        Err(_) => false,
    }
}

/// Copies a frame into a pool buffer and queues it for worker 0; false if
/// the pool or the inbox is full. A super-frame grows the buffer it gets
/// to its size (once: the buffer keeps it in the pool).
fn hand(h: &Handoff, port: PortId, f: &crate::packet::Frame<'_>) -> bool {
    let data = f.data();
    let Some(mut buf) = h.pool.pop() else { return false };
    let at = crate::packet::HEADROOM;
    if data.len() > buf.len() - at {
        buf = vec![0u8; at + crate::io::SUPER_ROOM.max(data.len())].into_boxed_slice();
    }
    buf[at..at + data.len()].copy_from_slice(data);
    // The offload's offsets are from the buffer's start: the frame moves
    // to the headroom's end in the new buffer.
    let mut offload = f.offload();
    if offload.is_super() {
        offload.csum_at = (offload.csum_at as usize + at).wrapping_sub(f.start()) as u32;
    }
    match h.inbox.push(Handed { port, len: data.len(), offload, buf }) {
        Ok(()) => true,
        Err(x) => {
            let _ = h.pool.push(x.buf);
            false
        }
    }
}

/// Drops by reason, named, leaving out zeros (for logs and summaries).
pub fn drops_named(stats: &Stats) -> Vec<(&'static str, u64)> {
    DropReason::ALL.iter().map(|r| (r.name(), stats.dropped(*r))).filter(|(_, n)| *n > 0).collect()
}
