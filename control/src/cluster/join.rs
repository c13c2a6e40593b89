//! Becoming a member: `cluster init` (a new CA, this node the first
//! manager), `cluster join` (an identity from a manager, then Raft or the
//! state watch), and a joined manager made a Raft voter.

use super::forward::change_voters;
use super::gossip_loop::new_gossip_key;
use super::{AdminResponse, ApiError, Control, Saved, raft_id};
use crate::pki::{CLUSTER_NAME, ClusterCa, JoinRole, PkiError, csr_key_id, valid_name};
use crate::raft::{NodeId, node_addr};
use crate::rpc::{Issued, Request};
use crate::state::{Availability, ClusterState, Command, Kind, Node, Role, StateError};
use core::net::SocketAddr;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Control {
    /// `cluster init` (certificates valid for `cert_expiry`, or 90 days;
    /// VXLAN on `data_path_port`, or 4789).
    pub(super) async fn init(
        self: &Arc<Self>,
        cert_expiry: Option<Duration>,
        data_path_port: Option<u16>,
    ) -> AdminResponse {
        if self.lock().saved.is_some() {
            return Err(ApiError::AlreadyInCluster);
        }
        // Checked before anything is made (a refused init leaves nothing).
        let port = data_path_port.unwrap_or(crate::state::DEFAULT_DATA_PATH_PORT);
        if !crate::state::valid_data_path_port(port) {
            return Err(StateError::BadDataPathPort(port).into());
        }
        ClusterState::default().admit(&Command::SetDataPathPort { port })?;
        let mut ca = ClusterCa::init()?;
        if let Some(d) = cert_expiry {
            ca = ca.with_cert_expiry(d);
        }
        let identity = ca.issue(&self.cfg.name, JoinRole::Manager)?;
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
        self.write(Command::SetDataPathPort { port }).await?;
        self.write(Command::AddNode(self.this_node(Role::Manager))).await?;
        // Saved last: a node that fails half way can be initialised again
        // after its state directory is cleared.
        self.save(&saved)?;
        Ok(serde_json::json!({
            "node": self.cfg.name,
            "data_path_port": port,
            "manager_token": ca.token(JoinRole::Manager),
            "worker_token": ca.token(JoinRole::Worker),
        }))
    }

    /// `cluster join`.
    pub(super) async fn join(self: &Arc<Self>, token: &str, addr: SocketAddr) -> AdminResponse {
        if self.lock().saved.is_some() {
            return Err(ApiError::AlreadyInCluster);
        }
        let node = Some(self.this_node(Role::Worker));
        let (identity, role) = crate::tls::join_new_key(addr, CLUSTER_NAME, token, &self.cfg.name, node)
            .await
            .map_err(|e| ApiError::Join { addr, detail: e.to_string() })?;
        let role = role_of(role);
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
        Ok(serde_json::json!({ "node": self.cfg.name, "role": role }))
    }

    /// A manager's side of a join: the token checked, the name checked
    /// and free, the node recorded in the state with its key, then its
    /// certificate signed (the node's key never leaves the node).
    pub(super) async fn admit(
        &self,
        token: &str,
        name: &str,
        csr: &[u8],
        node: Option<Node>,
    ) -> Result<Issued, ApiError> {
        let ca = self.lock().state.ca.clone().ok_or(ApiError::NotAManager)?;
        let role = ca.check(token)?;
        if !valid_name(name) {
            return Err(PkiError::BadName(name.to_owned()).into());
        }
        if self.lock().state.nodes.contains_key(name) {
            return Err(StateError::Exists { kind: Kind::Node, name: name.to_owned() }.into());
        }
        let key_id = csr_key_id(csr)?;
        let node = node.ok_or_else(|| ApiError::BadRequest("a join without the node's addresses".into()))?;
        let node = Node {
            id: name.to_owned(),
            role: role_of(role),
            availability: Availability::Active,
            key_id: Some(key_id),
            ..node
        };
        // Refused if the name was taken meanwhile (under another key).
        self.write(Command::AddNode(node)).await?;
        let cert = ca.sign(csr, name, role)?;
        tracing::info!(node = name, ?role, "admitted node {name} as {role:?}");
        Ok(Issued { cert, ca: ca.cert().to_vec(), role })
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

/// The state's role for a certificate's.
pub(super) fn role_of(r: JoinRole) -> Role {
    match r {
        JoinRole::Manager => Role::Manager,
        JoinRole::Worker => Role::Worker,
    }
}

/// The certificate's role for the state's.
pub(super) fn join_role(r: Role) -> JoinRole {
    match r {
        Role::Manager => JoinRole::Manager,
        Role::Worker => JoinRole::Worker,
    }
}
