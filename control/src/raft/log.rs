//! The on-disk Raft log: an append-only file of records (append, truncate
//! after a conflict, purge after a snapshot), each a length and a JSON
//! body, fsynced before openraft is told the entries are durable, and
//! replayed at start; rewritten whole when purges leave most of it dead.
//! The vote and the committed id are small files beside it.

use super::{SE, io_err, read_json, write_atomic};
use crate::rpc::{NodeId, TypeConfig};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, RaftLogReader, Vote};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A record of the log file.
#[derive(Serialize, Deserialize)]
enum Record {
    Append(Entry<TypeConfig>),
    /// Entries from this index on are gone (a conflict).
    Truncate(u64),
    /// Entries up to this log id are gone (compacted into a snapshot).
    Purge(LogId<NodeId>),
}

/// `records` as the file holds them: each a 4-byte length and its JSON.
fn encode(records: &[Record]) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    for r in records {
        let body = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&body);
    }
    Ok(buf)
}

#[derive(Default)]
struct LogInner {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
    /// Records in the file that no longer describe a live entry.
    dead: usize,
    file: Option<std::fs::File>,
    dir: PathBuf,
}

impl LogInner {
    fn write(&mut self, records: &[Record]) -> std::io::Result<()> {
        let f = self.file.as_mut().ok_or_else(|| std::io::Error::other("log file not open"))?;
        f.write_all(&encode(records)?)?;
        f.sync_data()
    }

    /// Rewrites the file with only the live entries (after purges).
    fn compact(&mut self) -> std::io::Result<()> {
        let path = self.dir.join("log");
        let tmp = self.dir.join("log.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            let mut recs: Vec<Record> = Vec::new();
            if let Some(p) = self.last_purged {
                recs.push(Record::Purge(p));
            }
            recs.extend(self.entries.values().cloned().map(Record::Append));
            f.write_all(&encode(&recs)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.file = Some(std::fs::OpenOptions::new().append(true).open(&path)?);
        self.dead = 0;
        Ok(())
    }
}

/// The on-disk Raft log (and vote, committed id) of one manager.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, replaying its records.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log");
        let mut inner = LogInner { dir: dir.to_owned(), ..LogInner::default() };
        if let Ok(mut f) = std::fs::File::open(&path) {
            let mut all = Vec::new();
            f.read_to_end(&mut all)?;
            let mut at = 0;
            while at + 4 <= all.len() {
                let len = u32::from_le_bytes([all[at], all[at + 1], all[at + 2], all[at + 3]]) as usize;
                let Some(body) = all.get(at + 4..at + 4 + len) else { break }; // a torn tail: ignored
                let Ok(rec) = serde_json::from_slice::<Record>(body) else { break };
                match rec {
                    Record::Append(e) => {
                        inner.entries.insert(e.log_id.index, e);
                    }
                    Record::Truncate(i) => {
                        inner.entries.split_off(&i);
                    }
                    Record::Purge(id) => {
                        inner.entries = inner.entries.split_off(&(id.index + 1));
                        inner.last_purged = Some(id);
                    }
                }
                inner.dead += 1;
                at += 4 + len;
            }
            inner.dead = inner.dead.saturating_sub(inner.entries.len());
        }
        inner.file = Some(std::fs::OpenOptions::new().create(true).append(true).open(&path)?);
        Ok(LogStore { inner: Arc::new(Mutex::new(inner)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dir(&self) -> PathBuf {
        self.lock().dir.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SE> {
        Ok(self.lock().entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SE> {
        let g = self.lock();
        let last = g.entries.values().next_back().map(|e| e.log_id).or(g.last_purged);
        Ok(LogState { last_purged_log_id: g.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SE> {
        let b = serde_json::to_vec(vote).map_err(io_err)?;
        write_atomic(&self.dir().join("vote"), &b).map_err(io_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SE> {
        read_json(&self.dir().join("vote")).map_err(io_err)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SE> {
        let b = serde_json::to_vec(&committed).map_err(io_err)?;
        write_atomic(&self.dir().join("committed"), &b).map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SE> {
        Ok(read_json::<Option<LogId<NodeId>>>(&self.dir().join("committed")).map_err(io_err)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let mut g = self.lock();
        let recs: Vec<Record> = entries.iter().cloned().map(Record::Append).collect();
        let r = g.write(&recs);
        if r.is_ok() {
            for e in entries {
                g.entries.insert(e.log_id.index, e);
            }
        }
        drop(g);
        let ok = r.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
        callback.log_io_completed(ok);
        r.map_err(io_err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        let mut g = self.lock();
        g.write(&[Record::Truncate(log_id.index)]).map_err(io_err)?;
        let gone = g.entries.split_off(&log_id.index);
        g.dead += gone.len() + 1;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        let mut g = self.lock();
        g.write(&[Record::Purge(log_id)]).map_err(io_err)?;
        let keep = g.entries.split_off(&(log_id.index + 1));
        let gone = g.entries.len();
        g.entries = keep;
        g.last_purged = Some(log_id);
        g.dead += gone + 1;
        if g.dead > 64 && g.dead > g.entries.len() {
            g.compact().map_err(io_err)?;
        }
        Ok(())
    }
}
