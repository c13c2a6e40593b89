//! Crash safety of the Raft storage (redb): a manager runs as a real child
//! process (this test binary run again with `MESHPLANE_RAFT_CHILD` set,
//! selecting `raft_child`) and is killed with SIGKILL at a random moment
//! while the parent writes; every write the child acknowledged must be in
//! its log exactly once, in order, at the index it was acknowledged at,
//! and in its state after the restart. A torn tail written by hand on the
//! database file; snapshot chunks with a wrong or huge offset refused.

use meshplane_control::raft::{Router, Store, StoreError, answer, start};
use meshplane_control::rpc::{Request, Response};
use openraft::raft::InstallSnapshotRequest;
use openraft::{BasicNode, SnapshotMeta, StoredMembership, Vote};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command as Proc, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{add_node, logged_writes, tmpdir};

const CHILD_ENV: &str = "MESHPLANE_RAFT_CHILD";

/// The child: a single-manager cluster in `$MESHPLANE_RAFT_CHILD`; prints
/// `ready <node names>`, then for each `w <i>` line on stdin writes node
/// `i` and prints `ok <i> <log index>` once it is committed.
#[test]
fn raft_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let router = Router::default();
        let (raft, sm) = start(1, Path::new(&dir), &router, 1_000_000).await.expect("start");
        if !raft.is_initialized().await.expect("raft") {
            raft.initialize(BTreeMap::from([(1, BasicNode::new("m1"))])).await.expect("initialize");
        }
        raft.wait(Some(Duration::from_secs(20))).current_leader(1, "leader").await.expect("leader");
        // Everything committed before is applied before the first answer.
        let committed = raft.metrics().borrow().last_log_index;
        raft.wait(Some(Duration::from_secs(20))).applied_index_at_least(committed, "applied").await.expect("applied");
        let names: Vec<String> = sm.state().nodes.keys().cloned().collect();
        println!("ready {}", names.join(","));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.strip_prefix("w ").and_then(|x| x.parse().ok()) {
                    let _ = tx.send(i);
                }
            }
        });
        while let Some(i) = rx.recv().await {
            let r = raft.client_write(add_node(i)).await.expect("write");
            assert_eq!(r.data.0, Ok(()));
            println!("ok {i} {}", r.log_id.index);
        }
        std::process::exit(0);
    });
}

/// A tiny xorshift: the kill points.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The log's node writes of the stopped child, in log order.
fn logged(dir: &Path) -> Vec<(u32, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(logged_writes(dir))
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_write() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tmpdir("sigkill");
    let exe = std::env::current_exe().unwrap();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let mut acked: Vec<(u32, u64)> = Vec::new();
    let mut next = 0u32;
    let started = Instant::now();
    for round in 0..50 {
        let mut child = Proc::new(&exe)
            .args(["--exact", "raft_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.with_extension("stderr")).map(Stdio::from).unwrap_or(Stdio::null()))
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Ready, with every write acknowledged so far applied.
        let names = loop {
            let line = rx.recv_timeout(Duration::from_secs(30)).expect("the child starts");
            // (after the harness's "test raft_child ... ", on the same line)
            if let Some(n) = line.split_once("ready ").map(|(_, n)| n) {
                break n.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect::<Vec<_>>();
            }
        };
        for (i, _) in &acked {
            assert!(names.contains(&format!("n{i}")), "round {round}: acknowledged n{i} missing from the state");
        }
        // A burst of writes, and SIGKILL at a random moment.
        let mut stdin = child.stdin.take().unwrap();
        let burst: String = (next..next + 300).map(|i| format!("w {i}\n")).collect();
        next += 300;
        stdin.write_all(burst.as_bytes()).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(250)));
        child.kill().unwrap();
        child.wait().unwrap();
        drop(stdin);
        reader.join().unwrap();
        let before = acked.len();
        for line in rx.try_iter() {
            if let Some(rest) = line.strip_prefix("ok ") {
                let (i, idx) = rest.split_once(' ').unwrap();
                acked.push((i.parse().unwrap(), idx.parse().unwrap()));
            }
        }
        // The log: every acknowledged write once, in order, where it was
        // acknowledged; no write twice.
        let logged = logged(&dir);
        let mut seen = std::collections::BTreeSet::new();
        for (i, _) in &logged {
            assert!(seen.insert(*i), "round {round}: n{i} twice in the log");
        }
        let at: BTreeMap<u32, u64> = logged.iter().copied().collect();
        for (i, idx) in &acked {
            assert_eq!(at.get(i), Some(idx), "round {round}: acknowledged n{i} at index {idx}");
        }
        assert!(acked.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1), "acknowledged in order");
        eprintln!("round {round}: {} acknowledged, {} logged", acked.len() - before, logged.len());
    }
    assert!(acked.len() > 50, "the rounds wrote something: {}", acked.len());
    eprintln!("50 rounds in {:?}, {} writes acknowledged", started.elapsed(), acked.len());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts a single-manager cluster in `dir`, writes nodes `from..to`,
/// checks that it then has `0..to`, and stops.
async fn run_single(dir: &Path, from: u32, to: u32) {
    let router = Router::default();
    let (raft, sm) = start(1, dir, &router, 1_000_000).await.expect("start");
    if !raft.is_initialized().await.unwrap() {
        raft.initialize(BTreeMap::from([(1, BasicNode::new("m1"))])).await.unwrap();
    }
    raft.wait(Some(Duration::from_secs(10))).current_leader(1, "leader").await.unwrap();
    for i in from..to {
        assert_eq!(raft.client_write(add_node(i)).await.unwrap().data.0, Ok(()));
    }
    let last = raft.metrics().borrow().last_log_index;
    raft.wait(Some(Duration::from_secs(10))).applied_index_at_least(last, "applied").await.unwrap();
    let names: Vec<String> = sm.state().nodes.keys().cloned().collect();
    let mut want: Vec<String> = (0..to).map(|i| format!("n{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    raft.shutdown().await.unwrap();
    drop((raft, sm));
    // openraft's tasks let go of the database a moment after shutdown:
    // opening it waits for that; the file is then nobody's.
    drop(Store::open(dir).expect("reopen"));
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_on_the_database_file_is_survived() {
    let dir = tmpdir("torn");
    run_single(&dir, 0, 20).await;
    let db = dir.join("raft.redb");
    // Garbage appended to the file, not a whole page (a torn write past
    // the last commit): cut on open; everything committed is there.
    append(&db, &[0xa5; 10_000]);
    run_single(&dir, 20, 30).await;
    // Whole pages of garbage: redb's recovery takes them in.
    append(&db, &[0x5a; 3 * 4096]);
    run_single(&dir, 30, 40).await;
    // Later writes survive the next restart.
    run_single(&dir, 40, 41).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_database_file_is_refused_with_a_clear_error() {
    let dir = tmpdir("truncated");
    run_single(&dir, 0, 20).await;
    let db = dir.join("raft.redb");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len - 4096).unwrap();
    let e = Store::open(&dir).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("is damaged and cannot be opened"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_have_private_modes_and_the_old_format_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("modes").join("raft");
    run_single(&dir, 0, 1).await;
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(dir.join("raft.redb")).unwrap().permissions().mode() & 0o777, 0o600);
    let old = tmpdir("old");
    std::fs::create_dir_all(old.join("log")).unwrap();
    let e = Store::open(&old).unwrap_err();
    assert!(matches!(e, StoreError::OldFormat(_)), "{e}");
    assert!(e.to_string().contains("old format"), "{e}");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    let _ = std::fs::remove_dir_all(&old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_chunks_with_a_wrong_or_huge_offset_are_refused() {
    let dir = tmpdir("chunks");
    let router = Router::default();
    let (raft, _sm) = start(1, &dir, &router, 1_000_000).await.unwrap();
    raft.initialize(BTreeMap::from([(1, BasicNode::new("m1"))])).await.unwrap();
    raft.wait(Some(Duration::from_secs(10))).current_leader(1, "leader").await.unwrap();
    let meta =
        SnapshotMeta { last_log_id: None, last_membership: StoredMembership::default(), snapshot_id: "evil-1".into() };
    let chunk = |offset: u64, data: Vec<u8>| {
        Request::Snapshot(InstallSnapshotRequest {
            vote: Vote::new(1000, 2),
            meta: meta.clone(),
            offset,
            data,
            done: false,
        })
    };
    let refused = |r: Response, what: &str| match r {
        Response::Snapshot(Err(openraft::error::RaftError::Fatal(openraft::error::Fatal::StorageError(e)))) => {
            assert!(e.to_string().contains(what), "{e}");
        }
        Response::Snapshot(other) => panic!("not refused: {other:?}"),
        _ => panic!("not a snapshot answer"),
    };
    // The first chunk of a snapshot must start at 0.
    let r = answer(&raft, chunk(5, vec![1; 10])).await;
    assert!(matches!(r, Response::Snapshot(Err(openraft::error::RaftError::APIError(_)))), "an offset not 0 first");
    assert!(matches!(answer(&raft, chunk(0, vec![1; 10])).await, Response::Snapshot(Ok(_))));
    // A gap, or a rewind to anywhere but 0.
    refused(answer(&raft, chunk(100, vec![1; 10])).await, "but 10 bytes were received so far");
    refused(answer(&raft, chunk(4, vec![1; 10])).await, "but 10 bytes were received so far");
    // Offsets past the limit (the old code resized a buffer to them).
    refused(answer(&raft, chunk(1 << 40, vec![1])).await, "the limit is 268435456");
    refused(answer(&raft, chunk(u64::MAX, vec![1])).await, "the limit is");
    // A chunk too large.
    refused(answer(&raft, chunk(10, vec![0; 2 << 20])).await, "chunks are at most 1048576");
    // The next chunk in place is taken; the manager still commits.
    assert!(matches!(answer(&raft, chunk(10, vec![1; 10])).await, Response::Snapshot(Ok(_))));
    assert_eq!(raft.client_write(add_node(0)).await.unwrap().data.0, Ok(()));
    raft.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
