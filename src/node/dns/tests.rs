//! The server on real sockets on 127.0.0.1 (no namespace, no dataplane):
//! queries built with hickory over UDP and TCP, a fake upstream that is
//! itself a real socket.

use super::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshplane_dns::zone::{Mode, NetZone, SvcRec, TaskRec};
use std::io::{Read, Write};
use std::sync::atomic::AtomicU32;

/// A port range of this test's own (tests run in parallel, and test
/// binaries too).
fn ports(k: u16) -> PortRange {
    let lo = 21000 + (std::process::id() % 400) as u16 * 20 + k * 4;
    PortRange { lo, hi: lo + 3 }
}

fn ip(n: u8, last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, n, last)
}

/// Network `n` (VNI 4096 + n): service `web` (its VIP .2) with tasks
/// `web.1` and `web.2` (.5, .6) serving.
fn net(n: u8, name: &str, internal: bool) -> NetZone {
    let task = |id: &str, last| TaskRec { name: id.into(), service: "web".into(), ip: ip(n, last), serving: true };
    NetZone {
        name: name.into(),
        vni: FIRST_VNI + u32::from(n),
        gateway: ip(n, 254),
        subnet: (ip(n, 0), 24),
        internal,
        services: vec![SvcRec { name: "web".into(), mode: Mode::Vip, vip: Some(ip(n, 2)), ports: vec![] }],
        tasks: vec![task(&format!("web.{}", 1), 5), task("web.2", 6)],
    }
}

fn start(k: u16, upstreams: Vec<SocketAddr>, limits: Limits, zone: Zone) -> (Dns, PortRange) {
    let p = ports(k);
    let cfg = DnsConfig {
        listen: Ipv4Addr::LOCALHOST,
        ports: p,
        upstreams: Upstreams::Fixed(upstreams),
        never: vec![],
        limits,
    };
    let dns = Dns::start(cfg).expect("the DNS thread starts");
    let want = zone.networks.len();
    dns.set_zone(zone);
    settle(|| dns.listening().len() == want, "the listeners open");
    (dns, p)
}

/// Waits up to 2 s for `ok`.
fn settle(ok: impl Fn() -> bool, what: &str) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(2), "{what}: not within 2 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("a name"), t));
    m.to_vec().expect("encodes")
}

fn at(p: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, p))
}

/// A UDP exchange; `None` if nothing came back within `wait`.
fn udp_wait(to: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(wait)).expect("timeout");
    s.send_to(msg, to).expect("send");
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

fn udp(to: SocketAddr, msg: &[u8]) -> Message {
    let r = udp_wait(to, msg, Duration::from_secs(6)).expect("an answer");
    Message::from_vec(&r).expect("the answer parses")
}

fn addrs(m: &Message) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Length-prefixed messages written at once, then their answers read.
fn tcp_pipelined(to: SocketAddr, msgs: &[Vec<u8>]) -> Vec<Message> {
    let mut s = std::net::TcpStream::connect(to).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(6))).expect("timeout");
    let mut out = Vec::new();
    for m in msgs {
        out.extend_from_slice(&(m.len() as u16).to_be_bytes());
        out.extend_from_slice(m);
    }
    s.write_all(&out).expect("write");
    msgs.iter()
        .map(|_| {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).expect("a length");
            let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut m).expect("a message");
            Message::from_vec(&m).expect("parses")
        })
        .collect()
}

#[test]
fn each_network_is_answered_on_its_own_port_over_udp_and_tcp_and_follows_the_zone() {
    let zone = Zone { networks: vec![net(0, "app", false), net(1, "back", true)] };
    let (dns, p) = start(0, vec![], Limits::default(), zone.clone());
    let (app, back) = (at(p.lo), at(p.lo + 1));
    assert_eq!(dns.listening().into_iter().collect::<Vec<_>>(), vec![(p.lo, "app".into()), (p.lo + 1, "back".into())]);

    let m = udp(app, &query(7, "web.", RecordType::A));
    assert_eq!((m.metadata.id, m.metadata.response_code, addrs(&m)), (7, ResponseCode::NoError, vec![ip(0, 2)]));
    assert!(m.answers.iter().all(|r| r.ttl == 600));
    let m = udp(back, &query(8, "web.", RecordType::A));
    assert_eq!(addrs(&m), vec![ip(1, 2)], "the other network's VIP from the other port");
    let m = udp(app, &query(9, "web.back.", RecordType::A));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "another network's names do not exist here");
    let m = udp(app, &query(10, "web.", RecordType::AAAA));
    assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0), "NODATA");
    let m = udp(app, &query(11, "9.0.19.198.in-addr.arpa.", RecordType::PTR));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // Two queries pipelined on one connection, answered in order.
    let got = tcp_pipelined(app, &[query(21, "tasks.web.", RecordType::A), query(22, "web.2.app.", RecordType::A)]);
    assert_eq!((got[0].metadata.id, addrs(&got[0])), (21, vec![ip(0, 5), ip(0, 6)]));
    assert_eq!((got[1].metadata.id, addrs(&got[1])), (22, vec![ip(0, 6)]));

    // A task goes: the next query sees it.
    let mut z2 = zone.clone();
    z2.networks[0].tasks.retain(|t| t.name != "web.2");
    dns.set_zone(z2.clone());
    settle(|| addrs(&udp(app, &query(30, "tasks.web.", RecordType::A))) == vec![ip(0, 5)], "web.2 leaves tasks.web");
    let m = udp(app, &query(31, "web.2.", RecordType::A));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "its name is gone (not ours: no upstream)");

    // A malformed query: FORMERR with its ID, and the server keeps
    // answering.
    let good = query(0x4242, "web.", RecordType::A);
    let r = udp_wait(app, &good[..good.len() - 3], Duration::from_secs(2)).expect("an answer");
    assert_eq!((&r[..2], r[2] & 0x80, r[3] & 0x0f), (&[0x42u8, 0x42][..], 0x80, 1), "FORMERR");
    let mut zero = good.clone();
    zero[5] = 0;
    let r = udp_wait(app, &zero, Duration::from_secs(2)).expect("an answer");
    assert_eq!(r[3] & 0x0f, 1, "QDCOUNT 0: FORMERR");
    assert_eq!(udp_wait(app, &good[..11], Duration::from_millis(300)), None, "too short: ignored");
    assert_eq!(addrs(&udp(app, &good)), vec![ip(0, 2)], "still answering");
    // Over TCP a malformed message is answered, then the connection closed.
    let mut s = std::net::TcpStream::connect(app).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    s.write_all(&[0, 9]).and_then(|()| s.write_all(&good[..9])).expect("write");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(rest.len(), 0, "under 12 bytes: closed without an answer");
    let mut s = std::net::TcpStream::connect(app).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let bad = &zero[..];
    s.write_all(&(bad.len() as u16).to_be_bytes()).and_then(|()| s.write_all(bad)).expect("write");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("answered and closed");
    assert_eq!((rest.len() > 4, rest.get(5).map(|rc| rc & 0x0f)), (true, Some(1)), "FORMERR, then EOF");

    // A network leaves: its port closes.
    dns.set_zone(Zone { networks: vec![z2.networks[0].clone()] });
    settle(|| dns.listening().len() == 1, "back's listeners close");
    assert_eq!(udp_wait(back, &good, Duration::from_millis(300)), None, "nobody answers for back");

    let st = dns.stats();
    assert!(st.queries_udp >= 11 && st.queries_tcp >= 4, "{st:?}");
    assert!(st.noerror >= 6 && st.nodata >= 1 && st.nxdomain >= 1 && st.formerr >= 3 && st.servfail >= 2, "{st:?}");
    assert!(st.ignored >= 2 && st.tcp_conns >= 3 && st.networks == 1 && st.forwarded == 0, "{st:?}");
    dns.stop();
    assert_eq!(udp_wait(app, &good, Duration::from_millis(300)), None, "stopped: nothing listens");
}

/// A fake upstream on 127.0.0.1 (UDP and TCP on one port): answers every
/// `A` query with 198.18.30.10 (unless `silent`), remembers the IDs it
/// saw; serves for 20 s at most.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u16>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Upstream {
    fn start(silent: bool) -> Upstream {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = u.local_addr().expect("addr");
        let t = std::net::TcpListener::bind(addr).expect("tcp bind");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        u.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        t.set_nonblocking(true).expect("nonblocking");
        let (s2, st2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut buf = [0u8; 4096];
            while !st2.load(Relaxed) && t0.elapsed() < Duration::from_secs(20) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    s2.lock().expect("lock").push(u16::from_be_bytes([buf[0], buf[1]]));
                    if !silent {
                        let _ = u.send_to(&answer_a(&buf[..n]), from);
                    }
                }
                if let Ok((mut c, _)) = t.accept() {
                    c.set_nonblocking(false).expect("blocking");
                    let mut len = [0u8; 2];
                    if c.read_exact(&mut len).is_ok() {
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if c.read_exact(&mut q).is_ok() {
                            s2.lock().expect("lock").push(u16::from_be_bytes([q[0], q[1]]));
                            let a = answer_a(&q);
                            let _ = c.write_all(&(a.len() as u16).to_be_bytes()).and_then(|()| c.write_all(&a));
                        }
                    }
                }
            }
        });
        Upstream { addr, seen, stop }
    }

    fn seen(&self) -> Vec<u16> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

fn answer_a(q: &[u8]) -> Vec<u8> {
    let q = Message::from_vec(q).expect("the forwarded query parses");
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    for x in &q.queries {
        m.add_query(x.clone());
        m.add_answer(Record::from_rdata(x.name().clone(), 60, RData::A(A(Ipv4Addr::new(198, 18, 30, 10)))));
    }
    m.to_vec().expect("encodes")
}

#[test]
fn other_names_are_forwarded_with_a_new_id_and_answered_with_the_tasks() {
    let up = Upstream::start(false);
    let zone = Zone { networks: vec![net(0, "app", false), net(1, "back", true)] };
    let (dns, p) = start(1, vec![up.addr], Limits::default(), zone);
    let ids = [0x1111u16, 0x2222, 0x3333];
    for id in ids {
        let m = udp(at(p.lo), &query(id, "outside.test.", RecordType::A));
        assert_eq!((m.metadata.id, m.metadata.response_code), (id, ResponseCode::NoError));
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(198, 18, 30, 10)]);
        assert_eq!(m.queries[0].name().to_ascii(), "outside.test.");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().zip(ids).any(|(s, id)| *s != id), "new IDs toward the upstream: {seen:x?}");
    // Over TCP, forwarded over TCP.
    let got =
        tcp_pipelined(at(p.lo), &[query(0x4444, "outside.test.", RecordType::A), query(5, "web.", RecordType::A)]);
    assert_eq!((got[0].metadata.id, addrs(&got[0])), (0x4444, vec![Ipv4Addr::new(198, 18, 30, 10)]));
    assert_eq!(addrs(&got[1]), vec![ip(0, 2)]);
    assert_eq!(up.seen().len(), 4);
    // An internal network's query never leaves.
    let m = udp(at(p.lo + 1), &query(6, "outside.test.", RecordType::A));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(up.seen().len(), 4, "the upstream saw nothing of it");
    let st = dns.stats();
    assert_eq!((st.forwarded, st.forward_timeouts, st.forward_errors), (4, 0, 0), "{st:?}");
}

#[test]
fn a_silent_upstream_times_out_the_next_one_answers_and_all_silent_is_servfail_in_time() {
    let (s1, s2, s3, good) =
        (Upstream::start(true), Upstream::start(true), Upstream::start(true), Upstream::start(false));
    let zone = Zone { networks: vec![net(0, "app", false)] };
    let (dns, p) = start(2, vec![s1.addr, good.addr], Limits::default(), zone.clone());
    let t0 = Instant::now();
    let m = udp(at(p.lo), &query(1, "outside.test.", RecordType::A));
    let took = t0.elapsed();
    assert_eq!(addrs(&m), vec![Ipv4Addr::new(198, 18, 30, 10)], "the second upstream's answer");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(3), "after the first's 2 s: {took:?}");
    assert_eq!((s1.seen().len(), good.seen().len()), (1, 1));
    assert_eq!(dns.stats().forward_timeouts, 1);
    dns.stop();

    let (dns, p) = start(3, vec![s1.addr, s2.addr, s3.addr], Limits::default(), zone);
    let t0 = Instant::now();
    let m = udp(at(p.lo), &query(2, "outside.test.", RecordType::A));
    let took = t0.elapsed();
    assert_eq!((m.metadata.id, m.metadata.response_code), (2, ResponseCode::ServFail));
    assert!(took >= Duration::from_millis(3900) && took < Duration::from_millis(4500), "4 s in all: {took:?}");
    assert_eq!((s2.seen().len(), s3.seen().len()), (1, 0), "the third was never reached in 4 s");
    assert_eq!(dns.stats().forward_timeouts, 2);
}

#[test]
fn forwarded_queries_in_flight_are_capped_per_network_and_per_node() {
    let silent = Upstream::start(true);
    let limits =
        Limits { per_try: Duration::from_millis(800), total: Duration::from_millis(800), in_flight: 3, per_network: 2 };
    let zone = Zone { networks: vec![net(0, "app", false), net(2, "more", false)] };
    let (dns, p) = start(4, vec![silent.addr], limits, zone);
    let (app, more) = (at(p.lo), at(p.lo + 2));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let id = AtomicU32::new(100);
    let send = |to| {
        let i = id.fetch_add(1, Relaxed) as u16;
        sock.send_to(&query(i, "outside.test.", RecordType::A), to).expect("send");
        std::thread::sleep(Duration::from_millis(30));
        i
    };
    let t0 = Instant::now();
    let (a1, a2, a3, m1, m2) = (send(app), send(app), send(app), send(more), send(more));
    // The two over a cap are answered at once; the three admitted when
    // the upstream's time is up.
    let mut order = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..5 {
        let n = sock.recv(&mut buf).expect("every query is answered");
        assert_eq!(buf[3] & 0x0f, 2, "SERVFAIL");
        order.push((u16::from_be_bytes([buf[0], buf[1]]), t0.elapsed() < Duration::from_millis(500)));
        let _ = n;
    }
    order.sort();
    assert_eq!(
        order,
        vec![(a1, false), (a2, false), (a3, true), (m1, false), (m2, true)],
        "app's third (network cap 2), more's second (node cap 3)"
    );
    assert_eq!(silent.seen().len(), 3);
    let st = dns.stats();
    assert_eq!((st.forward_over_cap, st.forwarded, st.forward_timeouts, st.servfail), (2, 3, 3, 5), "{st:?}");
    // The slots are free again.
    send(app);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!((silent.seen().len(), dns.stats().forward_over_cap), (4, 2));
}

#[test]
fn ports_follow_the_vni_inside_the_range() {
    let r = PortRange { lo: 25300, hi: 26323 };
    assert_eq!(port_for(r, FIRST_VNI), Some(25300));
    assert_eq!(port_for(r, FIRST_VNI + 1), Some(25301));
    assert_eq!(port_for(r, FIRST_VNI + 1023), Some(26323));
    assert_eq!(port_for(r, FIRST_VNI + 1024), None, "past the range: no DNS");
    assert_eq!(port_for(r, FIRST_VNI - 1), None);
    assert_eq!(port_for(PortRange { lo: 65500, hi: 65535 }, FIRST_VNI + 100), None);
}

#[test]
fn tcp_connections_past_the_cap_are_closed_at_once_and_a_freed_place_is_reused() {
    let (dns, p) = start(5, vec![], Limits::default(), Zone { networks: vec![net(0, "app", false)] });
    let open: Vec<std::net::TcpStream> =
        (0..TCP_CONNS).map(|_| std::net::TcpStream::connect(at(p.lo)).expect("connect")).collect();
    settle(|| dns.stats().tcp_conns == TCP_CONNS as u64, "every connection accepted");
    let mut over = std::net::TcpStream::connect(at(p.lo)).expect("the kernel accepts it");
    over.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut b = [0u8; 2];
    assert_eq!(over.read(&mut b).ok(), Some(0), "closed by the server at once");
    assert_eq!(dns.stats().tcp_refused, 1);
    drop(open);
    settle(
        || {
            let mut s = std::net::TcpStream::connect(at(p.lo)).expect("connect");
            let q = query(3, "web.", RecordType::A);
            let _ = s.write_all(&(q.len() as u16).to_be_bytes()).and_then(|()| s.write_all(&q));
            s.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
            let mut len = [0u8; 2];
            s.read_exact(&mut len).is_ok()
        },
        "answered again once the others closed",
    );
}
