//! Kept connections between managers for Raft: one TLS handshake per
//! peer, not one per RPC.
//!
//! An RPC takes a kept connection to its target (or makes one), sends
//! its request, reads the answer and gives the connection back. RPCs in
//! flight at once (an append and a vote) each take their own, so one
//! never waits behind another. A connection is made in a task of its own
//! (at most [`MAX_CONNECTING`] at once per target): when openraft gives
//! up on an RPC (its deadline is the heartbeat interval), the handshake
//! goes on and the connection is kept for the next one. A kept connection
//! that fails before its answer (the server closed it while it was idle)
//! is dropped and the RPC sent once more on a new one: Raft's RPCs may be
//! repeated.

use super::{TlsError, connect, exchange};
use crate::rpc::{Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;

/// A connection idle longer is not used again (the server closes idle
/// connections after `Limits::idle`, 60 s).
const REUSE_WITHIN: Duration = Duration::from_secs(30);
/// A connection older is not used again: a renewed certificate, or one
/// the CA revoked, shows in new handshakes only.
const MAX_AGE: Duration = Duration::from_secs(600);
/// Idle connections kept per target.
const MAX_IDLE: usize = 4;
/// Connections being made at once per target.
const MAX_CONNECTING: usize = 2;
/// The whole of one RPC on a connection: request written, answer read.
const RPC_DEADLINE: Duration = Duration::from_secs(10);

type Key = (SocketAddr, String);

struct Kept {
    s: TlsStream<TcpStream>,
    opened: Instant,
    used: Instant,
}

#[derive(Default)]
struct Target {
    idle: Vec<Kept>,
    connecting: Option<Arc<Semaphore>>,
}

/// Kept connections, per target (address and certificate name).
#[derive(Default)]
pub(super) struct Pool {
    targets: Mutex<HashMap<Key, Target>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Target>> {
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A kept connection to `key` still worth using.
    fn take(&self, key: &Key) -> Option<Kept> {
        let mut g = self.lock();
        let t = g.get_mut(key)?;
        while let Some(k) = t.idle.pop() {
            if k.used.elapsed() < REUSE_WITHIN && k.opened.elapsed() < MAX_AGE {
                return Some(k);
            }
        }
        None
    }

    fn put(&self, key: Key, k: Kept) {
        let mut g = self.lock();
        let t = g.entry(key).or_default();
        if t.idle.len() < MAX_IDLE {
            t.idle.push(k);
        }
    }

    fn connecting(&self, key: &Key) -> Arc<Semaphore> {
        let mut g = self.lock();
        g.entry(key.clone())
            .or_default()
            .connecting
            .get_or_insert_with(|| Arc::new(Semaphore::new(MAX_CONNECTING)))
            .clone()
    }

    /// A new connection to `key`, made in a task that outlives this call.
    async fn open(self: &Arc<Pool>, connector: tokio_rustls::TlsConnector, key: &Key) -> Result<Kept, TlsError> {
        let permit = self.connecting(key).acquire_owned().await.map_err(|_| TlsError::ConnectTimeout)?;
        // One made while this call waited for its turn.
        if let Some(k) = self.take(key) {
            return Ok(k);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (pool, key2) = (self.clone(), key.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let r = connect(&connector, key2.0, &key2.1).await;
            let r = r.map(|s| Kept { s, opened: Instant::now(), used: Instant::now() });
            // The caller gave up: keep the connection for the next one.
            if let Err(Ok(k)) = tx.send(r) {
                pool.put(key2, k);
            }
        });
        rx.await.unwrap_or(Err(TlsError::ConnectTimeout))
    }

    /// `req` to the node at `addr` (certificate name `name`) on a kept
    /// connection, or a new one.
    pub(super) async fn call(
        self: &Arc<Pool>,
        connector: tokio_rustls::TlsConnector,
        addr: SocketAddr,
        name: &str,
        req: &Request,
    ) -> Result<Response, TlsError> {
        let key = (addr, name.to_owned());
        if let Some(mut k) = self.take(&key) {
            match tokio::time::timeout(RPC_DEADLINE, exchange(&mut k.s, req)).await {
                Ok(Ok(resp)) => {
                    k.used = Instant::now();
                    self.put(key, k);
                    return Ok(resp);
                }
                Err(_) => return Err(TlsError::NoAnswer),
                // Closed while idle: once more on a new connection.
                Ok(Err(_)) => {}
            }
        }
        let mut k = self.open(connector, &key).await?;
        let resp =
            tokio::time::timeout(RPC_DEADLINE, exchange(&mut k.s, req)).await.map_err(|_| TlsError::NoAnswer)??;
        k.used = Instant::now();
        self.put(key, k);
        Ok(resp)
    }
}
