//! The replicated state machine: the [`ClusterState`], with its snapshot
//! (metadata and data) in the manager's redb database ([`Store`]), written
//! in one durable transaction on the blocking pool. Commands that fail validation are applied as no-ops and their
//! error returned to the writer, on every manager alike (the state
//! machine stays deterministic).

use super::SE;
use super::store::{META, Store, StoreError};
use crate::rpc::{Applied, NodeId, TypeConfig};
use crate::snapshot_data::{MAX_SNAPSHOT_BYTES, SnapshotData, SnapshotRefusal};
use crate::state::ClusterState;
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership};
use redb::ReadableDatabase;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
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
    built: u64,
}

const SNAPSHOT_META: &str = "snapshot-meta";
const SNAPSHOT_DATA: &str = "snapshot-data";

/// The replicated state machine: the cluster state, with snapshots on disk.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
    store: Store,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateMachine")
    }
}

impl StateMachine {
    /// The state machine in `store`, restored from its last snapshot.
    pub async fn open(store: Store) -> Result<StateMachine, StoreError> {
        let saved = store
            .run(|db| {
                let r = db.begin_read()?;
                let t = r.open_table(META)?;
                let (Some(meta), Some(data)) = (t.get(SNAPSHOT_META)?, t.get(SNAPSHOT_DATA)?) else {
                    return Ok(None);
                };
                let meta: SnapshotMeta<NodeId, BasicNode> = serde_json::from_slice(meta.value())?;
                Ok(Some((meta, data.value().to_vec())))
            })
            .await?;
        let mut inner = SmInner::default();
        if let Some((meta, data)) = saved {
            inner.body = serde_json::from_slice(&data)?;
            inner.snapshot = Some((meta, data));
        }
        Ok(StateMachine { inner: Arc::new(Mutex::new(inner)), store })
    }

    /// Saves the snapshot `meta` of `data` durably.
    async fn save(&self, meta: &SnapshotMeta<NodeId, BasicNode>, data: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let m = serde_json::to_vec(meta)?;
        self.store
            .run(move |db| {
                let w = db.begin_write()?;
                {
                    let mut t = w.open_table(META)?;
                    t.insert(SNAPSHOT_META, m.as_slice())?;
                    t.insert(SNAPSHOT_DATA, data.as_slice())?;
                }
                w.commit()?;
                Ok(data)
            })
            .await
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
        let (meta, data) = {
            let mut g = self.lock();
            let data = serde_json::to_vec(&g.body).map_err(StoreError::from)?;
            g.built += 1;
            let meta = SnapshotMeta {
                last_log_id: g.body.last_applied,
                last_membership: g.body.membership.clone(),
                snapshot_id: format!("{}-{}", g.body.last_applied.map_or(0, |l| l.index), g.built),
            };
            (meta, data)
        };
        if data.len() as u64 > MAX_SNAPSHOT_BYTES {
            let r = SnapshotRefusal::TooLarge { size: data.len() as u64, limit: MAX_SNAPSHOT_BYTES };
            return Err(openraft::StorageIOError::write_snapshot(Some(meta.signature()), &r).into());
        }
        let data = self.save(&meta, data).await?;
        self.lock().snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::built(data)) })
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, SE> {
        Ok(Box::new(SnapshotData::receiving()))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), SE> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data).map_err(StoreError::from)?;
        let data = self.save(meta, data).await?;
        let mut g = self.lock();
        g.body = body;
        g.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SE> {
        let g = self.lock();
        Ok(g.snapshot
            .as_ref()
            .map(|(meta, data)| Snapshot { meta: meta.clone(), snapshot: Box::new(SnapshotData::built(data.clone())) }))
    }
}
