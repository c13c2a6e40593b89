//! Raft's network: the client side of openraft over any [`Call`] (the
//! in-process [`Router`] here, TLS connections in `tls`), and the server
//! side ([`answer`]) both networks share.

use super::{Raft, RaftNodeError};
use crate::rpc::{NodeId, Refusal, Request, Response, TypeConfig};
use crate::snapshot_data::SnapshotRefusal;
use core::net::SocketAddr;
use openraft::error::{InstallSnapshotError, RPCError, RaftError};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, StorageError};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

/// Answers a Raft request with `raft` (the server side of both networks;
/// a join is not Raft's and is refused here).
pub async fn answer(raft: &Raft, req: Request) -> Response {
    match req {
        Request::Append(rpc) => Response::Append(raft.append_entries(rpc).await),
        Request::Vote(rpc) => Response::Vote(raft.vote(rpc).await),
        Request::Snapshot(rpc) => match SnapshotRefusal::check_chunk(rpc.offset, rpc.data.len() as u64) {
            // The offset against the bytes received is checked as the chunk
            // is written (`SnapshotData`).
            Ok(()) => Response::Snapshot(raft.install_snapshot(rpc).await),
            Err(r) => {
                let e = openraft::StorageIOError::write_snapshot(Some(rpc.meta.signature()), &r);
                Response::Snapshot(Err(RaftError::Fatal(openraft::error::Fatal::from(StorageError::from(e)))))
            }
        },
        Request::Join { .. } => Response::Refused(Refusal::JoinNotHere),
        _ => Response::Refused(Refusal::NotRaft),
    }
}

/// Answers a Raft request with `raft` if this node runs Raft yet.
pub async fn answer_if_running(raft: Option<Raft>, req: Request) -> Response {
    match raft {
        Some(r) => answer(&r, req).await,
        None => Response::Refused(Refusal::RaftNotRunning),
    }
}

/// The address to put in a member's `BasicNode`: `name@ip:port`.
pub fn node_addr(name: &str, addr: SocketAddr) -> BasicNode {
    BasicNode::new(format!("{name}@{addr}"))
}

/// A member's name and management address from its `BasicNode`
/// (`name@ip:port`, as [`node_addr`] makes it).
pub fn parse_node_addr(node: &BasicNode) -> Option<(&str, SocketAddr)> {
    let (name, addr) = node.addr.split_once('@')?;
    Some((name, addr.parse().ok()?))
}

/// A way to send one request to one node: the TLS connection, or the
/// in-process router.
pub trait Call: Send + Sync + 'static {
    /// Why a request got no response.
    type Error: std::error::Error;
    /// The node the requests go to.
    fn target(&self) -> NodeId;
    /// Sends `req`; the response.
    fn call(&self, req: Request) -> impl std::future::Future<Output = Result<Response, Self::Error>> + Send;
}

/// Raft's network over any [`Call`]: one implementation of openraft's
/// client side for both networks.
pub struct RpcClient<T>(pub T);

/// Why openraft's RPC got no answer, as openraft wants it.
fn unreachable<E: std::error::Error>(to: NodeId, e: impl std::fmt::Display) -> RPCError<NodeId, BasicNode, E> {
    let e = std::io::Error::other(format!("node {to}: {e}"));
    RPCError::Unreachable(openraft::error::Unreachable::new(&e))
}

impl<T: Call> RpcClient<T> {
    /// Sends `req` and takes the expected response out with `pick`; errors
    /// as openraft wants them.
    async fn rpc<R, E: std::error::Error>(
        &self,
        req: Request,
        pick: impl FnOnce(Response) -> Option<Result<R, E>>,
    ) -> Result<R, RPCError<NodeId, BasicNode, E>> {
        let to = self.0.target();
        match self.0.call(req).await {
            Ok(resp) => match pick(resp) {
                Some(r) => r.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(to, e))),
                None => Err(unreachable(to, "refused")),
            },
            Err(e) => Err(unreachable(to, e)),
        }
    }
}

type RaftErr<E = openraft::error::Infallible> = RaftError<NodeId, E>;

impl<T: Call> openraft::RaftNetwork<TypeConfig> for RpcClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftErr>> {
        self.rpc(Request::Append(rpc), |r| match r {
            Response::Append(x) => Some(x),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftErr<InstallSnapshotError>>> {
        self.rpc(Request::Snapshot(rpc), |r| match r {
            Response::Snapshot(x) => Some(x),
            _ => None,
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftErr>> {
        self.rpc(Request::Vote(rpc), |r| match r {
            Response::Vote(x) => Some(x),
            _ => None,
        })
        .await
    }
}

/// An in-process network between Raft nodes, with partitions for tests.
#[derive(Clone, Default)]
pub struct Router {
    nodes: Arc<Mutex<BTreeMap<NodeId, Raft>>>,
    /// Nodes cut off: nothing reaches them or leaves them.
    cut: Arc<Mutex<std::collections::BTreeSet<NodeId>>>,
}

impl Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Router")
    }
}

impl Router {
    /// Adds (or replaces) node `id`.
    pub fn add(&self, id: NodeId, raft: Raft) {
        self.nodes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, raft);
    }
    /// Removes node `id` (it crashed).
    pub fn remove(&self, id: NodeId) -> Option<Raft> {
        self.nodes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id)
    }
    /// Cuts `id` off the network, or joins it back.
    pub fn set_cut(&self, id: NodeId, cut: bool) {
        let mut c = self.cut.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cut {
            c.insert(id);
        } else {
            c.remove(&id);
        }
    }
    fn target(&self, from: NodeId, to: NodeId) -> Option<Raft> {
        let cut = self.cut.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cut.contains(&from) || cut.contains(&to) {
            return None;
        }
        self.nodes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&to).cloned()
    }
}

/// A node's connection to another through the [`Router`].
pub struct Conn {
    router: Router,
    from: NodeId,
    to: NodeId,
}

/// The router as seen from node `from`.
#[derive(Clone)]
pub struct RouterNetwork {
    /// The router.
    pub router: Router,
    /// This node.
    pub from: NodeId,
}

impl openraft::RaftNetworkFactory<TypeConfig> for RouterNetwork {
    type Network = RpcClient<Conn>;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        RpcClient(Conn { router: self.router.clone(), from: self.from, to: target })
    }
}

impl Call for Conn {
    type Error = RaftNodeError;
    fn target(&self) -> NodeId {
        self.to
    }
    async fn call(&self, req: Request) -> Result<Response, RaftNodeError> {
        let r = self.router.target(self.from, self.to).ok_or(RaftNodeError::Unreachable(self.to))?;
        Ok(answer(&r, req).await)
    }
}
