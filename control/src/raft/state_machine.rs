//! The replicated state machine: the [`ClusterState`], with its snapshots
//! on disk. Commands that fail validation are applied as no-ops and their
//! error returned to the writer, on every manager alike (the state
//! machine stays deterministic).

use super::{SE, io_err, read_json, write_atomic};
use crate::rpc::{Applied, NodeId, TypeConfig};
use crate::state::ClusterState;
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a snapshot holds.
#[derive(Serialize, Deserialize, Default, Clone)]
struct SnapshotBody {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    state: ClusterState,
}

#[derive(Default)]
struct SmInner {
    body: SnapshotBody,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    dir: PathBuf,
    built: u64,
}

/// The replicated state machine: the cluster state, with snapshots on disk.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateMachine")
    }
}

impl StateMachine {
    /// The state machine in `dir`, restored from its last snapshot.
    pub fn open(dir: &Path) -> std::io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let mut inner = SmInner { dir: dir.to_owned(), ..SmInner::default() };
        if let Some((meta, data)) = read_json::<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>(&dir.join("snapshot"))? {
            inner.body = serde_json::from_slice(&data).map_err(std::io::Error::other)?;
            inner.snapshot = Some((meta, data));
        }
        Ok(StateMachine { inner: Arc::new(Mutex::new(inner)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SmInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the cluster state as applied here.
    pub fn state(&self) -> ClusterState {
        self.lock().body.state.clone()
    }

    /// The last log id applied here.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.lock().body.last_applied
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SE> {
        let mut g = self.lock();
        let data = serde_json::to_vec(&g.body).map_err(io_err)?;
        g.built += 1;
        let meta = SnapshotMeta {
            last_log_id: g.body.last_applied,
            last_membership: g.body.membership.clone(),
            snapshot_id: format!("{}-{}", g.body.last_applied.map_or(0, |l| l.index), g.built),
        };
        let b = serde_json::to_vec(&(&meta, &data)).map_err(io_err)?;
        write_atomic(&g.dir.join("snapshot"), &b).map_err(io_err)?;
        g.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SE> {
        let g = self.lock();
        Ok((g.body.last_applied, g.body.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut g = self.lock();
        let mut out = Vec::new();
        for e in entries {
            g.body.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Applied(Ok(()))),
                EntryPayload::Normal(cmd) => out.push(Applied(g.body.state.apply(&cmd))),
                EntryPayload::Membership(m) => {
                    g.body.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied(Ok(())));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SE> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SE> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data).map_err(io_err)?;
        let mut g = self.lock();
        let b = serde_json::to_vec(&(meta, &data)).map_err(io_err)?;
        write_atomic(&g.dir.join("snapshot"), &b).map_err(io_err)?;
        g.body = body;
        g.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SE> {
        let g = self.lock();
        Ok(g.snapshot
            .as_ref()
            .map(|(meta, data)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(data.clone())) }))
    }
}
