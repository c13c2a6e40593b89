//! The admin API: what the CLI asks a node (over its unix socket, or over
//! the management plane's TLS from another member), and its answers.

use super::gossip_loop::new_gossip_key;
use super::{AdminRequest, AdminResponse, ApiError, Control, raft_id};
use crate::rpc::{AdminStats, FrameError, MAX_FRAME, read_frame, write_frame};
use crate::state::Command;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One admin request on the admin socket at `socket` (framed as the
/// management plane's: a 4-byte little-endian length and JSON).
pub async fn admin_call(socket: &Path, req: &AdminRequest) -> Result<AdminResponse, FrameError> {
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    write_frame(&mut s, req).await?;
    read_frame(&mut s, MAX_FRAME).await
}

impl Control {
    /// The admin API.
    pub async fn admin(self: &Arc<Self>, req: AdminRequest) -> AdminResponse {
        match req {
            AdminRequest::Init { cert_expiry_secs, data_path_port } => {
                self.init(cert_expiry_secs.map(Duration::from_secs), data_path_port).await
            }
            AdminRequest::Join { token, addr } => self.join(&token, addr).await,
            AdminRequest::Token { role, rotate } => {
                let ca = self.lock().state.ca.clone();
                let ca = ca.ok_or(ApiError::TokensOnManagers)?;
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
                self.require_manager()?;
                let cmd = new_gossip_key(&self.lock().state);
                let id = match &cmd {
                    Command::RotateGossipKey { id, .. } => *id,
                    _ => 0,
                };
                self.write(cmd).await?;
                Ok(serde_json::json!({ "key_id": id }))
            }
            AdminRequest::Write { command } => {
                if let Some(name) = command.internal() {
                    return Err(ApiError::BadRequest(format!(
                        "{name} is written by the cluster itself (cluster init, join, token --rotate, rotate-gossip-key), not through the admin API"
                    )));
                }
                self.require_manager_or_itself(&command)?;
                self.write(command).await.map(|()| serde_json::Value::Null)
            }
            AdminRequest::State => {
                let g = self.lock();
                Ok(serde_json::json!({ "version": g.version, "state": g.state.redacted() }))
            }
            AdminRequest::Nodes => Ok(self.nodes()),
            AdminRequest::Info => Ok(self.info()),
            AdminRequest::Tables => {
                serde_json::to_value(&self.lock().last_tables).map_err(|e| ApiError::Tables(e.to_string()))
            }
            AdminRequest::Conntrack => {
                let dp = self.dp.clone();
                let entries = tokio::task::spawn_blocking(move || dp.conntrack())
                    .await
                    .map_err(|e| ApiError::Conntrack(e.to_string()))?;
                to_json("conntrack", &entries)
            }
            AdminRequest::Cni { request } => self.cni(request).await,
            AdminRequest::Stats => {
                let (gossip, management) = {
                    let g = self.lock();
                    (g.gossip.clone(), g._server.as_ref().map(|s| s.stats()))
                };
                to_json(
                    "stats",
                    &AdminStats {
                        dataplane: self.dp.stats(),
                        gossip,
                        management,
                        health: self.dp.health(),
                        cni: self.cni_stats(),
                    },
                )
            }
        }
    }

    /// A worker's own reports (its tasks) are written through it; every
    /// other change is made on a manager.
    fn require_manager_or_itself(&self, cmd: &Command) -> Result<(), ApiError> {
        let inner = self.lock();
        match inner.saved.as_ref() {
            Some(s) if s.role == crate::state::Role::Worker => {
                if crate::authz::reports_itself(cmd, &self.cfg.name, &inner.state) {
                    Ok(())
                } else {
                    Err(ApiError::NotAManager)
                }
            }
            Some(_) => Ok(()),
            None => Err(ApiError::NotInCluster),
        }
    }

    /// Changes to the state are made on managers (as `docker service
    /// create` on a worker: "this node is not a manager").
    fn require_manager(&self) -> Result<(), ApiError> {
        match self.lock().saved.as_ref().map(|s| s.role) {
            Some(crate::state::Role::Manager) => Ok(()),
            Some(crate::state::Role::Worker) => Err(ApiError::NotAManager),
            None => Err(ApiError::NotInCluster),
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

    pub(super) fn serve_admin_socket(self: Arc<Self>) -> Result<(), ApiError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.cfg.state_dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let socket_err = |e: std::io::Error| ApiError::AdminSocket { path: path.clone(), detail: e.to_string() };
        let l = tokio::net::UnixListener::bind(&path).map_err(socket_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(socket_err)?;
        tokio::spawn(async move {
            let mut last_warn = None;
            loop {
                let mut s = match l.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        crate::rpc::accept_failed("admin socket", &e, &mut last_warn).await;
                        continue;
                    }
                };
                let me = self.clone();
                tokio::spawn(async move {
                    // A frame that is not a request gets an answer saying so;
                    // a client that sends none within the deadline is closed.
                    let read = tokio::time::timeout(ADMIN_READ_DEADLINE, read_frame(&mut s, MAX_FRAME));
                    let Ok(Ok(v)) = read.await else { return };
                    let resp = match serde_json::from_value::<AdminRequest>(v) {
                        Ok(req) => me.admin(req).await,
                        Err(e) => Err(ApiError::BadRequest(e.to_string())),
                    };
                    let _ = write_frame(&mut s, &resp).await;
                });
            }
        });
        Ok(())
    }
}

/// How long the admin socket waits for a connection's request (the CLI
/// and the CNI plugin send theirs at once): a client that connects and
/// says nothing does not hold a descriptor for ever.
const ADMIN_READ_DEADLINE: Duration = Duration::from_secs(10);

/// An admin answer as the JSON the admin API carries.
fn to_json<T: serde::Serialize>(what: &'static str, t: &T) -> AdminResponse {
    serde_json::to_value(t).map_err(|e| ApiError::Encode { what: what.into(), detail: e.to_string() })
}
