//! CNI requests (`AdminRequest::Cni`, `control/src/cluster/cni.rs`) on
//! real control planes: a manager and a worker over loopback (real TLS,
//! Raft on disk in a temporary directory), each with a scripted
//! dataplane double that answers `netns_check` and `task_port` as told,
//! records what it was asked, and, as the node's real dataplane does,
//! has a task's port only once a publication names the task.
//!
//! Each case checks the cluster state (the manager's, which is what
//! committed, and the worker's own) before and after: ADD on a worker
//! (the task, its `ContainerRef`, the `Attached` answer), a duplicate ADD,
//! an ADD in another namespace, racing ADDs, a namespace or port failure,
//! a port that is never made, DEL (twice, unknown), GC, CNI over TLS,
//! unknown services and full networks, STATUS, the counters; and a node in
//! no cluster.

use meshplane_cni::failure::Failure;
use meshplane_cni::proto::{AddReq, CniAnswer, CniRequest, GcReq, Key, StatusReq};
use meshplane_cni::result::Attached;
use meshplane_control::cluster::cni::MAX_CNI_ADDS;
use meshplane_control::cluster::{AdminRequest, Config, Control, Dataplane, LocalTask, PortInfo, PublishError};
use meshplane_control::rpc::{ApiError, CniStats, Refusal, Request, Response};
use meshplane_control::state::{
    ClusterState, CniAttachment, Command, ContainerRef, EndpointMode, PublishRequest, Task,
};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::report::NodeStats;
use meshplane_dataplane::tables::TablesSpec;
use meshplane_dataplane::tables::services::Proto;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The inode the double's `netns_check` reports by default.
const INODE: u64 = 4_026_532_999;

/// What the double's `task_port` answers once the task is published.
#[derive(Debug, Clone)]
enum Port {
    /// The port is made.
    Made(PortInfo),
    /// Making it failed.
    Fails(Failure),
    /// No outcome ever comes: the wait runs out at `until`, as the node's
    /// dataplane's does.
    Never,
    /// A dataplane that breaks its contract: it answers 3 s after `until`.
    Hangs,
}

/// A call the control plane made on the double.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// `netns_check(netns, ifname)`.
    NetnsCheck(String, String),
    /// `task_port(id)`.
    TaskPort(String),
    /// `task_port_gone(id)`.
    PortGone(String),
}

/// The scripted dataplane.
struct Double {
    netns: Mutex<Result<u64, Failure>>,
    port: Mutex<Port>,
    calls: Mutex<Vec<Call>>,
    /// The tasks of the last publication (whose ports a dataplane makes).
    tasks: Mutex<Vec<LocalTask>>,
    /// A publication came.
    changed: Condvar,
    /// `task_port_gone` returns at once (the port was never made), and
    /// `netns_check` takes no time.
    quick: std::sync::atomic::AtomicBool,
}

/// What the double's ports report by default.
fn made() -> Port {
    Port::Made(PortInfo { host_iface: Some("mpt1c9e0f3a".into()), dns_search: Some(vec!["example.com".into()]) })
}

impl Default for Double {
    fn default() -> Self {
        Double {
            netns: Mutex::new(Ok(INODE)),
            port: Mutex::new(made()),
            calls: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            quick: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Double {
    /// Waits (until `until`) for the last publication to name task `id`
    /// (`present`) or not to; whether it came.
    fn wait_published(&self, id: &str, present: bool, until: Instant) -> bool {
        let mut tasks = self.tasks.lock().unwrap();
        loop {
            if tasks.iter().any(|t| t.id == id) == present {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            tasks = self.changed.wait_timeout(tasks, until - now).unwrap().0;
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls so far, forgotten.
    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// The published task `id`, if the last publication names it.
    fn published(&self, id: &str) -> Option<LocalTask> {
        self.tasks.lock().unwrap().iter().find(|t| t.id == id).cloned()
    }
}

impl Dataplane for Double {
    fn publish(&self, _spec: TablesSpec, tasks: Vec<LocalTask>) -> Result<(), PublishError> {
        *self.tasks.lock().unwrap() = tasks;
        self.changed.notify_all();
        Ok(())
    }
    fn stats(&self) -> NodeStats {
        NodeStats { tables_version: 0, workers: Vec::new(), dns: None }
    }
    fn netns_check(&self, netns: &str, ifname: &str) -> Result<u64, Failure> {
        self.calls.lock().unwrap().push(Call::NetnsCheck(netns.into(), ifname.into()));
        // As slow as a look into a namespace: two ADDs racing are both
        // past their idempotency check before either writes.
        if !self.quick.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.netns.lock().unwrap().clone()
    }
    fn task_port(&self, id: &str, until: Instant) -> Result<PortInfo, Failure> {
        self.calls.lock().unwrap().push(Call::TaskPort(id.into()));
        if !self.wait_published(id, true, until) {
            return Err(Failure::Later(format!("task {id} was never published")));
        }
        let port = self.port.lock().unwrap().clone();
        match port {
            Port::Made(p) => Ok(p),
            Port::Fails(f) => Err(f),
            Port::Never => {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                Err(Failure::Later(format!("task {id}'s port was not made in time (see the node's log)")))
            }
            Port::Hangs => {
                std::thread::sleep(until.saturating_duration_since(Instant::now()) + Duration::from_secs(3));
                Err(Failure::Later("the double hung".into()))
            }
        }
    }
    fn task_port_gone(&self, id: &str, until: Instant) {
        self.calls.lock().unwrap().push(Call::PortGone(id.into()));
        if self.quick.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.wait_published(id, false, until);
    }
}

struct Node {
    rt: tokio::runtime::Runtime,
    control: Arc<Control>,
    dp: Arc<Double>,
    cfg: Config,
}

/// Node `node<i>` on 127.0.0.(10 + i) (none of the other control tests'
/// addresses).
fn config(i: u8, dir: &Path) -> Config {
    Config {
        name: format!("node{i}"),
        advertise: format!("127.0.0.{}:23770", 10 + i).parse().unwrap(),
        data_ip: format!("198.18.0.{i}").parse().unwrap(),
        data_mac: format!("02:00:00:00:00:{i:02x}").parse().unwrap(),
        underlay_mtu: 1500,
        gossip_port: 17961,
        state_dir: dir.join(format!("node{i}")),
        snapshot_every: 1000,
        renew_check: Duration::from_secs(60),
        gossip_key_interval: meshplane_control::cluster::gossip_loop::GOSSIP_KEY_INTERVAL,
    }
}

fn start(cfg: Config) -> Node {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dp = Arc::new(Double::default());
    let control = rt.block_on(Control::start(cfg.clone(), dp.clone())).unwrap();
    Node { rt, control, dp, cfg }
}

impl Node {
    fn admin(&self, req: AdminRequest) -> Result<Value, ApiError> {
        let c = self.control.clone();
        self.rt.block_on(async move { c.admin(req).await })
    }
    fn write(&self, command: Command) -> Result<Value, ApiError> {
        self.admin(AdminRequest::Write { command })
    }
    /// A CNI request through the admin API: its answer, or its failure.
    fn cni(&self, request: CniRequest) -> Result<CniAnswer, Failure> {
        answer(self.admin(AdminRequest::Cni { request }))
    }
    /// The same, on the admin socket (as the plugin sends it).
    fn cni_on_socket(&self, request: CniRequest) -> Result<CniAnswer, Failure> {
        let sock = self.cfg.state_dir.join("admin.sock");
        let req = AdminRequest::Cni { request };
        let r = self.rt.block_on(meshplane_control::cluster::admin_call(&sock, &req)).expect("the admin socket");
        answer(r)
    }
    fn state(&self) -> ClusterState {
        self.control.state().0
    }
    fn version(&self) -> u64 {
        self.control.state().1
    }
    /// The state version once no more entries are being applied (a
    /// refused write is an entry too, and a joint membership two).
    fn settled(&self) -> u64 {
        let mut version = self.version();
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let v = self.version();
            if v == version {
                return v;
            }
            version = v;
        }
    }
    fn cni_stats(&self) -> CniStats {
        serde_json::from_value(self.admin(AdminRequest::Stats).unwrap()["cni"].clone()).expect("the cni counters")
    }
}

/// A CNI answer, or the failure it carries (anything else is a bug).
fn answer(r: Result<Value, ApiError>) -> Result<CniAnswer, Failure> {
    match r {
        Ok(v) => Ok(serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not a CniAnswer ({e}): {v}"))),
        Err(ApiError::Cni(f)) => Err(f),
        Err(e) => panic!("a CNI request answered with a non-CNI error: {e:?}"),
    }
}

/// The attachment of container `id` on `ifname` in network `mp-net`.
fn key_if(id: &str, ifname: &str) -> Key {
    Key { network: "mp-net".into(), container_id: id.into(), ifname: ifname.into() }
}

fn key(id: &str) -> Key {
    key_if(id, "eth0")
}

/// ADD of `key` in `netns` to service `service`.
fn add_to(key: Key, netns: &str, service: &str, timeout_secs: u64) -> CniRequest {
    let name = Some(format!("pod-{}", key.container_id));
    CniRequest::Add(AddReq { key, netns: netns.into(), service: service.into(), weight: 1, name, timeout_secs })
}

fn add(key: Key, netns: &str) -> CniRequest {
    add_to(key, netns, "web", 10)
}

/// The tasks of `node` that are attachment `key`.
fn tasks_of<'a>(st: &'a ClusterState, node: &str, key: &Key) -> Vec<&'a Task> {
    st.tasks
        .values()
        .filter(|t| t.node == node)
        .filter(|t| {
            t.container.as_ref().is_some_and(|c| {
                c.id == key.container_id
                    && c.cni.as_ref().is_some_and(|a| a.network == key.network && a.ifname == key.ifname)
            })
        })
        .collect()
}

/// The one task of `node` that is attachment `key`.
fn task_of(st: &ClusterState, node: &str, key: &Key) -> Task {
    let v = tasks_of(st, node, key);
    assert_eq!(v.len(), 1, "one task for {key} on {node}: {v:?}");
    v[0].clone()
}

fn added(r: Result<CniAnswer, Failure>) -> Attached {
    match r {
        Ok(CniAnswer::Added(a)) => a,
        other => panic!("ADD not answered with Added: {other:?}"),
    }
}

fn failed(what: &str, r: Result<CniAnswer, Failure>) -> Failure {
    match r {
        Err(f) => f,
        Ok(a) => panic!("{what}: answered {a:?}, not a failure"),
    }
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mp-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn network(name: &str, subnet: &str) -> Command {
    Command::CreateNetwork {
        name: name.into(),
        subnet: subnet.parse().unwrap(),
        gateway: None,
        mtu: None,
        internal: false,
    }
}

fn service(name: &str, network: &str, vip_port: Option<u16>) -> Command {
    Command::CreateService {
        name: name.into(),
        network: network.into(),
        protocol: Proto::Tcp,
        vip_port,
        target_port: 8080,
        publish: Vec::<PublishRequest>::new(),
        scheduler: Scheduler::Rr,
        endpoint_mode: EndpointMode::Vip,
        health: None,
    }
}

/// A manager (`node61`, the Raft leader) and a worker (`node62`), a
/// network `app` with service `web`, a /29 network `tiny` with service
/// `small`.
struct Cluster {
    dir: PathBuf,
    /// The manager join token.
    mtoken: String,
    m: Node,
    w: Node,
}

fn cluster() -> Cluster {
    let dir = tmpdir("cni");
    let m = start(config(61, &dir));
    let init = m.admin(AdminRequest::Init { cert_expiry_secs: None, data_path_port: None }).unwrap();
    let wtoken = init["worker_token"].as_str().unwrap().to_owned();
    let mtoken = init["manager_token"].as_str().unwrap().to_owned();
    let w = start(config(62, &dir));
    w.admin(AdminRequest::Join { token: wtoken, addr: m.cfg.advertise }).unwrap();
    m.write(network("app", "198.19.0.0/24")).unwrap();
    m.write(service("web", "app", Some(80))).unwrap();
    m.write(network("tiny", "198.19.9.0/29")).unwrap();
    m.write(service("small", "tiny", None)).unwrap();
    wait_for("the worker has the networks and services", 10, || {
        let st = w.state();
        st.nodes.len() == 2 && st.networks.len() == 2 && st.services.len() == 2
    });
    Cluster { dir, mtoken, m, w }
}

#[test]
fn cni_requests_on_a_manager_and_a_worker() {
    let t0 = Instant::now();
    let c = cluster();
    add_on_a_worker(&c);
    add_again(&c);
    add_in_another_netns(&c);
    racing_adds(&c);
    replaced_quickly(&c);
    netns_and_port_failures(&c);
    port_never_made(&c);
    port_wait_hangs(&c);
    adds_past_the_cap(&c);
    del(&c);
    gc(&c);
    over_tls(&c);
    unknown_service_and_full_network(&c);
    status(&c);
    eprintln!("cni control cases: {:.1} s", t0.elapsed().as_secs_f64());
    let Cluster { dir, m, w, .. } = c;
    drop((w, m));
    let _ = std::fs::remove_dir_all(&dir);
}

/// ADD on the worker: the task is the worker's, with the container, and
/// the answer is the state's address, prefix, gateway, MAC, MTU and the
/// interface asked for, with the dataplane's host end and DNS.
fn add_on_a_worker(c: &Cluster) {
    let k = key_if("c1", "net1");
    assert!(tasks_of(&c.m.state(), "node62", &k).is_empty());
    let before = c.w.cni_stats();
    let a = added(c.w.cni_on_socket(add(k.clone(), "/run/netns/mp-ctl-c1")));
    let st = c.m.state();
    let t = task_of(&st, "node62", &k);
    assert_eq!((t.service.as_str(), t.netns.as_deref(), t.weight), ("web", Some("mp-ctl-c1"), 1));
    assert_eq!(
        t.container,
        Some(ContainerRef {
            id: "c1".into(),
            cni: Some(CniAttachment { network: "mp-net".into(), ifname: "net1".into() }),
            netns_ino: Some(INODE),
            name: Some("pod-c1".into()),
        })
    );
    let nw = &st.networks["app"];
    assert_eq!(
        a,
        Attached {
            host_iface: Some("mpt1c9e0f3a".into()),
            ifname: "net1".into(),
            mac: t.mac.to_string(),
            mtu: nw.mtu,
            ip: (t.ip, nw.subnet.prefix),
            gateway: nw.gateway,
            dns: Some(vec!["example.com".into()]),
        }
    );
    assert_eq!(nw.subnet.prefix, 24);
    // The namespace checked (by its path) before the write, the port
    // waited for after it; on the worker only.
    assert_eq!(
        c.w.dp.take_calls(),
        [Call::NetnsCheck("/var/run/netns/mp-ctl-c1".into(), "net1".into()), Call::TaskPort(t.id.clone())]
    );
    assert!(c.m.dp.calls().is_empty(), "{:?}", c.m.dp.calls());
    // The worker published it with its container, the manager did not.
    let local = c.w.dp.published(&t.id).expect("published on the worker");
    assert_eq!((local.ifname(), local.netns.as_deref()), (Some("net1"), Some("mp-ctl-c1")));
    assert!(c.m.dp.published(&t.id).is_none());
    assert_eq!(task_of(&c.w.state(), "node62", &k), t, "the worker's own state has it");
    let after = c.w.cni_stats();
    assert_eq!((after.adds, after.add_failures), (before.adds + 1, before.add_failures));
}

/// The same ADD again (the namespace spelt the same, or another way):
/// the same task, nothing written, nothing checked.
fn add_again(c: &Cluster) {
    let k = key_if("c1", "net1");
    let t = task_of(&c.m.state(), "node62", &k);
    let first = added(c.w.cni(add(k.clone(), "/run/netns/mp-ctl-c1")));
    let version = c.m.settled();
    let tasks = c.m.state().tasks;
    for netns in ["/run/netns/mp-ctl-c1", "/var/run/netns/mp-ctl-c1"] {
        let again = added(c.w.cni(add(k.clone(), netns)));
        assert_eq!(again, first);
        assert_eq!(again.ip.0, t.ip);
    }
    assert_eq!(c.m.settled(), version, "a duplicate ADD wrote");
    assert_eq!(c.m.state().tasks, tasks);
    let calls = c.w.dp.take_calls();
    assert!(!calls.iter().any(|x| matches!(x, Call::NetnsCheck(..))), "{calls:?}");
}

/// The same attachment in another namespace (a container id reused):
/// the old task goes (its port waited for), a new one is in the new
/// namespace.
fn add_in_another_netns(c: &Cluster) {
    let k = key_if("c1", "net1");
    let old = task_of(&c.m.state(), "node62", &k);
    let n = c.m.state().tasks.len();
    let a = added(c.w.cni(add(k.clone(), "/proc/4242/ns/net")));
    let st = c.m.state();
    let new = task_of(&st, "node62", &k);
    assert_eq!(new.netns.as_deref(), Some("/proc/4242/ns/net"));
    assert_eq!(a.ip.0, new.ip);
    assert_eq!(st.tasks.len(), n, "the old task replaced, not kept: {:?}", st.tasks.keys());
    assert!(!st.tasks.values().any(|t| t.netns == old.netns), "the old namespace's task is still there");
    let calls = c.w.dp.take_calls();
    assert_eq!(
        calls,
        [
            Call::PortGone(old.id.clone()),
            Call::NetnsCheck("/proc/4242/ns/net".into(), "net1".into()),
            Call::TaskPort(new.id.clone()),
        ]
    );
}

/// The same attachment in another namespace when the old task's port
/// was never made (nothing to wait for), right away: the new task, not
/// the old one, whose detach the worker's state may not have yet (the
/// race tried a few times).
fn replaced_quickly(c: &Cluster) {
    for i in 0..10 {
        let k = key(&format!("c11-{i}"));
        added(c.w.cni(add(k.clone(), "/run/netns/mp-ctl-c11a")));
        c.w.dp.quick.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = c.w.cni(add_to(k.clone(), "/run/netns/mp-ctl-c11b", "web", 2));
        c.w.dp.quick.store(false, std::sync::atomic::Ordering::Relaxed);
        let a = added(r);
        let st = c.m.state();
        let v = tasks_of(&st, "node62", &k);
        assert_eq!(v.len(), 1, "try {i}: one task for {k} after its ADD answered {a:?}: {v:?}");
        assert_eq!(v[0].netns.as_deref(), Some("mp-ctl-c11b"), "try {i}");
        assert_eq!(a.ip.0, v[0].ip, "try {i}");
        c.w.dp.quick.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(c.w.cni(CniRequest::Del(k.clone())), Ok(CniAnswer::Done));
        c.w.dp.quick.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    c.w.dp.take_calls();
}

/// Two ADDs of one attachment at once, both past the idempotency check
/// before either writes: one task, both answers name it.
fn racing_adds(c: &Cluster) {
    let k = key("c2");
    let n = c.m.state().tasks.len();
    let req = AdminRequest::Cni { request: add(k.clone(), "/run/user/1000/netns/netns-c2") };
    let ctl = c.w.control.clone();
    let (a, b) = c.w.rt.block_on(async { tokio::join!(ctl.admin(req.clone()), ctl.admin(req.clone())) });
    let (a, b) = (added(answer(a)), added(answer(b)));
    assert_eq!(a, b);
    let st = c.m.state();
    let t = task_of(&st, "node62", &k);
    assert_eq!(a.ip.0, t.ip);
    assert_eq!(st.tasks.len(), n + 1);
    let calls = c.w.dp.take_calls();
    let checks = calls.iter().filter(|x| matches!(x, Call::NetnsCheck(..))).count();
    assert_eq!(checks, 2, "both ADDs raced past the idempotency check: {calls:?}");
    assert!(calls.iter().filter(|x| matches!(x, Call::TaskPort(_))).all(|x| *x == Call::TaskPort(t.id.clone())));
    wait_for("the worker has c2's task", 5, || tasks_of(&c.w.state(), "node62", &k).len() == 1);
}

/// A namespace refused before anything is written; a port that could not
/// be made (the interface name taken): its code, and no task afterwards.
fn netns_and_port_failures(c: &Cluster) {
    let k = key("c3");
    let netns = "/run/netns/mp-ctl-c3";
    let (version, before) = (c.m.settled(), c.w.cni_stats());
    let gone = Failure::Netns { netns: "/var/run/netns/mp-ctl-c3".into(), why: "is gone".into() };
    *c.w.dp.netns.lock().unwrap() = Err(gone.clone());
    let f = failed("a gone namespace", c.w.cni(add(k.clone(), netns)));
    *c.w.dp.netns.lock().unwrap() = Ok(INODE);
    assert_eq!((f.code(), &f), (102, &gone));
    assert_eq!(c.m.settled(), version, "written before the namespace was checked");
    assert_eq!(c.w.dp.take_calls(), [Call::NetnsCheck("/var/run/netns/mp-ctl-c3".into(), "eth0".into())]);

    let taken = Failure::Ifname { ifname: "eth0".into(), netns: netns.into() };
    *c.w.dp.port.lock().unwrap() = Port::Fails(taken.clone());
    let f = failed("a port failure", c.w.cni(add(k.clone(), netns)));
    *c.w.dp.port.lock().unwrap() = made();
    assert_eq!((f.code(), &f), (103, &taken));
    // Detached before the answer: gone from the leader's state (and then
    // the worker's) at once.
    wait_for("no task for c3 after its failed ADD", 2, || no_task(c, &k));
    assert!(c.m.version() > version, "the task was written, then detached");
    let after = c.w.cni_stats();
    assert_eq!((after.adds, after.add_failures), (before.adds + 2, before.add_failures + 2));
    c.w.dp.take_calls();
}

/// Neither the manager nor the worker has a task for `k`.
fn no_task(c: &Cluster, k: &Key) -> bool {
    tasks_of(&c.m.state(), "node62", k).is_empty() && tasks_of(&c.w.state(), "node62", k).is_empty()
}

/// A port never made: "try again later" (11) when the ADD's time is up
/// (1 s), and no task afterwards.
fn port_never_made(c: &Cluster) {
    let k = key("c4");
    *c.w.dp.port.lock().unwrap() = Port::Never;
    let t0 = Instant::now();
    let f = failed("a port never made", c.w.cni(add_to(k.clone(), "/run/netns/mp-ctl-c4", "web", 1)));
    let took = t0.elapsed();
    *c.w.dp.port.lock().unwrap() = made();
    assert_eq!(f.code(), 11, "{f}");
    assert!(f.to_string().contains("not made in time"), "{f}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
    wait_for("no task for c4 after its timed-out ADD", 2, || no_task(c, &k));
    c.w.dp.take_calls();
}

/// A dataplane that does not keep to the deadline: the ADD still answers
/// (11) a second after its time is up, and leaves no task.
fn port_wait_hangs(c: &Cluster) {
    let k = key("c5");
    *c.w.dp.port.lock().unwrap() = Port::Hangs;
    let t0 = Instant::now();
    let f = failed("a hung port wait", c.w.cni(add_to(k.clone(), "/run/netns/mp-ctl-c5", "web", 1)));
    let took = t0.elapsed();
    *c.w.dp.port.lock().unwrap() = made();
    assert_eq!(f.code(), 11, "{f}");
    assert!(f.to_string().contains("not made in time"), "{f}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_millis(3500), "{took:?}");
    wait_for("no task for c5 after its ADD gave up", 2, || no_task(c, &k));
    c.w.dp.take_calls();
}

/// `MAX_CNI_ADDS` ADDs waiting for their ports: one more waits for a slot
/// until its timeout and answers 11 with nothing looked at or written;
/// once they are done, an ADD is served again.
fn adds_past_the_cap(c: &Cluster) {
    *c.w.dp.port.lock().unwrap() = Port::Never;
    let (version, before) = (c.m.settled(), c.w.cni_stats());
    let ctl = c.w.control.clone();
    let keys: Vec<Key> = (0..MAX_CNI_ADDS).map(|i| key(&format!("cap{i}"))).collect();
    let waiting: Vec<_> = keys
        .iter()
        .map(|k| {
            let req = AdminRequest::Cni {
                request: add_to(k.clone(), &format!("/run/netns/mp-ctl-{}", k.container_id), "web", 4),
            };
            let ctl = ctl.clone();
            c.w.rt.spawn(async move { answer(ctl.admin(req).await) })
        })
        .collect();
    wait_for("every slot's ADD waits for its port", 10, || {
        let ended = waiting.iter().filter(|w| w.is_finished()).count();
        assert_eq!(ended, 0, "ADDs racing on one node ended before their ports' deadline (task ids?)");
        c.w.dp.calls().iter().filter(|x| matches!(x, Call::TaskPort(_))).count() == MAX_CNI_ADDS
    });
    let k = key("past-cap");
    let t0 = Instant::now();
    let f = failed("an ADD past the cap", c.w.cni(add_to(k.clone(), "/run/netns/mp-ctl-past-cap", "web", 1)));
    let took = t0.elapsed();
    assert_eq!(f.code(), 11, "{f}");
    assert!(f.to_string().contains(&format!("{MAX_CNI_ADDS} CNI ADDs are in progress")), "{f}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");
    assert!(
        !c.w.dp.calls().iter().any(|x| matches!(x, Call::NetnsCheck(n, _) if n.contains("past-cap"))),
        "the ADD past the cap looked into its namespace"
    );
    assert!(no_task(c, &k));
    for w in waiting {
        let f = failed("an ADD whose port never came", c.w.rt.block_on(w).unwrap());
        assert!(f.to_string().contains("not made in time"), "{f}");
    }
    let after = c.w.cni_stats();
    assert_eq!(after.adds_waited_out, before.adds_waited_out + 1);
    assert_eq!(after.add_failures, before.add_failures + MAX_CNI_ADDS as u64 + 1);
    for k in &keys {
        wait_for("no task after a timed-out ADD", 5, || no_task(c, k));
    }
    assert!(c.m.settled() > version);
    *c.w.dp.port.lock().unwrap() = made();
    c.w.dp.take_calls();
    let a = added(c.w.cni(add_to(k.clone(), "/run/netns/mp-ctl-past-cap", "web", 5)));
    assert_eq!(a.ip.0, task_of(&c.m.state(), "node62", &k).ip);
    assert_eq!(c.w.cni(CniRequest::Del(k.clone())), Ok(CniAnswer::Done));
    wait_for("no task for past-cap after its DEL", 5, || no_task(c, &k));
    c.w.dp.take_calls();
}

/// DEL: the task goes (its port waited for) at the first, the second and
/// one of an unknown container are done too.
fn del(c: &Cluster) {
    let k = key("c2");
    let t = task_of(&c.m.state(), "node62", &k);
    let before = c.w.cni_stats();
    assert_eq!(c.w.cni(CniRequest::Del(k.clone())), Ok(CniAnswer::Done));
    assert!(tasks_of(&c.m.state(), "node62", &k).is_empty());
    assert!(!c.m.state().tasks.contains_key(&t.id));
    assert_eq!(c.w.dp.take_calls(), [Call::PortGone(t.id.clone())]);
    assert!(c.w.dp.published(&t.id).is_none(), "DEL answered before the port went");
    let version = c.m.settled();
    assert_eq!(c.w.cni(CniRequest::Del(k.clone())), Ok(CniAnswer::Done));
    assert_eq!(c.w.cni(CniRequest::Del(key("never-added"))), Ok(CniAnswer::Done));
    assert_eq!(c.m.settled(), version, "a DEL of nothing wrote");
    assert!(c.w.dp.take_calls().is_empty());
    assert_eq!(c.w.cni_stats().dels, before.dels + 3);

    // A DEL spooled while the node was away, then an ADD of the same
    // attachment (a restarted container): the ADD drops it, so the
    // reaper's next pass cannot detach the new task.
    let socket = c.w.cfg.state_dir.join("admin.sock");
    let k = key("c9");
    let spooled = meshplane_cni::spool::write(&socket, &k).unwrap().expect("spooled");
    let other = meshplane_cni::spool::write(&socket, &key("c10")).unwrap().expect("spooled");
    added(c.w.cni(add(k.clone(), "/run/netns/mp-ctl-c9")));
    assert!(!spooled.exists(), "the ADD left the DEL before it spooled");
    assert!(other.exists(), "another attachment's DEL stays");
    assert_eq!(c.w.cni(CniRequest::Del(key("c10"))), Ok(CniAnswer::Done));
    std::fs::remove_file(&other).unwrap();
    assert_eq!(c.w.cni(CniRequest::Del(k)), Ok(CniAnswer::Done));
    c.w.dp.take_calls();
}

/// GC on the worker: its tasks of the network that the runtime does not
/// list go; tasks without a container, containers without CNI, other
/// networks' tasks and other nodes' tasks stay.
fn gc(c: &Cluster) {
    // c1/net1 (from before) is not listed: it goes.
    let plain = Command::AttachTask {
        id: "web.40".into(),
        service: "web".into(),
        node: "node62".into(),
        weight: 1,
        netns: Some("mp-ctl-plain".into()),
        container: None,
    };
    c.w.write(plain).unwrap();
    let docker = Command::AttachTask {
        id: "web.41".into(),
        service: "web".into(),
        node: "node62".into(),
        weight: 1,
        netns: Some("/proc/4343/ns/net".into()),
        container: Some(ContainerRef { id: "dock1".into(), cni: None, netns_ino: None, name: None }),
    };
    c.w.write(docker).unwrap();
    for id in ["c5", "c6"] {
        added(c.w.cni(add(key(id), &format!("/run/netns/mp-ctl-{id}"))));
    }
    let other = Key { network: "other-net".into(), ..key("c7") };
    added(c.w.cni(add(other.clone(), "/run/netns/mp-ctl-c7")));
    added(c.m.cni(add(key("c8"), "/run/netns/mp-ctl-c8")));
    let st = c.m.state();
    let mut stale = vec![task_of(&st, "node62", &key_if("c1", "net1")).id, task_of(&st, "node62", &key("c6")).id];
    stale.sort();
    let keep: Vec<String> = st.tasks.keys().filter(|id| !stale.contains(id)).cloned().collect();
    c.w.dp.take_calls();
    c.m.dp.take_calls();

    // c6 is listed on another interface: not its attachment.
    let valid = vec![("c5".to_owned(), "eth0".to_owned()), ("c6".to_owned(), "eth1".to_owned())];
    let before = c.w.cni_stats();
    let r = c.w.cni(CniRequest::Gc(GcReq { network: "mp-net".into(), valid: valid.clone() }));
    let mut removed = match r {
        Ok(CniAnswer::Removed(v)) => v,
        other => panic!("GC answered {other:?}"),
    };
    removed.sort();
    assert_eq!(removed, stale);
    let after: Vec<String> = c.m.state().tasks.keys().cloned().collect();
    assert_eq!(after, keep);
    let mut gone: Vec<Call> = stale.iter().map(|id| Call::PortGone(id.clone())).collect();
    let mut calls = c.w.dp.take_calls();
    calls.sort_by_key(|x| format!("{x:?}"));
    gone.sort_by_key(|x| format!("{x:?}"));
    assert_eq!(calls, gone);
    // Again: nothing left to remove.
    let r = c.w.cni(CniRequest::Gc(GcReq { network: "mp-net".into(), valid }));
    assert_eq!(r, Ok(CniAnswer::Removed(vec![])));
    assert_eq!(c.w.cni_stats().gcs, before.gcs + 2);
}

/// CNI requests over the management plane's TLS from another manager
/// (whose certificate may make admin requests; a client talks only to
/// managers' servers): refused (106) both ways, nothing written or
/// checked.
fn over_tls(c: &Cluster) {
    let m2 = start(config(64, &c.dir));
    m2.admin(AdminRequest::Join { token: c.mtoken.clone(), addr: c.m.cfg.advertise }).unwrap();
    wait_for("node64 a voter with the state", 10, || {
        c.m.control.raft_voter_count() == 2 && m2.state().tasks == c.m.state().tasks
    });
    let identity = |name: &str| -> meshplane_control::pki::NodeIdentity {
        let saved: Value = serde_json::from_slice(&std::fs::read(c.dir.join(name).join("node.json")).unwrap()).unwrap();
        serde_json::from_value(saved["identity"].clone()).unwrap()
    };
    let c5 = task_of(&c.m.state(), "node62", &key("c5"));
    let version = c.m.settled();
    let tasks = c.m.state().tasks;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (n, id) in [(&c.m, identity("node64")), (&m2, identity("node61"))] {
        for request in [add(key("c9"), "/run/netns/mp-ctl-c9"), CniRequest::Del(key("c5"))] {
            let req = Request::Admin(AdminRequest::Cni { request });
            let r = rt.block_on(meshplane_control::tls::request(n.cfg.advertise, &n.cfg.name, &id, &req)).unwrap();
            match r {
                Response::Admin(Err(ApiError::Cni(f))) => {
                    assert_eq!(f.code(), 106, "{f}");
                    assert!(f.to_string().contains("admin socket only"), "{f}");
                }
                _ => panic!("a CNI request over TLS to {} was not refused", n.cfg.name),
            }
        }
    }
    // The same certificate's other admin requests are answered.
    let nodes = Request::Admin(AdminRequest::Nodes);
    let r = rt.block_on(meshplane_control::tls::request(c.m.cfg.advertise, "node61", &identity("node64"), &nodes));
    assert!(matches!(r.unwrap(), Response::Admin(Ok(_))));
    // A worker's certificate makes no admin request at all.
    let req = Request::Admin(AdminRequest::Cni { request: add(key("c9"), "/run/netns/mp-ctl-c9") });
    let r = rt.block_on(meshplane_control::tls::request(c.m.cfg.advertise, "node61", &identity("node62"), &req));
    assert!(matches!(r.unwrap(), Response::Refused(Refusal::ManagersOnly)));
    assert_eq!(c.m.settled(), version);
    assert_eq!(c.m.state().tasks, tasks);
    assert_eq!(task_of(&c.m.state(), "node62", &key("c5")), c5);
    let calls = [c.w.dp.take_calls(), c.m.dp.take_calls(), m2.dp.calls()];
    assert!(calls.iter().all(Vec::is_empty), "{calls:?}");
    // node64 leaves again (the other cases run on one manager).
    c.m.write(Command::RemoveNode { id: "node64".into() }).unwrap();
    wait_for("node64 out of Raft", 10, || c.m.control.raft_voter_count() == 1);
    drop(m2);
}

/// An unknown service (100) and a full network (101): nothing written.
fn unknown_service_and_full_network(c: &Cluster) {
    let version = c.m.settled();
    let f = failed("an unknown service", c.w.cni(add_to(key("c10"), "/run/netns/mp-ctl-c10", "wbe", 10)));
    assert_eq!((f.code(), &f), (100, &Failure::UnknownService("wbe".into())));
    assert_eq!(c.m.settled(), version);
    // Fill tiny.
    let mut filled = 0;
    for i in 1..=8 {
        let r = c.m.write(Command::AttachTask {
            id: format!("small.{i}"),
            service: "small".into(),
            node: "node61".into(),
            weight: 1,
            netns: None,
            container: None,
        });
        match r {
            Ok(_) => filled += 1,
            Err(e) => {
                assert!(e.to_string().contains("no free address"), "{e}");
                break;
            }
        }
    }
    // Six hosts: the gateway's, the VIP's (if it has one) and the tasks'.
    let vip = usize::from(c.m.state().services["small"].vip.is_some());
    assert_eq!(filled, 6 - 1 - vip);
    // The worker knows it is full (else its ADD's write is refused by the
    // leader: the same answer, but a log entry).
    wait_for("the worker sees tiny full", 5, || c.w.state().allocate_ip("tiny").is_err());
    let (version, tasks) = (c.m.settled(), c.m.state().tasks);
    let f = failed("a full network", c.w.cni(add_to(key("c10"), "/run/netns/mp-ctl-c10", "small", 10)));
    assert_eq!((f.code(), &f), (101, &Failure::NetworkFull("tiny".into())));
    assert_eq!(c.m.settled(), version);
    assert_eq!(c.m.state().tasks, tasks);
    c.w.dp.take_calls();
}

/// STATUS: the service's and its network's as ADD would find them.
fn status(c: &Cluster) {
    let version = c.m.settled();
    let status = |s: Option<&str>| c.w.cni(CniRequest::Status(StatusReq { service: s.map(str::to_owned) }));
    assert_eq!(status(Some("wbe")).map_err(|f| f.code()), Err(100));
    assert_eq!(status(Some("small")).map_err(|f| f.code()), Err(101));
    assert_eq!(status(Some("web")), Ok(CniAnswer::Done));
    assert_eq!(status(None), Ok(CniAnswer::Done));
    assert_eq!(c.m.settled(), version, "STATUS wrote");
    assert!(c.w.dp.take_calls().is_empty(), "STATUS touched the dataplane");
}

/// A node in no cluster refuses ADD (106) and has nothing to delete.
#[test]
fn a_node_in_no_cluster() {
    let dir = tmpdir("cni-alone");
    let n = start(config(63, &dir));
    let f = failed("ADD in no cluster", n.cni_on_socket(add(key("c1"), "/run/netns/mp-ctl-c1")));
    assert_eq!(f.code(), 106);
    assert!(f.to_string().contains("in no cluster"), "{f}");
    assert_eq!(n.cni(CniRequest::Del(key("c1"))), Ok(CniAnswer::Done));
    let status = n.cni(CniRequest::Status(StatusReq { service: Some("web".into()) }));
    assert_eq!(status.map_err(|f| f.code()), Err(106));
    let gc = n.cni(CniRequest::Gc(GcReq { network: "mp-net".into(), valid: vec![] }));
    assert_eq!(gc.map_err(|f| f.code()), Err(106));
    assert!(n.dp.calls().is_empty(), "{:?}", n.dp.calls());
    assert!(n.state().tasks.is_empty());
    drop(n);
    let _ = std::fs::remove_dir_all(&dir);
}
