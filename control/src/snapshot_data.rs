//! The bytes of a Raft snapshot in memory, bounded: openraft's
//! `SnapshotData`. A snapshot being received grows only by appending: a
//! chunk must start exactly where the bytes received so far end (or at 0,
//! which starts the transfer over), and the whole may not pass
//! [`MAX_SNAPSHOT_BYTES`]. Anything else is refused with a typed
//! [`SnapshotRefusal`] (as an I/O error, which openraft answers to the
//! sender as a storage error), never by growing a buffer to a size a peer
//! chose. A built (or installed) snapshot is read-only.
//!
//! A leaf: `rpc` names it in the Raft type declarations, `raft` uses it.

use std::io::SeekFrom;
use std::pin::Pin;
use std::task::{Context, Poll};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// The largest snapshot a manager accepts (and builds): 256 MiB.
pub const MAX_SNAPSHOT_BYTES: u64 = 256 << 20;
/// The size of the chunks a snapshot is sent in (openraft's
/// `snapshot_max_chunk_size`), and the largest chunk accepted: 1 MiB.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1 << 20;

/// Why a snapshot chunk (or a write to a snapshot) was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnapshotRefusal {
    /// The chunk does not start where the bytes received so far end.
    #[error("snapshot chunk at offset {offset}, but {received} bytes were received so far")]
    Offset {
        /// The chunk's offset.
        offset: u64,
        /// The bytes received so far for this snapshot.
        received: u64,
    },
    /// The snapshot would pass the limit.
    #[error("snapshot of at least {size} bytes refused (the limit is {limit})")]
    TooLarge {
        /// The size it would have.
        size: u64,
        /// [`MAX_SNAPSHOT_BYTES`].
        limit: u64,
    },
    /// One chunk is larger than a chunk may be.
    #[error("snapshot chunk of {size} bytes refused (chunks are at most {limit})")]
    ChunkTooLarge {
        /// The chunk's size.
        size: u64,
        /// [`SNAPSHOT_CHUNK_BYTES`].
        limit: u64,
    },
    /// A write to a snapshot that is not being received.
    #[error("a built snapshot is read-only")]
    ReadOnly,
}

impl SnapshotRefusal {
    /// Checks a chunk of `len` bytes at `offset` against the limits alone
    /// (the offset against the bytes received is checked on write).
    pub fn check_chunk(offset: u64, len: u64) -> Result<(), SnapshotRefusal> {
        if len > SNAPSHOT_CHUNK_BYTES {
            return Err(SnapshotRefusal::ChunkTooLarge { size: len, limit: SNAPSHOT_CHUNK_BYTES });
        }
        match offset.checked_add(len) {
            Some(end) if end <= MAX_SNAPSHOT_BYTES => Ok(()),
            end => Err(SnapshotRefusal::TooLarge { size: end.unwrap_or(u64::MAX), limit: MAX_SNAPSHOT_BYTES }),
        }
    }
}

fn refused(r: SnapshotRefusal) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, r)
}

/// A snapshot's bytes: being received (append-only, bounded) or built
/// (read-only).
#[derive(Debug, Default)]
pub struct SnapshotData {
    buf: Vec<u8>,
    pos: usize,
    receiving: bool,
}

impl SnapshotData {
    /// A built snapshot of `bytes`, to read.
    pub fn built(bytes: Vec<u8>) -> SnapshotData {
        SnapshotData { buf: bytes, pos: 0, receiving: false }
    }

    /// An empty snapshot to receive chunks into.
    pub fn receiving() -> SnapshotData {
        SnapshotData { buf: Vec::new(), pos: 0, receiving: true }
    }

    /// The bytes.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    /// The bytes received (or built) so far.
    pub fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let rest = me.buf.get(me.pos..).unwrap_or_default();
        let n = rest.len().min(out.remaining());
        out.put_slice(&rest[..n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if !me.receiving {
            return Poll::Ready(Err(refused(SnapshotRefusal::ReadOnly)));
        }
        let size = me.buf.len() as u64 + data.len() as u64;
        if size > MAX_SNAPSHOT_BYTES {
            return Poll::Ready(Err(refused(SnapshotRefusal::TooLarge { size, limit: MAX_SNAPSHOT_BYTES })));
        }
        me.buf.extend_from_slice(data);
        me.pos = me.buf.len();
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, to: SeekFrom) -> std::io::Result<()> {
        let me = self.get_mut();
        let len = me.buf.len() as u64;
        let target = match to {
            SeekFrom::Start(x) => Some(x),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => (me.pos as u64).checked_add_signed(d),
        };
        match target {
            // Receiving: the next chunk at the end, or the transfer over from 0.
            Some(0) if me.receiving => me.buf.clear(),
            Some(t) if me.receiving && t == len => {}
            Some(t) if !me.receiving && t <= len => {}
            t => {
                return Err(refused(SnapshotRefusal::Offset { offset: t.unwrap_or(u64::MAX), received: len }));
            }
        }
        me.pos = usize::try_from(target.unwrap_or_default()).unwrap_or(usize::MAX).min(me.buf.len());
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Poll::Ready(Ok(self.pos as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    #[tokio::test]
    async fn receiving_appends_refuses_gaps_and_rewinds_only_to_zero() {
        let mut s = SnapshotData::receiving();
        s.write_all(b"abc").await.unwrap();
        s.seek(SeekFrom::Start(3)).await.unwrap();
        s.write_all(b"def").await.unwrap();
        let e = s.seek(SeekFrom::Start(1 << 40)).await.unwrap_err();
        assert_eq!(e.to_string(), "snapshot chunk at offset 1099511627776, but 6 bytes were received so far");
        assert!(s.seek(SeekFrom::Start(2)).await.is_err());
        assert_eq!(s.len(), 6);
        s.seek(SeekFrom::Start(0)).await.unwrap();
        assert!(s.is_empty());
        assert_eq!(
            SnapshotRefusal::check_chunk(MAX_SNAPSHOT_BYTES, 1),
            Err(SnapshotRefusal::TooLarge { size: MAX_SNAPSHOT_BYTES + 1, limit: MAX_SNAPSHOT_BYTES })
        );
        assert!(SnapshotRefusal::check_chunk(u64::MAX, 1).is_err());
        assert!(SnapshotRefusal::check_chunk(0, SNAPSHOT_CHUNK_BYTES + 1).is_err());
    }

    #[tokio::test]
    async fn built_is_read_only_and_seeks_within() {
        let mut s = SnapshotData::built(b"hello".to_vec());
        assert_eq!(s.seek(SeekFrom::End(0)).await.unwrap(), 5);
        s.seek(SeekFrom::Start(1)).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "ello");
        assert!(s.seek(SeekFrom::Start(6)).await.is_err());
        assert!(s.write_all(b"x").await.is_err());
    }
}
