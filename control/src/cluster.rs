//! The control thread of a node: cluster membership (init, join, restart
//! from disk), Raft on managers, the cluster state on workers (watched
//! from a manager), gossip over UDP, the admin API, and the tables it
//! compiles for this node and hands to the dataplane.
//!
//! One [`Control`] per node, on a tokio runtime of its own (the workers
//! never wait for it). What it keeps on disk, in the state directory:
//! `node.json` (the node's certificate, key and role; mode 0600), `raft/`
//! (managers: the log and snapshots), `admin.sock` (the admin API's unix
//! socket, root only).
//!
//! Liveness: a node is up unless gossip declared it down; tables compiled
//! while a node is down leave its tasks out of every balancer and its
//! endpoints out of the forwarding tables, and put them back when gossip
//! sees it again.

use crate::compile::compile;
use crate::gossip::{Gossip, GossipId, Keyring, MemberEvent};
use crate::pki::{CLUSTER_NAME, ClusterCa, JoinRole, NodeIdentity};
use crate::raft::{NodeId, Raft, StateMachine};
use crate::state::{Availability, ClusterState, Command, Node, Role};
use crate::transport::{Request, Response};
use core::net::{Ipv4Addr, SocketAddr};
use meshplane_dataplane::tables::TablesSpec;
use meshplane_dataplane::wire::MacAddr;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The default management port (Swarm's).
pub const MGMT_PORT: u16 = 2377;
/// The default gossip port (Swarm's).
pub const GOSSIP_PORT: u16 = 7946;

/// How a node runs its control plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's name (unique in the cluster; its certificate's).
    pub name: String,
    /// Management address (tcp: Raft, joins, admin API over TLS); gossip
    /// uses its IP.
    pub advertise: SocketAddr,
    /// Data-path address.
    pub data_ip: Ipv4Addr,
    /// MAC of the data-path NIC.
    pub data_mac: MacAddr,
    /// Gossip UDP port.
    pub gossip_port: u16,
    /// State directory.
    pub state_dir: PathBuf,
    /// Raft snapshot every this many entries.
    pub snapshot_every: u64,
}

/// A task on this node, with what its port needs (the tables name the port
/// after the task).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTask {
    /// The task's id (its tables port's name).
    pub id: String,
    /// The namespace to make its port in, if the node makes it.
    pub netns: Option<String>,
    /// Its address, prefix length, MAC.
    pub ip: Ipv4Addr,
    /// The network's prefix length.
    pub prefix: u8,
    /// Its MAC.
    pub mac: MacAddr,
    /// The network's gateway (the task's default route).
    pub gateway: Ipv4Addr,
    /// The network's MTU.
    pub mtu: u16,
}

/// The tasks of node `me` in `state`.
pub fn local_tasks(state: &ClusterState, me: &str) -> Vec<LocalTask> {
    state
        .tasks
        .values()
        .filter(|t| t.node == me)
        .filter_map(|t| {
            let nw = state.networks.get(&state.services.get(&t.service)?.network)?;
            Some(LocalTask {
                id: t.id.clone(),
                netns: t.netns.clone(),
                ip: t.ip,
                prefix: nw.subnet.prefix,
                mac: t.mac,
                gateway: nw.gateway,
                mtu: nw.mtu,
            })
        })
        .collect()
}

/// What the control thread needs of the dataplane.
pub trait Dataplane: Send + Sync + 'static {
    /// New tables for this node (compiled from the state and liveness),
    /// with the node's tasks (whose ports the dataplane makes). Called
    /// from a blocking context; an error is logged and the next change
    /// tries again.
    fn publish(&self, spec: TablesSpec, tasks: Vec<LocalTask>) -> Result<(), String>;
    /// The dataplane's counters, as JSON (admin `stats`).
    fn stats(&self) -> serde_json::Value;
    /// The dataplane's tracked connections, as JSON (admin `conntrack`).
    fn conntrack(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// An admin API request (the CLI's; JSON over the unix socket, or
/// `Request::Admin` over TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum AdminRequest {
    /// `cluster init`: a new cluster with this node as its first manager.
    Init,
    /// `cluster join`: join through the manager at `addr` with `token`.
    Join {
        /// The token.
        token: String,
        /// A manager's management address.
        addr: SocketAddr,
    },
    /// `cluster token`: the join token for `role` (a new one if `rotate`).
    Token {
        /// Manager or worker.
        role: JoinRole,
        /// Rotate the secret first (old tokens stop working).
        rotate: bool,
    },
    /// `cluster rotate-gossip-key`.
    RotateGossipKey,
    /// A change to the state (`network create`, `service create`, …).
    Write {
        /// The change.
        command: Command,
    },
    /// The cluster state (without secrets) and its version.
    State,
    /// `node ls`: every node with its role, availability and liveness.
    Nodes,
    /// This node: name, role, cluster version, Raft leader.
    Info,
    /// This node's tables as last published.
    Tables,
    /// The dataplane's and gossip's counters.
    Stats,
    /// The connections this node's workers track.
    Conntrack,
}

/// An admin API response: a JSON value, or why not.
pub type AdminResponse = Result<serde_json::Value, String>;

/// What a node keeps in `node.json`.
#[derive(Clone, Serialize, Deserialize)]
struct Saved {
    identity: NodeIdentity,
    role: Role,
    /// The manager it joined through (workers watch it first).
    joined_via: Option<SocketAddr>,
}

/// A node's Raft id: from its name (stable across restarts).
pub fn raft_id(name: &str) -> NodeId {
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

#[derive(Default)]
struct Inner {
    saved: Option<Saved>,
    raft: Option<(Raft, StateMachine)>,
    state: ClusterState,
    version: u64,
    /// Nodes gossip declared down.
    down: BTreeSet<String>,
    last_tables: Option<TablesSpec>,
    gossip: Option<GossipSummary>,
    _server: Option<crate::transport::Server>,
}

/// Gossip's counters and view, for `stats` and `node ls`.
#[derive(Debug, Clone, Default, Serialize)]
struct GossipSummary {
    members: Vec<String>,
    sent: u64,
    received: u64,
    rejected_short: u64,
    rejected_unknown_key: u64,
    rejected_bad_tag: u64,
    rejected_undecodable: u64,
}

/// A node's control plane.
pub struct Control {
    cfg: Config,
    dp: Arc<dyn Dataplane>,
    inner: Mutex<Inner>,
    /// State or liveness changed: compile and publish.
    changed: tokio::sync::Notify,
    /// The state version, for watchers.
    version_tx: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("name", &self.cfg.name).finish()
    }
}

fn io(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The frame format of the admin socket (the management plane's: a 4-byte
/// little-endian length and JSON).
pub async fn admin_call(socket: &Path, req: &AdminRequest) -> std::io::Result<AdminResponse> {
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    crate::transport::write_frame(&mut s, req).await?;
    crate::transport::read_frame(&mut s).await
}

impl Control {
    /// Starts the control plane of the node `cfg` on the current tokio
    /// runtime: the admin socket at once; Raft or the state watch, the
    /// TLS server and gossip if the node is in a cluster already (its
    /// state directory says so), else after `init` or `join`.
    pub async fn start(cfg: Config, dp: Arc<dyn Dataplane>) -> Result<Arc<Control>, String> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| format!("{}: {e}", cfg.state_dir.display()))?;
        let saved: Option<Saved> = match std::fs::read(cfg.state_dir.join("node.json")) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| format!("node.json: {e}"))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("node.json: {e}")),
        };
        if let Some(s) = &saved
            && s.identity.name != cfg.name
        {
            return Err(format!("the state directory belongs to node {:?}, not {:?}", s.identity.name, cfg.name));
        }
        let (version_tx, _) = tokio::sync::watch::channel(0);
        let c = Arc::new(Control {
            cfg,
            dp,
            inner: Mutex::new(Inner::default()),
            changed: tokio::sync::Notify::new(),
            version_tx,
        });
        c.clone().serve_admin_socket()?;
        tokio::spawn(c.clone().publish_loop());
        tokio::spawn(c.clone().gossip_loop());
        if let Some(s) = saved {
            c.resume(s).await?;
        }
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn raft(&self) -> Option<Raft> {
        self.lock().raft.as_ref().map(|(r, _)| r.clone())
    }

    fn identity(&self) -> Option<NodeIdentity> {
        self.lock().saved.as_ref().map(|s| s.identity.clone())
    }

    /// The state as this node knows it, and its version.
    pub fn state(&self) -> (ClusterState, u64) {
        let g = self.lock();
        (g.state.clone(), g.version)
    }

    /// Nodes gossip declared down.
    pub fn down(&self) -> BTreeSet<String> {
        self.lock().down.clone()
    }

    fn save(&self, s: &Saved) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.cfg.state_dir.join("node.json");
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(s).map_err(io)?;
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(&body).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// Runs what a member runs: Raft (managers) or the state watch
    /// (workers), and the TLS server.
    fn resume(
        self: &Arc<Self>,
        s: Saved,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.resume_inner(s))
    }

    async fn resume_inner(self: &Arc<Self>, s: Saved) -> Result<(), String> {
        self.lock().saved = Some(s.clone());
        if s.role == Role::Manager {
            let net = crate::transport::TlsNetwork::new(&s.identity).map_err(io)?;
            let (raft, sm) = crate::raft::start_with(
                raft_id(&self.cfg.name),
                &self.cfg.state_dir.join("raft"),
                net,
                self.cfg.snapshot_every,
            )
            .await
            .map_err(io)?;
            self.lock().raft = Some((raft.clone(), sm.clone()));
            tokio::spawn(self.clone().follow_raft(raft, sm));
        } else {
            tokio::spawn(self.clone().watch_loop());
        }
        let listener = tokio::net::TcpListener::bind(self.cfg.advertise)
            .await
            .map_err(|e| format!("listening on {}: {e}", self.cfg.advertise))?;
        let me = self.clone();
        let handler: crate::transport::Handler = Arc::new(move |req, member| {
            let me = me.clone();
            Box::pin(async move { me.handle(req, member).await })
        });
        let server = crate::transport::serve_with(listener, &s.identity, handler).map_err(io)?;
        self.lock()._server = Some(server);
        Ok(())
    }

    /// Stops Raft (the state on disk stays as it is).
    pub async fn shutdown(&self) {
        let raft = self.raft();
        if let Some(r) = raft {
            let _ = r.shutdown().await;
        }
        let _ = std::fs::remove_file(self.cfg.state_dir.join("admin.sock"));
    }

    fn set_state(&self, state: ClusterState, version: u64) {
        {
            let mut g = self.lock();
            if version < g.version {
                return;
            }
            g.state = state;
            g.version = version;
        }
        self.version_tx.send_replace(version);
        self.changed.notify_one();
    }

    /// Managers: the state machine's state, each time Raft applies.
    async fn follow_raft(self: Arc<Self>, raft: Raft, sm: StateMachine) {
        let mut rx = raft.metrics();
        let mut seen = None;
        loop {
            let applied = rx.borrow_and_update().last_applied;
            if applied != seen {
                seen = applied;
                self.set_state(sm.state(), applied.map_or(0, |l| l.index));
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Where to send a write or a watch: the managers of the state (the
    /// Raft leader first if this node knows it), then the one this node
    /// joined through.
    fn managers(&self) -> Vec<(String, SocketAddr)> {
        let g = self.lock();
        let mut v: Vec<(String, SocketAddr)> = Vec::new();
        if let Some((r, _)) = &g.raft {
            let m = r.metrics().borrow().clone();
            if let Some(l) = m.current_leader
                && let Some(n) = m.membership_config.membership().get_node(&l)
                && let Some((name, addr)) = n.addr.split_once('@')
                && let Ok(a) = addr.parse()
            {
                v.push((name.to_owned(), a));
            }
        }
        for n in g.state.nodes.values().filter(|n| n.role == Role::Manager && n.id != self.cfg.name) {
            if !v.iter().any(|(x, _)| *x == n.id) {
                v.push((n.id.clone(), n.mgmt));
            }
        }
        if let Some(a) = g.saved.as_ref().and_then(|s| s.joined_via)
            && !v.iter().any(|(_, x)| *x == a)
        {
            v.push((CLUSTER_NAME.to_owned(), a));
        }
        v
    }

    /// Workers: the state from a manager, by long polls.
    async fn watch_loop(self: Arc<Self>) {
        loop {
            let Some(id) = self.identity() else { return };
            let since = self.lock().version;
            let mut got = false;
            for (name, addr) in self.managers() {
                let req = Request::Watch { since };
                let r =
                    tokio::time::timeout(Duration::from_secs(15), crate::transport::request(addr, &name, &id, &req))
                        .await;
                if let Ok(Ok(Response::State { version, state })) = r {
                    self.set_state(*state, version);
                    got = true;
                    break;
                }
            }
            if !got {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// A change to the state, through the leader (forwarded if this node
    /// is not it).
    pub async fn write(&self, cmd: Command) -> Result<(), String> {
        use openraft::error::{ClientWriteError, RaftError};
        if let Some(r) = self.raft() {
            // A manager that leaves the cluster leaves Raft too (on the
            // leader: the change is committed first, then the membership).
            let voter = match &cmd {
                Command::RemoveNode { id } => {
                    let g = self.lock();
                    g.state.nodes.get(id).filter(|n| n.role == Role::Manager).map(|n| raft_id(&n.id))
                }
                _ => None,
            };
            if let Some(v) = voter {
                let voters: BTreeSet<NodeId> =
                    r.metrics().borrow().membership_config.membership().voter_ids().collect();
                if voters.len() == 1 && voters.contains(&v) {
                    return Err("this is the cluster's only manager: it cannot leave".into());
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), r.client_write(cmd.clone())).await {
                Err(_) => return Err("no Raft quorum: the write did not commit within 10 s".into()),
                Ok(Ok(resp)) => {
                    resp.data.0.clone()?;
                    if let Some(v) = voter {
                        let change = openraft::ChangeMembers::RemoveVoters(BTreeSet::from([v]));
                        tokio::time::timeout(Duration::from_secs(10), r.change_membership(change, false))
                            .await
                            .map_err(|_| "the node left the state, but Raft's membership change timed out".to_owned())?
                            .map_err(|e| format!("the node left the state, but not Raft's membership: {e}"))?;
                    }
                    return Ok(());
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
                Ok(Err(e)) => return Err(e.to_string()),
            }
        }
        self.forward(Request::Write(cmd)).await
    }

    /// Sends a write-like request to the managers until one answers.
    async fn forward(&self, req: Request) -> Result<(), String> {
        let id = self.identity().ok_or("this node is not in a cluster (cluster init or cluster join first)")?;
        let mut last = "no manager known".to_owned();
        for (name, addr) in self.managers() {
            match tokio::time::timeout(Duration::from_secs(12), crate::transport::request(addr, &name, &id, &req)).await
            {
                Ok(Ok(Response::Written(r))) => return r,
                Ok(Ok(Response::Refused(why))) => last = format!("{name}: {why}"),
                Ok(Ok(_)) => last = format!("{name}: unexpected answer"),
                Ok(Err(e)) => last = format!("{name} ({addr}): {e}"),
                Err(_) => last = format!("{name} ({addr}): no answer"),
            }
        }
        Err(last)
    }

    /// The management plane's requests.
    async fn handle(self: Arc<Self>, req: Request, member: bool) -> Response {
        match req {
            Request::Join { token, name } => {
                let ca = self.lock().state.ca.clone();
                match ca {
                    Some(ca) => Response::Join(crate::transport::admit(&ca, &token, &name)),
                    None => Response::Refused("this node does not hold the cluster CA (not a manager)".into()),
                }
            }
            _ if !member => Response::Refused("this request needs a certificate of the cluster CA".into()),
            Request::Write(cmd) => Response::Written(self.write(cmd).await),
            Request::Watch { since } => {
                let mut rx = self.version_tx.subscribe();
                let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| *v > since)).await;
                let g = self.lock();
                if g.raft.is_none() {
                    return Response::Refused("not a manager".into());
                }
                Response::State { version: g.version, state: Box::new(g.state.redacted()) }
            }
            Request::AddManager { id, name, addr } => Response::Written(self.add_manager(id, name, addr).await),
            Request::Admin(a) => Response::Admin(self.admin(a).await),
            rpc => match self.raft() {
                Some(r) => crate::transport::answer(&r, rpc).await,
                None => Response::Refused("Raft is not running here".into()),
            },
        }
    }

    /// Makes a joined manager a Raft voter (here if this is the leader,
    /// else through the leader).
    async fn add_manager(&self, id: NodeId, name: String, addr: SocketAddr) -> Result<(), String> {
        let r = self.raft().ok_or("not a manager")?;
        let leader = r.metrics().borrow().current_leader;
        if leader != Some(raft_id(&self.cfg.name)) {
            return self.forward(Request::AddManager { id, name, addr }).await;
        }
        let node = crate::transport::node_addr(&name, addr);
        tokio::time::timeout(Duration::from_secs(10), r.add_learner(id, node, true))
            .await
            .map_err(|_| "the new manager did not catch up within 10 s".to_owned())?
            .map_err(io)?;
        let voters = openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        tokio::time::timeout(Duration::from_secs(10), r.change_membership(voters, false))
            .await
            .map_err(|_| "the membership change did not commit within 10 s".to_owned())?
            .map_err(io)?;
        Ok(())
    }

    fn this_node(&self, role: Role) -> Node {
        Node {
            id: self.cfg.name.clone(),
            mgmt: self.cfg.advertise,
            data_ip: self.cfg.data_ip,
            data_mac: self.cfg.data_mac,
            role,
            availability: Availability::Active,
        }
    }

    /// `cluster init`.
    async fn init(self: &Arc<Self>) -> AdminResponse {
        if self.lock().saved.is_some() {
            return Err("this node is already in a cluster".into());
        }
        let ca = ClusterCa::init().map_err(io)?;
        let identity = ca.issue(&self.cfg.name).map_err(io)?;
        let saved = Saved { identity, role: Role::Manager, joined_via: None };
        self.resume(saved.clone()).await?;
        let raft = self.raft().ok_or("Raft did not start")?;
        let me = raft_id(&self.cfg.name);
        let members =
            std::collections::BTreeMap::from([(me, crate::transport::node_addr(&self.cfg.name, self.cfg.advertise))]);
        raft.initialize(members).await.map_err(io)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while raft.metrics().borrow().current_leader != Some(me) {
            if Instant::now() > deadline {
                return Err("this node did not become the Raft leader within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.write(Command::SetCa(ca.clone())).await?;
        self.write(new_gossip_key(&ClusterState::default())).await?;
        self.write(Command::AddNode(self.this_node(Role::Manager))).await?;
        // Saved last: a node that fails half way can be initialised again
        // after its state directory is cleared.
        self.save(&saved)?;
        Ok(serde_json::json!({
            "node": self.cfg.name,
            "manager_token": ca.token(JoinRole::Manager),
            "worker_token": ca.token(JoinRole::Worker),
        }))
    }

    /// `cluster join`.
    async fn join(self: &Arc<Self>, token: &str, addr: SocketAddr) -> AdminResponse {
        if self.lock().saved.is_some() {
            return Err("this node is already in a cluster".into());
        }
        let (identity, role) = crate::transport::join(addr, CLUSTER_NAME, token, &self.cfg.name)
            .await
            .map_err(|e| format!("joining through {addr}: {e}"))?;
        let role = match role {
            JoinRole::Manager => Role::Manager,
            JoinRole::Worker => Role::Worker,
        };
        let saved = Saved { identity: identity.clone(), role, joined_via: Some(addr) };
        self.save(&saved)?;
        self.resume(saved).await?;
        if role == Role::Manager {
            let req = Request::AddManager {
                id: raft_id(&self.cfg.name),
                name: self.cfg.name.clone(),
                addr: self.cfg.advertise,
            };
            self.forward(req).await?;
        }
        self.write(Command::AddNode(self.this_node(role))).await?;
        Ok(serde_json::json!({ "node": self.cfg.name, "role": role }))
    }

    /// The admin API.
    pub async fn admin(self: &Arc<Self>, req: AdminRequest) -> AdminResponse {
        match req {
            AdminRequest::Init => self.init().await,
            AdminRequest::Join { token, addr } => self.join(&token, addr).await,
            AdminRequest::Token { role, rotate } => {
                let ca = self.lock().state.ca.clone();
                let ca = ca.ok_or("join tokens are held by managers: ask a manager")?;
                let ca = if rotate {
                    let next = ca.rotated(role);
                    self.write(Command::SetCa(next.clone())).await?;
                    next
                } else {
                    ca
                };
                Ok(serde_json::json!({ "role": role, "token": ca.token(role) }))
            }
            AdminRequest::RotateGossipKey => {
                let cmd = new_gossip_key(&self.lock().state);
                let id = match &cmd {
                    Command::RotateGossipKey { id, .. } => *id,
                    _ => 0,
                };
                self.write(cmd).await?;
                Ok(serde_json::json!({ "key_id": id }))
            }
            AdminRequest::Write { command } => {
                self.require_member()?;
                self.write(command).await.map(|()| serde_json::Value::Null)
            }
            AdminRequest::State => {
                let g = self.lock();
                Ok(serde_json::json!({ "version": g.version, "state": g.state.redacted() }))
            }
            AdminRequest::Nodes => Ok(self.nodes()),
            AdminRequest::Info => Ok(self.info()),
            AdminRequest::Tables => Ok(serde_json::to_value(&self.lock().last_tables).map_err(io)?),
            AdminRequest::Conntrack => {
                let dp = self.dp.clone();
                tokio::task::spawn_blocking(move || dp.conntrack()).await.map_err(io)
            }
            AdminRequest::Stats => {
                let dp = self.dp.stats();
                let gossip = self.lock().gossip.clone();
                Ok(serde_json::json!({ "dataplane": dp, "gossip": gossip }))
            }
        }
    }

    fn require_member(&self) -> Result<(), String> {
        match self.lock().saved {
            Some(_) => Ok(()),
            None => Err("this node is not in a cluster (cluster init or cluster join first)".into()),
        }
    }

    fn info(&self) -> serde_json::Value {
        let g = self.lock();
        let leader = g.raft.as_ref().and_then(|(r, _)| {
            let m = r.metrics().borrow().clone();
            let l = m.current_leader?;
            m.membership_config.membership().get_node(&l).map(|n| n.addr.clone())
        });
        serde_json::json!({
            "node": self.cfg.name,
            "role": g.saved.as_ref().map(|s| s.role),
            "version": g.version,
            "leader": leader,
            "tables_version": g.last_tables.as_ref().map(|t| t.version),
        })
    }

    fn nodes(&self) -> serde_json::Value {
        let g = self.lock();
        let (leader, voters) = match &g.raft {
            Some((r, _)) => {
                let m = r.metrics().borrow().clone();
                (m.current_leader, m.membership_config.membership().voter_ids().collect::<BTreeSet<_>>())
            }
            None => (None, BTreeSet::new()),
        };
        let list: Vec<serde_json::Value> = g
            .state
            .nodes
            .values()
            .map(|n| {
                let id = raft_id(&n.id);
                serde_json::json!({
                    "name": n.id,
                    "role": n.role,
                    "availability": n.availability,
                    "status": if g.down.contains(&n.id) { "down" } else { "ready" },
                    "manager_status": if Some(id) == leader { "leader" } else if voters.contains(&id) { "reachable" } else { "" },
                    "mgmt": n.mgmt,
                    "data_ip": n.data_ip,
                    "self": n.id == self.cfg.name,
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    fn serve_admin_socket(self: Arc<Self>) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.cfg.state_dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let me = self.clone();
                tokio::spawn(async move {
                    // A frame that is not a request gets an answer saying so.
                    let Ok(v) = crate::transport::read_frame::<_, serde_json::Value>(&mut s).await else { return };
                    let resp = match serde_json::from_value::<AdminRequest>(v) {
                        Ok(req) => me.admin(req).await,
                        Err(e) => Err(format!("bad admin request: {e}")),
                    };
                    let _ = crate::transport::write_frame(&mut s, &resp).await;
                });
            }
        });
        Ok(())
    }

    /// Compiles and publishes this node's tables on every change of state
    /// or liveness.
    async fn publish_loop(self: Arc<Self>) {
        let mut generation = 0u64;
        loop {
            self.changed.notified().await;
            let (state, down) = {
                let g = self.lock();
                (g.state.clone(), g.down.clone())
            };
            if !state.nodes.contains_key(&self.cfg.name) {
                continue;
            }
            generation += 1;
            let spec = match compile(&state, &self.cfg.name, &|n| !down.contains(n), generation) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("compiling this node's tables: {e}");
                    continue;
                }
            };
            let dp = self.dp.clone();
            let s2 = spec.clone();
            let tasks = local_tasks(&state, &self.cfg.name);
            match tokio::task::spawn_blocking(move || dp.publish(s2, tasks)).await {
                Ok(Ok(())) => self.lock().last_tables = Some(spec),
                Ok(Err(e)) => tracing::warn!("publishing tables: {e}"),
                Err(e) => tracing::warn!("publishing tables: {e}"),
            }
        }
    }

    /// Gossip over UDP on the management IP: membership, failure
    /// detection, sealed with the cluster's key.
    async fn gossip_loop(self: Arc<Self>) {
        // Waits until the node is in a cluster with a gossip key.
        let keys = loop {
            let k = self.lock().state.gossip_keys.clone();
            if !k.is_empty() && self.lock().state.nodes.contains_key(&self.cfg.name) {
                break k;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let addr = SocketAddr::new(self.cfg.advertise.ip(), self.cfg.gossip_port);
        let sock = match tokio::net::UdpSocket::bind(addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("gossip: binding {addr}: {e}");
                return;
            }
        };
        // The generation: later starts win over an identity declared down.
        let bump = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            & 0xffff) as u16;
        let mut ring = keyring(&keys);
        let mut key_ids: Vec<u8> = keys.iter().map(|(i, _)| *i).collect();
        let n = self.lock().state.nodes.len() as u32;
        let mut g = Gossip::new(GossipId { addr, bump }, ring.clone(), n.max(3), u64::from(bump) ^ 0x9e37);
        let mut timers: Vec<(tokio::time::Instant, foca::Timer<GossipId>)> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        let mut buf = vec![0u8; 65536];
        loop {
            let next = timers.iter().map(|(t, _)| *t).min();
            let out = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok((len, _)) => g.handle_packet(&buf[..len]),
                    Err(_) => continue,
                },
                () = sleep_until_opt(next) => {
                    let now = tokio::time::Instant::now();
                    let mut out = crate::gossip::Output::default();
                    let mut due = Vec::new();
                    timers.retain(|(t, e)| if *t <= now { due.push(e.clone()); false } else { true });
                    for e in due {
                        let o = g.handle_timer(e);
                        out.send.extend(o.send);
                        out.timers.extend(o.timers);
                        out.events.extend(o.events);
                    }
                    out
                }
                _ = tick.tick() => {
                    // New keys from the state; announce to nodes not
                    // (yet, or no longer) members.
                    let (state_keys, targets) = {
                        let inner = self.lock();
                        let members: BTreeSet<core::net::IpAddr> = g.members().iter().map(|m| m.addr.ip()).collect();
                        let t: Vec<SocketAddr> = inner.state.nodes.values()
                            .filter(|n| n.id != self.cfg.name && !members.contains(&n.mgmt.ip()))
                            .map(|n| SocketAddr::new(n.mgmt.ip(), self.cfg.gossip_port))
                            .collect();
                        (inner.state.gossip_keys.clone(), t)
                    };
                    let ids: Vec<u8> = state_keys.iter().map(|(i, _)| *i).collect();
                    if !state_keys.is_empty() && ids != key_ids {
                        ring = keyring(&state_keys);
                        *g.keys_mut() = ring.clone();
                        key_ids = ids;
                    }
                    let mut out = crate::gossip::Output::default();
                    for t in targets {
                        let o = g.announce(GossipId { addr: t, bump: 0 });
                        out.send.extend(o.send);
                        out.timers.extend(o.timers);
                        out.events.extend(o.events);
                    }
                    self.lock().gossip = Some(summary(&g));
                    out
                }
            };
            for (to, p) in out.send {
                let _ = sock.send_to(&p, to).await;
            }
            let now = tokio::time::Instant::now();
            timers.extend(out.timers.into_iter().map(|(d, t)| (now + d, t)));
            if !out.events.is_empty() {
                self.member_events(&out.events);
            }
        }
    }

    fn member_events(&self, events: &[MemberEvent]) {
        let mut changed = false;
        {
            let mut g = self.lock();
            for e in events {
                let (id, down) = match e {
                    MemberEvent::Up(id) => (id, false),
                    MemberEvent::Down(id) => (id, true),
                };
                let Some(name) = g.state.nodes.values().find(|n| n.mgmt.ip() == id.addr.ip()).map(|n| n.id.clone())
                else {
                    continue;
                };
                changed |= if down { g.down.insert(name.clone()) } else { g.down.remove(&name) };
                tracing::info!(node = %name, down, "gossip: node {name} is {}", if down { "down" } else { "up" });
            }
        }
        if changed {
            self.changed.notify_one();
        }
    }
}

fn summary(g: &Gossip) -> GossipSummary {
    GossipSummary {
        members: g.members().iter().map(|m| m.addr.to_string()).collect(),
        sent: g.stats.sent,
        received: g.stats.received,
        rejected_short: g.stats.rejected[0],
        rejected_unknown_key: g.stats.rejected[1],
        rejected_bad_tag: g.stats.rejected[2],
        rejected_undecodable: g.stats.rejected[3],
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn keyring(keys: &[(u8, [u8; 32])]) -> Keyring {
    let mut it = keys.iter().rev();
    let Some((id, key)) = it.next() else { return Keyring::new(0, &[0; 32]) };
    let mut r = Keyring::new(*id, key);
    for (id, key) in it {
        r.rotate(*id, key);
    }
    r
}

fn new_gossip_key(state: &ClusterState) -> Command {
    let id = state.gossip_keys.first().map_or(1, |(i, _)| i.wrapping_add(1));
    let mut key = [0u8; 32];
    rand::fill(&mut key);
    Command::RotateGossipKey { id, key }
}
