//! The management plane's messages and their framing: what managers and
//! members say to each other (Raft's RPCs, joins, writes, state watches,
//! the admin API) and the errors that cross the wire, all typed.
//!
//! The bottom of the control crate: it imports only the leaves (`state`,
//! `pki`) and the Raft type declarations, which live here so that the
//! messages can carry Raft's RPCs without importing `raft`.
//!
//! Framing: each request and response is a 4-byte little-endian length and
//! a JSON body (on TLS connections and on the admin socket alike).

use crate::pki::{JoinRole, PkiError};
use crate::state::{ClusterState, Command, Node, StateError};
use core::net::SocketAddr;
use meshplane_dataplane::report::NodeStats;
use openraft::BasicNode;
use openraft::error::{ClientWriteError, InitializeError, InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Raft node ids.
pub type NodeId = u64;

/// The outcome of applying a command: `Err` says why the state refused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Result<(), StateError>);

openraft::declare_raft_types!(
    /// meshplane's Raft types: commands in, applied results out.
    pub TypeConfig:
        D = Command,
        R = Applied,
        SnapshotData = crate::snapshot_data::SnapshotData,
);

/// Why a Raft write (or membership change) failed, as openraft says it.
pub type RaftWriteError = RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>;

/// Gossip's counters and view (the control plane's part of `stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipStats {
    /// The members gossip sees.
    pub members: Vec<String>,
    /// Packets sent.
    pub sent: u64,
    /// Packets received and accepted.
    pub received: u64,
    /// Packets dropped: too short.
    pub rejected_short: u64,
    /// Packets dropped: sealed with a key this node does not have.
    pub rejected_unknown_key: u64,
    /// Packets dropped: their tag did not verify.
    pub rejected_bad_tag: u64,
    /// Packets dropped: opened but not decodable.
    pub rejected_undecodable: u64,
    /// Packets dropped: sealed with a key the cluster retired.
    #[serde(default)]
    pub rejected_retired_key: u64,
    /// Packets dropped: their sealed sender is not where they came from.
    #[serde(default)]
    pub rejected_wrong_sender: u64,
    /// Packets dropped: replayed (a sequence number seen or too old, or an
    /// earlier epoch of the sender).
    #[serde(default)]
    pub rejected_replayed: u64,
    /// Packets not sent: the OS's random source gave no nonce.
    #[serde(default)]
    pub seal_failed: u64,
    /// The ids of the gossip keys this node holds (each opens).
    #[serde(default)]
    pub key_ids: Vec<u32>,
    /// The id of the key this node seals with.
    #[serde(default)]
    pub sealing_key: u32,
}

impl GossipStats {
    /// Packets rejected, for any reason.
    pub fn rejected(&self) -> u64 {
        self.rejected_short
            + self.rejected_unknown_key
            + self.rejected_bad_tag
            + self.rejected_undecodable
            + self.rejected_retired_key
            + self.rejected_wrong_sender
            + self.rejected_replayed
    }
}

/// The admin API's `stats` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminStats {
    /// The dataplane's counters.
    pub dataplane: NodeStats,
    /// Gossip's (none before the node is in a cluster).
    pub gossip: Option<GossipStats>,
    /// The management plane server's connections (none before the node
    /// is in a cluster).
    #[serde(default)]
    pub management: Option<ConnStats>,
    /// The health checks this node runs for its tasks (none on a node
    /// without a checker).
    #[serde(default)]
    pub health: Option<HealthStats>,
    /// The CNI requests this node served.
    #[serde(default)]
    pub cni: CniStats,
}

/// A node's CNI counters (since it started).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniStats {
    /// ADDs asked.
    pub adds: u64,
    /// ADDs that failed.
    pub add_failures: u64,
    /// DELs asked.
    pub dels: u64,
    /// GCs asked.
    pub gcs: u64,
    /// Tasks detached because their container's namespace went.
    pub reaped: u64,
    /// DELs spooled because they could not commit.
    pub spooled: u64,
    /// ADDs refused (11) because `MAX_CNI_ADDS` others were in progress
    /// until their deadline (also counted in `add_failures`).
    #[serde(default)]
    pub adds_waited_out: u64,
}

/// The counters of a node's health checker (all since it started, but
/// `tasks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStats {
    /// Tasks of this node checked now.
    pub tasks: u64,
    /// Probes run.
    pub checks: u64,
    /// Probes that failed (refused, timed out, or an HTTP status that is
    /// not 2xx or 3xx).
    pub failures: u64,
    /// Transitions to healthy.
    pub to_healthy: u64,
    /// Transitions to unhealthy.
    pub to_unhealthy: u64,
    /// Transitions proposed to the cluster and accepted.
    pub proposed: u64,
    /// Proposals that failed (tried again at the next probe).
    pub propose_errors: u64,
}

/// A server's connection counters (all since it started, but `open`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnStats {
    /// Connections open now.
    pub open: u64,
    /// Connections admitted.
    pub accepted: u64,
    /// Closed at accept: `max_connections` reached (for this address).
    pub refused_total: u64,
    /// Closed at accept: `max_per_ip` reached.
    pub refused_per_ip: u64,
    /// `accept` failed (out of descriptors, ...); the server waited and
    /// went on.
    pub accept_errors: u64,
    /// Closed: no TLS handshake within `handshake`.
    pub handshake_timeouts: u64,
    /// Closed: the handshake failed (a certificate the CA did not sign, not
    /// TLS).
    pub handshake_failed: u64,
    /// Closed: a request not read whole within `request` (slow clients).
    pub request_timeouts: u64,
    /// Closed: a member's connection idle for `idle`.
    pub idle_closed: u64,
    /// Closed: an answer not written within `write`.
    pub write_timeouts: u64,
    /// Closed: a request over the size limit (`join_frame` without a
    /// certificate, `request_frame` with one).
    pub too_large: u64,
    /// Closed: a request that is not one.
    pub bad_frames: u64,
    /// Closed: the client's certificate expired while its connection was
    /// open.
    pub expired_closed: u64,
    /// Requests answered.
    pub requests: u64,
}

impl ConnStats {
    /// Every connection the server closed or refused for breaking a limit.
    pub fn closed_by_limits(&self) -> u64 {
        self.refused_total
            + self.refused_per_ip
            + self.handshake_timeouts
            + self.handshake_failed
            + self.request_timeouts
            + self.idle_closed
            + self.write_timeouts
            + self.too_large
            + self.bad_frames
            + self.expired_closed
    }
}

/// A management-plane request.
#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Raft: append entries (heartbeats included).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft: a vote.
    Vote(VoteRequest<NodeId>),
    /// Raft: a snapshot chunk.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A node asks to join with a token, under a name, for the key of
    /// its certificate signing request.
    Join {
        /// The token.
        token: String,
        /// The node's name.
        name: String,
        /// Its certificate signing request (DER): the node keeps its key.
        csr: Vec<u8>,
        /// The node as the state will hold it (addresses; its role comes
        /// from the token, its key id from the request).
        node: Option<Node>,
    },
    /// A member asks for a new certificate for its key (before its own
    /// expires, or after its role changed): name and role come from the
    /// state, not from the request.
    Renew {
        /// A certificate signing request for its key (DER).
        csr: Vec<u8>,
    },
    /// A member asks for a change to the cluster state (followers and
    /// workers forward their writes to the leader this way).
    Write(Command),
    /// A member waits for the cluster state newer than `since` (a long
    /// poll: answered at once if there is one, else when there is one or
    /// after a few seconds with the same version).
    Watch {
        /// The version the member has.
        since: u64,
    },
    /// A manager that joined asks to become a Raft voter.
    AddManager {
        /// Its Raft id.
        id: NodeId,
        /// Its name (its certificate's).
        name: String,
        /// Its management address.
        addr: SocketAddr,
    },
    /// An admin API request from a member (the CLI on another node).
    Admin(AdminRequest),
}

/// A management-plane response.
#[derive(Serialize, Deserialize)]
pub enum Response {
    /// To `Append`.
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To `Join`: the node's certificate and role, or why not.
    Join(Result<Issued, ApiError>),
    /// To `Renew`: the member's new certificate, or why not.
    Renewed(Result<Issued, ApiError>),
    /// To `Write` and `AddManager`: applied, or why not.
    Written(Result<(), ApiError>),
    /// To `Watch`: the state (without secrets) and its version.
    State {
        /// The version (the last applied Raft log index).
        version: u64,
        /// The state.
        state: Box<ClusterState>,
    },
    /// To `Admin`.
    Admin(AdminResponse),
    /// A request this server does not serve (or not for this client).
    Refused(Refusal),
}

/// A certificate a manager issued: to a joining node or in a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The node's certificate (DER).
    pub cert: Vec<u8>,
    /// The CA's certificate (DER).
    pub ca: Vec<u8>,
    /// The role it carries.
    pub role: JoinRole,
}

/// Why a server refused a request outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Error)]
pub enum Refusal {
    /// A join sent to a node without the CA: send it to a manager.
    #[error("this node does not hold the cluster CA (not a manager)")]
    NoCa,
    /// A member's request from a client without a certificate of the CA.
    #[error("this request needs a certificate of the cluster CA")]
    NeedsCertificate,
    /// A Raft RPC to a node not (yet) running Raft.
    #[error("Raft is not running here")]
    RaftNotRunning,
    /// A state watch sent to a worker: watch a manager.
    #[error("not a manager")]
    NotAManager,
    /// A join sent to Raft's RPC handler.
    #[error("joins go to a manager holding the CA")]
    JoinNotHere,
    /// Something other than a Raft RPC sent to Raft's RPC handler.
    #[error("not a Raft request")]
    NotRaft,
    /// A request only managers may make, from a worker's certificate (or
    /// a node the state no longer holds as a manager).
    #[error("only managers may do this: the certificate is a worker's")]
    ManagersOnly,
    /// A certificate of a node the state no longer holds, or of another key
    /// under its name (removed, or replaced).
    #[error("the certificate is not a current member's (the node was removed or rejoined with a new key)")]
    Revoked,
    /// A member reporting or adding another node than itself.
    #[error("a node may only report itself")]
    NotYourself,
}

/// An admin API request (the CLI's; JSON over the unix socket, or
/// `Request::Admin` over TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum AdminRequest {
    /// `cluster init`: a new cluster with this node as its first manager.
    Init {
        /// How long node certificates are valid (default 90 days).
        #[serde(default)]
        cert_expiry_secs: Option<u64>,
        /// The cluster's data-path (VXLAN) UDP port (default 4789).
        #[serde(default)]
        data_path_port: Option<u16>,
    },
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
    /// A CNI plugin's request (on the admin socket only).
    Cni {
        /// The command.
        request: meshplane_cni::proto::CniRequest,
    },
}

/// An admin API response: a JSON value, or why not.
pub type AdminResponse = Result<serde_json::Value, ApiError>;

/// Why a node could not do what the admin API, a write or a join asked
/// (what the CLI prints). Errors of other crates that cannot travel typed
/// (I/O, TLS) travel as their message, with what was being done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
pub enum ApiError {
    /// The state refused the command.
    #[error(transparent)]
    State(#[from] StateError),
    /// A CNI request failed (the plugin reports its code).
    #[error(transparent)]
    Cni(meshplane_cni::failure::Failure),
    /// The CA could not be made, or a certificate issued, or a token was refused.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// `cluster init` or `cluster join` on a node in a cluster.
    #[error("this node is already in a cluster")]
    AlreadyInCluster,
    /// A member's request on a node in no cluster.
    #[error("this node is not in a cluster (cluster init or cluster join first)")]
    NotInCluster,
    /// `cluster token` on a worker.
    #[error("join tokens are held by managers: ask a manager")]
    TokensOnManagers,
    /// A manager's request (a change to the state, adding a manager, a
    /// token) on a worker.
    #[error("this node is not a manager: worker nodes cannot change the cluster state (run this on a manager)")]
    NotAManager,
    /// The state directory cannot be made or read.
    #[error("{}: {detail}", path.display())]
    StateDir {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
    /// A secret file others can read.
    #[error("{}: mode {mode:o} lets others read the secrets in it (this node's key, or the CA key in the Raft log): chmod 600 it (and check who read it)", path.display())]
    SecretReadable {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A certificate renewal refused or failed.
    #[error("renewing this node's certificate: {0}")]
    Renew(String),
    /// `node.json` cannot be read, parsed or written.
    #[error("node.json: {0}")]
    NodeFile(String),
    /// The state directory is another node's.
    #[error("the state directory belongs to node {owner:?}, not {name:?}")]
    NotThisNode {
        /// The node it belongs to.
        owner: String,
        /// This node's name.
        name: String,
    },
    /// The admin socket cannot be bound.
    #[error("{}: {detail}", path.display())]
    AdminSocket {
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
    /// The management address cannot be listened on.
    #[error("listening on {addr}: {detail}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        detail: String,
    },
    /// The node's TLS set-up failed (its certificate or key).
    #[error("{0}")]
    Tls(String),
    /// Raft did not start (its directory, its configuration).
    #[error("{0}")]
    RaftStart(String),
    /// `cluster init`: Raft is not running after its start.
    #[error("Raft did not start")]
    RaftNotRunning,
    /// `cluster init`: Raft's membership could not be initialised.
    #[error("{0}")]
    Initialize(Box<RaftError<NodeId, InitializeError<NodeId, BasicNode>>>),
    /// `cluster init`: this node was not elected in time.
    #[error("this node did not become the Raft leader within 10 s")]
    NotLeaderInTime,
    /// `cluster join`: the manager did not give this node an identity.
    #[error("joining through {addr}: {detail}")]
    Join {
        /// The manager's address.
        addr: SocketAddr,
        /// Why (the connection, the TLS check, or the manager's refusal).
        detail: String,
    },
    /// A manager may not leave if it is the only one.
    #[error("this is the cluster's only manager: it cannot leave")]
    OnlyManager,
    /// A write that did not commit in time.
    #[error("no Raft quorum: the write did not commit within 10 s")]
    NoQuorum,
    /// A write Raft refused.
    #[error("{0}")]
    Raft(Box<RaftWriteError>),
    /// A manager left the state but its Raft membership change timed out.
    #[error("the node left the state, but Raft's membership change timed out")]
    LeaveTimedOut,
    /// A manager left the state but Raft's membership change failed.
    #[error("the node left the state, but not Raft's membership: {0}")]
    LeaveFailed(Box<RaftWriteError>),
    /// A joined manager did not catch up with the log in time.
    #[error("the new manager did not catch up within 10 s")]
    CatchUpTimedOut,
    /// A membership change did not commit in time.
    #[error("the membership change did not commit within 10 s")]
    MembershipTimedOut,
    /// A membership change Raft refused.
    #[error("{0}")]
    Membership(Box<RaftWriteError>),
    /// A forwarded request: this node knows no manager.
    #[error("no manager known")]
    NoManagerKnown,
    /// A forwarded request: the manager refused it.
    #[error("{name}: {why}")]
    Refused {
        /// The manager.
        name: String,
        /// Why.
        why: Refusal,
    },
    /// An answer that could not be put into JSON.
    #[error("encoding the {what} answer: {detail}")]
    Encode {
        /// Which answer.
        what: String,
        /// The encoder's error.
        detail: String,
    },
    /// A forwarded request: the manager answered something else.
    #[error("{name}: unexpected answer")]
    UnexpectedAnswer {
        /// The manager.
        name: String,
    },
    /// A forwarded request: the manager could not be reached.
    #[error("{name} ({addr}): {detail}")]
    Unreachable {
        /// The manager.
        name: String,
        /// Its address.
        addr: SocketAddr,
        /// The connection's error.
        detail: String,
    },
    /// A forwarded request: the manager did not answer in time.
    #[error("{name} ({addr}): no answer")]
    NoAnswer {
        /// The manager.
        name: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// A frame on the admin socket that is not an admin request.
    #[error("bad admin request: {0}")]
    BadRequest(String),
    /// The dataplane's connection dump failed.
    #[error("dumping the dataplane's connections: {0}")]
    Conntrack(String),
    /// The last tables could not be encoded.
    #[error("encoding the tables: {0}")]
    Tables(String),
}

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A length over the reader's limit: not a request this peer may send.
    #[error("frame too large ({len} bytes, at most {limit})")]
    TooLarge {
        /// The length the frame announced.
        len: usize,
        /// The reader's limit.
        limit: usize,
    },
    /// A body that is not the JSON expected.
    #[error("frame body: {0}")]
    Json(#[from] serde_json::Error),
}

/// The largest frame read from a peer this side chose to trust: an answer
/// from a server whose certificate it checked, a request on the admin
/// socket (root only). A server's requests have their own, smaller
/// limits (`tls::Limits`).
pub const MAX_FRAME: usize = 64 << 20;

/// How much of a frame's body is made room for before it arrives: the
/// rest grows with what is read, so an announced length costs nothing
/// until its bytes come.
const FIRST_ALLOCATION: usize = 64 << 10;

/// Writes `v` as one frame: its length, then its JSON.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, v: &T) -> Result<(), FrameError> {
    let b = serde_json::to_vec(v)?;
    let len = u32::try_from(b.len()).map_err(|_| FrameError::TooLarge { len: b.len(), limit: u32::MAX as usize })?;
    w.write_all(&len.to_le_bytes()).await?;
    w.write_all(&b).await?;
    Ok(w.flush().await?)
}

/// What an accept loop does when `accept` fails (out of descriptors, or
/// another passing failure): the connection waits in the backlog, the
/// loop pauses 50 ms and goes on serving. It warns at most once every 10 s
/// (`last_warn` holds when it last did) so a long exhaustion does not flood
/// the log. Never a reason to stop listening.
pub async fn accept_failed(what: &str, e: &std::io::Error, last_warn: &mut Option<std::time::Instant>) {
    if last_warn.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
        tracing::warn!("{what}: accept failed ({e}); still listening, retrying every 50 ms");
        *last_warn = Some(std::time::Instant::now());
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Reads one frame of at most `limit` bytes as a `T`; a longer one is
/// refused from its length, before its body is read.
pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
    limit: usize,
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let mut b = Vec::with_capacity(len.min(FIRST_ALLOCATION));
    r.take(len as u64).read_to_end(&mut b).await?;
    if b.len() < len {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(serde_json::from_slice(&b)?)
}
