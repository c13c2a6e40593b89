//! The pending-DEL spool (`docs/cni-design.md` section 6): a DEL that
//! found no node to talk to is written to `cni-pending/` beside the admin
//! socket, one file per attachment, and the node finishes it when it
//! starts (and on each reaper pass), deleting the file once no task
//! matches. The plugin writes; the node reads with [`read`] the files
//! [`pending`] lists.
//!
//! A file is `cni-pending/<16 hex>.json` ([`spool_name`]: FNV-1a 64 of
//! `network\0container_id\0ifname`, so a repeated DEL replaces its own
//! file), holding the [`Key`] as JSON (`{"network", "container_id",
//! "ifname"}`), mode 0600, written to a temporary name (not ending in
//! `.json`) and renamed, so a reader never sees half a file.

use crate::proto::Key;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The spool directory of the node whose admin socket is `socket`.
pub fn spool_dir(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or(Path::new("/")).join("cni-pending")
}

/// The file name of `key`'s pending DEL.
pub fn spool_name(key: &Key) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = [key.network.as_bytes(), key.container_id.as_bytes(), key.ifname.as_bytes()].join(&0u8);
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}.json")
}

/// Spools the DEL of `key` for the node at `socket`: the file written, or
/// `None` if the socket's directory (the node's state directory) does not
/// exist, in which case no node ever ran there and there is nothing to
/// delete.
pub fn write(socket: &Path, key: &Key) -> std::io::Result<Option<PathBuf>> {
    let dir = spool_dir(socket);
    match dir.parent() {
        Some(state) if state.is_dir() => {}
        _ => return Ok(None),
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let name = spool_name(key);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let body = serde_json::to_vec(key).map_err(std::io::Error::other)?;
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| Some(path))
}

/// The pending DELs in the spool of the node at `socket` (the files named
/// as [`spool_name`] names them; temporary files are skipped). No spool
/// directory: none.
pub fn pending(socket: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = spool_dir(socket);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if name.len() == 21 && name.ends_with(".json") && name.bytes().take(16).all(|b| b.is_ascii_hexdigit()) {
            out.push(dir.join(&*name));
        }
    }
    out.sort();
    Ok(out)
}

/// Drops the DEL of `key` spooled for the node at `socket`, if there is
/// one: an ADD of the same attachment came after it (the runtime ran the
/// DEL first), so it must not detach what that ADD attaches. True if a
/// file was removed.
pub fn remove(socket: &Path, key: &Key) -> std::io::Result<bool> {
    match std::fs::remove_file(spool_dir(socket).join(spool_name(key))) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// One spooled DEL's attachment.
pub fn read(path: &Path) -> std::io::Result<Key> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(c: &str) -> Key {
        Key { network: "web-net".into(), container_id: c.into(), ifname: "eth0".into() }
    }

    #[test]
    fn names_are_the_keys_hash_and_tell_keys_apart() {
        // The published FNV-1a 64 test vector, then the key's fields joined by NULs.
        assert_eq!(fnv(b"a"), "af63dc4c8601ec8c");
        assert_eq!(spool_name(&key("abc")), format!("{}.json", fnv(b"web-net\0abc\0eth0")));
        assert_eq!(spool_name(&key("abc")), spool_name(&key("abc")));
        assert_ne!(spool_name(&key("abc")), spool_name(&key("abd")));
        // The separator keeps ("a", "bc") apart from ("ab", "c").
        let a = Key { network: "a".into(), container_id: "bc".into(), ifname: "x".into() };
        let b = Key { network: "ab".into(), container_id: "c".into(), ifname: "x".into() };
        assert_ne!(spool_name(&a), spool_name(&b));
        assert_eq!(spool_dir(Path::new("/var/lib/meshplane/admin.sock")), Path::new("/var/lib/meshplane/cni-pending"));
    }

    /// FNV-1a 64, written out from its definition.
    fn fnv(b: &[u8]) -> String {
        let h =
            b.iter().fold(14_695_981_039_346_656_037u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(1_099_511_628_211));
        format!("{h:016x}")
    }

    #[test]
    fn a_spooled_del_reads_back_and_a_missing_state_directory_is_nothing_to_do() {
        let dir = std::env::temp_dir().join(format!("mpcni-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("admin.sock");
        assert_eq!(write(&sock, &key("abc")).unwrap(), None);
        assert!(pending(&sock).unwrap().is_empty());
        std::fs::create_dir(&dir).unwrap();
        let p = write(&sock, &key("abc")).unwrap().unwrap();
        assert_eq!(write(&sock, &key("abc")).unwrap().unwrap(), p);
        assert_eq!(pending(&sock).unwrap(), vec![p.clone()]);
        assert_eq!(read(&p).unwrap(), key("abc"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(spool_dir(&sock)).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
