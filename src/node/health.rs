//! Health checks of this node's tasks (Docker's `HEALTHCHECK`, as Swarm
//! balances only to healthy tasks).
//!
//! For each task of this node whose service has a check
//! ([`meshplane_control::state::HealthCheck`]) and whose network
//! namespace the node knows, a probe runs every interval, given the
//! check's timeout, **inside the task's namespace**, as Docker runs a
//! container's check inside the container: the socket is made in the
//! namespace by a dedicated thread ([`NsSockets`]: `setns` there, the
//! socket, `setns` back; a runtime thread never changes namespace) and
//! connects to the task's own address and target port (so the probe never
//! crosses the dataplane). A TCP probe passes when the connection is
//! accepted; an HTTP probe when `GET path` (HTTP/1.1 through hyper)
//! answers 2xx or 3xx, as `curl -f` would.
//!
//! [`Tracker`] turns results into health: one success is healthy;
//! `retries` failures in a row are unhealthy; failures of a starting task
//! within the start period do not count. The first probe runs at once
//! (Docker waits one interval), so a new task serves as soon as it
//! answers. Only transitions are proposed to the cluster
//! (`Command::SetTaskHealth` through the node's control plane, forwarded
//! to the Raft leader from a worker as task attaches are); a proposal that
//! fails is tried again after the next probe, and one the state has not
//! taken within [`RESYNC`] is made again. Each transition is logged, and
//! the counters ([`Counters`]) are in `meshplane stats` and `/metrics`.
//!
//! A task without a namespace (an interface someone else wired up) cannot
//! be probed from inside: it is not checked (a warning), and stays
//! starting.

use crate::stats::HealthStats;
use meshplane_control::cluster::Control;
use meshplane_control::state::{ClusterState, Command, HealthCheck, Probe, TaskHealth, TaskNetns};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::TcpSocket;

/// How often the checker looks at the state for tasks to check (new,
/// gone, or with a changed check).
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// How long a proposed health may take to show in the state before it is
/// proposed again (a write can be acknowledged while this node's copy of
/// the state lags; one that was lost is made again).
pub(crate) const RESYNC: Duration = Duration::from_secs(5);

/// Why a probe failed, or could not run.
#[derive(Debug, Error)]
pub(crate) enum HealthError {
    /// The task's namespace could not be opened.
    #[error("opening the task's network namespace {path}: {source}")]
    OpenNetns {
        /// Its file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The namespace thread could not enter it.
    #[error("entering the task's network namespace {path}: {source}")]
    EnterNetns {
        /// Its file.
        path: String,
        /// Why.
        source: nix::Error,
    },
    /// The namespace thread could not return to the node's namespace (it
    /// ends; the next probe starts another).
    #[error("returning to the node's network namespace: {0}")]
    ReturnNetns(nix::Error),
    /// The namespace thread is gone or could not start.
    #[error("the namespace thread: {0}")]
    NsThread(String),
    /// The socket could not be made.
    #[error("making a socket: {0}")]
    Socket(std::io::Error),
    /// The connection was refused or failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The task's address and port.
        addr: SocketAddrV4,
        /// Why.
        source: std::io::Error,
    },
    /// No answer within the check's timeout.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// An HTTP status other than 2xx or 3xx.
    #[error("HTTP status {0}")]
    Status(u16),
}

/// Probes in a row that the node could not make for its own shortage and
/// that are not counted; the next one counts (a task must not stay a
/// backend for as long as a shortage lasts).
const SHORT_SKIPS: u32 = 3;

impl HealthError {
    /// True if the node, not the task, is short (descriptors, memory):
    /// such a probe says little about the task, and a few in a row are not
    /// counted against it ([`SHORT_SKIPS`]).
    pub(crate) fn node_short(&self) -> bool {
        use nix::errno::Errno;
        let short = |e: Option<i32>| {
            e.is_some_and(|n| {
                [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM].contains(&Errno::from_raw(n))
            })
        };
        match self {
            HealthError::OpenNetns { source, .. } | HealthError::Socket(source) => short(source.raw_os_error()),
            HealthError::EnterNetns { source, .. } | HealthError::ReturnNetns(source) => short(Some(*source as i32)),
            _ => false,
        }
    }
}

/// One task's check, as the state has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The task.
    pub(crate) task: String,
    /// Its namespace's file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub(crate) netns: PathBuf,
    /// Its address and its service's target port.
    pub(crate) addr: SocketAddrV4,
    /// The check.
    pub(crate) check: HealthCheck,
    /// Its health in the state now.
    pub(crate) health: TaskHealth,
}

impl Target {
    /// Whether `other` is the same check of the same task (its health
    /// aside): else the task's probe loop starts anew.
    fn same_check(&self, other: &Target) -> bool {
        (&self.task, &self.netns, self.addr, &self.check) == (&other.task, &other.netns, other.addr, &other.check)
    }
}

/// The checks node `me` runs: its tasks with a namespace whose service has
/// a health check, by task; the tasks without a namespace apart (they
/// cannot be probed from inside).
pub(crate) fn targets(state: &ClusterState, me: &str) -> (BTreeMap<String, Target>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut blind = Vec::new();
    for t in state.tasks.values().filter(|t| t.node == me) {
        let Some(svc) = state.services.get(&t.service) else { continue };
        let Some(check) = &svc.health else { continue };
        let Some(ns) = t.netns.as_deref().and_then(|n| TaskNetns::parse(n).ok()) else {
            blind.push(t.id.clone());
            continue;
        };
        out.insert(
            t.id.clone(),
            Target {
                task: t.id.clone(),
                netns: PathBuf::from(ns.path()),
                addr: SocketAddrV4::new(t.ip, svc.target_port),
                check: check.clone(),
                health: t.health,
            },
        );
    }
    (out, blind)
}

/// A task's health from its probes' results.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    retries: u32,
    start_period: Duration,
    started: Instant,
    status: TaskHealth,
    failures: u32,
    /// The last health proposed and taken, and when.
    proposed: Option<(TaskHealth, Instant)>,
}

impl Tracker {
    /// Tracking from `now` with `check`, from the health the state has
    /// (a restarted node goes on from there; a new task is starting).
    pub(crate) fn new(check: &HealthCheck, health: TaskHealth, now: Instant) -> Tracker {
        Tracker {
            retries: check.retries.max(1),
            start_period: Duration::from_millis(check.start_period_ms),
            started: now,
            status: health,
            failures: 0,
            proposed: None,
        }
    }

    /// The health now.
    pub(crate) fn status(&self) -> TaskHealth {
        self.status
    }

    /// A probe's result at `now`: the new health if it changed. A success
    /// is healthy at once; a failure counts unless the task is starting
    /// within the start period; `retries` counted failures in a row are
    /// unhealthy.
    pub(crate) fn observe(&mut self, ok: bool, now: Instant) -> Option<TaskHealth> {
        let next = if ok {
            self.failures = 0;
            TaskHealth::Healthy
        } else {
            let grace = self.status == TaskHealth::Starting && now.duration_since(self.started) < self.start_period;
            if grace {
                return None;
            }
            self.failures = self.failures.saturating_add(1);
            if self.failures < self.retries {
                return None;
            }
            TaskHealth::Unhealthy
        };
        (next != self.status).then(|| {
            self.status = next;
            next
        })
    }

    /// Whether to propose the health now, the state having `in_state`: if
    /// they differ, unless the same was taken less than [`RESYNC`] ago.
    pub(crate) fn wants_proposal(&self, in_state: TaskHealth, now: Instant) -> bool {
        if self.status == in_state || self.status == TaskHealth::Unchecked {
            return false;
        }
        !self.proposed.is_some_and(|(h, at)| h == self.status && now.duration_since(at) < RESYNC)
    }

    /// The health was proposed and taken at `now`.
    pub(crate) fn taken(&mut self, now: Instant) {
        self.proposed = Some((self.status, now));
    }
}

/// The checker's counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    tasks: AtomicU64,
    checks: AtomicU64,
    failures: AtomicU64,
    to_healthy: AtomicU64,
    to_unhealthy: AtomicU64,
    proposed: AtomicU64,
    propose_errors: AtomicU64,
}

impl Counters {
    /// Their values now, in the statistics schema.
    pub(crate) fn snapshot(&self) -> HealthStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HealthStats {
            tasks: r(&self.tasks),
            checks: r(&self.checks),
            failures: r(&self.failures),
            to_healthy: r(&self.to_healthy),
            to_unhealthy: r(&self.to_unhealthy),
            proposed: r(&self.proposed),
            propose_errors: r(&self.propose_errors),
        }
    }

    fn add(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

/// A proposal's future.
pub(crate) type Proposal<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// What the checker needs of the cluster.
pub(crate) trait Cluster: Send + Sync + 'static {
    /// The checks this node runs now ([`targets`]), and the tasks it
    /// cannot check.
    fn targets(&self) -> (BTreeMap<String, Target>, Vec<String>);
    /// Proposes a task's health to the cluster state.
    fn propose(&self, task: &str, health: TaskHealth) -> Proposal<'_>;
}

/// The cluster through this node's control plane.
pub(crate) struct ControlCluster {
    /// The node's control plane.
    pub(crate) control: Arc<Control>,
    /// This node's name.
    pub(crate) me: String,
}

impl Cluster for ControlCluster {
    fn targets(&self) -> (BTreeMap<String, Target>, Vec<String>) {
        targets(&self.control.state().0, &self.me)
    }

    fn propose(&self, task: &str, health: TaskHealth) -> Proposal<'_> {
        let cmd = Command::SetTaskHealth { task: task.to_owned(), health };
        Box::pin(async move { self.control.write(cmd).await.map_err(|e| e.to_string()) })
    }
}

/// The probe loops running, by task; aborted when dropped (so are they
/// when the checker stops).
#[derive(Default)]
struct Running(BTreeMap<String, (Target, tokio::task::JoinHandle<()>)>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, h) in self.0.values() {
            h.abort();
        }
    }
}

/// The shared parts of the probe loops.
struct Shared {
    cluster: Arc<dyn Cluster>,
    counters: Arc<Counters>,
    sockets: NsSockets,
    /// The checks as the state has them (each loop reads its task's
    /// health in the state here).
    view: tokio::sync::watch::Receiver<Arc<BTreeMap<String, Target>>>,
}

/// Runs the checker until dropped: every [`POLL`], the tasks to check
/// from `cluster`, a probe loop for each new one (or one whose check
/// changed), gone ones stopped.
pub(crate) async fn run(cluster: Arc<dyn Cluster>, counters: Arc<Counters>) {
    let (tx, view) = tokio::sync::watch::channel(Arc::new(BTreeMap::new()));
    let shared =
        Arc::new(Shared { cluster: cluster.clone(), counters: counters.clone(), sockets: NsSockets::new(), view });
    let mut running = Running::default();
    let mut warned = std::collections::BTreeSet::new();
    loop {
        let (now, blind) = cluster.targets();
        for t in blind {
            if warned.insert(t.clone()) {
                tracing::warn!(
                    "task {t}: its service has a health check, but the task has no --netns to run it in: not checked (it stays starting)"
                );
            }
        }
        tx.send_replace(Arc::new(now.clone()));
        running.0.retain(|id, (t, h)| {
            let keep = now.get(id).is_some_and(|n| n.same_check(t));
            if !keep {
                h.abort();
            }
            keep
        });
        for (id, t) in now {
            if let std::collections::btree_map::Entry::Vacant(e) = running.0.entry(id) {
                let h = tokio::spawn(probe_loop(t.clone(), shared.clone()));
                e.insert((t, h));
            }
        }
        counters.tasks.store(running.0.len() as u64, Ordering::Relaxed);
        tokio::time::sleep(POLL).await;
    }
}

/// Probes `t` every interval, keeps its health, proposes transitions.
async fn probe_loop(t: Target, sh: Arc<Shared>) {
    let mut tracker = Tracker::new(&t.check, t.health, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(t.check.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let c = &sh.counters;
    let mut skipped = 0u32;
    loop {
        tick.tick().await;
        let r = probe(&t, &sh.sockets).await;
        if let Err(e) = &r
            && e.node_short()
            && skipped < SHORT_SKIPS
        {
            skipped += 1;
            tracing::warn!(
                "task {}: health probe not made ({e}): the node is short, not counted ({skipped} in a row)",
                t.task
            );
            continue;
        }
        skipped = 0;
        Counters::add(&c.checks);
        if let Err(e) = &r {
            Counters::add(&c.failures);
            tracing::debug!("task {}: health probe failed: {e}", t.task);
        }
        let before = tracker.status();
        if let Some(h) = tracker.observe(r.is_ok(), Instant::now()) {
            Counters::add(if h == TaskHealth::Healthy { &c.to_healthy } else { &c.to_unhealthy });
            let why = r.as_ref().err().map_or(String::new(), |e| format!(": {e}"));
            tracing::info!("task {}: {} -> {}{why}", t.task, before.name(), h.name());
        }
        let in_state = sh.view.borrow().get(&t.task).map(|x| x.health);
        let Some(in_state) = in_state else { continue };
        if tracker.wants_proposal(in_state, Instant::now()) {
            match sh.cluster.propose(&t.task, tracker.status()).await {
                Ok(()) => {
                    Counters::add(&c.proposed);
                    tracker.taken(Instant::now());
                }
                Err(e) => {
                    Counters::add(&c.propose_errors);
                    tracing::warn!(
                        "task {}: proposing {} to the cluster: {e} (again after the next probe)",
                        t.task,
                        tracker.status().name()
                    );
                }
            }
        }
    }
}

/// One probe of `t` within its timeout.
pub(crate) async fn probe(t: &Target, sockets: &NsSockets) -> Result<(), HealthError> {
    let limit = Duration::from_millis(t.check.timeout_ms);
    let once = async {
        let sock = sockets.socket(&t.netns).await?;
        let stream = sock
            .connect(SocketAddr::V4(t.addr))
            .await
            .map_err(|source| HealthError::Connect { addr: t.addr, source })?;
        match &t.check.probe {
            Probe::Tcp => Ok(()),
            Probe::Http { path } => http_get(stream, t.addr, path).await,
        }
    };
    tokio::time::timeout(limit, once).await.map_err(|_| HealthError::Timeout(t.check.timeout_ms))?
}

/// `GET path` on `stream` (HTTP/1.1, `Connection: close`): passes on 2xx
/// and 3xx.
async fn http_get(stream: tokio::net::TcpStream, addr: SocketAddrV4, path: &str) -> Result<(), HealthError> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper::header::{CONNECTION, HOST, USER_AGENT};
    let http = |e: &dyn std::fmt::Display| HealthError::Http(e.to_string());
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| http(&e))?;
    // The connection is driven beside the request, and stopped with it
    // (a probe that times out leaves nothing behind).
    let conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = hyper::Request::get(path)
        .header(HOST, addr.to_string())
        .header(USER_AGENT, concat!("meshplane-health/", env!("CARGO_PKG_VERSION")))
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(&e))?;
    let status = sender.send_request(req).await.map_err(|e| http(&e))?.status();
    drop(conn);
    if status.is_success() || status.is_redirection() { Ok(()) } else { Err(HealthError::Status(status.as_u16())) }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A request to the namespace thread: a namespace's file, and where to
/// send the socket made in it.
type Job = (PathBuf, tokio::sync::oneshot::Sender<Result<TcpSocket, HealthError>>);

/// Makes TCP sockets inside tasks' network namespaces, on a thread of its
/// own: `setns` changes the namespace of the calling thread only, and a
/// socket keeps the namespace it was made in; the thread enters the task's
/// namespace, makes the socket and returns to the node's. If it cannot
/// return it ends, and the next request starts another.
pub(crate) struct NsSockets {
    tx: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

impl NsSockets {
    /// No thread yet (the first request starts it).
    pub(crate) fn new() -> NsSockets {
        NsSockets { tx: Mutex::new(None) }
    }

    /// A TCP socket made in the namespace whose file is `netns`.
    pub(crate) async fn socket(&self, netns: &std::path::Path) -> Result<TcpSocket, HealthError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send((netns.to_owned(), reply))?;
        rx.await.map_err(|_| HealthError::NsThread("it ended".into()))?
    }

    /// Hands `job` to the thread, starting one if there is none (or it
    /// ended).
    fn send(&self, job: Job) -> Result<(), HealthError> {
        let mut g = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match g.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // The thread ended: another one takes the job.
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("mp-health-ns".into())
            .spawn(move || ns_thread(&rx))
            .map_err(|e| HealthError::NsThread(e.to_string()))?;
        tx.send(job).map_err(|_| HealthError::NsThread("it ended at once".into()))?;
        *g = Some(tx);
        Ok(())
    }
}

/// The namespace thread: serves requests until their senders are gone or
/// it cannot return to its own namespace.
fn ns_thread(rx: &std::sync::mpsc::Receiver<Job>) {
    let home = match std::fs::File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("health checks: opening this node's network namespace: {e}");
            return;
        }
    };
    for (path, reply) in rx {
        let r = socket_in(&home, &path);
        let lost = matches!(r, Err(HealthError::ReturnNetns(_)));
        let _ = reply.send(r);
        if lost {
            tracing::warn!("health checks: the namespace thread could not return to the node's namespace; it ends");
            return;
        }
    }
}

/// A TCP socket made in the namespace `path`, back in `home` after.
fn socket_in(home: &std::fs::File, path: &std::path::Path) -> Result<TcpSocket, HealthError> {
    use nix::sched::{CloneFlags, setns};
    let shown = || path.display().to_string();
    let ns = std::fs::File::open(path).map_err(|source| HealthError::OpenNetns { path: shown(), source })?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| HealthError::EnterNetns { path: shown(), source })?;
    let sock = TcpSocket::new_v4();
    setns(home, CloneFlags::CLONE_NEWNET).map_err(HealthError::ReturnNetns)?;
    sock.map_err(HealthError::Socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshplane_control::state::{Command, HealthUpdate, StateError};
    use std::net::Ipv4Addr;

    #[test]
    fn a_node_short_of_descriptors_is_not_the_tasks_failure() {
        let io = |n: i32| std::io::Error::from_raw_os_error(n);
        assert!(HealthError::Socket(io(nix::libc::EMFILE)).node_short());
        assert!(HealthError::OpenNetns { path: "/proc/1/ns/net".into(), source: io(nix::libc::ENFILE) }.node_short());
        assert!(HealthError::ReturnNetns(nix::errno::Errno::ENOMEM).node_short());
        assert!(!HealthError::NsThread("gone".into()).node_short(), "may last: counted");
        assert!(!HealthError::OpenNetns { path: "/proc/1/ns/net".into(), source: io(nix::libc::ENOENT) }.node_short());
        let addr = "198.19.0.1:80".parse().unwrap();
        assert!(!HealthError::Connect { addr, source: io(nix::libc::ECONNREFUSED) }.node_short());
        assert!(!HealthError::Timeout(500).node_short());
    }

    fn check(probe: Probe, interval_ms: u64, retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck { probe, interval_ms, timeout_ms: interval_ms / 2, retries, start_period_ms }
    }

    #[test]
    fn one_success_is_healthy_and_retries_failures_in_a_row_unhealthy() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut tr = Tracker::new(&check(Probe::Tcp, 100, 3, 0), TaskHealth::Starting, t0);
        assert_eq!(tr.observe(true, at(0)), Some(TaskHealth::Healthy));
        assert_eq!(tr.observe(true, at(100)), None, "no transition, nothing to say");
        assert_eq!(tr.observe(false, at(200)), None);
        assert_eq!(tr.observe(false, at(300)), None);
        assert_eq!(tr.observe(true, at(400)), None, "a success in between starts the count again");
        assert_eq!(tr.observe(false, at(500)), None);
        assert_eq!(tr.observe(false, at(600)), None);
        assert_eq!(tr.observe(false, at(700)), Some(TaskHealth::Unhealthy), "the third in a row");
        assert_eq!(tr.observe(false, at(800)), None);
        assert_eq!(tr.observe(true, at(900)), Some(TaskHealth::Healthy), "one success");
    }

    #[test]
    fn failures_of_a_starting_task_in_its_start_period_do_not_count() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut tr = Tracker::new(&check(Probe::Tcp, 100, 2, 1000), TaskHealth::Starting, t0);
        for ms in (0..1000).step_by(100) {
            assert_eq!(tr.observe(false, at(ms)), None, "{ms} ms: in the start period");
        }
        assert_eq!(tr.status(), TaskHealth::Starting);
        assert_eq!(tr.observe(false, at(1000)), None, "the first that counts");
        assert_eq!(tr.observe(false, at(1100)), Some(TaskHealth::Unhealthy));
        // Once it passed, failures count even within the start period.
        let mut tr = Tracker::new(&check(Probe::Tcp, 100, 1, 1000), TaskHealth::Starting, t0);
        assert_eq!(tr.observe(true, at(100)), Some(TaskHealth::Healthy));
        assert_eq!(tr.observe(false, at(200)), Some(TaskHealth::Unhealthy));
        // A task the state has as healthy (the node restarted) has no grace.
        let mut tr = Tracker::new(&check(Probe::Tcp, 100, 1, 1000), TaskHealth::Healthy, t0);
        assert_eq!(tr.observe(false, at(0)), Some(TaskHealth::Unhealthy));
        // Nor has a task that was not checked (a check added later).
        let mut tr = Tracker::new(&check(Probe::Tcp, 100, 1, 1000), TaskHealth::Unchecked, t0);
        assert_eq!(tr.observe(false, at(0)), Some(TaskHealth::Unhealthy));
    }

    #[test]
    fn only_differences_from_the_state_are_proposed_and_a_lost_one_again_later() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(&check(Probe::Tcp, 100, 1, 0), TaskHealth::Starting, t0);
        assert!(!tr.wants_proposal(TaskHealth::Starting, t0), "nothing found yet");
        tr.observe(true, t0);
        assert!(tr.wants_proposal(TaskHealth::Starting, t0));
        // Not taken (the proposal failed): again at the next probe.
        assert!(tr.wants_proposal(TaskHealth::Starting, t0 + Duration::from_millis(100)));
        tr.taken(t0);
        assert!(!tr.wants_proposal(TaskHealth::Starting, t0 + Duration::from_secs(1)), "the state lags a little");
        assert!(tr.wants_proposal(TaskHealth::Starting, t0 + RESYNC), "lost: proposed again");
        assert!(!tr.wants_proposal(TaskHealth::Healthy, t0 + Duration::from_secs(1)), "the state has it");
        tr.observe(false, t0 + Duration::from_secs(2));
        assert!(tr.wants_proposal(TaskHealth::Healthy, t0 + Duration::from_secs(2)), "a new transition at once");
        // A task the state has as healthy and still healthy: nothing.
        let mut tr = Tracker::new(&check(Probe::Tcp, 100, 1, 0), TaskHealth::Healthy, t0);
        tr.observe(true, t0);
        assert!(!tr.wants_proposal(TaskHealth::Healthy, t0));
    }

    /// Node `n1` (this one) and `n2`, network app, service `web` with a
    /// TCP check on 8080, tasks on both nodes (with and without a
    /// namespace), service `plain` without a check.
    fn state() -> ClusterState {
        use super::super::fixtures::{network, node, service as svc};
        let mut st = ClusterState::new();
        let task = |id: &str, service: &str, node: &str, netns: Option<&str>| Command::AttachTask {
            id: id.into(),
            service: service.into(),
            node: node.into(),
            weight: 1,
            netns: netns.map(str::to_owned),
            container: None,
        };
        for c in [
            node("n1", 1),
            node("n2", 2),
            network(),
            svc("web", Some(check(Probe::Http { path: "/healthz".into() }, 1000, 3, 0))),
            svc("plain", None),
            task("web.1", "web", "n1", Some("mp-hc-a")),
            task("web.2", "web", "n2", Some("mp-hc-b")),
            task("web.3", "web", "n1", None),
            task("web.4", "web", "n1", Some("/proc/77/ns/net")),
            task("plain.1", "plain", "n1", Some("mp-hc-c")),
        ] {
            st.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
        st
    }

    #[test]
    fn a_node_checks_its_own_tasks_of_checked_services_in_their_namespaces() {
        let st = state();
        let (t, blind) = targets(&st, "n1");
        assert_eq!(t.keys().map(String::as_str).collect::<Vec<_>>(), ["web.1", "web.4"]);
        assert_eq!(blind, ["web.3"], "no namespace to run it in");
        let w1 = &t["web.1"];
        assert_eq!(w1.netns, PathBuf::from("/var/run/netns/mp-hc-a"));
        assert_eq!(t["web.4"].netns, PathBuf::from("/proc/77/ns/net"));
        assert_eq!(w1.addr, SocketAddrV4::new(st.tasks["web.1"].ip, 8080), "its own address, the target port");
        assert_eq!(w1.health, TaskHealth::Starting, "a new task of a checked service starts");
        assert_eq!(st.tasks["plain.1"].health, TaskHealth::Unchecked);
        // The check removed: nothing to run, every task serving again.
        let mut st2 = st.clone();
        st2.apply(&Command::UpdateService {
            name: "web".into(),
            scheduler: None,
            publish_add: vec![],
            publish_rm: vec![],
            health: HealthUpdate::Remove,
        })
        .expect("removed");
        assert!(targets(&st2, "n1").0.is_empty());
        assert!(st2.tasks.values().all(|t| t.health == TaskHealth::Unchecked));
        assert_eq!(
            st2.apply(&Command::SetTaskHealth { task: "web.1".into(), health: TaskHealth::Healthy }),
            Err(StateError::NoHealthCheck { task: "web.1".into(), service: "web".into() }),
            "a late proposal for a check that is gone is refused"
        );
    }

    // ---- in namespaces (root) ----

    /// The task's address in its namespace.
    const TASK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 77, 2);

    /// Namespaces removed on drop (also when the test fails).
    struct Netns(Vec<&'static str>);

    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = std::process::Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    fn ip(args: &[&str]) {
        let o = std::process::Command::new("ip").args(args).output().expect("running ip");
        assert!(o.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    }

    /// Namespace `ns` with lo up and the task's address on `eth0` (one
    /// end of a veth pair inside it); `None` (the test skips) without
    /// root.
    fn task_namespace(ns: &'static str) -> Option<Netns> {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
            eprintln!("skipped: needs root (network namespaces)");
            return None;
        }
        let _ =
            std::process::Command::new("ip").args(["netns", "del", ns]).stderr(std::process::Stdio::null()).status();
        let guard = Netns(vec![ns]);
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
        ip(&["-n", ns, "addr", "add", "198.18.77.2/24", "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0p", "up"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        Some(guard)
    }

    /// A fake cluster: the targets as a state would have them, proposals
    /// applied to them and recorded with their time; the first
    /// `fail_first` proposals fail.
    struct Fake {
        targets: Mutex<BTreeMap<String, Target>>,
        log: Mutex<Vec<(Instant, String, TaskHealth)>>,
        fail_first: AtomicU64,
    }

    impl Fake {
        fn new(targets: &[Target], fail_first: u64) -> Arc<Fake> {
            Arc::new(Fake {
                targets: Mutex::new(targets.iter().map(|t| (t.task.clone(), t.clone())).collect()),
                log: Mutex::new(Vec::new()),
                fail_first: AtomicU64::new(fail_first),
            })
        }

        fn health(&self, task: &str) -> TaskHealth {
            self.targets.lock().expect("lock")[task].health
        }

        /// Waits (at most `limit`) until `task` is `want` in the "state";
        /// when it got there.
        async fn until(&self, task: &str, want: TaskHealth, limit: Duration) -> Instant {
            let t0 = Instant::now();
            while self.health(task) != want {
                assert!(t0.elapsed() < limit, "{task}: not {want:?} within {limit:?} (is {:?})", self.health(task));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.log.lock().expect("lock").iter().rev().find(|(_, t, h)| t == task && *h == want).expect("logged").0
        }
    }

    impl Cluster for Fake {
        fn targets(&self) -> (BTreeMap<String, Target>, Vec<String>) {
            (self.targets.lock().expect("lock").clone(), vec![])
        }

        fn propose(&self, task: &str, health: TaskHealth) -> Proposal<'_> {
            let task = task.to_owned();
            Box::pin(async move {
                let failing = self.fail_first.load(Ordering::Relaxed);
                if failing > 0 {
                    self.fail_first.store(failing - 1, Ordering::Relaxed);
                    return Err("no Raft quorum (test)".into());
                }
                if let Some(t) = self.targets.lock().expect("lock").get_mut(&task) {
                    t.health = health;
                }
                self.log.lock().expect("lock").push((Instant::now(), task, health));
                Ok(())
            })
        }
    }

    fn target(ns: &str, task: &str, port: u16, check: HealthCheck) -> Target {
        Target {
            task: task.into(),
            netns: PathBuf::from(format!("/var/run/netns/{ns}")),
            addr: SocketAddrV4::new(TASK_IP, port),
            check,
            health: TaskHealth::Starting,
        }
    }

    /// A TCP listener on the task's address inside the namespace, made
    /// there by a thread of its own (as the checker's sockets are).
    fn listen_in_namespace(ns: &str, port: u16) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(path).expect("the namespace");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the namespace");
            std::net::TcpListener::bind((TASK_IP, port)).expect("listening in the namespace")
        })
        .join()
        .expect("the listening thread")
    }

    /// Serves `l` (accepting and closing) until aborted; the listener
    /// closes with it.
    fn serve(l: std::net::TcpListener) -> tokio::task::JoinHandle<()> {
        l.set_nonblocking(true).expect("nonblocking");
        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
    }

    #[test]
    fn a_tcp_check_in_the_tasks_namespace_follows_its_server_within_the_windows() {
        let ns = "mp-hc-tcp";
        let Some(_ns) = task_namespace(ns) else { return };
        let rt = runtime();
        rt.block_on(async {
            let (interval, retries) = (Duration::from_millis(400), 3u32);
            let tcp = check(Probe::Tcp, 400, retries, 0);
            let slow_start = HealthCheck { retries: 1, start_period_ms: 1500, ..tcp.clone() };
            // web.1: a server on 8080; web.2: nothing on 8081 and a start
            // period; web.3: a namespace that does not exist.
            let mut gone = target(ns, "web.3", 8080, tcp.clone());
            gone.netns = PathBuf::from("/var/run/netns/mp-hc-absent");
            let fake =
                Fake::new(&[target(ns, "web.1", 8080, tcp.clone()), target(ns, "web.2", 8081, slow_start), gone], 2);
            let server = serve(listen_in_namespace(ns, 8080));
            // No server on the node's side: the probe must run inside.
            let counters = Arc::new(Counters::default());
            let t0 = Instant::now();
            let checker = AbortOnDrop(tokio::spawn(run(fake.clone(), counters.clone())));

            // Starting -> healthy at the first probe (two proposals fail
            // first, and are made again at the next probes).
            let up = fake.until("web.1", TaskHealth::Healthy, Duration::from_secs(5)).await;
            let took = up - t0;
            assert!(took <= 2 * interval + SLACK, "healthy after {took:?}");
            assert!(counters.snapshot().propose_errors >= 1, "{:?}", counters.snapshot());

            // The server stops: unhealthy after `retries` failed probes,
            // one interval apart, the first within an interval.
            tokio::time::sleep(Duration::from_millis(500)).await;
            server.abort();
            let _ = server.await;
            let stopped = Instant::now();
            let down = fake.until("web.1", TaskHealth::Unhealthy, Duration::from_secs(10)).await;
            let took = down - stopped;
            let (lo, hi) = (interval * (retries - 1), interval * retries + SLACK);
            assert!(
                took >= lo - Duration::from_millis(50) && took <= hi,
                "unhealthy after {took:?}, not in {lo:?}..{hi:?}"
            );

            // Back: healthy at the next probe.
            let server = serve(listen_in_namespace(ns, 8080));
            let back = Instant::now();
            let up = fake.until("web.1", TaskHealth::Healthy, Duration::from_secs(5)).await;
            assert!(up - back <= interval + SLACK, "healthy again after {:?}", up - back);

            // web.2 never answered: starting through its start period,
            // then unhealthy at the first probe that counts.
            let sick = fake.until("web.2", TaskHealth::Unhealthy, Duration::from_secs(10)).await;
            assert!(sick - t0 >= Duration::from_millis(1500), "failures in the start period counted: {:?}", sick - t0);
            assert!(sick - t0 <= Duration::from_millis(1500) + interval + SLACK, "{:?}", sick - t0);
            // web.3's namespace is not there: a failure, never a crash.
            fake.until("web.3", TaskHealth::Unhealthy, Duration::from_secs(10)).await;

            let c = counters.snapshot();
            assert_eq!(c.tasks, 3);
            assert!(c.checks >= 10 && c.failures >= 3, "{c:?}");
            assert_eq!((c.to_healthy, c.to_unhealthy), (2, 3), "{c:?}");
            // Transitions only: one proposal each (the two failed ones aside).
            let log = fake.log.lock().expect("lock").clone();
            let mine: Vec<TaskHealth> = log.iter().filter(|(_, t, _)| t == "web.1").map(|(_, _, h)| *h).collect();
            assert_eq!(mine, [TaskHealth::Healthy, TaskHealth::Unhealthy, TaskHealth::Healthy]);
            assert_eq!(c.proposed, log.len() as u64);

            // A task that goes from the state is no longer checked.
            fake.targets.lock().expect("lock").remove("web.3");
            tokio::time::sleep(POLL * 3).await;
            assert_eq!(counters.snapshot().tasks, 2);
            drop(checker);
            drop(server);
        });
    }

    /// What a loaded machine (two cores shared with builds) may add to a
    /// window's upper end.
    const SLACK: Duration = Duration::from_millis(900);

    /// Python's HTTP server in the namespace, serving `dir` on the task's
    /// address; killed (by its pid) when dropped.
    struct HttpServer(std::process::Child);

    impl HttpServer {
        fn start(ns: &str, dir: &std::path::Path, port: u16) -> HttpServer {
            let child = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "python3", "-m", "http.server", &port.to_string()])
                .args(["--bind", &TASK_IP.to_string(), "--directory"])
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("python3 -m http.server");
            HttpServer(child)
        }
    }

    impl Drop for HttpServer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn an_http_check_passes_on_2xx_fails_on_404_and_follows_a_real_server() {
        let ns = "mp-hc-http";
        let Some(_ns) = task_namespace(ns) else { return };
        if std::process::Command::new("python3").arg("--version").output().is_err() {
            eprintln!("skipped: needs python3 (its http.server is the task's server)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("mp-hc-www-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory to serve");
        std::fs::write(dir.join("healthz"), "ok\n").expect("healthz");
        let rt = runtime();
        rt.block_on(async {
            let interval = Duration::from_millis(400);
            let ok = check(Probe::Http { path: "/healthz".into() }, 400, 2, 0);
            let missing = check(Probe::Http { path: "/missing".into() }, 400, 2, 0);
            let fake = Fake::new(&[target(ns, "web.1", 8090, ok), target(ns, "web.2", 8090, missing)], 0);
            let server = HttpServer::start(ns, &dir, 8090);
            let counters = Arc::new(Counters::default());
            let checker = AbortOnDrop(tokio::spawn(run(fake.clone(), counters.clone())));
            // Python takes a moment to listen: failures until then count,
            // but two in a row at 400 ms do not come before it does.
            fake.until("web.1", TaskHealth::Healthy, Duration::from_secs(10)).await;
            fake.until("web.2", TaskHealth::Unhealthy, Duration::from_secs(10)).await;
            assert_eq!(fake.health("web.1"), TaskHealth::Healthy, "404 fails, 200 passes");
            drop(server);
            let stopped = Instant::now();
            let down = fake.until("web.1", TaskHealth::Unhealthy, Duration::from_secs(10)).await;
            assert!(down - stopped <= interval * 2 + SLACK, "unhealthy after {:?}", down - stopped);
            let _server = HttpServer::start(ns, &dir, 8090);
            fake.until("web.1", TaskHealth::Healthy, Duration::from_secs(10)).await;
            assert_eq!(fake.health("web.2"), TaskHealth::Unhealthy);
            drop(checker);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
