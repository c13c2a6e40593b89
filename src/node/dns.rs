//! The embedded DNS server (`docs/dns-design.md` sections 5 to 7): a
//! thread `mp-dns` with a current-thread tokio runtime of its own, so that
//! a burst of queries never delays Raft or gossip on `mp-control`.
//!
//! A task asks its network's gateway (`gateway_ip:53`); the dataplane
//! hands the query over the host link to the kernel's end of it, on a port
//! per network (`port_for`: `--dns-ports` LO plus the VNI's offset from
//! `FIRST_VNI`), where this server listens with a UDP socket and a TCP
//! listener per network of the zone (the networks of this node's tasks),
//! opened and closed as networks come and go. The listen port says which
//! network asked; its names are that network's `View`, swapped whole on
//! every zone the control plane hands over (`Dns::set_zone`).
//!
//! Names of the network are answered from the view (`meshplane_dns`);
//! other names are forwarded (`forward`), except from an internal network
//! (SERVFAIL). TCP follows RFC 7766: a 2-byte length before each message,
//! several queries per connection answered in order, 10 s idle, at most
//! 256 connections on the node.

mod forward;
#[cfg(test)]
mod tests;

pub(crate) use forward::{Upstreams, parse_upstream, search};

use forward::Forwarder;
use meshplane_control::state::FIRST_VNI;
use meshplane_dataplane::report::DnsReport;
use meshplane_dataplane::tables::egress::PortRange;
use meshplane_dns::view::{Lookup, View};
use meshplane_dns::wire::{self, Parsed, Request};
use meshplane_dns::zone::Zone;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// The default ports, one per network (`--dns-ports`): below the
/// published range (30000-32767) and the kernel's ephemeral ports
/// (32768-60999), so no outgoing kernel socket ever holds one.
pub(crate) const DEFAULT_PORTS: PortRange = PortRange { lo: 25300, hi: 26323 };
/// Socket buffers of each UDP socket (a burst must queue, not drop).
const UDP_BUFFER: usize = 4 << 20;
/// The largest UDP query read (anything longer is cut and FORMERR).
const UDP_READ: usize = 4096;
/// TCP connections open at once on the node (RFC 7766 6.2.2).
const TCP_CONNS: usize = 256;
/// A TCP connection with nothing to read for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// At most one "over the cap" log line this often.
const CAP_LOG_EVERY: Duration = Duration::from_secs(2);

/// The DNS server's errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsError {
    /// The thread or its runtime could not start.
    #[error("starting the DNS server's thread: {0}")]
    Start(#[source] std::io::Error),
    /// A network's socket could not be opened.
    #[error("DNS for network {network} on {addr}: {source}")]
    Bind {
        /// The network.
        network: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Network `vni`'s port in `ports` (`None`: outside the range, no DNS).
pub(crate) fn port_for(ports: PortRange, vni: u32) -> Option<u16> {
    let p = u32::from(ports.lo).checked_add(vni.checked_sub(FIRST_VNI)?)?;
    u16::try_from(p).ok().filter(|p| *p <= ports.hi)
}

/// Limits of the forwarder (the design's; tests shorten the times).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long one upstream has to answer.
    pub(crate) per_try: Duration,
    /// How long a forwarded query may take in all (then SERVFAIL).
    pub(crate) total: Duration,
    /// Forwarded queries in flight on the node.
    pub(crate) in_flight: usize,
    /// Forwarded queries in flight from one network.
    pub(crate) per_network: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_try: Duration::from_secs(2), total: Duration::from_secs(4), in_flight: 1024, per_network: 256 }
    }
}

/// How the server is set up.
#[derive(Debug, Clone)]
pub(crate) struct DnsConfig {
    /// The address to listen on: the host link's kernel end (tests:
    /// 127.0.0.1).
    pub(crate) listen: Ipv4Addr,
    /// The ports, one per network by VNI.
    pub(crate) ports: PortRange,
    /// Where forwarded queries go.
    pub(crate) upstreams: Upstreams,
    /// Addresses never forwarded to (they would loop back here: the host
    /// link's); every network's gateway is left out too.
    pub(crate) never: Vec<Ipv4Addr>,
    /// The forwarder's limits.
    pub(crate) limits: Limits,
}

macro_rules! counters {
    ($($f:ident),* $(,)?) => {
        /// The server's counters (written by the DNS thread, read by
        /// `Dns::stats`).
        #[derive(Default)]
        struct Counters { $($f: AtomicU64,)* }
        impl Counters {
            fn report(&self, networks: u64) -> DnsReport {
                DnsReport { $($f: self.$f.load(Relaxed),)* networks }
            }
        }
    };
}

counters!(
    queries_udp,
    queries_tcp,
    noerror,
    nodata,
    nxdomain,
    servfail,
    formerr,
    notimp,
    refused,
    badvers,
    other,
    truncated,
    forwarded,
    forward_timeouts,
    forward_errors,
    forward_over_cap,
    tcp_conns,
    tcp_refused,
    ignored,
);

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Counters {
    /// Counts a reply by its header (rcode, answer count, TC).
    fn sent(&self, reply: &[u8]) {
        let (Some(&flags), Some(&rc), Some(&an0), Some(&an1)) =
            (reply.get(2), reply.get(3), reply.get(6), reply.get(7))
        else {
            return;
        };
        if flags & 0x02 != 0 {
            bump(&self.truncated);
        }
        let answers = u16::from_be_bytes([an0, an1]);
        bump(match rc & 0x0f {
            0 if answers == 0 => &self.nodata,
            0 => &self.noerror,
            1 => &self.formerr,
            3 => &self.nxdomain,
            4 => &self.notimp,
            2 => &self.servfail,
            5 => &self.refused,
            _ => &self.other,
        });
    }

    /// Counts a refusal of `parse` (its header rcode 0 is BADVERS: the
    /// extended code is in the OPT).
    fn refused_by_parse(&self, reply: &[u8]) {
        if reply.get(3).is_some_and(|rc| rc & 0x0f == 0) {
            bump(&self.badvers);
        } else {
            self.sent(reply);
        }
    }
}

/// What a network's listeners answer from.
struct Served {
    name: String,
    view: View,
}

/// A network being served.
struct Net {
    served: RwLock<Arc<Served>>,
    /// Its forwarded queries in flight.
    in_flight: AtomicUsize,
}

impl Net {
    fn served(&self) -> Arc<Served> {
        self.served.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// What the DNS thread shares among its tasks.
struct Server {
    counters: Counters,
    forwarder: Forwarder,
    limits: Limits,
    in_flight: AtomicUsize,
    tcp_conns: Arc<Semaphore>,
    cap_logged: Mutex<Option<Instant>>,
    /// Shuffling seeds (splitmix64 over a random start).
    seed: AtomicU64,
}

/// What to do with a message received.
enum Step {
    /// Send this (or nothing).
    Reply(Option<Vec<u8>>),
    /// Forward it upstream (its slot held until the answer).
    Forward(Request, Slot),
}

/// One forwarded query's place under the caps.
struct Slot {
    server: Arc<Server>,
    net: Arc<Net>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Relaxed);
        self.net.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Server {
    fn seed(&self) -> u64 {
        let mut z = self.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A query of `net` received as `raw`: answered from the view,
    /// refused, or to be forwarded.
    fn decide(self: &Arc<Self>, net: &Arc<Net>, raw: &[u8], tcp: bool) -> Step {
        let req = match wire::parse(raw, tcp) {
            Parsed::Ignore => {
                bump(&self.counters.ignored);
                return Step::Reply(None);
            }
            Parsed::Reply(r) => {
                self.counters.refused_by_parse(&r);
                return Step::Reply(Some(r));
            }
            Parsed::Query(req) => req,
        };
        let served = net.served();
        let found = served.view.lookup(&req.name(), req.kind());
        let reply = match found {
            Lookup::NotOurs if served.view.internal() => wire::servfail(&req),
            Lookup::NotOurs => match self.admit(net) {
                Some(slot) => return Step::Forward(req, slot),
                None => wire::servfail(&req),
            },
            found => wire::answer(&req, &found, self.seed()),
        };
        self.counters.sent(&reply);
        Step::Reply(Some(reply))
    }

    /// A place for one more forwarded query from `net`, if both caps
    /// allow it.
    fn admit(self: &Arc<Self>, net: &Arc<Net>) -> Option<Slot> {
        let node = self.in_flight.fetch_add(1, Relaxed);
        let mine = net.in_flight.fetch_add(1, Relaxed);
        let slot = Slot { server: self.clone(), net: net.clone() };
        if node < self.limits.in_flight && mine < self.limits.per_network {
            return Some(slot);
        }
        drop(slot);
        bump(&self.counters.forward_over_cap);
        let mut last = self.cap_logged.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() >= CAP_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                "DNS: too many forwarded queries in flight (network {}: {mine}, node: {node}; caps {} and {}): SERVFAIL",
                net.served().name,
                self.limits.per_network,
                self.limits.in_flight
            );
        }
        None
    }

    /// The answer to a query to forward: the upstream's (with the task's
    /// ID), or SERVFAIL.
    async fn forwarded(&self, req: &Request, raw: &[u8], tcp: bool, slot: Slot) -> Vec<u8> {
        let reply = self.forwarder.forward(raw, req, tcp, &self.counters).await;
        drop(slot);
        let reply = reply.unwrap_or_else(|| wire::servfail(req));
        self.counters.sent(&reply);
        reply
    }
}

/// A network's listeners (their tasks end when it is dropped).
struct Listener {
    net: Arc<Net>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The running server.
pub(crate) struct Dns {
    zone: watch::Sender<Arc<Zone>>,
    stop: watch::Sender<bool>,
    server: Arc<Server>,
    /// Port → network, as served now.
    listening: Arc<Mutex<BTreeMap<u16, String>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Dns {
    /// Starts the thread; it serves nothing until [`Dns::set_zone`].
    pub(crate) fn start(cfg: DnsConfig) -> Result<Dns, DnsError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DnsError::Start)?;
        let server = Arc::new(Server {
            counters: Counters::default(),
            forwarder: Forwarder::new(cfg.upstreams.clone(), cfg.never.clone(), cfg.limits),
            limits: cfg.limits,
            in_flight: AtomicUsize::new(0),
            tcp_conns: Arc::new(Semaphore::new(TCP_CONNS)),
            cap_logged: Mutex::new(None),
            seed: AtomicU64::new(getrandom::u64().unwrap_or(0x5eed)),
        });
        let (zone, zone_rx) = watch::channel(Arc::new(Zone::default()));
        let (stop, stop_rx) = watch::channel(false);
        let listening = Arc::new(Mutex::new(BTreeMap::new()));
        let (srv, l) = (server.clone(), listening.clone());
        let thread = std::thread::Builder::new()
            .name("mp-dns".into())
            .spawn(move || rt.block_on(run(srv, cfg, zone_rx, stop_rx, l)))
            .map_err(DnsError::Start)?;
        Ok(Dns { zone, stop, server, listening, thread: Mutex::new(Some(thread)) })
    }

    /// The names to serve from now on.
    pub(crate) fn set_zone(&self, zone: Zone) {
        self.zone.send_replace(Arc::new(zone));
    }

    /// The networks served now, by port.
    pub(crate) fn listening(&self) -> BTreeMap<u16, String> {
        self.listening.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The counters.
    pub(crate) fn stats(&self) -> DnsReport {
        self.server.counters.report(self.listening().len() as u64)
    }

    /// Closes every socket and ends the thread (again: nothing).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The DNS thread: the listeners follow the zone until stopped.
async fn run(
    server: Arc<Server>,
    cfg: DnsConfig,
    mut zone: watch::Receiver<Arc<Zone>>,
    mut stop: watch::Receiver<bool>,
    listening: Arc<Mutex<BTreeMap<u16, String>>>,
) {
    let mut open = BTreeMap::<u16, Listener>::new();
    let mut told = BTreeSet::<String>::new();
    loop {
        let z = zone.borrow_and_update().clone();
        follow(&server, &cfg, &z, &mut open, &mut told);
        *listening.lock().unwrap_or_else(PoisonError::into_inner) =
            open.iter().map(|(p, l)| (*p, l.net.served().name.clone())).collect();
        tokio::select! {
            r = zone.changed() => if r.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    listening.lock().unwrap_or_else(PoisonError::into_inner).clear();
    drop(open);
}

/// Opens, swaps and closes listeners so that the networks of `z` are
/// served (`told`: the failures already logged).
fn follow(
    server: &Arc<Server>,
    cfg: &DnsConfig,
    z: &Zone,
    open: &mut BTreeMap<u16, Listener>,
    told: &mut BTreeSet<String>,
) {
    server.forwarder.set_gateways(z.networks.iter().map(|n| n.gateway).collect());
    let mut wanted = BTreeMap::new();
    for nz in &z.networks {
        match port_for(cfg.ports, nz.vni) {
            Some(p) => {
                wanted.insert(p, nz);
            }
            None => {
                if told.insert(format!("range {} {}", nz.name, nz.vni)) {
                    tracing::warn!(
                        "network {} (VNI {}) has no DNS port in --dns-ports {}: its tasks get no DNS",
                        nz.name,
                        nz.vni,
                        cfg.ports
                    );
                }
            }
        }
    }
    open.retain(|p, _| wanted.contains_key(p));
    for (port, nz) in wanted {
        let served = Arc::new(Served { name: nz.name.clone(), view: View::build(nz) });
        if let Some(l) = open.get(&port) {
            *l.net.served.write().unwrap_or_else(PoisonError::into_inner) = served;
            continue;
        }
        let net = Arc::new(Net { served: RwLock::new(served), in_flight: AtomicUsize::new(0) });
        match listen(server, &net, SocketAddr::from((cfg.listen, port)), &nz.name) {
            Ok(tasks) => {
                told.remove(&format!("bind {port}"));
                tracing::info!("DNS for network {} on {}:{port}", nz.name, cfg.listen);
                open.insert(port, Listener { net, tasks });
            }
            Err(e) => {
                if told.insert(format!("bind {port}")) {
                    tracing::warn!("{e}: its tasks get no DNS (tried again at the next change)");
                }
            }
        }
    }
}

/// Opens network `net`'s UDP socket and TCP listener on `addr` and starts
/// serving them.
fn listen(server: &Arc<Server>, net: &Arc<Net>, addr: SocketAddr, name: &str) -> Result<Vec<JoinHandle<()>>, DnsError> {
    let err = |source| DnsError::Bind { network: name.to_owned(), addr, source };
    let udp = std::net::UdpSocket::bind(addr).map_err(err)?;
    big_buffers(&udp);
    udp.set_nonblocking(true).map_err(err)?;
    let udp = Arc::new(UdpSocket::from_std(udp).map_err(err)?);
    let tcp = std::net::TcpListener::bind(addr).map_err(err)?;
    tcp.set_nonblocking(true).map_err(err)?;
    let tcp = TcpListener::from_std(tcp).map_err(err)?;
    Ok(vec![
        tokio::spawn(udp_loop(server.clone(), net.clone(), udp)),
        tokio::spawn(tcp_loop(server.clone(), net.clone(), tcp)),
    ])
}

/// 4 MiB receive and send buffers, past `rmem_max` where allowed (root:
/// `SO_RCVBUFFORCE`), else as large as the system allows.
fn big_buffers(s: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(s, sockopt::RcvBufForce, &UDP_BUFFER).is_err() {
        let _ = setsockopt(s, sockopt::RcvBuf, &UDP_BUFFER);
    }
    if setsockopt(s, sockopt::SndBufForce, &UDP_BUFFER).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &UDP_BUFFER);
    }
}

/// A network's UDP socket: each datagram answered, or forwarded in a task
/// of its own.
async fn udp_loop(server: Arc<Server>, net: Arc<Net>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; UDP_READ];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("DNS: receiving: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let raw = buf.get(..n).unwrap_or_default();
        bump(&server.counters.queries_udp);
        match server.decide(&net, raw, false) {
            Step::Reply(Some(r)) => {
                let _ = sock.send_to(&r, from).await;
            }
            Step::Reply(None) => {}
            Step::Forward(req, slot) => {
                let (server, sock, raw) = (server.clone(), sock.clone(), raw.to_vec());
                tokio::spawn(async move {
                    let r = server.forwarded(&req, &raw, false, slot).await;
                    let _ = sock.send_to(&r, from).await;
                });
            }
        }
    }
}

/// A network's TCP listener: at most [`TCP_CONNS`] connections on the
/// node; over it a connection is closed at once.
async fn tcp_loop(server: Arc<Server>, net: Arc<Net>, l: TcpListener) {
    loop {
        let s = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!("DNS: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match server.tcp_conns.clone().try_acquire_owned() {
            Ok(permit) => {
                bump(&server.counters.tcp_conns);
                let (server, net) = (server.clone(), net.clone());
                tokio::spawn(async move {
                    tcp_conn(&server, &net, s).await;
                    drop(permit);
                });
            }
            Err(_) => bump(&server.counters.tcp_refused),
        }
    }
}

/// One TCP connection: length-prefixed queries answered in order until
/// the client closes, 10 s pass without a query (or without taking an
/// answer), or a malformed message (closed after its FORMERR).
async fn tcp_conn(server: &Arc<Server>, net: &Arc<Net>, mut s: TcpStream) {
    loop {
        let mut len = [0u8; 2];
        if !matches!(tokio::time::timeout(TCP_IDLE, s.read_exact(&mut len)).await, Ok(Ok(_))) {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(tokio::time::timeout(TCP_IDLE, s.read_exact(&mut msg)).await, Ok(Ok(_))) {
            return;
        }
        bump(&server.counters.queries_tcp);
        let (reply, last) = match server.decide(net, &msg, true) {
            Step::Reply(Some(r)) => {
                let refused = r.get(3).is_some_and(|rc| rc & 0x0f == 1);
                (r, refused)
            }
            Step::Reply(None) => return,
            Step::Forward(req, slot) => (server.forwarded(&req, &msg, true, slot).await, false),
        };
        let Ok(n) = u16::try_from(reply.len()) else { return };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&reply);
        // A client that does not read its answers loses the connection
        // (and its place under the cap).
        let sent = tokio::time::timeout(TCP_IDLE, s.write_all(&out)).await;
        if !matches!(sent, Ok(Ok(()))) || last {
            return;
        }
    }
}
