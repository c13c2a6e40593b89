//! Becoming a member: `cluster init` (a new CA, this node the first
//! manager), `cluster join` (an identity from a manager, then Raft or the
//! state watch), and a joined manager made a Raft voter.

use super::forward::change_voters;
use super::gossip_loop::new_gossip_key;
use super::{AdminResponse, ApiError, Control, Saved, raft_id};
use crate::pki::{CLUSTER_NAME, ClusterCa, JoinRole};
use crate::raft::{NodeId, node_addr};
use crate::rpc::Request;
use crate::state::{ClusterState, Command, Role};
use core::net::SocketAddr;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Control {
    /// `cluster init`.
    pub(super) async fn init(self: &Arc<Self>) -> AdminResponse {
        if self.lock().saved.is_some() {
            return Err(ApiError::AlreadyInCluster);
        }
        let ca = ClusterCa::init()?;
        let identity = ca.issue(&self.cfg.name)?;
        let saved = Saved { identity, role: Role::Manager, joined_via: None };
        self.resume(saved.clone()).await?;
        let raft = self.raft().ok_or(ApiError::RaftNotRunning)?;
        let me = raft_id(&self.cfg.name);
        let members = std::collections::BTreeMap::from([(me, node_addr(&self.cfg.name, self.cfg.advertise))]);
        raft.initialize(members).await.map_err(|e| ApiError::Initialize(Box::new(e)))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while raft.metrics().borrow().current_leader != Some(me) {
            if Instant::now() > deadline {
                return Err(ApiError::NotLeaderInTime);
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
    pub(super) async fn join(self: &Arc<Self>, token: &str, addr: SocketAddr) -> AdminResponse {
        if self.lock().saved.is_some() {
            return Err(ApiError::AlreadyInCluster);
        }
        let (identity, role) = crate::tls::join(addr, CLUSTER_NAME, token, &self.cfg.name)
            .await
            .map_err(|e| ApiError::Join { addr, detail: e.to_string() })?;
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

    /// Makes a joined manager a Raft voter (here if this is the leader,
    /// else through the leader).
    pub(super) async fn add_manager(&self, id: NodeId, name: String, addr: SocketAddr) -> Result<(), ApiError> {
        let r = self.raft().ok_or(ApiError::NotAManager)?;
        let leader = r.metrics().borrow().current_leader;
        if leader != Some(raft_id(&self.cfg.name)) {
            return self.forward(Request::AddManager { id, name, addr }).await;
        }
        let node = node_addr(&name, addr);
        tokio::time::timeout(Duration::from_secs(10), r.add_learner(id, node, true))
            .await
            .map_err(|_| ApiError::CatchUpTimedOut)?
            .map_err(|e| ApiError::Membership(Box::new(e)))?;
        let voters = openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        change_voters(&r, voters, ApiError::MembershipTimedOut, ApiError::Membership).await
    }
}
