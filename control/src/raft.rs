//! Cluster state replicated with Raft (openraft): the log and the state
//! machine's snapshots persisted on disk, so that a manager restarted from
//! its directory has everything it committed.
//!
//! The log is meshplane's own: an append-only file of records (append,
//! truncate after a conflict, purge after a snapshot), each a length and a
//! JSON body, fsynced before openraft is told the entries are durable, and
//! replayed at start. Why not an embedded database: the log is written
//! sequentially and read almost only at start, a cluster's state is small
//! (nodes, networks, services, tasks), and a file is one less dependency to
//! trust; it is rewritten whole when a purge leaves most of it dead. The
//! vote, the committed id and the snapshot are small files written to a
//! temporary name, fsynced and renamed.
//!
//! The state machine is [`ClusterState`]; commands that fail validation
//! are applied as no-ops and their error returned to the writer, on every
//! manager alike (the state machine stays deterministic).
//!
//! The network is in-process ([`Router`], for tests) or the management
//! plane's TCP + mutual TLS (`transport::TlsNetwork`).

use crate::state::{ClusterState, Command};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Cursor, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The outcome of applying a command: `Err` carries the validation error's
/// message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Result<(), String>);

openraft::declare_raft_types!(
    /// meshplane's Raft types: commands in, applied results out.
    pub TypeConfig:
        D = Command,
        R = Applied,
);

/// A Raft node of meshplane.
pub type Raft = openraft::Raft<TypeConfig>;
/// Node ids.
pub type NodeId = u64;

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

/// A record of the log file.
#[derive(Serialize, Deserialize)]
enum Record {
    Append(Entry<TypeConfig>),
    /// Entries from this index on are gone (a conflict).
    Truncate(u64),
    /// Entries up to this log id are gone (compacted into a snapshot).
    Purge(LogId<NodeId>),
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
        let mut buf = Vec::new();
        for r in records {
            let body = serde_json::to_vec(r).map_err(std::io::Error::other)?;
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&body);
        }
        f.write_all(&buf)?;
        f.sync_data()
    }

    /// Rewrites the file with only the live entries (after purges).
    fn compact(&mut self) -> std::io::Result<()> {
        let path = self.dir.join("log");
        let tmp = self.dir.join("log.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            let mut buf = Vec::new();
            let mut recs: Vec<Record> = Vec::new();
            if let Some(p) = self.last_purged {
                recs.push(Record::Purge(p));
            }
            recs.extend(self.entries.values().cloned().map(Record::Append));
            for r in &recs {
                let body = serde_json::to_vec(r).map_err(std::io::Error::other)?;
                buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
                buf.extend_from_slice(&body);
            }
            f.write_all(&buf)?;
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
                EntryPayload::Normal(cmd) => out.push(Applied(g.body.state.apply(&cmd).map_err(|e| e.to_string()))),
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
    type Network = crate::transport::RpcClient<Conn>;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        crate::transport::RpcClient(Conn { router: self.router.clone(), from: self.from, to: target })
    }
}

impl crate::transport::Call for Conn {
    fn target(&self) -> NodeId {
        self.to
    }
    async fn call(&self, req: crate::transport::Request) -> std::io::Result<crate::transport::Response> {
        let r = self.router.target(self.from, self.to).ok_or_else(|| std::io::Error::other("unreachable"))?;
        Ok(crate::transport::answer(&r, req).await)
    }
}

/// Starts Raft node `id` with its log and state machine in `dir`, on the
/// router; snapshots every `snapshot_every` entries (log compaction).
pub async fn start(
    id: NodeId,
    dir: &Path,
    router: &Router,
    snapshot_every: u64,
) -> anyhow_free::Result<(Raft, StateMachine)> {
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
) -> anyhow_free::Result<(Raft, StateMachine)> {
    let config = openraft::Config {
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    let config = Arc::new(config.validate().map_err(|e| anyhow_free::Error(e.to_string()))?);
    let log = LogStore::open(&dir.join("log")).map_err(|e| anyhow_free::Error(e.to_string()))?;
    let sm = StateMachine::open(&dir.join("sm")).map_err(|e| anyhow_free::Error(e.to_string()))?;
    let raft = Raft::new(id, config, net, log, sm.clone()).await.map_err(|e| anyhow_free::Error(e.to_string()))?;
    Ok((raft, sm))
}

/// A small error type (the crate does not use anyhow).
pub mod anyhow_free {
    /// A message.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Error(pub String);
    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Error {}
    /// A result with [`Error`].
    pub type Result<T> = std::result::Result<T, Error>;
}
