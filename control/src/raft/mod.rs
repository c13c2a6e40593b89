//! Cluster state replicated with Raft (openraft): the log ([`log`]) and
//! the state machine's snapshots ([`state_machine`]) persisted on disk, so
//! that a manager restarted from its directory has everything it
//! committed, and the network ([`network`]): Raft's client side over any
//! way of sending a [`Request`](crate::rpc::Request), the server side
//! ([`answer`]), and an in-process [`Router`] for tests.
//!
//! Why the log is meshplane's own and not an embedded database: the log is
//! written sequentially and read almost only at start, a cluster's state
//! is small (nodes, networks, services, tasks), and a file is one less
//! dependency to trust. The vote, the committed id and the snapshot are
//! small files written to a temporary name, fsynced and renamed.
//!
//! Imports `rpc` (the messages, and the Raft type declarations) and
//! `state`; the TLS network (`tls::TlsNetwork`) sits above this module.

pub mod log;
pub mod network;
pub mod state_machine;

pub use crate::rpc::{Applied, NodeId, TypeConfig};
pub use log::LogStore;
pub use network::{Call, Conn, Router, RouterNetwork, RpcClient, answer, answer_if_running, node_addr};
pub use state_machine::StateMachine;

use openraft::{StorageError, StorageIOError};
use serde::Deserialize;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// A Raft node of meshplane.
pub type Raft = openraft::Raft<TypeConfig>;

/// Why a Raft node could not start, or a peer could not be reached.
#[derive(Debug, Error)]
pub enum RaftNodeError {
    /// The Raft configuration is invalid (a bug: it is fixed).
    #[error("Raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    /// The log in the state directory cannot be opened or replayed.
    #[error("opening the Raft log: {0}")]
    Log(std::io::Error),
    /// The state machine's snapshot cannot be opened or read.
    #[error("opening the Raft snapshot: {0}")]
    StateMachine(std::io::Error),
    /// openraft stopped at start.
    #[error("starting Raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<NodeId>),
    /// The in-process router: the node crashed or is cut off.
    #[error("node {0} is unreachable")]
    Unreachable(NodeId),
}

type SE = StorageError<NodeId>;

fn io_err(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::write(&e).into()
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, fsync
/// of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Starts Raft node `id` with its log and state machine in `dir`, on the
/// router; snapshots every `snapshot_every` entries (log compaction).
pub async fn start(
    id: NodeId,
    dir: &Path,
    router: &Router,
    snapshot_every: u64,
) -> Result<(Raft, StateMachine), RaftNodeError> {
    let net = RouterNetwork { router: router.clone(), from: id };
    let (raft, sm) = start_with(id, dir, net, snapshot_every).await?;
    router.add(id, raft.clone());
    Ok((raft, sm))
}

/// Starts Raft node `id` with its log and state machine in `dir` on the
/// network `net` (the router, or the TLS transport); snapshots every
/// `snapshot_every` entries.
pub async fn start_with<N: openraft::RaftNetworkFactory<TypeConfig>>(
    id: NodeId,
    dir: &Path,
    net: N,
    snapshot_every: u64,
) -> Result<(Raft, StateMachine), RaftNodeError> {
    let config = openraft::Config {
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    let config = Arc::new(config.validate()?);
    let log = LogStore::open(&dir.join("log")).map_err(RaftNodeError::Log)?;
    let sm = StateMachine::open(&dir.join("sm")).map_err(RaftNodeError::StateMachine)?;
    let raft = Raft::new(id, config, net, log, sm.clone()).await?;
    Ok((raft, sm))
}
