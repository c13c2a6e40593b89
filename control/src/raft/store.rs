//! The one redb database of a manager's Raft (`<dir>/raft.redb`): the log
//! entries in table `log` (index → entry), and in table `meta` the vote,
//! the committed id, the last purged id and the snapshot (metadata and
//! data). Every write is one redb transaction committed with immediate
//! durability (fsynced) before it returns; every call runs on tokio's
//! blocking pool, never on the async threads.

use openraft::{StorageError, StorageIOError};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

use crate::rpc::NodeId;

/// The log: index → the entry (JSON).
pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Everything else: name → value (JSON, or the snapshot's bytes).
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// redb's page size (its default, which the database uses): it sizes the
/// file in whole pages.
const DB_PAGE: u64 = 4096;

/// The database's file name in the Raft directory.
pub const DB_FILE: &str = "raft.redb";

/// Why the Raft storage failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The directory or file could not be made or opened.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// redb refused or failed.
    #[error("Raft database: {0}")]
    Db(#[from] redb::Error),
    /// A stored value could not be encoded or decoded.
    #[error("Raft database value: {0}")]
    Codec(#[from] serde_json::Error),
    /// The directory holds the log of meshplane before redb.
    #[error(
        "{0} holds Raft data in the old format (a `log` or `sm` directory); this version keeps Raft in \
         {DB_FILE} and does not read it: move it away and re-join this manager to the cluster"
    )]
    OldFormat(PathBuf),
    /// redb could not make sense of the file (it is shorter than its
    /// header says, or damaged otherwise): refused, never opened half.
    #[error("{path} is damaged and cannot be opened ({detail}); restore it or re-join this manager")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What redb said.
        detail: String,
    },
    /// The blocking task died.
    #[error("Raft storage task: {0}")]
    Task(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<StoreError> for StorageError<NodeId> {
    fn from(e: StoreError) -> Self {
        StorageIOError::write(&e).into()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// Fsyncs directory `dir` (a new entry in it is durable).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// A manager's Raft database (shared by its log and state machine).
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the database in `dir` (made 0700, the file
    /// 0600, each new entry fsynced in its parent). Refuses a directory of
    /// the old format.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        if dir.join("log").exists() || dir.join("sm").exists() {
            return Err(StoreError::OldFormat(dir.to_owned()));
        }
        if !dir.is_dir() {
            DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let path = dir.join(DB_FILE);
        if !path.exists() {
            let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
            sync_dir(dir)?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
        cut_partial_page(&path)?;
        // A database still held by a Raft being shut down in this process
        // is released in a moment.
        let mut tries = 0;
        let db = loop {
            // redb asserts (panics) on some damaged files: a refusal here.
            let opened = std::panic::catch_unwind(|| Database::create(&path)).map_err(|p| StoreError::Corrupt {
                path: path.clone(),
                detail: p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default(),
            })?;
            match opened {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => break r?,
            }
        };
        let w = db.begin_write()?;
        w.open_table(LOG)?;
        w.open_table(META)?;
        w.commit()?;
        Ok(Store { db: Arc::new(db) })
    }

    /// Runs `f` with the database on the blocking pool.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// The value of `key` in `meta`, decoded.
    pub(super) async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.run(move |db| {
            let r = db.begin_read()?;
            let t = r.open_table(META)?;
            match t.get(key)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Sets `key` in `meta` to `value`, durably.
    pub(super) async fn put<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)?;
        self.run(move |db| {
            let w = db.begin_write()?;
            w.open_table(META)?.insert(key, bytes.as_slice())?;
            w.commit()?;
            Ok(())
        })
        .await
    }
}

/// Cuts bytes past the file's last whole page (a torn tail: redb sizes the
/// file in whole pages, so they were never part of a commit), durably.
fn cut_partial_page(path: &Path) -> Result<(), StoreError> {
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    let extra = len % DB_PAGE;
    if extra != 0 {
        tracing::warn!(path = %path.display(), bytes = extra, "cutting a torn tail off the Raft database");
        let f = OpenOptions::new().write(true).open(path).map_err(io(path))?;
        f.set_len(len - extra).and_then(|()| f.sync_all()).map_err(io(path))?;
    }
    Ok(())
}
