//! The management plane's limits, over real TLS on loopback sockets: the
//! size of a request before and after authentication, the deadlines
//! (handshake, a slow request, an idle member, all counted), the caps at
//! accept (per address, in total, with places kept for members), kept
//! connections (many requests on one); and three managers whose Raft
//! keeps committing while one follower's port takes 2 000 idle
//! connections and 200 slow-loris ones, with bounded memory.
//!
//! Attackers connect from other loopback addresses (127.0.1.x, 127.0.2.x,
//! 127.0.3.x: all of 127/8 is local) than the managers (127.0.0.1).

use meshplane_control::pki::{ClusterCa, JoinRole, NodeIdentity};
use meshplane_control::raft::{Applied, NodeId, Raft, StateMachine, node_addr, start_with};
use meshplane_control::rpc::{MAX_FRAME, Refusal, Request, Response, read_frame, write_frame};
use meshplane_control::state::{Availability, Command, Node, Role};
use meshplane_control::tls::{Creds, Limits, Server, TlsNetwork, client_config, raft_handler, serve_with_limits};
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// A TCP connection from `src` (a loopback address) to `to`.
async fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

/// A TLS client without a certificate (as a joining node is), trusting
/// the CA `ca`.
fn anonymous(ca: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec())).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn member(id: &NodeIdentity) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(client_config(id).unwrap()))
}

async fn tls(c: &tokio_rustls::TlsConnector, src: IpAddr, to: SocketAddr, name: &str) -> TlsStream<TcpStream> {
    let tcp = tcp_from(src, to).await.unwrap();
    c.connect(ServerName::try_from(name.to_owned()).unwrap(), tcp).await.unwrap()
}

/// Whether the server closed `s` within `d` (an end of file or a reset).
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, d: Duration) -> bool {
    let mut b = [0u8; 64];
    let end = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Whether a connection from `src` to `to` is closed at once (reset by
/// the server while it connects, or just after).
async fn refused(src: IpAddr, to: SocketAddr) -> bool {
    match tcp_from(src, to).await {
        Err(_) => true,
        Ok(mut s) => closed_within(&mut s, Duration::from_secs(2)).await,
    }
}

/// Waits until `server`'s counters satisfy `f` (at most 5 s).
async fn until(server: &Server, what: &str, f: impl Fn(&meshplane_control::tls::ConnStats) -> bool) {
    for _ in 0..500 {
        if f(&server.stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: {:?}", server.stats());
}

fn loopback(a: u8, b: u8) -> IpAddr {
    IpAddr::from([127, 0, a, b])
}

/// A worker node of the state named `id` (fixed addresses).
fn worker_node(id: String) -> Node {
    Node {
        id,
        mgmt: "198.18.1.1:2377".parse().unwrap(),
        data_ip: "198.18.0.1".parse().unwrap(),
        data_mac: "02:00:00:00:00:01".parse().unwrap(),
        role: Role::Worker,
        availability: Availability::Active,
        key_id: None,
        underlay_mtu: 1500,
    }
}

fn local() -> IpAddr {
    loopback(0, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_before_and_after_authentication() {
    let ca = ClusterCa::init().unwrap();
    let (m1, m2) = (ca.issue("m1", JoinRole::Manager).unwrap(), ca.issue("m2", JoinRole::Manager).unwrap());
    let token = ca.token(JoinRole::Worker);
    let limits = Limits {
        max_connections: 8,
        reserved_for_members: 2,
        max_per_ip: 4,
        handshake: Duration::from_secs(3),
        request: Duration::from_secs(1),
        idle: Duration::from_secs(1),
        write: Duration::from_secs(1),
        ..Limits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handler = raft_handler(Arc::new(Mutex::new(None)), Some(Arc::new(Mutex::new(ca.clone()))));
    let server = serve_with_limits(listener, Creds::new(&m1).unwrap(), handler, limits.clone()).unwrap();
    let to = server.addr;
    let (anon, mem) = (anonymous(&m1.ca), member(&m2));

    // A member: a request over the join limit is read and answered, and
    // the connection serves the next one too.
    let mut s = tls(&mem, local(), to, "m1").await;
    let mut big = worker_node("x".repeat(200 << 10));
    write_frame(&mut s, &Request::Write(Command::AddNode(big.clone()))).await.unwrap();
    let r: Response = read_frame(&mut s, MAX_FRAME).await.unwrap();
    assert!(matches!(r, Response::Refused(Refusal::RaftNotRunning)));
    let vote = Request::Vote(openraft::raft::VoteRequest::new(openraft::Vote::new(1, 1), None));
    write_frame(&mut s, &vote).await.unwrap();
    let r: Response = read_frame(&mut s, MAX_FRAME).await.unwrap();
    assert!(matches!(r, Response::Refused(Refusal::RaftNotRunning)));
    let st = server.stats();
    assert_eq!((st.accepted, st.requests), (1, 2), "two requests on one connection");
    // ... and is closed once idle.
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "an idle member's connection stays");
    assert!(t.elapsed() >= Duration::from_millis(900), "closed before it was idle: {:?}", t.elapsed());
    until(&server, "idle", |s| s.idle_closed == 1).await;

    // Without a certificate: a request over 64 KiB is refused from its
    // length; a join is answered, and nothing more on that connection.
    let mut s = tls(&anon, local(), to, "m1").await;
    let join = Request::Join { token: token.clone(), name: "y".repeat(70 << 10), csr: vec![], node: None };
    let _ = write_frame(&mut s, &join).await; // may break off: the server closes
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "a 70 KiB join was read");
    until(&server, "too large", |s| s.too_large == 1).await;
    let mut s = tls(&anon, local(), to, "m1").await;
    let csr = meshplane_control::pki::csr(&meshplane_control::pki::new_key().unwrap(), "w1").unwrap();
    write_frame(&mut s, &Request::Join { token, name: "w1".into(), csr, node: None }).await.unwrap();
    let r: Response = read_frame(&mut s, MAX_FRAME).await.unwrap();
    assert!(matches!(r, Response::Join(Ok(_))));
    let again = write_frame(&mut s, &vote).await.is_ok() && read_frame::<_, Response>(&mut s, MAX_FRAME).await.is_ok();
    assert!(!again, "a second request without a certificate was answered");
    // A member's limit is 16 MiB.
    let mut s = tls(&mem, local(), to, "m1").await;
    s.write_all(&((16u32 << 20) + 1).to_le_bytes()).await.unwrap();
    s.flush().await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "a 16 MiB + 1 request was read");
    until(&server, "too large", |s| s.too_large == 2).await;
    big.id.truncate(100);

    // Slow clients: a header and a byte, then nothing; a TCP connection
    // that never starts TLS.
    let mut slow_anon = tls(&anon, local(), to, "m1").await;
    let mut slow_member = tls(&mem, local(), to, "m1").await;
    for s in [&mut slow_anon, &mut slow_member] {
        s.write_all(&1000u32.to_le_bytes()).await.unwrap();
        s.write_all(b"{").await.unwrap();
        s.flush().await.unwrap();
    }
    let mut raw = tcp_from(local(), to).await.unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut slow_anon, Duration::from_secs(3)).await);
    assert!(closed_within(&mut slow_member, Duration::from_secs(3)).await);
    assert!(t.elapsed() >= Duration::from_millis(900), "closed before the deadline: {:?}", t.elapsed());
    until(&server, "slow requests", |s| s.request_timeouts == 2).await;
    assert!(closed_within(&mut raw, Duration::from_secs(4)).await, "a connection without TLS stays");
    assert!(t.elapsed() >= Duration::from_millis(2900), "closed before the handshake deadline: {:?}", t.elapsed());
    until(&server, "handshake", |s| s.handshake_timeouts == 1 && s.open == 0).await;

    // Caps: 4 per address, 8 in total of which 2 only for members (this
    // server saw 127.0.0.1 show a member's certificate).
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from(loopback(3, 1), to).await.unwrap());
    }
    until(&server, "four held", |s| s.open == 4).await;
    assert!(refused(loopback(3, 1), to).await, "a fifth from one address");
    until(&server, "per address", |s| s.refused_per_ip == 1).await;
    for _ in 0..2 {
        held.push(tcp_from(loopback(3, 2), to).await.unwrap());
    }
    until(&server, "six held", |s| s.open == 6).await;
    assert!(refused(loopback(3, 3), to).await, "a seventh from strangers");
    until(&server, "total", |s| s.refused_total == 1).await;
    let mut s = tls(&mem, local(), to, "m1").await;
    write_frame(&mut s, &vote).await.unwrap();
    let r: Response = read_frame(&mut s, MAX_FRAME).await.unwrap();
    assert!(matches!(r, Response::Refused(Refusal::RaftNotRunning)), "a member in a reserved place");
    drop((held, s));
    until(&server, "all closed", |s| s.open == 0).await;
    let st = server.stats();
    assert_eq!((st.bad_frames, st.write_timeouts, st.accept_errors), (0, 0, 0), "{st:?}");
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Raises this process's open-file limit to `want` (within the hard one).
fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(hard >= want, "the open-file hard limit ({hard}) is under {want}: raise it (ulimit -Hn)");
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
}

struct Manager {
    id: NodeId,
    ca: Vec<u8>,
    server: Server,
    raft: Raft,
    _sm: StateMachine,
}

fn availability(i: usize) -> Command {
    let availability = if i.is_multiple_of(2) { Availability::Drain } else { Availability::Active };
    Command::SetAvailability { id: "n0".into(), availability }
}

/// Commits `n` writes through `leader` one after the other, `gap` apart:
/// each one's latency.
async fn writes(leader: &Raft, n: usize, from: usize, gap: Duration) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in from..from + n {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), leader.client_write(availability(i))).await;
        let Ok(r) = r else { panic!("write {i}: no commit within 10 s") };
        let r = r.unwrap();
        assert_eq!(r.data, Applied(Ok(())), "write {i}");
        lat.push(t.elapsed());
        tokio::time::sleep(gap).await;
    }
    lat
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// Idle connections: each connects from `src`, waits until the server
/// closes it, and connects again a second later, until `stop`.
async fn idle_flood(src: IpAddr, to: SocketAddr, stop: Arc<AtomicBool>, made: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = tcp_from(src, to).await {
            made.fetch_add(1, Ordering::Relaxed);
            let mut b = [0u8; 16];
            let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Slow-loris: a TLS connection without a certificate, a frame header,
/// then one byte a second; again when the server closes it, until `stop`.
async fn slow_loris(
    anon: tokio_rustls::TlsConnector,
    src: IpAddr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicU64>,
) {
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let Ok(tcp) = tcp_from(src, to).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let name = ServerName::try_from("meshplane").unwrap();
        if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(10), anon.connect(name, tcp)).await
            && s.write_all(&60_000u32.to_le_bytes()).await.is_ok()
            && s.flush().await.is_ok()
        {
            if std::mem::take(&mut first) {
                ready.fetch_add(1, Ordering::Relaxed);
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if s.write_all(b" ").await.is_err() || s.flush().await.is_err() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_keeps_committing_under_a_connection_flood() {
    const IDLE: usize = 2000;
    const IDLE_ADDRS: u8 = 40; // 50 each
    const SLOW: usize = 200;
    const SLOW_ADDRS: u8 = 4;
    const WRITES: usize = 200;
    raise_nofile(8192);
    let dir = std::env::temp_dir().join(format!("meshplane-mgmt-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = ClusterCa::init().unwrap();

    let mut ms = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let ident = ca.issue(&format!("m{id}"), JoinRole::Manager).unwrap();
        let slot = Arc::new(Mutex::new(None));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = serve_with_limits(
            listener,
            Creds::new(&ident).unwrap(),
            raft_handler(slot.clone(), None),
            Limits::default(),
        )
        .unwrap();
        let net = TlsNetwork::new(&ident).unwrap();
        let (raft, sm) = start_with(id, &dir.join(id.to_string()), net, 1000).await.unwrap();
        *slot.lock().unwrap() = Some(raft.clone());
        members.insert(id, node_addr(&ident.name, server.addr));
        ms.push(Manager { id, ca: ident.ca, server, raft, _sm: sm });
    }
    ms[0].raft.initialize(members).await.unwrap();
    let mut leader = None;
    for _ in 0..200 {
        leader = ms[0].raft.metrics().borrow().current_leader;
        if leader.is_some() && ms.iter().all(|m| m.raft.metrics().borrow().current_leader == leader) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = ms.iter().find(|m| Some(m.id) == leader).expect("a leader");
    let target = ms.iter().find(|m| m.id != leader.id).unwrap();
    let n0 = worker_node("n0".into());
    leader.raft.client_write(Command::AddNode(n0)).await.unwrap();

    // Before: Raft's connections are kept, not made per RPC.
    let accepted = target.server.stats().accepted;
    let base = writes(&leader.raft, WRITES, 0, Duration::from_millis(5)).await;
    let made = target.server.stats().accepted - accepted;
    assert!(made <= 4, "{made} connections for {WRITES} writes and their heartbeats");
    let term = leader.raft.metrics().borrow().current_term;

    // The flood, at the follower's port: slow-loris first (they must be in
    // to be timed out), then the idle ones.
    let to = target.server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, idle_made) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let rss0 = rss_kib();
    let mut flood = Vec::new();
    let anon = anonymous(&target.ca);
    for i in 0..SLOW {
        let src = loopback(2, 1 + (i % SLOW_ADDRS as usize) as u8);
        flood.push(tokio::spawn(slow_loris(anon.clone(), src, to, stop.clone(), ready.clone())));
    }
    let t = Instant::now();
    while ready.load(Ordering::Relaxed) < SLOW as u64 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ready.load(Ordering::Relaxed), SLOW as u64, "slow-loris connections in: {:?}", target.server.stats());
    let flood_start = Instant::now();
    for i in 0..IDLE {
        let src = loopback(1, 1 + (i % IDLE_ADDRS as usize) as u8);
        flood.push(tokio::spawn(idle_flood(src, to, stop.clone(), idle_made.clone())));
    }
    // The writes, and memory and open connections sampled while the flood
    // lasts: past the slow-loris' deadline (10 s after their header).
    let done = AtomicBool::new(false);
    let load = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let l = writes(&leader.raft, WRITES, WRITES, Duration::from_millis(50)).await;
        while flood_start.elapsed() < Duration::from_secs(13) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        done.store(true, Ordering::Relaxed);
        l
    };
    let sample = async {
        let (mut rss, mut open) = (rss0, 0);
        while !done.load(Ordering::Relaxed) {
            rss = rss.max(rss_kib());
            open = open.max(target.server.stats().open);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (rss, open)
    };
    let (loaded, (rss_peak, open_peak)) = tokio::join!(load, sample);
    let during = target.server.stats();
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.abort();
    }
    let term_after = leader.raft.metrics().borrow().current_term;

    let (b50, b99, bmax) = percentiles(base);
    let (l50, l99, lmax) = percentiles(loaded);
    println!(
        "commit latency, {WRITES} writes through the leader, 3 managers on loopback TLS:\n  \
         idle:  p50 {b50:?} p99 {b99:?} max {bmax:?}\n  \
         flood: p50 {l50:?} p99 {l99:?} max {lmax:?} ({IDLE} idle + {SLOW} slow-loris connections \
         at a follower's port; {} idle connects made)\n  \
         Raft term {term} -> {term_after}; follower's connections: peak open {open_peak}, {during:?}\n  \
         VmRSS {rss0} KiB before, peak {rss_peak} KiB",
        idle_made.load(Ordering::Relaxed)
    );
    let cap = Limits::default().max_connections as u64;
    assert!(open_peak <= cap, "open {open_peak} over the cap {cap}");
    // (The total cap refuses first here; the per-address one is checked above.)
    assert!(during.refused_total > 0, "nothing refused at the cap: {during:?}");
    assert!(during.handshake_timeouts > 0, "idle connections were not closed: {during:?}");
    assert!(during.request_timeouts >= SLOW as u64 / 2, "slow-loris connections were not closed: {during:?}");
    assert!(rss_peak < rss0 + 256 * 1024, "memory grew from {rss0} KiB to {rss_peak} KiB");
    assert!(l99 < Duration::from_secs(2), "commits stalled under the flood: p99 {l99:?}");
    for m in &ms {
        let _ = m.raft.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
