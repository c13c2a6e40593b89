//! Raft: 3 and 5 managers in one process on the in-process router, each
//! with its log and state machine on disk. A new leader after the leader
//! dies, with no committed write lost; restart of every manager from disk
//! to the same state; a minority cannot commit; snapshots compact the log.

use meshplane_control::raft::{Applied, NodeId, Raft, Router, StateMachine, start};
use meshplane_control::state::{ClusterState, Command};
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{add_node, logged_writes, tmpdir};

struct Cluster {
    router: Router,
    dir: PathBuf,
    nodes: BTreeMap<NodeId, (Raft, StateMachine)>,
    /// The log index of the last write.
    last: std::sync::Mutex<u64>,
}

impl Cluster {
    async fn new(tag: &str, n: u64, snapshot_every: u64) -> Cluster {
        let dir = tmpdir(tag);
        let router = Router::default();
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            nodes.insert(id, start(id, &dir.join(id.to_string()), &router, snapshot_every).await.unwrap());
        }
        let members: BTreeMap<NodeId, BasicNode> = (1..=n).map(|id| (id, BasicNode::new(format!("m{id}")))).collect();
        nodes[&1].0.initialize(members).await.unwrap();
        let c = Cluster { router, dir, nodes, last: std::sync::Mutex::new(0) };
        c.leader().await;
        c
    }

    /// The leader all live nodes agree on.
    async fn leader(&self) -> NodeId {
        for _ in 0..200 {
            let leaders: Vec<Option<NodeId>> =
                self.nodes.values().map(|(r, _)| r.metrics().borrow().current_leader).collect();
            if let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| *x == Some(*l))
                && self.nodes.contains_key(l)
            {
                return *l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader agreed on");
    }

    async fn write(&self, cmd: Command) -> Applied {
        let l = self.leader().await;
        let r = tokio::time::timeout(Duration::from_secs(10), self.nodes[&l].0.client_write(cmd))
            .await
            .expect("the write completes")
            .expect("the leader takes it");
        *self.last.lock().unwrap() = r.log_id.index;
        r.data
    }

    /// Waits until every live node applied the last write.
    async fn settle(&self) {
        let want = *self.last.lock().unwrap();
        for (id, (r, _)) in &self.nodes {
            r.wait(Some(Duration::from_secs(10)))
                .applied_index_at_least(Some(want), "caught up")
                .await
                .unwrap_or_else(|e| panic!("node {id}: {e}"));
        }
    }

    async fn kill(&mut self, id: NodeId) {
        self.router.remove(id);
        if let Some((r, _)) = self.nodes.remove(&id) {
            let _ = r.shutdown().await;
        }
    }

    fn states(&self) -> Vec<ClusterState> {
        self.nodes.values().map(|(_, sm)| sm.state()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_dies_writes_go_on_nothing_committed_is_lost_and_restart_from_disk() {
    let mut c = Cluster::new("three", 3, 1000).await;
    for i in 0..10 {
        assert_eq!(c.write(add_node(i)).await, Applied(Ok(())));
    }
    // A refused command is applied as nothing, everywhere, with its error.
    let dup = c.write(Command::RemoveNode { id: "nobody".into() }).await;
    assert_eq!(dup.0.map_err(|e| e.to_string()), Err("no node \"nobody\"".into()));
    c.settle().await;
    let before = c.states();
    assert!(before.iter().all(|s| s.nodes.len() == 10 && *s == before[0]));

    // The leader dies: the other two elect a new one and go on.
    let old = c.leader().await;
    c.kill(old).await;
    let new = c.leader().await;
    assert_ne!(new, old);
    for i in 10..15 {
        assert_eq!(c.write(add_node(i)).await, Applied(Ok(())));
    }
    c.settle().await;
    let detail: Vec<_> = c
        .nodes
        .iter()
        .map(|(id, (r, sm))| (*id, sm.state().nodes.len(), sm.last_applied(), r.metrics().borrow().last_applied))
        .collect();
    assert!(c.states().iter().all(|s| s.nodes.len() == 15), "no committed write lost: {detail:?}");

    // Every manager stops and starts again from its directory.
    let ids: Vec<NodeId> = c.nodes.keys().copied().collect();
    for id in ids.clone() {
        c.kill(id).await;
    }
    for id in [1, 2, 3] {
        let n = start(id, &c.dir.join(id.to_string()), &c.router, 1000).await.unwrap();
        c.nodes.insert(id, n);
    }
    let _ = c.leader().await;
    // A write after the restart commits; everyone has all 16 nodes.
    assert_eq!(c.write(add_node(15)).await, Applied(Ok(())));
    c.settle().await;
    let after = c.states();
    let detail: Vec<_> = c
        .nodes
        .iter()
        .map(|(id, (r, sm))| (*id, sm.state().nodes.len(), sm.last_applied(), r.metrics().borrow().last_applied))
        .collect();
    assert!(after.iter().all(|s| s.nodes.len() == 16 && *s == after[0]), "{detail:?}");
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_cannot_commit() {
    let mut c = Cluster::new("minority", 3, 1000).await;
    assert_eq!(c.write(add_node(0)).await, Applied(Ok(())));
    let old = c.leader().await;
    // The leader is cut off: alone it is a minority.
    c.router.set_cut(old, true);
    let r = tokio::time::timeout(Duration::from_secs(3), c.nodes[&old].0.client_write(add_node(1))).await;
    assert!(!matches!(r, Ok(Ok(_))), "a cut-off leader committed a write");
    // The majority elects another leader and commits.
    let isolated = c.nodes.remove(&old).expect("node");
    let new = c.leader().await;
    assert_ne!(new, old);
    assert_eq!(c.write(add_node(2)).await, Applied(Ok(())));
    // The old leader comes back and follows: it never applied node 1.
    c.router.set_cut(old, false);
    c.nodes.insert(old, isolated);
    c.settle().await;
    for s in c.states() {
        let names: Vec<&str> = s.nodes.keys().map(String::as_str).collect();
        assert_eq!(names, ["n0", "n2"]);
    }
    c.kill(old).await;
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_managers_survive_two_failures_and_snapshots_compact_the_log() {
    let mut c = Cluster::new("five", 5, 20).await;
    for i in 0..50 {
        assert_eq!(c.write(add_node(i)).await, Applied(Ok(())));
    }
    c.settle().await;
    // Snapshots were taken and written; the logs were purged behind them.
    let leader = c.leader().await;
    let m = c.nodes[&leader].0.metrics().borrow().clone();
    assert!(m.snapshot.is_some(), "{m:?}");
    assert!(m.purged.is_some(), "the log was compacted: {m:?}");
    assert!(Path::new(&c.dir.join(leader.to_string()).join("raft.redb")).exists());
    // Two managers die (a majority of 3 of 5 remains).
    let l = c.leader().await;
    c.kill(l).await;
    let other = *c.nodes.keys().next().expect("node");
    c.kill(other).await;
    for i in 50..55 {
        assert_eq!(c.write(add_node(i)).await, Applied(Ok(())));
    }
    c.settle().await;
    assert!(c.states().iter().all(|s| s.nodes.len() == 55));
    // A dead one restarts from its snapshot and log, and catches up.
    let n = start(l, &c.dir.join(l.to_string()), &c.router, 20).await.unwrap();
    c.nodes.insert(l, n);
    c.settle().await;
    assert!(c.states().iter().all(|s| s.nodes.len() == 55));
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_are_added_and_removed() {
    let mut c = Cluster::new("members", 3, 1000).await;
    for i in 0..5 {
        assert_eq!(c.write(add_node(i)).await, Applied(Ok(())));
    }
    // A fourth manager joins: first as a learner (it catches up), then a voter.
    let l = c.leader().await;
    let leader = c.nodes[&l].0.clone();
    let n4 = start(4, &c.dir.join("4"), &c.router, 1000).await.unwrap();
    c.nodes.insert(4, n4);
    leader.add_learner(4, BasicNode::new("m4"), true).await.expect("learner");
    leader.change_membership(std::collections::BTreeSet::from([1, 2, 3, 4]), false).await.expect("voter");
    c.settle().await;
    assert_eq!(c.nodes[&4].1.state().nodes.len(), 5, "the new manager has the state");
    // One of the first three (not the leader) leaves the cluster.
    let gone = [1, 2, 3].into_iter().find(|x| *x != l).expect("a follower");
    let keep3: std::collections::BTreeSet<NodeId> = [1, 2, 3, 4].into_iter().filter(|x| *x != gone).collect();
    leader.change_membership(keep3.clone(), false).await.expect("remove one");
    c.kill(gone).await;
    for i in 5..8 {
        assert_eq!(c.write(add_node(i)).await, Applied(Ok(())));
    }
    c.settle().await;
    let voters: Vec<NodeId> = c.nodes[&l].0.metrics().borrow().membership_config.membership().voter_ids().collect();
    assert_eq!(voters.into_iter().collect::<std::collections::BTreeSet<_>>(), keep3);
    assert!(c.states().iter().all(|s| s.nodes.len() == 8));
    for id in c.nodes.keys().copied().collect::<Vec<_>>() {
        c.kill(id).await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_whose_storage_is_dropped_and_reopened_again_and_again_loses_nothing() {
    let mut c = Cluster::new("reopen", 3, 1000).await;
    let mut acked: Vec<(u32, u64)> = Vec::new();
    let mut i = 0;
    for round in 0..6u64 {
        // One manager (the leader every third round) stops: its storage is
        // dropped; the other two go on; it starts again from its database.
        let victim = round % 3 + 1;
        c.kill(victim).await;
        for _ in 0..5 {
            assert_eq!(c.write(add_node(i)).await, Applied(Ok(())));
            acked.push((i, *c.last.lock().unwrap()));
            i += 1;
        }
        let n = start(victim, &c.dir.join(victim.to_string()), &c.router, 1000).await.unwrap();
        c.nodes.insert(victim, n);
        c.settle().await;
        let states = c.states();
        assert!(states.iter().all(|s| s.nodes.len() == i as usize && *s == states[0]), "round {round}");
    }
    // Every manager's log: each acknowledged write once, in order, at the
    // index it was acknowledged at, and nothing else.
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
    for id in [1u64, 2, 3] {
        assert_eq!(logged_writes(&c.dir.join(id.to_string())).await, acked, "manager {id}");
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}
