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
//!
//! The top of the crate: here the management plane's requests are served
//! ([`Control::start`], `handle`), the admin API in [`admin`], joins in
//! [`join`], writes and watches through the managers in [`forward`],
//! gossip in [`gossip_loop`]. Its errors are the admin API's
//! ([`ApiError`], defined with the messages in `rpc`).

pub mod admin;
pub mod cni;
pub mod forward;
pub mod gossip_loop;
pub mod join;
pub mod renew;

pub use crate::rpc::{AdminRequest, AdminResponse, ApiError};
pub use crate::{GOSSIP_PORT, MANAGEMENT_PORT as MGMT_PORT};
pub use admin::admin_call;

use crate::authz::authorize;
use crate::compile::{compile, zone};
use crate::pki::{NodeIdentity, Peer};
use crate::raft::{NodeId, Raft, StateMachine, answer_if_running};
use crate::rpc::{GossipStats, Refusal, Request, Response};
use crate::state::{Availability, ClusterState, Node, Role};
use crate::tls::{Creds, Handler, Server, TlsNetwork, serve_with};
use core::net::{Ipv4Addr, SocketAddr};
use meshplane_cni::failure::Failure;
use meshplane_dataplane::report::{ConntrackEntry, NodeStats};
use meshplane_dataplane::tables::TablesSpec;
use meshplane_dataplane::wire::MacAddr;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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
    /// MTU of the data-path NIC (the underlay), recorded in the node's
    /// state entry when it joins.
    pub underlay_mtu: u16,
    /// Gossip UDP port.
    pub gossip_port: u16,
    /// State directory.
    pub state_dir: PathBuf,
    /// Raft snapshot every this many entries.
    pub snapshot_every: u64,
    /// How often the node checks whether its certificate needs renewing
    /// (half its validity gone, or its role changed).
    pub renew_check: Duration,
    /// How often the Raft leader rotates the gossip key
    /// ([`gossip_loop::GOSSIP_KEY_INTERVAL`], 12 hours, unless a test
    /// wants it sooner); the previous key is retired after a grace period
    /// ([`gossip_loop::key_grace`]).
    pub gossip_key_interval: Duration,
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
    /// The container the task is (its interface name, its namespace's
    /// inode), if it is one.
    pub container: Option<crate::state::ContainerRef>,
}

impl LocalTask {
    /// The interface name the container asked for (CNI's `CNI_IFNAME`).
    pub fn ifname(&self) -> Option<&str> {
        self.container.as_ref()?.cni.as_ref().map(|c| c.ifname.as_str())
    }
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
                container: t.container.clone(),
            })
        })
        .collect()
}

/// Why the dataplane could not take new tables: its own error (it is only
/// logged; the next change tries again).
pub type PublishError = Box<dyn std::error::Error + Send + Sync>;

/// What the control thread needs of the dataplane.
pub trait Dataplane: Send + Sync + 'static {
    /// New tables for this node (compiled from the state and liveness),
    /// with the node's tasks (whose ports the dataplane makes). Called
    /// from a blocking context; an error is logged and the next change
    /// tries again.
    fn publish(&self, spec: TablesSpec, tasks: Vec<LocalTask>) -> Result<(), PublishError>;
    /// The names this node serves (its tasks' networks), compiled from the
    /// same state as the tables published right after: handed to the
    /// embedded DNS server (a quick hand-over; called from the control
    /// thread). Test doubles keep the default, which drops them.
    fn names(&self, _zone: meshplane_dns::zone::Zone) {}
    /// The dataplane's counters (admin `stats`, under `dataplane`).
    fn stats(&self) -> NodeStats;
    /// The dataplane's tracked connections (admin `conntrack`).
    fn conntrack(&self) -> Vec<ConntrackEntry> {
        Vec::new()
    }
    /// The node's health checker's counters (admin `stats`, under
    /// `health`), if it runs one.
    fn health(&self) -> Option<crate::rpc::HealthStats> {
        None
    }
    /// CNI ADD: checks the namespace a container's task is about to be
    /// attached in (it exists, is a network namespace, is neither the
    /// node's nor the host's, has no interface `ifname`); its inode.
    /// Called from a blocking context.
    fn netns_check(&self, _netns: &str, _ifname: &str) -> Result<u64, Failure> {
        Ok(0)
    }
    /// CNI ADD: waits (until `until`) for the publication naming task `id`
    /// to have made its port, or failed to. Called from a blocking context.
    fn task_port(&self, _id: &str, _until: Instant) -> Result<PortInfo, Failure> {
        Ok(PortInfo::default())
    }
    /// CNI DEL: waits (until `until`) for the port of a gone task to be
    /// removed. Called from a blocking context.
    fn task_port_gone(&self, _id: &str, _until: Instant) {}
    /// CNI CHECK: the task's interface in its namespace is as the task
    /// says (up, its MAC, its address). Called from a blocking context.
    fn verify_port(&self, _t: &LocalTask) -> Result<(), Failure> {
        Ok(())
    }
}

/// What the dataplane made for a task (a CNI ADD's result reports it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// The host end of its port (AF_XDP's veth; a TAP is in the task).
    pub host_iface: Option<String>,
    /// The search domains, if the node serves DNS for the task's network.
    pub dns_search: Option<Vec<String>>,
}

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
    gossip: Option<GossipStats>,
    /// The node's TLS credentials (renewed in place).
    creds: Option<Arc<Creds>>,
    _server: Option<Server>,
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
    /// CNI requests served.
    cni_counters: cni::CniCounters,
    /// Held while a spooled DEL is done (the reaper) or dropped (an ADD of
    /// its attachment): a DEL read before an ADD cannot detach the task the
    /// ADD attaches.
    cni_spool: tokio::sync::Mutex<()>,
    /// The slots of the ADDs in progress (`cni::MAX_CNI_ADDS`).
    cni_adds: Arc<tokio::sync::Semaphore>,
    /// Held while an ADD chooses and writes its task id.
    cni_ids: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("name", &self.cfg.name).finish()
    }
}

fn node_file(e: impl std::fmt::Display) -> ApiError {
    ApiError::NodeFile(e.to_string())
}

impl Control {
    /// Starts the control plane of the node `cfg` on the current tokio
    /// runtime: the admin socket at once; Raft or the state watch, the
    /// TLS server and gossip if the node is in a cluster already (its
    /// state directory says so), else after `init` or `join`.
    pub async fn start(cfg: Config, dp: Arc<dyn Dataplane>) -> Result<Arc<Control>, ApiError> {
        private_dir(&cfg.state_dir)?;
        check_private(&cfg.state_dir.join("node.json"))?;
        // The Raft log holds the CA key and the join secrets.
        check_private(&cfg.state_dir.join("raft").join("raft.redb"))?;
        let saved: Option<Saved> = match std::fs::read(cfg.state_dir.join("node.json")) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(node_file)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(node_file(e)),
        };
        if let Some(s) = &saved
            && s.identity.name != cfg.name
        {
            return Err(ApiError::NotThisNode { owner: s.identity.name.clone(), name: cfg.name });
        }
        let (version_tx, _) = tokio::sync::watch::channel(0);
        let c = Arc::new(Control {
            cfg,
            dp,
            inner: Mutex::new(Inner::default()),
            changed: tokio::sync::Notify::new(),
            version_tx,
            cni_counters: cni::CniCounters::default(),
            cni_spool: tokio::sync::Mutex::new(()),
            cni_adds: Arc::new(tokio::sync::Semaphore::new(cni::MAX_CNI_ADDS)),
            cni_ids: tokio::sync::Mutex::new(()),
        });
        c.clone().serve_admin_socket()?;
        tokio::spawn(c.clone().publish_loop());
        tokio::spawn(c.clone().gossip_loop());
        tokio::spawn(c.clone().renew_loop());
        tokio::spawn(c.clone().voters_loop());
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

    /// How many voters this node's Raft membership has (every config of a
    /// joint one counted): 0 on a node without Raft (diagnostics, tests).
    pub fn raft_voter_count(&self) -> usize {
        self.raft().map_or(0, |r| r.metrics().borrow().membership_config.membership().voter_ids().count())
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

    fn save(&self, s: &Saved) -> Result<(), ApiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.cfg.state_dir.join("node.json");
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(s).map_err(node_file)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(node_file)?;
        f.write_all(&body).and_then(|()| f.sync_all()).map_err(node_file)?;
        std::fs::rename(&tmp, &path).map_err(node_file)
    }

    /// Runs what a member runs: Raft (managers) or the state watch
    /// (workers), and the TLS server.
    fn resume(
        self: &Arc<Self>,
        s: Saved,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApiError>> + Send + '_>> {
        Box::pin(self.resume_inner(s))
    }

    async fn resume_inner(self: &Arc<Self>, s: Saved) -> Result<(), ApiError> {
        let creds = Creds::new(&s.identity).map_err(|e| ApiError::Tls(e.to_string()))?;
        {
            let mut g = self.lock();
            g.saved = Some(s.clone());
            g.creds = Some(creds.clone());
        }
        if s.role == Role::Manager {
            self.start_raft(creds.clone()).await?;
        } else {
            tokio::spawn(self.clone().watch_loop());
        }
        let addr = self.cfg.advertise;
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| ApiError::Listen { addr, detail: e.to_string() })?;
        let me = self.clone();
        let handler: Handler = Arc::new(move |req, peer| {
            let me = me.clone();
            Box::pin(async move { me.handle(req, peer).await })
        });
        let server = serve_with(listener, creds, handler).map_err(|e| ApiError::Tls(e.to_string()))?;
        self.lock()._server = Some(server);
        tokio::spawn(self.clone().say_if_entry_differs());
        Ok(())
    }

    /// A node started again with other addresses or another underlay MTU
    /// than its entry in the state has: said in the log, once the node has
    /// its entry (within a minute). The entry is the one joined with, and
    /// what every node's tables use; it is not rewritten from here (a
    /// rewrite could undo an operator's change made meanwhile, or bring
    /// back a node removed meanwhile): remove the node and join it again.
    async fn say_if_entry_differs(self: Arc<Self>) {
        for _ in 0..60 {
            let current = self.lock().state.nodes.get(&self.cfg.name).cloned();
            if let Some(c) = current {
                let now = (self.cfg.advertise, self.cfg.data_ip, self.cfg.data_mac, self.cfg.underlay_mtu);
                if now != (c.mgmt, c.data_ip, c.data_mac, c.underlay_mtu) {
                    tracing::warn!(
                        "this node started with management {}, data {} ({}), underlay MTU {}, but the cluster has it as {}, {} ({}), {}: the cluster's are used; to change them, remove the node and join it again",
                        now.0,
                        now.1,
                        now.2,
                        now.3,
                        c.mgmt,
                        c.data_ip,
                        c.data_mac,
                        c.underlay_mtu
                    );
                }
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Starts Raft on this node (a manager) from its directory.
    async fn start_raft(self: &Arc<Self>, creds: Arc<Creds>) -> Result<(), ApiError> {
        let dir = self.cfg.state_dir.join("raft");
        let net = TlsNetwork::with_creds(creds);
        let (raft, sm) = crate::raft::start_with(raft_id(&self.cfg.name), &dir, net, self.cfg.snapshot_every)
            .await
            .map_err(|e| ApiError::RaftStart(e.to_string()))?;
        self.lock().raft = Some((raft.clone(), sm.clone()));
        tokio::spawn(self.clone().follow_raft(raft, sm));
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

    /// The management plane's requests, each authorized first
    /// ([`authorize`]: by the client's certificate and the state).
    async fn handle(self: Arc<Self>, req: Request, peer: Option<Peer>) -> Response {
        let allowed = authorize(&req, peer.as_ref(), &self.lock().state);
        if let Err(why) = allowed {
            tracing::info!(peer = ?peer.as_ref().map(|p| &p.name), "management plane: refused: {why}");
            return Response::Refused(why);
        }
        match req {
            Request::Join { token, name, csr, node } => Response::Join(self.admit(&token, &name, &csr, node).await),
            Request::Renew { csr } => Response::Renewed(self.renew_for(peer.as_ref(), &csr)),
            Request::Write(cmd) => Response::Written(self.write(cmd).await),
            Request::Watch { since } => {
                let mut rx = self.version_tx.subscribe();
                let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| *v > since)).await;
                let g = self.lock();
                if g.raft.is_none() {
                    return Response::Refused(Refusal::NotAManager);
                }
                Response::State { version: g.version, state: Box::new(g.state.redacted()) }
            }
            Request::AddManager { id, name, addr } => Response::Written(self.add_manager(id, name, addr).await),
            // A CNI request names a namespace on the node it is made on.
            Request::Admin(AdminRequest::Cni { .. }) => {
                Response::Admin(Err(ApiError::Cni(meshplane_cni::failure::Failure::Refused(
                    "CNI requests are served on the node's admin socket only".into(),
                ))))
            }
            Request::Admin(a) => Response::Admin(self.admin(a).await),
            rpc => answer_if_running(self.raft(), rpc).await,
        }
    }

    fn this_node(&self, role: Role) -> Node {
        Node {
            id: self.cfg.name.clone(),
            mgmt: self.cfg.advertise,
            data_ip: self.cfg.data_ip,
            data_mac: self.cfg.data_mac,
            role,
            availability: Availability::Active,
            key_id: self.identity().and_then(|i| i.peer().ok()).map(|p| p.key_id),
            underlay_mtu: self.cfg.underlay_mtu,
        }
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
            // The names first, from the same snapshot: a new task's name
            // exists before its port does.
            self.dp.names(zone(&state, &self.cfg.name, &|n| !down.contains(n)));
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
}

/// Makes `dir` (the state directory) if it is missing, private to its
/// owner (0700); tightens an existing one that others can read.
fn private_dir(dir: &std::path::Path) -> Result<(), ApiError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |e: std::io::Error| ApiError::StateDir { path: dir.to_owned(), detail: e.to_string() };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!("{}: mode {:o} lets others in: set to 0700", dir.display(), mode & 0o777);
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Refuses a secret file (a node's key, the Raft log with the CA key)
/// that others can read: whoever could read it may hold the node's
/// identity, or the cluster's.
fn check_private(path: &std::path::Path) -> Result<(), ApiError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            Err(ApiError::SecretReadable { path: path.to_owned(), mode: m.permissions().mode() & 0o777 })
        }
        _ => Ok(()),
    }
}
