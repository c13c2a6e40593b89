//! Cluster state replicated with Raft (openraft): the log ([`log`]) and
//! the state machine's snapshots ([`state_machine`]) persisted on disk, so
//! that a manager restarted from its directory has everything it
//! committed, and the network ([`network`]): Raft's client side over any
//! way of sending a [`Request`](crate::rpc::Request), the server side
//! ([`answer`]), and an in-process [`Router`] for tests.
//!
//! Storage: one redb database per manager (`<dir>/raft.redb`, module
//! [`store`]) holds the log entries, the vote, the committed id, the last
//! purged id and the snapshot. redb rather than a file of meshplane's own:
//! it is crash-safe by design (copy-on-write B-trees, a commit is durable
//! once its fsync returns, a torn write after it is rolled back to the last
//! commit on open), its pages are checksummed, it is pure Rust, and it
//! is well kept; a hand-written log had to get torn tails, checksums and
//! directory fsyncs right by itself, and did not. Every write is committed
//! (fsynced) before openraft is told it is durable, and all storage I/O
//! runs on tokio's blocking pool. A directory in the format before redb
//! (`log/`, `sm/`) is refused with a message, not migrated.
//!
//! Snapshots travel in chunks of at most 1 MiB
//! ([`SNAPSHOT_CHUNK_BYTES`](crate::snapshot_data::SNAPSHOT_CHUNK_BYTES));
//! a chunk must start exactly where the bytes received so far end and the
//! whole may not pass 256 MiB: anything else is answered with a storage
//! error naming the [`SnapshotRefusal`](crate::snapshot_data::SnapshotRefusal).
//!
//! Imports `rpc` (the messages, and the Raft type declarations),
//! `snapshot_data` and `state`; the TLS network (`tls::TlsNetwork`) sits above this module.

pub mod log;
pub mod network;
pub mod state_machine;
pub mod store;

pub use crate::rpc::{Applied, NodeId, TypeConfig};
pub use log::LogStore;
pub use network::{Call, Conn, Router, RouterNetwork, RpcClient, answer, answer_if_running, node_addr};
pub use state_machine::StateMachine;
pub use store::{Store, StoreError};

use openraft::StorageError;
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
    /// The Raft database cannot be opened or read.
    #[error("opening the Raft storage: {0}")]
    Storage(#[from] StoreError),
    /// openraft stopped at start.
    #[error("starting Raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<NodeId>),
    /// The in-process router: the node crashed or is cut off.
    #[error("node {0} is unreachable")]
    Unreachable(NodeId),
}

type SE = StorageError<NodeId>;

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
        snapshot_max_chunk_size: crate::snapshot_data::SNAPSHOT_CHUNK_BYTES,
        ..Default::default()
    };
    let config = Arc::new(config.validate()?);
    let owned = dir.to_owned();
    let store = tokio::task::spawn_blocking(move || Store::open(&owned))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    let log = LogStore::new(store.clone());
    let sm = StateMachine::open(store).await?;
    let raft = Raft::new(id, config, net, log, sm.clone()).await?;
    Ok((raft, sm))
}
