//! Who may do what on the management plane, in one place (as Swarm's
//! `swarm-manager` / `swarm-worker` roles): every request a server takes
//! is checked here against the client's certificate ([`Peer`]: name, role,
//! key) and the cluster state.
//!
//! - Anyone may ask to join (the token is checked by the join itself).
//! - Every other request needs a certificate of the cluster CA (the TLS
//!   handshake checks the signature and the validity dates) of a current
//!   member: a node the state holds under that name with that key. A
//!   removed node's certificate, or the certificate of an earlier holder of
//!   a name, is refused from the moment the removal commits.
//! - Members (managers and workers) may follow the state (`Watch`), renew
//!   their own certificate and report themselves: `AddNode` of their own
//!   name, role and key (new addresses after a restart), and the tasks
//!   that run on them (`AttachTask` on itself, `SetWeight` and
//!   `DetachTask` of its own tasks: a container started on a worker joins
//!   through that worker; `SetTaskHealth` of its own tasks: the node runs
//!   their health checks).
//! - Only managers (a manager's certificate *and* a manager in the state)
//!   may write to the state, use the admin API remotely, send Raft's RPCs,
//!   and ask to become a Raft voter (themselves only). A promoted worker
//!   is a manager once it has renewed its certificate; a demoted manager
//!   is a worker at once.
//!
//! A manager that has just joined has an empty state until Raft brings it
//! the log: until then it checks the role in the certificate only.
//!
//! Imports `pki`, `rpc` and `state`.

use crate::pki::{JoinRole, Peer};
use crate::rpc::{Refusal, Request};
use crate::state::{ClusterState, Command, Role};

/// What a request needs of its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing (a join).
    Anyone,
    /// A current member.
    Member,
    /// A current member speaking for itself.
    Itself,
    /// A current manager.
    Manager,
}

/// What `req` needs of its client.
pub fn needs(req: &Request) -> Needs {
    match req {
        Request::Join { .. } => Needs::Anyone,
        Request::Watch { .. } | Request::Renew { .. } => Needs::Member,
        Request::Write(c) if about_itself(c) => Needs::Itself,
        Request::Write(_)
        | Request::Admin(_)
        | Request::AddManager { .. }
        | Request::Append(_)
        | Request::Vote(_)
        | Request::Snapshot(_) => Needs::Manager,
    }
}

/// Whether the client `peer` (none: it presented no certificate) may make
/// `req`, given the cluster `state` as this node knows it.
pub fn authorize(req: &Request, peer: Option<&Peer>, state: &ClusterState) -> Result<(), Refusal> {
    let needs = needs(req);
    if needs == Needs::Anyone {
        return Ok(());
    }
    let p = peer.ok_or(Refusal::NeedsCertificate)?;
    if state.nodes.is_empty() {
        // Not caught up yet: the certificate's role alone.
        return authorize_role(req, Some(p));
    }
    let node =
        state.nodes.get(&p.name).filter(|n| n.key_id.as_deref() == Some(p.key_id.as_str())).ok_or(Refusal::Revoked)?;
    let manager = p.role == JoinRole::Manager && node.role == Role::Manager;
    match (needs, req) {
        (Needs::Member, _) => Ok(()),
        (Needs::Itself, Request::Write(c)) => {
            if manager || reports_itself(c, &p.name, state) {
                Ok(())
            } else {
                Err(Refusal::NotYourself)
            }
        }
        (_, Request::AddManager { name, .. }) if manager && *name != p.name => Err(Refusal::NotYourself),
        _ if manager => Ok(()),
        _ => Err(Refusal::ManagersOnly),
    }
}

/// Whether `cmd` is of the kind a member may make about itself.
fn about_itself(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::AddNode(_)
            | Command::AttachTask { .. }
            | Command::SetWeight { .. }
            | Command::DetachTask { .. }
            | Command::SetTaskHealth { .. }
    )
}

/// Whether `cmd` only reports the node `name` itself (given `state`): its
/// own node entry unchanged in role and key, or its own tasks.
pub fn reports_itself(cmd: &Command, name: &str, state: &ClusterState) -> bool {
    let own_task = |id: &String| state.tasks.get(id).is_some_and(|t| t.node == name);
    match cmd {
        Command::AddNode(n) => {
            n.id == name && state.nodes.get(name).is_some_and(|cur| cur.role == n.role && cur.key_id == n.key_id)
        }
        Command::AttachTask { node, id, .. } => node == name && (!state.tasks.contains_key(id) || own_task(id)),
        Command::SetWeight { id, .. } | Command::DetachTask { id } | Command::SetTaskHealth { task: id, .. } => {
            own_task(id)
        }
        _ => false,
    }
}

/// [`authorize`] for a server that holds no state (Raft's own server in
/// tests): the role in the certificate only.
pub fn authorize_role(req: &Request, peer: Option<&Peer>) -> Result<(), Refusal> {
    match needs(req) {
        Needs::Anyone => Ok(()),
        _ if peer.is_none() => Err(Refusal::NeedsCertificate),
        Needs::Member => Ok(()),
        _ if peer.is_some_and(|p| p.role == JoinRole::Manager) => match req {
            Request::AddManager { name, .. } if peer.is_some_and(|p| p.name != *name) => Err(Refusal::NotYourself),
            _ => Ok(()),
        },
        _ => Err(Refusal::ManagersOnly),
    }
}
