//! Nodes running the whole control plane (`cluster::Control`) over
//! loopback: init, joins (manager and worker; wrong token refused), writes
//! through a follower and a worker, every node's tables compiled and
//! published; a node killed → gossip declares it down and its task leaves
//! every other node's balancer within seconds, and comes back when the node
//! restarts from its state directory; gossip sealed under the key Raft
//! distributed (a foreign packet is dropped and counted).
//!
//! Each node runs on its own tokio runtime and thread, so killing one is
//! dropping its runtime (nothing of it runs any more; its disk stays).

use meshplane_control::cluster::{AdminRequest, Config, Control, Dataplane};
use meshplane_control::pki::JoinRole;
use meshplane_control::state::{Command, HealthCheck, HealthUpdate, Probe, PublishRequest, TaskHealth};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::report::NodeStats;
use meshplane_dataplane::tables::TablesSpec;
use meshplane_dataplane::tables::services::{MeshMode, Proto};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A dataplane that keeps what it is given.
#[derive(Default)]
struct Recorder {
    last: Mutex<Option<TablesSpec>>,
    names: Mutex<Option<meshplane_dns::zone::Zone>>,
}

impl Dataplane for Recorder {
    fn publish(
        &self,
        spec: TablesSpec,
        _tasks: Vec<meshplane_control::cluster::LocalTask>,
    ) -> Result<(), meshplane_control::cluster::PublishError> {
        *self.last.lock().unwrap() = Some(spec);
        Ok(())
    }
    fn names(&self, zone: meshplane_dns::zone::Zone) {
        *self.names.lock().unwrap() = Some(zone);
    }
    fn stats(&self) -> NodeStats {
        NodeStats { tables_version: 0, workers: Vec::new(), dns: None }
    }
}

struct Node {
    rt: Option<tokio::runtime::Runtime>,
    control: Arc<Control>,
    dp: Arc<Recorder>,
    cfg: Config,
}

fn config(i: u8, dir: &Path, gossip_port: u16) -> Config {
    Config {
        name: format!("node{i}"),
        advertise: format!("127.0.0.{}:{}", 10 + i, 23770).parse().unwrap(),
        data_ip: format!("198.18.0.{i}").parse().unwrap(),
        data_mac: format!("02:00:00:00:00:{i:02x}").parse().unwrap(),
        underlay_mtu: 1500,
        gossip_port,
        state_dir: dir.join(format!("node{i}")),
        snapshot_every: 50,
        renew_check: Duration::from_millis(500),
        gossip_key_interval: meshplane_control::cluster::gossip_loop::GOSSIP_KEY_INTERVAL,
    }
}

fn start(cfg: Config) -> Node {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dp = Arc::new(Recorder::default());
    let control = rt.block_on(Control::start(cfg.clone(), dp.clone())).unwrap();
    Node { rt: Some(rt), control, dp, cfg }
}

impl Node {
    fn admin(&self, req: AdminRequest) -> Result<Value, String> {
        let c = self.control.clone();
        self.rt.as_ref().unwrap().block_on(async move { c.admin(req).await }).map_err(|e| e.to_string())
    }
    fn write(&self, command: Command) -> Result<Value, String> {
        self.admin(AdminRequest::Write { command })
    }
    /// The backends of service `svc` in this node's last tables.
    fn backends(&self, svc: &str) -> Vec<String> {
        let t = self.dp.last.lock().unwrap();
        let Some(t) = t.as_ref() else { return vec![] };
        t.services
            .iter()
            .find(|s| s.name == svc)
            .map(|s| s.backends.iter().map(|b| b.ip.to_string()).collect())
            .unwrap_or_default()
    }
    /// The tasks in network `nw` of the names last handed over.
    fn named_tasks(&self, nw: &str) -> Vec<String> {
        let z = self.dp.names.lock().unwrap();
        let tasks = z.as_ref().and_then(|z| z.networks.iter().find(|n| n.name == nw)).map(|n| n.tasks.clone());
        let mut v: Vec<String> = tasks.unwrap_or_default().into_iter().map(|t| t.name).collect();
        v.sort();
        v
    }
    fn kill(mut self) -> Config {
        if let Some(rt) = self.rt.take() {
            // Every task dropped at once (a crash, not a stop), and the
            // runtime's threads waited for, so that its sockets are closed
            // before the node starts again on the same address.
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        self.cfg.clone()
    }
}

/// `CreateNetwork` of `name` on `subnet`, defaults otherwise.
fn network(name: &str, subnet: &str) -> Command {
    Command::CreateNetwork {
        name: name.into(),
        subnet: subnet.parse().unwrap(),
        gateway: None,
        mtu: None,
        internal: false,
    }
}

/// The Raft voters `n` reports (`node ls`'s manager status).
fn voters(n: &Node) -> Vec<String> {
    n.admin(AdminRequest::Nodes)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["manager_status"] != "")
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mp-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_cluster_of_control_planes() {
    let dir = tmpdir("cluster");
    let n1 = start(config(1, &dir, 17946));
    // Not in a cluster yet: writes are refused with a clear message.
    let e = n1.write(Command::RemoveNode { id: "x".into() }).unwrap_err();
    assert!(e.contains("not in a cluster"), "{e}");
    let init = n1.admin(AdminRequest::Init { cert_expiry_secs: None, data_path_port: None }).unwrap();
    let mtoken = init["manager_token"].as_str().unwrap().to_owned();
    let wtoken = init["worker_token"].as_str().unwrap().to_owned();
    assert!(
        n1.admin(AdminRequest::Init { cert_expiry_secs: None, data_path_port: None })
            .unwrap_err()
            .contains("already in a cluster")
    );
    let addr1 = n1.cfg.advertise;

    let n2 = start(config(2, &dir, 17946));
    let n3 = start(config(3, &dir, 17946));
    // A wrong token is refused, and the node stays out.
    let forged = format!("{}00", &wtoken[..wtoken.len() - 2]);
    let forged = if forged == wtoken { format!("{}11", &wtoken[..wtoken.len() - 2]) } else { forged };
    let e = n3.admin(AdminRequest::Join { token: forged, addr: addr1 }).unwrap_err();
    assert!(e.contains("token"), "{e}");
    n2.admin(AdminRequest::Join { token: mtoken.clone(), addr: addr1 }).unwrap();
    n3.admin(AdminRequest::Join { token: wtoken, addr: addr1 }).unwrap();

    // Three nodes, two managers (Raft voters), one worker.
    wait_for("three nodes in node2's state", 10, || n2.control.state().0.nodes.len() == 3);
    let nodes = n1.admin(AdminRequest::Nodes).unwrap();
    let roles: Vec<(String, String)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().into(), n["manager_status"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        roles,
        [("node1".into(), "leader".into()), ("node2".into(), "reachable".into()), ("node3".into(), "".into())]
    );
    // Secrets stay on managers: the worker's state has no CA.
    wait_for("node3 has the state", 10, || n3.control.state().0.nodes.len() == 3);
    assert!(n3.control.state().0.ca.is_none());
    assert!(n3.admin(AdminRequest::Token { role: JoinRole::Worker, rotate: false }).is_err());

    // Writes through the follower manager; a worker changes nothing but
    // its own tasks (as `docker service create` on a worker).
    n2.write(network("app", "198.19.0.0/24")).unwrap();
    let e = n3.write(network("other", "198.19.1.0/24")).unwrap_err();
    assert!(e.contains("this node is not a manager"), "{e}");
    n2.write(Command::CreateService {
        name: "web".into(),
        network: "app".into(),
        protocol: Proto::Tcp,
        vip_port: Some(80),
        target_port: 8080,
        publish: vec![PublishRequest { port: None, mode: MeshMode::Nat }],
        scheduler: Scheduler::Mh,
        endpoint_mode: meshplane_control::state::EndpointMode::Vip,
        health: None,
    })
    .unwrap();
    // A refused write says why, from wherever it was made.
    let e = n1.write(network("app", "198.19.1.0/24")).unwrap_err();
    assert!(e.contains("already exists"), "{e}");
    for i in 1..=2 {
        n1.write(Command::AttachTask {
            id: format!("web.{i}"),
            service: "web".into(),
            node: format!("node{i}"),
            weight: 1,
            netns: None,
            container: None,
        })
        .unwrap();
    }
    // The worker reports its own task, and no other node's.
    let e = n3
        .write(Command::AttachTask {
            id: "web.9".into(),
            service: "web".into(),
            node: "node1".into(),
            weight: 1,
            netns: None,
            container: None,
        })
        .unwrap_err();
    assert!(e.contains("this node is not a manager"), "{e}");
    n3.write(Command::AttachTask {
        id: "web.3".into(),
        service: "web".into(),
        node: "node3".into(),
        weight: 1,
        netns: None,
        container: None,
    })
    .unwrap();
    let nodes = [&n1, &n2, &n3];
    for n in nodes {
        wait_for("three backends everywhere", 10, || n.backends("web").len() == 3);
    }
    // Every node has a task in app: each is handed app's names, with the
    // other nodes' tasks too.
    for n in nodes {
        wait_for("app's names everywhere", 10, || n.named_tasks("app") == ["web.1", "web.2", "web.3"]);
    }
    let all = n1.backends("web");
    let (_, v) = n1.control.state();
    let task3 = n1.control.state().0.tasks["web.3"].ip.to_string();
    assert!(all.contains(&task3));

    // Health: a check added keeps every task serving; the worker reports
    // its own task's health the way its checker does (`Control::write`,
    // forwarded to the leader), and no other node's; an unhealthy task
    // leaves every node's balancer and comes back when healthy.
    let check = HealthCheck { probe: Probe::Tcp, interval_ms: 1000, timeout_ms: 500, retries: 3, start_period_ms: 0 };
    n1.write(Command::UpdateService {
        name: "web".into(),
        scheduler: None,
        publish_add: vec![],
        publish_rm: vec![],
        health: HealthUpdate::Set(check),
    })
    .unwrap();
    let report = |n: &Node, task: &str, health: TaskHealth| {
        let c = n.control.clone();
        let cmd = Command::SetTaskHealth { task: task.into(), health };
        n.rt.as_ref().unwrap().block_on(async move { c.write(cmd).await }).map_err(|e| e.to_string())
    };
    let e = report(&n3, "web.1", TaskHealth::Unhealthy).unwrap_err();
    assert!(e.contains("only report itself"), "{e}");
    report(&n3, "web.3", TaskHealth::Unhealthy).unwrap();
    for n in nodes {
        wait_for("web.3 out of every balancer", 10, || n.backends("web").len() == 2);
        assert!(!n.backends("web").contains(&task3));
    }
    report(&n3, "web.3", TaskHealth::Healthy).unwrap();
    for n in nodes {
        wait_for("web.3 back in every balancer", 10, || n.backends("web").len() == 3);
    }

    // Gossip: every node sees the other two, under the key Raft gave out.
    for n in nodes {
        wait_for("gossip membership", 15, || {
            let s = n.admin(AdminRequest::Stats).unwrap();
            s["gossip"]["members"].as_array().is_some_and(|m| m.len() == 2)
        });
    }
    // The admin API over the management plane's mutual TLS: a manager's
    // certificate is answered, a worker's refused; one from another CA
    // fails the handshake.
    let identity = |name: &str| -> meshplane_control::pki::NodeIdentity {
        let saved: Value = serde_json::from_slice(&std::fs::read(dir.join(name).join("node.json")).unwrap()).unwrap();
        serde_json::from_value(saved["identity"].clone()).unwrap()
    };
    let req = meshplane_control::rpc::Request::Admin(AdminRequest::Nodes);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match rt.block_on(meshplane_control::tls::request(addr1, "node1", &identity("node2"), &req)).unwrap() {
        meshplane_control::rpc::Response::Admin(Ok(v)) => assert_eq!(v.as_array().map(Vec::len), Some(3)),
        _ => panic!("no admin answer over TLS"),
    }
    match rt.block_on(meshplane_control::tls::request(addr1, "node1", &identity("node3"), &req)).unwrap() {
        meshplane_control::rpc::Response::Refused(meshplane_control::rpc::Refusal::ManagersOnly) => {}
        _ => panic!("a worker's admin request answered"),
    }
    let foreign = meshplane_control::pki::ClusterCa::init().unwrap().issue("node3", JoinRole::Worker).unwrap();
    assert!(rt.block_on(meshplane_control::tls::request(addr1, "node1", &foreign, &req)).is_err());

    // The gossip key rotates through Raft; membership holds across it.
    let before = n1.control.state().0.gossip_keys[0].id;
    n2.admin(AdminRequest::RotateGossipKey).unwrap();
    for n in nodes {
        wait_for("the new gossip key everywhere", 10, || {
            n.control.state().0.gossip_keys[0].id == before.wrapping_add(1)
        });
    }
    std::thread::sleep(Duration::from_secs(3));
    for n in nodes {
        assert!(n.control.down().is_empty(), "a node declared down across the rotation: {:?}", n.control.down());
        let s = n.admin(AdminRequest::Stats).unwrap();
        assert_eq!(s["gossip"]["members"].as_array().map(Vec::len), Some(2), "{s}");
    }

    // A foreign packet (not sealed with the cluster key) is dropped and counted.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(&[7u8; 80], "127.0.0.11:17946").unwrap();
    wait_for("a foreign gossip packet counted", 5, || {
        let s = n1.admin(AdminRequest::Stats).unwrap();
        s["gossip"]["rejected_unknown_key"].as_u64().unwrap_or(0)
            + s["gossip"]["rejected_bad_tag"].as_u64().unwrap_or(0)
            >= 1
    });

    // node3 dies: its task leaves the others' balancers within seconds.
    let cfg3 = n3.kill();
    let t = wait_for("node3's task removed on node1 and node2", 10, || {
        !n1.backends("web").contains(&task3) && !n2.backends("web").contains(&task3)
    });
    eprintln!("node3's task left every balancer {:.1} s after it died", t.as_secs_f64());
    let nodes = n1.admin(AdminRequest::Nodes).unwrap();
    assert_eq!(nodes[2]["status"], "down", "{nodes}");
    // Still in the desired state: only liveness took it out.
    assert!(n1.control.state().0.tasks.contains_key("web.3"));

    // It comes back from its state directory: the task returns.
    let n3 = start(cfg3);
    wait_for("node3's task back on node1 and node2", 15, || {
        n1.backends("web").contains(&task3) && n2.backends("web").contains(&task3)
    });
    wait_for("node3 has the state again", 10, || n3.control.state().1 >= v);

    // A manager leaves: out of the state and out of Raft (node1 carries on
    // as the only voter; writes still commit).
    n1.write(Command::AddNode(meshplane_control::state::Node {
        id: "spare".into(),
        mgmt: "127.0.0.99:23770".parse().unwrap(),
        data_ip: "198.18.0.99".parse().unwrap(),
        data_mac: "02:00:00:00:00:63".parse().unwrap(),
        role: meshplane_control::state::Role::Worker,
        availability: meshplane_control::state::Availability::Active,
        key_id: None,
        underlay_mtu: 1500,
    }))
    .unwrap();
    n1.write(Command::RemoveNode { id: "spare".into() }).unwrap();
    assert_eq!(voters(&n1), ["node1", "node2"]);
    n1.write(Command::RemoveNode { id: "node2".into() }).unwrap();
    // Out of the state at once; out of Raft's membership once the change
    // commits (killing node2 before that would leave a two-voter
    // membership with one voter: no quorum, as Raft has it).
    wait_for("node2 out of Raft", 10, || voters(&n1) == ["node1"] && n1.control.raft_voter_count() == 1);
    let cfg2 = n2.kill();
    // The only manager cannot leave.
    let e = n1.write(Command::RemoveNode { id: "node1".into() }).unwrap_err();
    assert!(e.contains("only manager"), "{e}");
    n1.write(network("after", "198.19.9.0/24")).unwrap();
    let _ = std::fs::remove_dir_all(&cfg2.state_dir);
    let n2 = start(cfg2);
    n2.admin(AdminRequest::Join { token: mtoken.clone(), addr: addr1 }).unwrap();
    wait_for("node2 a voter again", 15, || voters(&n1) == ["node1", "node2"]);

    // Restart every node from disk: the same state.
    let before = n1.control.state().0;
    let cfgs: Vec<Config> = [n1, n2, n3].into_iter().map(Node::kill).collect();
    std::thread::sleep(Duration::from_millis(300));
    let again: Vec<Node> = cfgs.into_iter().map(start).collect();
    for n in &again {
        wait_for("the same state after a restart", 15, || n.control.state().0.redacted() == before.redacted());
    }
    // And the restarted cluster takes writes.
    wait_for("a write after the restart", 15, || again[1].write(Command::RemoveService { name: "web".into() }).is_ok());
    for n in &again {
        wait_for("the service gone everywhere", 10, || n.control.state().0.services.is_empty());
    }
    drop(again);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_admin_socket_answers_bad_requests_with_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tmpdir("admin");
    let n = start(config(9, &dir, 17949));
    let sock = n.cfg.state_dir.join("admin.sock");
    let rt = n.rt.as_ref().unwrap();
    // Not JSON of a request: an error answer, and the node goes on.
    for body in [&b"{\"op\":\"launch-missiles\"}"[..], b"[1,2,3]", b"{\"op\":\"write\",\"command\":7}"] {
        let answer: meshplane_control::rpc::AdminResponse = rt.block_on(async {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            s.write_all(&(body.len() as u32).to_le_bytes()).await.unwrap();
            s.write_all(body).await.unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.unwrap();
            let mut b = vec![0u8; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut b).await.unwrap();
            serde_json::from_slice(&b).unwrap()
        });
        let e = answer.unwrap_err().to_string();
        assert!(e.starts_with("bad admin request"), "{e}");
    }
    // Garbage that is not even a frame: the connection is closed.
    rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        s.write_all(&[0xff; 4]).await.unwrap();
        let mut b = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut b)).await;
    });
    // A command only the cluster writes (keys, CA, data-path port):
    // refused through the raw Write, whatever the node's role.
    for command in [Command::RetireGossipKey { id: 1 }, Command::SetDataPathPort { port: 4790 }] {
        let e = n.admin(AdminRequest::Write { command }).unwrap_err();
        assert!(e.contains("is written by the cluster itself"), "{e}");
    }
    // Still answering.
    let info = n.admin(AdminRequest::Info).unwrap();
    assert_eq!(info["node"], "node9");
    assert!(rt.block_on(meshplane_control::cluster::admin_call(&sock, &AdminRequest::Nodes)).unwrap().is_ok());
    drop(n);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Roles no certificate can exceed (issue 17): what a worker's certificate
/// may not do, joins under a taken name, expired and renewed certificates,
/// promotion and demotion, automatic renewal, secrets' modes, and a removed
/// node's certificate refused from the moment the removal commits.
#[test]
fn roles_certificates_and_revocation() {
    use meshplane_control::pki::{NodeIdentity, csr};
    use meshplane_control::rpc::{Refusal, Request, Response};
    use meshplane_control::state::Role;
    use std::os::unix::fs::PermissionsExt;
    use std::time::SystemTime;
    let dir = tmpdir("roles");
    let n4 = start(config(4, &dir, 19946));
    // Certificates valid one minute: renewed after thirty seconds.
    let init = n4.admin(AdminRequest::Init { cert_expiry_secs: Some(60), data_path_port: None }).unwrap();
    let mtoken = init["manager_token"].as_str().unwrap().to_owned();
    let wtoken = init["worker_token"].as_str().unwrap().to_owned();
    let addr4 = n4.cfg.advertise;
    let n5 = start(config(5, &dir, 19946));
    let n6 = start(config(6, &dir, 19946));
    n5.admin(AdminRequest::Join { token: mtoken, addr: addr4 }).unwrap();
    n6.admin(AdminRequest::Join { token: wtoken.clone(), addr: addr4 }).unwrap();
    wait_for("three nodes", 10, || n4.control.state().0.nodes.len() == 3);
    let identity = |name: &str| -> NodeIdentity {
        let saved: Value = serde_json::from_slice(&std::fs::read(dir.join(name).join("node.json")).unwrap()).unwrap();
        serde_json::from_value(saved["identity"].clone()).unwrap()
    };
    let (id5, id6) = (identity("node5"), identity("node6"));
    let p6 = id6.peer().unwrap();
    assert_eq!((p6.name.as_str(), p6.role), ("node6", JoinRole::Worker));
    assert!((359..=361).contains(&(p6.not_after - p6.not_before)), "60 s and 5 min of slack: {p6:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ask = |id: &NodeIdentity, req: &Request| rt.block_on(meshplane_control::tls::request(addr4, "node4", id, req));

    // A worker's certificate: no Raft RPC, no voter, no write, no token, no
    // key rotation; a manager's: all of them.
    let vote = openraft::Vote::new(1, 7);
    let append = Request::Append(openraft::raft::AppendEntriesRequest {
        vote,
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    });
    let ballot = Request::Vote(openraft::raft::VoteRequest::new(vote, None));
    let snapshot = Request::Snapshot(openraft::raft::InstallSnapshotRequest {
        vote,
        meta: Default::default(),
        offset: 0,
        data: vec![],
        done: false,
    });
    let add_manager = Request::AddManager { id: 6, name: "node6".into(), addr: n6.cfg.advertise };
    let write = Request::Write(network("w", "198.19.3.0/24"));
    let token = Request::Admin(AdminRequest::Token { role: JoinRole::Manager, rotate: false });
    let rotate = Request::Admin(AdminRequest::RotateGossipKey);
    for (what, req) in [
        ("append", &append),
        ("vote", &ballot),
        ("snapshot", &snapshot),
        ("add manager", &add_manager),
        ("write", &write),
        ("token", &token),
        ("key rotation", &rotate),
    ] {
        match ask(&id6, req).unwrap() {
            Response::Refused(Refusal::ManagersOnly) => {}
            _ => panic!("a worker's {what} was not refused as managers-only"),
        }
    }
    // Not even about itself under another role.
    let mut me = n4.control.state().0.nodes["node6"].clone();
    me.role = Role::Manager;
    assert!(matches!(
        ask(&id6, &Request::Write(Command::AddNode(me))).unwrap(),
        Response::Refused(Refusal::NotYourself)
    ));
    // A manager may; but becomes a voter only as itself.
    assert!(matches!(ask(&id5, &token).unwrap(), Response::Admin(Ok(_))));
    assert!(matches!(ask(&id5, &ballot).unwrap(), Response::Vote(_)));
    assert!(matches!(ask(&id5, &add_manager).unwrap(), Response::Refused(Refusal::NotYourself)));
    // And a worker follows the state.
    assert!(matches!(ask(&id6, &Request::Watch { since: 0 }).unwrap(), Response::State { .. }));

    // A join under a taken name is refused (the CA never signs it).
    let e = rt
        .block_on(meshplane_control::tls::join_new_key(addr4, "node4", &wtoken, "node5", None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("node5") && e.contains("exists"), "{e}");

    // An expired certificate fails the handshake; a renewal (same key, a
    // certificate from a manager) is accepted.
    let ca = n4.control.state().0.ca.clone().expect("the CA on a manager");
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let old = ca.sign_valid(&csr(&id6.key, "node6").unwrap(), "node6", JoinRole::Worker, now - 2 * hour, now - hour);
    let expired = NodeIdentity { cert: old.unwrap(), ..id6.clone() };
    assert!(ask(&expired, &Request::Watch { since: 0 }).is_err(), "an expired certificate was accepted");
    let renewed = match ask(&id6, &Request::Renew { csr: csr(&id6.key, "node6").unwrap() }).unwrap() {
        Response::Renewed(Ok(i)) => NodeIdentity { cert: i.cert, ..id6.clone() },
        _ => panic!("no renewal"),
    };
    assert_eq!(renewed.peer().unwrap().role, JoinRole::Worker);
    assert!(matches!(ask(&renewed, &Request::Watch { since: 0 }).unwrap(), Response::State { .. }));
    // A renewal is for the certificate's own key.
    let other = meshplane_control::pki::new_key().unwrap();
    assert!(matches!(
        ask(&id6, &Request::Renew { csr: csr(&other, "node6").unwrap() }).unwrap(),
        Response::Renewed(Err(_))
    ));

    // On a worker, a change to the cluster is refused as on a Swarm worker.
    let create = |n: &Node| n.write(network("p", "198.19.4.0/24"));
    assert!(create(&n6).unwrap_err().contains("this node is not a manager"));
    // Promoted: it renews its certificate as a manager, joins Raft's
    // voters, and may write.
    n4.write(Command::SetRole { id: "node6".into(), role: Role::Manager }).unwrap();
    wait_for("node6 a manager's certificate", 15, || identity("node6").peer().unwrap().role == JoinRole::Manager);
    wait_for("node6 a voter", 15, || voters(&n4) == ["node4", "node5", "node6"]);
    create(&n6).unwrap();
    // Demoted: out of the voters at once, a worker's certificate, refused.
    n4.write(Command::SetRole { id: "node6".into(), role: Role::Worker }).unwrap();
    wait_for("node6 out of the voters", 15, || voters(&n4) == ["node4", "node5"]);
    wait_for("node6 a worker's certificate", 15, || identity("node6").peer().unwrap().role == JoinRole::Worker);
    wait_for("node6's Raft log removed", 10, || !n6.cfg.state_dir.join("raft").exists());
    let e = n6.write(Command::RemoveNetwork { name: "p".into() }).unwrap_err();
    assert!(e.contains("this node is not a manager"), "{e}");
    n5.write(Command::RemoveNetwork { name: "p".into() }).unwrap();

    // Automatic renewal before expiry: node5's certificate is replaced.
    let first = id5.peer().unwrap();
    wait_for("node5's certificate renewed", 45, || identity("node5").peer().unwrap().not_after > first.not_after);
    // Writes still commit between managers on the renewed certificates.
    create(&n5).unwrap();

    // Secrets at rest: directories 0700, files 0600.
    for n in ["node4", "node5", "node6"] {
        let mut todo = vec![dir.join(n)];
        while let Some(d) = todo.pop() {
            let m = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o700, "{}", d.display());
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                let m = e.metadata().unwrap().permissions().mode() & 0o777;
                if t.is_dir() {
                    todo.push(e.path());
                } else if t.is_file() {
                    assert_eq!(m, 0o600, "{}", e.path().display());
                }
            }
        }
    }
    // A node refuses to start with its key readable by others.
    let cfg6 = n6.kill();
    let key = cfg6.state_dir.join("node.json");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let rt6 = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let e = rt6.block_on(Control::start(cfg6.clone(), Arc::new(Recorder::default()))).unwrap_err().to_string();
    assert!(e.contains("node.json") && e.contains("644"), "{e}");
    drop(rt6);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let n6 = start(cfg6);
    wait_for("node6 back", 10, || n6.control.state().0.nodes.len() == 3);

    // Removed: node6's certificate is refused at its next connection.
    let id6 = identity("node6");
    assert!(matches!(ask(&id6, &Request::Watch { since: 0 }).unwrap(), Response::State { .. }));
    n4.write(Command::RemoveNode { id: "node6".into() }).unwrap();
    assert!(matches!(ask(&id6, &Request::Watch { since: 0 }).unwrap(), Response::Refused(Refusal::Revoked)));
    drop((n4, n5, n6));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The gossip key rotates on its own (every 8 s here): after the interval
/// a new key is current on every node, the previous one still held during
/// the grace period and retired after it, every node sealing with the new
/// one; membership holds throughout.
#[test]
fn the_gossip_key_rotates_and_the_previous_one_retires() {
    let dir = tmpdir("gossip-keys");
    let cfg = |i| Config { gossip_key_interval: Duration::from_secs(8), ..config(i, &dir, 18946) };
    let n1 = start(cfg(21));
    let init = n1.admin(AdminRequest::Init { cert_expiry_secs: None, data_path_port: None }).unwrap();
    let wtoken = init["worker_token"].as_str().unwrap().to_owned();
    let n2 = start(cfg(22));
    n2.admin(AdminRequest::Join { token: wtoken, addr: n1.cfg.advertise }).unwrap();
    let gossip = |n: &Node| n.admin(AdminRequest::Stats).unwrap()["gossip"].clone();
    let nodes = [&n1, &n2];
    for n in nodes {
        wait_for("gossip membership", 15, || gossip(n)["members"].as_array().is_some_and(|m| m.len() == 1));
    }
    let first = n1.control.state().0.gossip_keys[0].id;
    let (both, second) = (serde_json::json!([first, first + 1]), serde_json::json!([first + 1]));
    for n in nodes {
        wait_for("the new key held with the previous one", 15, || gossip(n)["key_ids"] == both);
    }
    for n in nodes {
        wait_for("the previous key retired", 10, || {
            let g = gossip(n);
            g["key_ids"] == second && g["sealing_key"] == first + 1
        });
    }
    assert_eq!(n1.control.state().0.gossip_keys.len(), 1);
    for n in nodes {
        assert!(n.control.down().is_empty(), "a node declared down across the rotation: {:?}", n.control.down());
        let g = gossip(n);
        assert_eq!(g["members"].as_array().map(Vec::len), Some(1), "{g}");
    }
}
