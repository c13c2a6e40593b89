//! The Raft log, the vote and the committed id in the manager's redb
//! database ([`Store`]): each append, truncation and purge one durable
//! transaction, committed before openraft is told (appends through
//! openraft's `LogFlushed` callback), on the blocking pool.

use super::SE;
use super::store::{LOG, META, Store, StoreError};
use crate::rpc::{NodeId, TypeConfig};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, RaftLogReader, Vote};
use redb::{ReadableDatabase, ReadableTable};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// The Raft log (and vote, committed id) of one manager.
#[derive(Clone, Debug)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    /// The log in `store`.
    pub fn new(store: Store) -> LogStore {
        LogStore { store }
    }

    /// The entries in `range`, in order (read on the blocking pool).
    pub async fn entries(&self, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        self.store
            .run(move |db| {
                let r = db.begin_read()?;
                let t = r.open_table(LOG)?;
                let mut out = Vec::new();
                for kv in t.range::<u64>(range)? {
                    let (_, v) = kv?;
                    out.push(serde_json::from_slice(v.value())?);
                }
                Ok(out)
            })
            .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SE> {
        Ok(self.entries((range.start_bound().cloned(), range.end_bound().cloned())).await?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SE> {
        let (purged, last) = self
            .store
            .run(|db| {
                let r = db.begin_read()?;
                let purged: Option<LogId<NodeId>> = match r.open_table(META)?.get(PURGED)? {
                    Some(v) => serde_json::from_slice(v.value())?,
                    None => None,
                };
                let last: Option<Entry<TypeConfig>> = match r.open_table(LOG)?.last()? {
                    Some((_, v)) => Some(serde_json::from_slice(v.value())?),
                    None => None,
                };
                Ok((purged, last.map(|e| e.log_id)))
            })
            .await?;
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SE> {
        Ok(self.store.put(VOTE, vote).await?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SE> {
        Ok(self.store.get(VOTE).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SE> {
        Ok(self.store.put(COMMITTED, &committed).await?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SE> {
        Ok(self.store.get::<Option<LogId<NodeId>>>(COMMITTED).await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut recs = Vec::new();
        for e in entries {
            recs.push((e.log_id.index, serde_json::to_vec(&e).map_err(StoreError::from)?));
        }
        let r = self
            .store
            .run(move |db| {
                let w = db.begin_write()?;
                {
                    let mut t = w.open_table(LOG)?;
                    for (i, b) in &recs {
                        t.insert(*i, b.as_slice())?;
                    }
                }
                w.commit()?;
                Ok(())
            })
            .await;
        callback.log_io_completed(r.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        Ok(r?)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        Ok(self.store.run(move |db| remove(db, (Bound::Included(log_id.index), Bound::Unbounded), None)).await?)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        let purged = serde_json::to_vec(&Some(log_id)).map_err(StoreError::from)?;
        Ok(self
            .store
            .run(move |db| remove(db, (Bound::Unbounded, Bound::Included(log_id.index)), Some(purged)))
            .await?)
    }
}

/// Removes the entries in `range` and, if given, sets the last purged id,
/// in one durable transaction.
fn remove(db: &redb::Database, range: (Bound<u64>, Bound<u64>), purged: Option<Vec<u8>>) -> Result<(), StoreError> {
    let w = db.begin_write()?;
    {
        let mut t = w.open_table(LOG)?;
        let keys: Vec<u64> = t.range::<u64>(range)?.map(|kv| kv.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
        for k in keys {
            t.remove(k)?;
        }
        if let Some(p) = purged {
            w.open_table(META)?.insert(PURGED, p.as_slice())?;
        }
    }
    w.commit()?;
    Ok(())
}
