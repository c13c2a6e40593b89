//! The reaper: a container's task (CNI, `task attach --pid`) whose network
//! namespace is gone, or is now another one (a pid reused), is detached,
//! every [`PERIOD`] and once at start; and the DELs spooled while the
//! node was down or without a quorum are done. Runtimes that never send
//! DEL (`ctr run -d`, Docker, a reboot) leave nothing behind. Tasks
//! without a container (the lab's namespaces, `task attach --netns NAME`)
//! are never reaped. `docs/cni-design.md` section 6.

use meshplane_control::cluster::Control;
use meshplane_control::cluster::cni::find_key;
use meshplane_control::state::{ClusterState, Command, TaskNetns};
use std::sync::Arc;
use std::time::Duration;

/// How often the reaper looks.
pub(crate) const PERIOD: Duration = Duration::from_secs(2);

/// What the reaper finds of a namespace file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// There, with this inode.
    There(u64),
    /// No such file.
    Gone,
    /// Cannot be read now (left alone).
    Unknown,
}

/// The namespace file at `path`.
pub(crate) fn probe(path: &str) -> Probe {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => Probe::There(m.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Probe::Gone,
        Err(_) => Probe::Unknown,
    }
}

/// The container tasks of node `me` whose namespace is gone (or is
/// another, by its inode): their ids and why.
pub(crate) fn stale(state: &ClusterState, me: &str, probe: impl Fn(&str) -> Probe) -> Vec<(String, String)> {
    state
        .tasks
        .values()
        .filter(|t| t.node == me)
        .filter_map(|t| {
            let c = t.container.as_ref()?;
            let path = TaskNetns::parse(t.netns.as_deref()?).ok()?.path();
            let why = match (probe(&path), c.netns_ino) {
                (Probe::Gone, _) => format!("container {}'s namespace {path} is gone", c.id),
                (Probe::There(ino), Some(want)) if ino != want => {
                    format!("container {}'s namespace {path} is now another (inode {ino}, was {want})", c.id)
                }
                _ => return None,
            };
            Some((t.id.clone(), why))
        })
        .collect()
}

/// The reaper's loop (on the control thread's runtime; ends with it).
pub(crate) async fn run(control: Arc<Control>, me: String) {
    loop {
        pass(&control, &me).await;
        tokio::time::sleep(PERIOD).await;
    }
}

/// One pass: stale tasks detached, the spool drained.
async fn pass(control: &Control, me: &str) {
    let state = control.state().0;
    for (id, why) in stale(&state, me, probe) {
        match control.write(Command::DetachTask { id: id.clone() }).await {
            Ok(()) => {
                control.count_reaped();
                tracing::info!("task {id}: {why}; detached");
            }
            Err(e) => tracing::warn!("task {id}: {why}; detaching it failed ({e}), tried again in {PERIOD:?}"),
        }
    }
    let pending = match meshplane_cni::spool::pending(&control.admin_socket()) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("reading the pending CNI DELs: {e}");
            return;
        }
    };
    for path in pending {
        // Under the spool's lock: an ADD of the same attachment drops the
        // file first, or waits until this DEL is done.
        let _spool = control.cni_spool_lock().await;
        if !path.exists() {
            continue;
        }
        let key = match meshplane_cni::spool::read(&path) {
            Ok(k) => k,
            Err(err) => {
                tracing::warn!("{}: not a pending CNI DEL ({err}); removed", path.display());
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        if let Err(f) = control.cni_del(&key).await {
            tracing::warn!("pending cni del {key}: {f}");
            continue;
        }
        // Done once no task is that attachment any more (a DEL that was
        // spooled again stays for the next pass).
        if find_key(&control.state().0, me, &key).is_none() {
            tracing::info!("pending cni del {key}: done");
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshplane_control::state::{CniAttachment, ContainerRef};

    fn state() -> ClusterState {
        use super::super::fixtures::{network, node, service};
        let mut st = ClusterState::new();
        for c in [node("n1", 1), node("n2", 2), network(), service("web", None)] {
            st.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
        let c = |id: &str, ino: Option<u64>| ContainerRef {
            id: id.into(),
            cni: Some(CniAttachment { network: "web-net".into(), ifname: "eth0".into() }),
            netns_ino: ino,
            name: None,
        };
        for (id, node, netns, container) in [
            ("web.1", "n1", "/run/netns/netns-a", Some(c("a", Some(10)))),
            ("web.2", "n1", "/proc/42/ns/net", Some(c("b", Some(20)))),
            ("web.3", "n1", "/proc/43/ns/net", Some(c("c", None))),
            ("web.4", "n1", "mp-lab-t4", None),
            ("web.5", "n2", "/proc/44/ns/net", Some(c("e", Some(40)))),
        ] {
            let cmd = Command::AttachTask {
                id: id.into(),
                service: "web".into(),
                node: node.into(),
                weight: 1,
                netns: Some(netns.into()),
                container,
            };
            st.apply(&cmd).expect("attached");
        }
        st
    }

    #[test]
    fn only_container_tasks_of_this_node_whose_namespace_went_are_stale() {
        let st = state();
        // Everything there with its inode: nothing.
        let there = |p: &str| match p {
            "/var/run/netns/netns-a" => Probe::There(10),
            "/proc/42/ns/net" => Probe::There(20),
            _ => Probe::There(1),
        };
        assert!(stale(&st, "n1", there).is_empty());
        // Everything gone: the container tasks of n1 only (not the lab's
        // web.4, not n2's web.5).
        let ids: Vec<String> = stale(&st, "n1", |_| Probe::Gone).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["web.1", "web.2", "web.3"]);
        // A pid reused: another inode; without a recorded inode, no
        // judgement; unreadable: left alone.
        let reused = |p: &str| match p {
            "/proc/42/ns/net" => Probe::There(99),
            "/proc/43/ns/net" => Probe::There(99),
            _ => Probe::Unknown,
        };
        let s = stale(&st, "n1", reused);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].0, "web.2");
        assert!(s[0].1.contains("is now another (inode 99, was 20)"), "{}", s[0].1);
    }

    #[test]
    fn a_real_file_is_probed() {
        assert!(matches!(probe("/proc/self/ns/net"), Probe::There(_)));
        assert_eq!(probe("/run/netns/mp-reaper-surely-absent"), Probe::Gone);
    }
}
