//! The management plane over mutual TLS: join tokens (right, wrong, for
//! another cluster), a node whose certificate the CA did not sign refused,
//! and three managers running Raft over loopback TCP: the leader dies,
//! writes go on.

use meshplane_control::pki::{ClusterCa, JoinRole, JoinToken, NodeIdentity, PkiError};
use meshplane_control::raft::{Applied, NodeId, Raft, StateMachine, node_addr, start_with};
use meshplane_control::rpc::{Refusal, Request, Response};
use meshplane_control::state::{Availability, Command, Node, Role};
use meshplane_control::tls::{Server, TlsNetwork, join_new_key, request, serve};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

#[test]
fn tokens_are_checked() {
    let mut ca = ClusterCa::init().unwrap();
    let m = ca.token(JoinRole::Manager);
    let w = ca.token(JoinRole::Worker);
    assert!(m.starts_with("MPTKN-1-") && m.contains(&ca.fingerprint()));
    assert_eq!(ca.check(&m), Ok(JoinRole::Manager));
    assert_eq!(ca.check(&w), Ok(JoinRole::Worker));
    let other = ClusterCa::init().unwrap();
    assert_eq!(ca.check(&other.token(JoinRole::Manager)), Err(PkiError::WrongCluster));
    let forged = format!("MPTKN-1-{}-{}", ca.fingerprint(), "00".repeat(16));
    assert_eq!(ca.check(&forged), Err(PkiError::BadSecret));
    for bad in ["", "MPTKN-1-", "SWMTKN-1-abc-def", "MPTKN-1-zz-11", &format!("MPTKN-1-{}", ca.fingerprint())] {
        assert_eq!(JoinToken::parse(bad), Err(PkiError::MalformedToken), "{bad:?}");
    }
    ca.rotate(JoinRole::Worker);
    assert_eq!(ca.check(&w), Err(PkiError::BadSecret), "a rotated token no longer works");
    assert_eq!(ca.check(&m), Ok(JoinRole::Manager), "the other role's token still does");
}

/// A certificate lifetime past any calendar (from the admin socket's
/// `Init`, or a `SetCa` in the log) is cut to ten years: signing works,
/// nothing panics.
#[test]
fn a_huge_certificate_lifetime_is_cut_to_ten_years() {
    use meshplane_control::pki::{MAX_CERT_EXPIRY, Peer, csr, new_key};
    let ca = ClusterCa::init().unwrap();
    let huge = ca.with_cert_expiry(Duration::from_secs(u64::MAX));
    assert_eq!(huge.cert_expiry(), MAX_CERT_EXPIRY);
    // As a `SetCa` could carry it: the field itself at u64::MAX.
    let mut v = serde_json::to_value(&ca).unwrap();
    v["cert_expiry_secs"] = serde_json::json!(u64::MAX);
    let raw: ClusterCa = serde_json::from_value(v).unwrap();
    assert_eq!(raw.cert_expiry(), MAX_CERT_EXPIRY);
    let key = new_key().unwrap();
    let cert = raw.sign(&csr(&key, "node9").unwrap(), "node9", JoinRole::Worker).unwrap();
    let p = Peer::from_cert(&cert).unwrap();
    let life = p.not_after - p.not_before;
    assert!((MAX_CERT_EXPIRY.as_secs() as i64..MAX_CERT_EXPIRY.as_secs() as i64 + 3600).contains(&life), "{life}");
}

struct Manager {
    id: NodeId,
    ident: NodeIdentity,
    server: Option<Server>,
    slot: Arc<Mutex<Option<Raft>>>,
    raft: Option<(Raft, StateMachine)>,
}

async fn manager(id: NodeId, ident: NodeIdentity, ca: Option<Arc<Mutex<ClusterCa>>>) -> Manager {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slot = Arc::new(Mutex::new(None));
    let server = serve(listener, &ident, slot.clone(), ca).unwrap();
    Manager { id, ident, server: Some(server), slot, raft: None }
}

fn add_node(i: u32) -> Command {
    Command::AddNode(Node {
        id: format!("n{i}"),
        mgmt: format!("198.18.1.{}:2377", i + 1).parse().unwrap(),
        data_ip: format!("198.18.0.{}", i + 1).parse().unwrap(),
        data_mac: format!("02:00:00:00:00:{:02x}", i + 1).parse().unwrap(),
        role: Role::Worker,
        availability: Availability::Active,
        key_id: None,
        underlay_mtu: 1500,
    })
}

async fn leader_of(ms: &[Manager]) -> NodeId {
    for _ in 0..200 {
        let ls: Vec<Option<NodeId>> =
            ms.iter().filter_map(|m| m.raft.as_ref()).map(|(r, _)| r.metrics().borrow().current_leader).collect();
        if let Some(Some(l)) = ls.first()
            && ls.iter().all(|x| *x == Some(*l))
            && ms.iter().any(|m| m.id == *l && m.raft.is_some())
        {
            return *l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_over_mutual_tls() {
    let dir = std::env::temp_dir().join(format!("meshplane-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = ClusterCa::init().unwrap();
    let token = ca.token(JoinRole::Manager);
    let ca = Arc::new(Mutex::new(ca));
    let first = ca.lock().unwrap().issue("m1", JoinRole::Manager).unwrap();
    let mut ms = vec![manager(1, first, Some(ca.clone())).await];
    let addr1 = ms[0].server.as_ref().unwrap().addr;

    // Joins: a wrong token is refused; a token of another cluster fails the
    // server check; the right one gives a certificate of the CA.
    let other = ClusterCa::init().unwrap();
    let e = join_new_key(addr1, "m1", &other.token(JoinRole::Manager), "x", None).await.unwrap_err();
    assert!(e.to_string().contains("not the token's"), "{e}");
    // (Tokens are taken out of the lock first: the server locks the CA.)
    let fp = ca.lock().unwrap().fingerprint();
    let forged = format!("MPTKN-1-{fp}-{}", "ab".repeat(16));
    let e = join_new_key(addr1, "m1", &forged, "x", None).await.unwrap_err();
    assert!(e.to_string().contains("invalid join token"), "{e}");
    let worker_token = ca.lock().unwrap().token(JoinRole::Worker);
    let worker = join_new_key(addr1, "m1", &worker_token, "w1", None).await.unwrap();
    assert_eq!(worker.1, JoinRole::Worker);
    assert_eq!(worker.0.peer().unwrap().role, JoinRole::Worker, "the certificate carries the role");
    let e = join_new_key(addr1, "m1", &worker_token, "-all", None).await.unwrap_err();
    assert!(e.to_string().contains("bad node name"), "{e}");
    for id in 2..=3u64 {
        let (ident, role) = join_new_key(addr1, "m1", &token, &format!("m{id}"), None).await.unwrap();
        assert_eq!(role, JoinRole::Manager);
        ms.push(manager(id, ident, None).await);
    }

    // A node whose certificate the CA did not sign is refused.
    let evil = other.issue("evil", JoinRole::Manager).unwrap();
    let evil = NodeIdentity { ca: ms[0].ident.ca.clone(), ..evil };
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, 9), None);
    let r = request(addr1, "m1", &evil, &Request::Vote(vote.clone())).await;
    assert!(r.is_err(), "a foreign certificate got an answer");
    // A worker's certificate may not send Raft's RPCs.
    let r = request(addr1, "m1", &worker.0, &Request::Vote(vote.clone())).await.unwrap();
    assert!(matches!(r, Response::Refused(Refusal::ManagersOnly)), "a worker's vote was taken");
    // Nor may it serve as a manager: a client refuses a worker's server
    // certificate (valid as it is).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = serve(listener, &worker.0, Arc::new(Mutex::new(None)), None).unwrap();
    match request(fake.addr, "w1", &ms[0].ident, &Request::Vote(vote.clone())).await {
        Err(e) => assert!(e.to_string().contains("not a manager's"), "{e}"),
        Ok(_) => panic!("a worker's server was taken for a manager"),
    }
    // Without a certificate, Raft is refused (joins only).
    let r = request(addr1, "m1", &ms[1].ident, &Request::Vote(vote)).await.unwrap();
    assert!(matches!(r, Response::Refused(_)), "Raft is not running on m1 yet");

    // Raft over the management plane.
    let mut members = BTreeMap::new();
    for m in &mut ms {
        let net = TlsNetwork::new(&m.ident).unwrap();
        let (r, sm) = start_with(m.id, &dir.join(m.id.to_string()), net, 1000).await.unwrap();
        *m.slot.lock().unwrap() = Some(r.clone());
        m.raft = Some((r, sm));
        members.insert(m.id, node_addr(&m.ident.name, m.server.as_ref().unwrap().addr));
    }
    ms[0].raft.as_ref().unwrap().0.initialize(members).await.unwrap();
    let write = |ms: &Vec<Manager>, l: NodeId, c: Command| {
        let r = ms.iter().find(|m| m.id == l).unwrap().raft.as_ref().unwrap().0.clone();
        async move { tokio::time::timeout(Duration::from_secs(10), r.client_write(c)).await.unwrap().unwrap().data }
    };
    let l = leader_of(&ms).await;
    for i in 0..5 {
        assert_eq!(write(&ms, l, add_node(i)).await, Applied(Ok(())));
    }
    // The leader dies (its server too): a new leader, writes go on.
    let m = ms.iter_mut().find(|m| m.id == l).unwrap();
    m.server = None;
    let (r, _) = m.raft.take().unwrap();
    r.shutdown().await.unwrap();
    let l2 = leader_of(&ms).await;
    assert_ne!(l2, l);
    for i in 5..8 {
        assert_eq!(write(&ms, l2, add_node(i)).await, Applied(Ok(())));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for m in ms.iter().filter(|m| m.raft.is_some()) {
        assert_eq!(m.raft.as_ref().unwrap().1.state().nodes.len(), 8, "manager {}", m.id);
    }
    for m in &mut ms {
        if let Some((r, _)) = m.raft.take() {
            let _ = r.shutdown().await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
