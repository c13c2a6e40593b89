//! Writes and watches through the managers: a write commits here if this
//! node leads Raft, else it goes to the managers until one answers;
//! workers follow the state by long polls to a manager.

use super::{ApiError, Control, raft_id};
use crate::pki::CLUSTER_NAME;
use crate::raft::{NodeId, Raft, network::parse_node_addr};
use crate::rpc::{RaftWriteError, Request, Response};
use crate::state::{Command, Role};
use crate::tls::request;
use core::net::SocketAddr;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

impl Control {
    /// Where to send a write or a watch: the managers of the state (the
    /// Raft leader first if this node knows it), then the one this node
    /// joined through.
    pub(super) fn managers(&self) -> Vec<(String, SocketAddr)> {
        let g = self.lock();
        let mut v: Vec<(String, SocketAddr)> = Vec::new();
        if let Some((r, _)) = &g.raft {
            let m = r.metrics().borrow().clone();
            if let Some(l) = m.current_leader
                && let Some(n) = m.membership_config.membership().get_node(&l)
                && let Some((name, a)) = parse_node_addr(n)
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
    pub(super) async fn watch_loop(self: Arc<Self>) {
        loop {
            let Some(id) = self.identity() else { return };
            if self.raft().is_some() {
                return; // promoted: Raft brings the state now
            }
            let since = self.lock().version;
            let mut got = false;
            for (name, addr) in self.managers() {
                let req = Request::Watch { since };
                let r = tokio::time::timeout(Duration::from_secs(15), request(addr, &name, &id, &req)).await;
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
    pub async fn write(&self, cmd: Command) -> Result<(), ApiError> {
        // Checked against this node's state (the leader checks again when
        // it is forwarded); `apply` keeps accepting what it did before.
        self.lock().state.admit(&cmd)?;
        if let Some(r) = self.raft() {
            // A manager that leaves the cluster leaves Raft too (on the
            // leader: the change is committed first, then the membership).
            let voter = self.leaving_voter(&r, &cmd)?;
            match tokio::time::timeout(Duration::from_secs(10), r.client_write(cmd.clone())).await {
                Err(_) => return Err(ApiError::NoQuorum),
                Ok(Ok(resp)) => {
                    resp.data.0.clone()?;
                    if let Some(v) = voter {
                        // Committed: if leadership moved meanwhile, the
                        // leader's voters_loop finishes the change.
                        if let Err(e) = remove_voter(&r, v).await {
                            tracing::warn!("a manager left the state; its Raft vote goes later: {e}");
                        }
                    }
                    return Ok(());
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
                Ok(Err(e)) => return Err(ApiError::Raft(Box::new(e))),
            }
        }
        self.forward(Request::Write(cmd)).await
    }

    /// The Raft voter `cmd` removes (a manager leaving the state), if any;
    /// refused if it is the only one.
    fn leaving_voter(&self, r: &Raft, cmd: &Command) -> Result<Option<NodeId>, ApiError> {
        let voter = match cmd {
            Command::RemoveNode { id } | Command::SetRole { id, role: Role::Worker } => {
                let g = self.lock();
                g.state.nodes.get(id).filter(|n| n.role == Role::Manager).map(|n| raft_id(&n.id))
            }
            _ => None,
        };
        if let Some(v) = voter {
            let voters: BTreeSet<NodeId> = r.metrics().borrow().membership_config.membership().voter_ids().collect();
            if voters.len() == 1 && voters.contains(&v) {
                return Err(ApiError::OnlyManager);
            }
        }
        Ok(voter)
    }

    /// On the leader, keeps Raft's voters to the state's managers: a voter
    /// whose node left the state or was demoted is taken out (the write
    /// that made the change takes it out at once; this finishes it if
    /// leadership moved in between, or the leader died). Checked every
    /// second and on every change of state.
    pub(super) async fn voters_loop(self: Arc<Self>) {
        let mut versions = self.version_tx.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                r = versions.changed() => if r.is_err() { return },
            }
            let Some(r) = self.raft() else { continue };
            if r.metrics().borrow().current_leader != Some(raft_id(&self.cfg.name)) {
                continue;
            }
            let stale = self.stale_voters(&r);
            if !stale.is_empty() {
                let change = ChangeMembers::RemoveVoters(stale.clone());
                match change_voters(&r, change, ApiError::LeaveTimedOut, ApiError::LeaveFailed).await {
                    Ok(()) => tracing::info!(?stale, "Raft voters no longer managers in the state removed"),
                    Err(e) => tracing::warn!(?stale, "removing Raft voters that are no longer managers: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Raft's voters that the state (once it has nodes) does not hold as
    /// managers; never all of them.
    fn stale_voters(&self, r: &Raft) -> BTreeSet<NodeId> {
        let managers: BTreeSet<NodeId> = {
            let g = self.lock();
            g.state.nodes.values().filter(|n| n.role == Role::Manager).map(|n| raft_id(&n.id)).collect()
        };
        if managers.is_empty() {
            return BTreeSet::new();
        }
        let voters: BTreeSet<NodeId> = r.metrics().borrow().membership_config.membership().voter_ids().collect();
        let stale: BTreeSet<NodeId> = voters.difference(&managers).copied().collect();
        if stale.len() == voters.len() { BTreeSet::new() } else { stale }
    }

    /// Sends a write-like request to the managers until one answers.
    pub(super) async fn forward(&self, req: Request) -> Result<(), ApiError> {
        let id = self.identity().ok_or(ApiError::NotInCluster)?;
        let mut last = ApiError::NoManagerKnown;
        for (name, addr) in self.managers() {
            match tokio::time::timeout(Duration::from_secs(12), request(addr, &name, &id, &req)).await {
                Ok(Ok(Response::Written(r))) => return r,
                Ok(Ok(Response::Refused(why))) => last = ApiError::Refused { name, why },
                Ok(Ok(_)) => last = ApiError::UnexpectedAnswer { name },
                Ok(Err(e)) => last = ApiError::Unreachable { name, addr, detail: e.to_string() },
                Err(_) => last = ApiError::NoAnswer { name, addr },
            }
        }
        Err(last)
    }
}

/// Takes voter `v` out of Raft's membership (after its node left the state).
async fn remove_voter(r: &Raft, v: NodeId) -> Result<(), ApiError> {
    let change = ChangeMembers::RemoveVoters(BTreeSet::from([v]));
    change_voters(r, change, ApiError::LeaveTimedOut, ApiError::LeaveFailed).await
}

/// Commits `change` to Raft's voters within 10 s: `timed_out` if it does
/// not, `failed` with Raft's error if Raft refuses it.
pub(super) async fn change_voters(
    r: &Raft,
    change: ChangeMembers<NodeId, BasicNode>,
    timed_out: ApiError,
    failed: fn(Box<RaftWriteError>) -> ApiError,
) -> Result<(), ApiError> {
    tokio::time::timeout(Duration::from_secs(10), r.change_membership(change, false))
        .await
        .map_err(|_| timed_out)?
        .map_err(|e| failed(Box::new(e)))?;
    Ok(())
}
