//! Certificates that expire and roles that change: a member renews its
//! certificate (same key, a new certificate from a manager) when half its
//! validity is gone or when the state gives it another role (`node
//! promote` / `node demote`); a promoted node then starts Raft and asks to
//! become a voter, a demoted one leaves Raft and follows the state as a
//! worker.

use super::join::{join_role, role_of};
use super::{ApiError, Control, Saved, raft_id};
use crate::pki::{NodeIdentity, Peer, PkiError, csr, csr_key_id};
use crate::rpc::{Issued, Request, Response};
use crate::state::{Kind, Role, StateError};
use crate::tls::request;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Renew once this much of a certificate's validity is gone.
const RENEW_AT: f64 = 0.5;

impl Control {
    /// A manager's side of a renewal: a certificate for the same key, the
    /// name and role the state gives the member.
    pub(super) fn renew_for(&self, peer: Option<&Peer>, csr: &[u8]) -> Result<Issued, ApiError> {
        let p = peer.ok_or_else(|| ApiError::Renew("no certificate".into()))?;
        let (ca, node) = {
            let g = self.lock();
            (g.state.ca.clone(), g.state.nodes.get(&p.name).cloned())
        };
        let ca = ca.ok_or(ApiError::NotAManager)?;
        let node = node.ok_or_else(|| StateError::Unknown { kind: Kind::Node, name: p.name.clone() })?;
        if csr_key_id(csr)? != p.key_id {
            return Err(PkiError::BadCsr("a renewal is for the key the certificate has".into()).into());
        }
        let role = join_role(node.role);
        let cert = ca.sign(csr, &p.name, role)?;
        tracing::info!(node = %p.name, ?role, "renewed the certificate of {}", p.name);
        Ok(Issued { cert, ca: ca.cert().to_vec(), role })
    }

    /// Checks whether this node's certificate needs renewing every
    /// `renew_check` and whenever the state changes (a promotion or a
    /// demotion is followed at once), at most once a second, and renews it.
    pub(super) async fn renew_loop(self: Arc<Self>) {
        let mut versions = self.version_tx.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.renew_check) => {}
                r = versions.changed() => if r.is_err() { return },
            }
            if let Err(e) = self.renew_if_due().await {
                tracing::warn!("{e}");
            }
            tokio::time::sleep(Duration::from_secs(1).min(self.cfg.renew_check)).await;
        }
    }

    /// Renews this node's certificate if half its validity is gone or the
    /// state gives it another role, then follows the new role.
    async fn renew_if_due(self: &Arc<Self>) -> Result<(), ApiError> {
        let Some(saved) = self.lock().saved.clone() else { return Ok(()) };
        let peer = saved.identity.peer()?;
        let wanted = self.lock().state.nodes.get(&self.cfg.name).map(|n| n.role);
        let role_changed = wanted.is_some_and(|r| join_role(r) != peer.role);
        if !role_changed && !peer.renewal_due(SystemTime::now(), RENEW_AT) {
            return Ok(());
        }
        let issued = self.ask_renewal(&saved.identity).await?;
        let identity = NodeIdentity { cert: issued.cert, ca: issued.ca, ..saved.identity.clone() };
        let role = role_of(issued.role);
        let next = Saved { identity: identity.clone(), role, joined_via: saved.joined_via };
        self.save(&next)?;
        let creds = self.lock().creds.clone();
        if let Some(c) = &creds {
            c.set(&identity).map_err(|e| ApiError::Tls(e.to_string()))?;
        }
        self.lock().saved = Some(next);
        tracing::info!(?role, "this node's certificate renewed ({:?})", issued.role);
        match (saved.role, role) {
            (Role::Worker, Role::Manager) => self.become_manager(creds).await,
            (Role::Manager, Role::Worker) => self.become_worker().await,
            _ => Ok(()),
        }
    }

    /// A new certificate for this node's key: signed here if this node
    /// holds the CA, else by the first manager that answers.
    async fn ask_renewal(&self, id: &NodeIdentity) -> Result<Issued, ApiError> {
        let req_csr = csr(&id.key, &id.name)?;
        if self.lock().state.ca.is_some() && self.raft().is_some() {
            return self.renew_for(Some(&id.peer()?), &req_csr);
        }
        let mut last = ApiError::NoManagerKnown;
        for (name, addr) in self.managers() {
            let req = Request::Renew { csr: req_csr.clone() };
            match tokio::time::timeout(Duration::from_secs(10), request(addr, &name, id, &req)).await {
                Ok(Ok(Response::Renewed(r))) => return r,
                Ok(Ok(Response::Refused(why))) => last = ApiError::Refused { name, why },
                Ok(Ok(_)) => last = ApiError::UnexpectedAnswer { name },
                Ok(Err(e)) => last = ApiError::Unreachable { name, addr, detail: e.to_string() },
                Err(_) => last = ApiError::NoAnswer { name, addr },
            }
        }
        Err(ApiError::Renew(last.to_string()))
    }

    /// A promoted worker: Raft from its (new) directory, then a voter.
    async fn become_manager(self: &Arc<Self>, creds: Option<Arc<crate::tls::Creds>>) -> Result<(), ApiError> {
        let creds = creds.ok_or(ApiError::NotInCluster)?;
        let _ = std::fs::remove_dir_all(self.cfg.state_dir.join("raft"));
        self.start_raft(creds).await?;
        let req =
            Request::AddManager { id: raft_id(&self.cfg.name), name: self.cfg.name.clone(), addr: self.cfg.advertise };
        self.forward(req).await?;
        tracing::info!("this node is a manager now");
        Ok(())
    }

    /// A demoted manager: out of Raft's voters (the leader takes it out;
    /// waited for a few seconds), Raft stopped and its log removed, then
    /// the state followed as a worker.
    async fn become_worker(self: &Arc<Self>) -> Result<(), ApiError> {
        if let Some(r) = self.raft() {
            let me = raft_id(&self.cfg.name);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline
                && r.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == me)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = r.shutdown().await;
        }
        self.lock().raft = None;
        let _ = std::fs::remove_dir_all(self.cfg.state_dir.join("raft"));
        tokio::spawn(self.clone().watch_loop());
        tracing::info!("this node is a worker now");
        Ok(())
    }
}
