//! CNI requests (`AdminRequest::Cni`, on the admin socket only): a
//! container runtime's plugin (`meshplane-cni`) asks its node to attach a
//! container's namespace as a task, to detach it, to check it, to forget
//! the containers the runtime no longer has (GC), and whether an ADD
//! could succeed now (STATUS). `docs/cni-design.md` section 5.
//!
//! ADD checks the namespace before anything is written, writes
//! `AttachTask` with the container (`ContainerRef`, which `apply` keeps
//! unique per node and attachment), waits until this node's dataplane has
//! made the port, and answers with what the runtime's result needs; a
//! failure after the write detaches the task again. DEL never fails for
//! a container the node does not know, and a DEL that cannot commit now
//! (no quorum) is spooled to the state directory and retried by the
//! node's reaper. Failures are the plugin's [`Failure`]s: the codes the
//! runtime sees.

use super::{ApiError, Control, local_tasks};
use crate::state::{ClusterState, CniAttachment, Command, ContainerRef, Kind, StateError, Task, TaskNetns};
use meshplane_cni::failure::Failure;
use meshplane_cni::proto::{AddReq, CheckReq, CniAnswer, CniRequest, GcReq, Key, StatusReq};
use meshplane_cni::result::Attached;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

/// How long DEL waits for the port of the detached task to go.
const DEL_WAIT: Duration = Duration::from_secs(5);

/// At most this many ADDs a node works on at once. Each holds a blocking
/// thread while it looks into the namespace and waits for its port; one
/// past the cap waits for a slot until its own deadline, then answers
/// "try again later" (11) with nothing written. A runtime starting
/// hundreds of containers at once (a node rebooting under kubelet) is
/// served 32 at a time, not with hundreds of threads.
pub const MAX_CNI_ADDS: usize = 32;

/// The node's CNI counters (admin `stats`, under `cni`).
#[derive(Debug, Default)]
pub struct CniCounters {
    adds: AtomicU64,
    add_failures: AtomicU64,
    dels: AtomicU64,
    gcs: AtomicU64,
    reaped: AtomicU64,
    spooled: AtomicU64,
    adds_waited_out: AtomicU64,
}

impl CniCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> crate::rpc::CniStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::rpc::CniStats {
            adds: g(&self.adds),
            add_failures: g(&self.add_failures),
            dels: g(&self.dels),
            gcs: g(&self.gcs),
            reaped: g(&self.reaped),
            spooled: g(&self.spooled),
            adds_waited_out: g(&self.adds_waited_out),
        }
    }
}

/// The task of node `me` that is attachment `key`, if any.
pub fn find_key<'a>(state: &'a ClusterState, me: &str, key: &Key) -> Option<&'a Task> {
    state.tasks.values().find(|t| {
        t.node == me
            && t.container.as_ref().is_some_and(|c| {
                c.id == key.container_id
                    && c.cni.as_ref().is_some_and(|a| a.network == key.network && a.ifname == key.ifname)
            })
    })
}

/// What a refused state change means to the runtime.
fn state_failure(e: StateError) -> Failure {
    match e {
        StateError::Unknown { kind: Kind::Service, name } => Failure::UnknownService(name),
        StateError::SubnetExhausted(network) => Failure::NetworkFull(network),
        StateError::BadNetns(netns) => {
            Failure::Netns { netns, why: "not a path meshplane takes for a namespace".into() }
        }
        other => Failure::Refused(other.to_string()),
    }
}

/// What a failed write means to the runtime: the state's refusal, or
/// "try again later" (code 11).
fn api_failure(e: ApiError) -> Failure {
    match e {
        ApiError::State(s) => state_failure(s),
        ApiError::Cni(f) => f,
        ApiError::NoQuorum => {
            Failure::Later("no Raft quorum: the write did not commit in 10 s (meshplane node ls on a manager)".into())
        }
        ApiError::NotInCluster => Failure::Refused(ApiError::NotInCluster.to_string()),
        other => Failure::Later(other.to_string()),
    }
}

impl Control {
    /// A CNI request, answered with a [`CniAnswer`] or `ApiError::Cni`.
    pub async fn cni(self: &Arc<Self>, r: CniRequest) -> Result<serde_json::Value, ApiError> {
        let answer = match r {
            CniRequest::Add(a) => {
                self.cni_counters.adds.fetch_add(1, Ordering::Relaxed);
                let r = self.cni_add(a).await.map(CniAnswer::Added);
                if r.is_err() {
                    self.cni_counters.add_failures.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
            CniRequest::Del(k) => {
                self.cni_counters.dels.fetch_add(1, Ordering::Relaxed);
                self.cni_del(&k).await.map(|()| CniAnswer::Done)
            }
            CniRequest::Check(c) => self.cni_check(c).await.map(|()| CniAnswer::Done),
            CniRequest::Gc(g) => {
                self.cni_counters.gcs.fetch_add(1, Ordering::Relaxed);
                self.cni_gc(g).await.map(CniAnswer::Removed)
            }
            CniRequest::Status(s) => self.cni_status(&s).map(|()| CniAnswer::Done),
        };
        let answer = answer.map_err(ApiError::Cni)?;
        serde_json::to_value(answer).map_err(|e| ApiError::Cni(Failure::Io(e.to_string())))
    }

    /// The CNI counters.
    pub fn cni_stats(&self) -> crate::rpc::CniStats {
        self.cni_counters.snapshot()
    }

    /// Counts a task detached because its container's namespace went.
    pub fn count_reaped(&self) {
        self.cni_counters.reaped.fetch_add(1, Ordering::Relaxed);
    }

    /// This node's admin socket, beside which the plugin and the node
    /// spool the DELs that could not be done (`meshplane_cni::spool`).
    pub fn admin_socket(&self) -> PathBuf {
        self.cfg.state_dir.join("admin.sock")
    }

    /// CNI needs the node in a cluster.
    fn cni_member(&self) -> Result<(), Failure> {
        if self.lock().saved.is_none() {
            return Err(Failure::Refused("this node is in no cluster (cluster init or join first)".into()));
        }
        Ok(())
    }

    async fn cni_add(self: &Arc<Self>, a: AddReq) -> Result<Attached, Failure> {
        self.cni_member()?;
        let me = self.cfg.name.clone();
        let deadline = Instant::now() + Duration::from_secs(a.timeout_secs.clamp(1, 120));
        let slot = self.cni_add_slot(deadline).await?;
        let netns =
            TaskNetns::parse(&a.netns).map_err(|e| Failure::Netns { netns: a.netns.clone(), why: e.to_string() })?;
        let mut cref = ContainerRef {
            id: a.key.container_id.clone(),
            cni: Some(CniAttachment { network: a.key.network.clone(), ifname: a.key.ifname.clone() }),
            netns_ino: None,
            name: a.name.clone(),
        };
        cref.check().map_err(state_failure)?;
        // A DEL of this attachment spooled before this ADD is done with:
        // the reaper must not detach what this ADD attaches.
        let spool = self.cni_spool.lock().await;
        match meshplane_cni::spool::remove(&self.admin_socket(), &a.key) {
            Ok(true) => tracing::info!("cni add {}: the DEL spooled before it dropped", a.key),
            Ok(false) => {}
            Err(e) => tracing::warn!("cni add {}: dropping its spooled DEL: {e}", a.key),
        }
        drop(spool);
        // The same attachment again: the same task if it is in the same
        // namespace (nothing written); a reused container id in another
        // namespace replaces it.
        let existing = self.state().0.container_task(&me, &cref).cloned();
        if let Some(t) = existing {
            if t.netns.as_deref() == Some(netns.to_string().as_str()) {
                tracing::info!("cni add {}: already task {}", a.key, t.id);
                return self.attached(&t.id, deadline, slot).await;
            }
            tracing::warn!("cni add {}: task {} is in {:?}; replaced by one in {netns}", a.key, t.id, t.netns);
            self.write(Command::DetachTask { id: t.id.clone() }).await.map_err(api_failure)?;
            self.port_gone(&t).await;
        }
        let dp = self.dp.clone();
        let (path, ifname) = (netns.path(), a.key.ifname.clone());
        let ino = tokio::task::spawn_blocking(move || dp.netns_check(&path, &ifname))
            .await
            .map_err(|e| Failure::Io(e.to_string()))??;
        cref.netns_ino = (ino != 0).then_some(ino);
        let id = self.attach_container(&a, &netns, cref, deadline).await?;
        tracing::info!("cni add {}: task {id} in {netns}", a.key);
        match self.attached(&id, deadline, slot).await {
            Ok(x) => Ok(x),
            Err(f) => {
                // Nothing left behind: the task goes again.
                match self.write(Command::DetachTask { id: id.clone() }).await {
                    Ok(()) | Err(ApiError::State(StateError::Unknown { .. })) => Err(f),
                    // Gone already (a worker's refusal does not say so:
                    // the manager cannot check a task it no longer has).
                    Err(_) if !self.state().0.tasks.contains_key(&id) => Err(f),
                    Err(e) => Err(Failure::Later(format!(
                        "{f}; detaching task {id} failed too ({e}): the runtime's DEL or the node's reaper removes it"
                    ))),
                }
            }
        }
    }

    /// Writes the container's task (`SERVICE.N`, the lowest N free; an id
    /// taken meanwhile is skipped), each write checked on a copy of the
    /// state first so that a refusal has its own code. A racing ADD of
    /// the same attachment that won: its task.
    ///
    /// This node's ADDs choose and write their ids one at a time, each
    /// until its task is in this node's state: ADDs racing on one node
    /// (a runtime starting many containers at once) would otherwise all
    /// choose the same lowest id, and all but one lose each round.
    async fn attach_container(
        &self,
        a: &AddReq,
        netns: &TaskNetns,
        cref: ContainerRef,
        deadline: Instant,
    ) -> Result<String, Failure> {
        let me = self.cfg.name.clone();
        let mut tried = std::collections::BTreeSet::new();
        let wait = deadline.saturating_duration_since(Instant::now());
        let Ok(_ids) = tokio::time::timeout(wait, self.cni_ids.lock()).await else {
            return Err(Failure::Later(
                "other ADDs on this node were writing their tasks until this one's timeout (is the Raft quorum slow \
                 or gone?); nothing was written, try again"
                    .into(),
            ));
        };
        for _ in 0..8 {
            let mut st = self.state().0;
            let id = (1..)
                .map(|n| format!("{}.{n}", a.service))
                .find(|i| !st.tasks.contains_key(i) && !tried.contains(i))
                .unwrap_or_default();
            let cmd = Command::AttachTask {
                id: id.clone(),
                service: a.service.clone(),
                node: me.clone(),
                weight: a.weight,
                netns: Some(netns.to_string()),
                container: Some(cref.clone()),
            };
            if let Err(e) = st.apply(&cmd) {
                return match e {
                    StateError::ContainerAttached { task, .. } => Ok(task),
                    other => Err(state_failure(other)),
                };
            }
            match self.write(cmd).await {
                Ok(()) => {
                    while !self.lock().state.tasks.contains_key(&id) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    return Ok(id);
                }
                Err(ApiError::State(StateError::Exists { kind: Kind::Task, .. })) => {
                    tried.insert(id);
                }
                Err(ApiError::State(StateError::ContainerAttached { task, .. })) => return Ok(task),
                Err(e) => return Err(api_failure(e)),
            }
        }
        Err(Failure::Later(format!("no free task id for service {} after 8 tries", a.service)))
    }

    /// One of the [`MAX_CNI_ADDS`] slots, waited for until `deadline`.
    async fn cni_add_slot(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Failure> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.cni_adds.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(Failure::Later("the node is stopping".into())),
            Err(_) => {
                self.cni_counters.adds_waited_out.fetch_add(1, Ordering::Relaxed);
                Err(Failure::Later(format!(
                    "{MAX_CNI_ADDS} CNI ADDs are in progress on this node and none finished within this one's \
                     timeout; nothing was written, try again"
                )))
            }
        }
    }

    /// Waits until this node's state has task `id` and its port is made;
    /// what the runtime's result says of it. `slot` is held until the
    /// dataplane's wait returns, also when the ADD has given up on it.
    async fn attached(&self, id: &str, deadline: Instant, slot: OwnedSemaphorePermit) -> Result<Attached, Failure> {
        let me = self.cfg.name.clone();
        let local = loop {
            let st = self.state().0;
            if let Some(t) = local_tasks(&st, &me).into_iter().find(|t| t.id == id) {
                break t;
            }
            if Instant::now() >= deadline {
                return Err(Failure::Later(format!("task {id} did not reach this node's state in time")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let dp = self.dp.clone();
        let tid = id.to_owned();
        // The dataplane keeps to the deadline; a second past it, the ADD
        // answers whatever the dataplane is doing.
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let port = tokio::time::timeout(
            wait,
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                dp.task_port(&tid, deadline)
            }),
        )
        .await
        .map_err(|_| Failure::Later(format!("task {id}'s port was not made in time (see the node's log)")))?
        .map_err(|e| Failure::Io(e.to_string()))??;
        Ok(Attached {
            host_iface: port.host_iface,
            ifname: local.ifname().unwrap_or("eth0").to_owned(),
            mac: local.mac.to_string(),
            mtu: local.mtu,
            ip: (local.ip, local.prefix),
            gateway: local.gateway,
            dns: port.dns_search,
        })
    }

    /// Waits (at most [`DEL_WAIT`]) until detached task `t` is gone from
    /// this node's state, then until its port is gone. A worker's state
    /// follows the leader's a round trip after the write: without the
    /// first wait, a request right after (the ADD that replaces it) still
    /// finds the task, and a port that was never made has nothing to
    /// wait for.
    async fn port_gone(&self, t: &Task) {
        let until = Instant::now() + DEL_WAIT;
        let here = || {
            let g = self.lock();
            g.state.tasks.get(&t.id).is_some_and(|x| x.container == t.container && x.ip == t.ip)
        };
        while here() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dp = self.dp.clone();
        let id = t.id.clone();
        let _ = tokio::task::spawn_blocking(move || dp.task_port_gone(&id, until)).await;
    }

    /// The lock a spooled DEL is done under (see `cni_spool`).
    pub async fn cni_spool_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.cni_spool.lock().await
    }

    /// DEL: the attachment's task detached, if there is one. A detach
    /// that cannot commit now is spooled and retried by the reaper.
    pub async fn cni_del(&self, key: &Key) -> Result<(), Failure> {
        if self.lock().saved.is_none() {
            return Ok(()); // in no cluster: nothing to delete
        }
        let Some(t) = find_key(&self.state().0, &self.cfg.name, key).cloned() else {
            tracing::info!("cni del {key}: no task (done)");
            return Ok(());
        };
        match self.write(Command::DetachTask { id: t.id.clone() }).await {
            Ok(()) | Err(ApiError::State(StateError::Unknown { .. })) => {
                tracing::info!("cni del {key}: task {} detached", t.id);
                self.port_gone(&t).await;
                Ok(())
            }
            Err(ApiError::State(e)) => Err(state_failure(e)),
            Err(e) => {
                tracing::warn!("cni del {key}: detaching task {} failed ({e}); spooled, retried", t.id);
                self.spool(key);
                Ok(())
            }
        }
    }

    /// Spools DEL `key` for the reaper (as the plugin does when the node
    /// is down).
    fn spool(&self, key: &Key) {
        match meshplane_cni::spool::write(&self.admin_socket(), key) {
            Ok(_) => {
                self.cni_counters.spooled.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("cni del {key}: spooling it beside {}: {e}", self.admin_socket().display()),
        }
    }

    /// CHECK: the task exists, has the previous result's address, and its
    /// interface in the namespace is as the task says.
    async fn cni_check(&self, c: CheckReq) -> Result<(), Failure> {
        self.cni_member()?;
        let me = self.cfg.name.clone();
        let st = self.state().0;
        let t = find_key(&st, &me, &c.key).ok_or_else(|| Failure::NoTask(format!("{} on {me}", c.key)))?;
        if let Some((ip, _)) = c.ip
            && ip != t.ip
        {
            return Err(Failure::Mismatch(format!(
                "the previous result's address {ip} is not task {}'s ({})",
                t.id, t.ip
            )));
        }
        let local = local_tasks(&st, &me)
            .into_iter()
            .find(|l| l.id == t.id)
            .ok_or_else(|| Failure::NoTask(format!("{} on {me}", c.key)))?;
        let dp = self.dp.clone();
        tokio::task::spawn_blocking(move || dp.verify_port(&local)).await.map_err(|e| Failure::Io(e.to_string()))?
    }

    /// GC: this node's tasks of the CNI network whose attachment the
    /// runtime no longer has are detached; their ids.
    async fn cni_gc(&self, g: GcReq) -> Result<Vec<String>, Failure> {
        self.cni_member()?;
        let me = self.cfg.name.clone();
        let stale: Vec<Task> = self
            .state()
            .0
            .tasks
            .values()
            .filter(|t| t.node == me)
            .filter(|t| {
                t.container.as_ref().and_then(|c| c.cni.as_ref().map(|a| (c, a))).is_some_and(|(c, a)| {
                    a.network == g.network && !g.valid.iter().any(|(id, ifname)| *id == c.id && *ifname == a.ifname)
                })
            })
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for t in stale {
            match self.write(Command::DetachTask { id: t.id.clone() }).await {
                Ok(()) => {
                    tracing::info!("cni gc {}: task {} detached (its container is gone)", g.network, t.id);
                    removed.push(t);
                }
                Err(ApiError::State(StateError::Unknown { .. })) => {}
                Err(e) => return Err(api_failure(e)),
            }
        }
        for t in &removed {
            self.port_gone(t).await;
        }
        Ok(removed.into_iter().map(|t| t.id).collect())
    }

    /// STATUS: the node is in a cluster, the service exists and its
    /// network has a free address.
    fn cni_status(&self, s: &StatusReq) -> Result<(), Failure> {
        self.cni_member()?;
        let Some(service) = &s.service else { return Ok(()) };
        let st = self.state().0;
        let sv = st.services.get(service).ok_or_else(|| Failure::UnknownService(service.clone()))?;
        st.allocate_ip(&sv.network).map(|_| ()).map_err(state_failure)
    }
}
