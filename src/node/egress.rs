//! Egress on the node side: which address and source ports a node's
//! tasks leave with (`--egress-addr`, `--egress-ports`, `--no-egress`, or
//! static mode's `[node.egress]`), and the kernel's side of it when the
//! kernel holds that address (an AF_XDP uplink): the address must be on
//! the data NIC, no kernel socket may already hold a port of the range on
//! it, and the range is written into the namespace's
//! `net.ipv4.ip_local_reserved_ports` (so that the kernel never picks
//! those ports for its own connections) and the old value put back when
//! the node stops.
//!
//! The dataplane does the translation (`dataplane::lb::egress`); the
//! steering program takes the replies (`io::afxdp::Steering`); the next
//! hops come from the kernel's FIB (`underlay`).

use super::args::{IoKind, RunArgs};
use meshplane_dataplane::tables::TablesSpec;
use meshplane_dataplane::tables::egress::{DEFAULT_PORTS, EgressSpec, PortRange};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use thiserror::Error;

/// The egress source ports of a TAP uplink by default: the kernel does
/// not hold the data address, so only the auto-published ports
/// (30000-32767) must stay below.
pub(crate) const TAP_PORTS: PortRange = PortRange { lo: 32768, hi: 65535 };

/// The namespace's reserved local ports (per network namespace).
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Why egress cannot start as asked.
#[derive(Debug, Error)]
pub(crate) enum EgressError {
    /// The egress address is not one of the data NIC's.
    #[error("egress address {addr} is not on the data NIC {nic}: ip addr add {addr}/32 dev {nic}")]
    NotOnNic {
        /// The egress address.
        addr: Ipv4Addr,
        /// The data NIC.
        nic: String,
    },
    /// The data NIC's addresses could not be read.
    #[error("reading the addresses of the data NIC {nic} (netlink): {msg}")]
    Addresses {
        /// The data NIC.
        nic: String,
        /// What went wrong.
        msg: String,
    },
    /// A kernel socket holds a port of the range on the egress address.
    #[error(
        "a kernel {proto} socket on {local}:{port} holds a port of the egress range {range}: its replies would go to meshplane; stop it, or give --egress-ports (or node.egress.ports) a range without it"
    )]
    PortHeld {
        /// tcp, udp, tcp6 or udp6.
        proto: &'static str,
        /// The socket's local address.
        local: String,
        /// The port.
        port: u16,
        /// The egress range.
        range: PortRange,
    },
    /// A proc file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reserved ports could not be written.
    #[error("writing {path} ({value:?}): {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A managed node's egress (the address, the range; the routes and
/// neighbours are filled per publication): off with `--no-egress`, else
/// `--egress-addr` (default the data-path address) and `--egress-ports`
/// (default: AF_XDP 61000-65535, TAP 32768-65535).
pub(crate) fn managed(a: &RunArgs, io: IoKind, data_ip: Ipv4Addr) -> Option<EgressSpec> {
    if a.no_egress {
        return None;
    }
    let ports = a.egress_ports.unwrap_or(match io {
        IoKind::Afxdp => DEFAULT_PORTS,
        IoKind::Tap => TAP_PORTS,
    });
    Some(EgressSpec { addr: Some(a.egress_addr.unwrap_or(data_ip)), ports, ..EgressSpec::default() })
}

/// Static mode: the tables file's `[node.egress]` as it is, with the
/// flags given overriding or completing it (`--egress-addr` or
/// `--egress-ports` without a `[node.egress]` makes one; `--no-egress`
/// removes it).
pub(crate) fn static_override(a: &RunArgs, spec: &mut TablesSpec) {
    if a.no_egress {
        spec.node.egress = None;
        return;
    }
    if a.egress_addr.is_none() && a.egress_ports.is_none() {
        return;
    }
    let e = spec.node.egress.get_or_insert_with(EgressSpec::default);
    if let Some(addr) = a.egress_addr {
        e.addr = Some(addr);
    }
    if let Some(p) = a.egress_ports {
        e.ports = p;
    }
}

/// The kernel's side of egress with an AF_XDP uplink (the kernel holds
/// the egress address): the address on the data NIC `nic` (unless it is
/// the data-path address), no kernel socket on it (or on 0.0.0.0 or ::)
/// holding a port of `range`, then the range reserved in this namespace
/// until the returned guard is dropped.
pub(crate) fn claim_kernel_ports(
    nic: &str,
    addr: Ipv4Addr,
    data_ip: Ipv4Addr,
    range: PortRange,
) -> Result<ReservedPorts, EgressError> {
    if addr != data_ip {
        on_nic(nic, addr)?;
    }
    check_sockets(addr, range)?;
    ReservedPorts::reserve(range)
}

/// Fails unless `addr` is one of interface `nic`'s IPv4 addresses (a
/// netlink address dump in the calling thread's namespace).
pub(crate) fn on_nic(nic: &str, addr: Ipv4Addr) -> Result<(), EgressError> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
    use rtnetlink::packet_route::link::LinkMessage;
    let err = |msg: String| EgressError::Addresses { nic: nic.to_owned(), msg };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| err(e.to_string()))?;
    let addrs: Vec<Ipv4Addr> = rt.block_on(async {
        let (conn, h, _) = rtnetlink::new_connection().map_err(|e| err(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let r = async {
            let link: Option<LinkMessage> =
                h.link().get().match_name(nic.to_owned()).execute().try_next().await.map_err(|e| err(e.to_string()))?;
            let index = link.ok_or_else(|| err("no such interface".into()))?.header.index;
            let msgs: Vec<AddressMessage> = h
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok::<_, EgressError>(
                msgs.iter()
                    .flat_map(|m| m.attributes.iter())
                    .filter_map(|a| match a {
                        AddressAttribute::Local(std::net::IpAddr::V4(ip))
                        | AddressAttribute::Address(std::net::IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })
                    .collect(),
            )
        }
        .await;
        conn.abort();
        r
    })?;
    if addrs.contains(&addr) { Ok(()) } else { Err(EgressError::NotOnNic { addr, nic: nic.to_owned() }) }
}

/// Fails if a kernel socket of this namespace, bound to `addr`, 0.0.0.0
/// or :: (or ::ffff:`addr`), holds a port of `range` (TCP in any state
/// but TIME_WAIT and CLOSE, and UDP).
pub(crate) fn check_sockets(addr: Ipv4Addr, range: PortRange) -> Result<(), EgressError> {
    // thread-self: the calling thread's namespace (a thread may have
    // entered another one than its process's).
    for proto in ["tcp", "udp", "tcp6", "udp6"] {
        let path = PathBuf::from(format!("/proc/thread-self/net/{proto}"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // No IPv6 in this kernel: no IPv6 sockets.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && proto.ends_with('6') => continue,
            Err(source) => return Err(EgressError::Read { path, source }),
        };
        if let Some((local, port)) = held(&text, proto.starts_with("tcp"), addr, range) {
            return Err(EgressError::PortHeld { proto, local, port, range });
        }
    }
    Ok(())
}

/// The first socket of a `/proc/net/{tcp,udp}[6]` table on `addr` (or
/// the wildcard) with a local port in `range`: its local address, and
/// the port.
fn held(text: &str, tcp: bool, addr: Ipv4Addr, range: PortRange) -> Option<(String, u16)> {
    const TIME_WAIT: &str = "06";
    const CLOSE: &str = "07";
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(local), Some(_remote), Some(state)) = (f.nth(1), f.next(), f.next()) else { continue };
        if tcp && (state == TIME_WAIT || state == CLOSE) {
            continue;
        }
        let Some((ip, port)) = local.split_once(':') else { continue };
        let Ok(port) = u16::from_str_radix(port, 16) else { continue };
        if !range.contains(port) {
            continue;
        }
        if let Some(shown) = local_matches(ip, addr) {
            return Some((shown, port));
        }
    }
    None
}

/// The kernel's hex address `ip` (an IPv4 address as one native u32
/// word, or an IPv6 address as four) written out, if it is `addr`, the
/// wildcard, or `addr` mapped into IPv6.
fn local_matches(ip: &str, addr: Ipv4Addr) -> Option<String> {
    let words: Vec<[u8; 4]> = (0..ip.len() / 8)
        .map(|i| ip.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes))
        .collect::<Option<_>>()?;
    match words.as_slice() {
        [v4] => (*v4 == [0; 4] || *v4 == addr.octets()).then(|| Ipv4Addr::from(*v4).to_string()),
        [a, b, c, d] => {
            let mut v6 = [0u8; 16];
            for (k, w) in [a, b, c, d].into_iter().enumerate() {
                v6[k * 4..k * 4 + 4].copy_from_slice(w);
            }
            let v6 = std::net::Ipv6Addr::from(v6);
            (v6.is_unspecified() || v6.to_ipv4_mapped() == Some(addr)).then(|| format!("[{v6}]"))
        }
        _ => None,
    }
}

/// The most on-link destinations the workers missed that the node keeps
/// asking the kernel about (the oldest is forgotten).
pub(crate) const MAX_MISSES: usize = 64;

/// The destinations the workers found no next-hop MAC for
/// (`EgressStats.neigh_miss`), newest last, at most [`MAX_MISSES`].
#[derive(Debug, Default)]
pub(crate) struct Misses(std::collections::VecDeque<Ipv4Addr>);

impl Misses {
    /// Takes the workers' last misses; true if one is new (the set to
    /// resolve changed).
    pub(crate) fn add(&mut self, seen: impl IntoIterator<Item = Option<Ipv4Addr>>) -> bool {
        let mut changed = false;
        for ip in seen.into_iter().flatten() {
            if self.0.contains(&ip) {
                continue;
            }
            if self.0.len() == MAX_MISSES {
                self.0.pop_front();
            }
            self.0.push_back(ip);
            changed = true;
        }
        changed
    }

    /// The destinations, oldest first.
    pub(crate) fn list(&self) -> Vec<Ipv4Addr> {
        self.0.iter().copied().collect()
    }
}

/// The range written into the namespace's reserved local ports (added to
/// what was there), and the old value put back on drop.
#[derive(Debug)]
pub(crate) struct ReservedPorts {
    old: String,
    path: PathBuf,
}

impl ReservedPorts {
    /// Adds `range` to the calling thread's namespace's reserved ports.
    pub(crate) fn reserve(range: PortRange) -> Result<ReservedPorts, EgressError> {
        // thread-self: /proc/sys/net is the calling thread's namespace's
        // already, but say so.
        let path = PathBuf::from(RESERVED);
        let old = std::fs::read_to_string(&path)
            .map_err(|source| EgressError::Read { path: path.clone(), source })?
            .trim()
            .to_owned();
        let value = if old.is_empty() { range.to_string() } else { format!("{old},{range}") };
        write(&path, &value)?;
        tracing::info!("egress ports {range} reserved from the kernel (net.ipv4.ip_local_reserved_ports = {value})");
        Ok(ReservedPorts { old, path })
    }
}

fn write(path: &std::path::Path, value: &str) -> Result<(), EgressError> {
    // A newline alone clears the list (an empty write changes nothing).
    std::fs::write(path, format!("{value}\n")).map_err(|source| EgressError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

impl Drop for ReservedPorts {
    fn drop(&mut self) {
        match write(&self.path, &self.old) {
            Ok(()) => tracing::info!("net.ipv4.ip_local_reserved_ports restored to {:?}", self.old),
            Err(e) => tracing::warn!("restoring the reserved ports: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn range(s: &str) -> PortRange {
        s.parse().expect("range")
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 010012C6:EE48 0A0312C6:01BB 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 010012C6:EE49 0A0312C6:01BB 06 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   3: 00000000:FDE8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st
   0: 0000000000000000FFFF0000010012C6:EE50 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:EE51 00000000000000000000000000000000:0000 0A
";

    #[test]
    fn sockets_in_the_range_on_the_address_or_the_wildcard_are_found() {
        let a = Ipv4Addr::new(198, 18, 0, 1);
        // 0xEE48 = 61000 on 198.18.0.1 (established), 0xEE49 in TIME_WAIT,
        // 0xFDE8 = 65000 on 0.0.0.0, 22 on 127.0.0.1.
        assert_eq!(held(TCP, true, a, range("61000-61099")), Some(("198.18.0.1".into(), 61000)));
        assert_eq!(held(TCP, true, a, range("61001-61099")), None, "TIME_WAIT does not hold a port");
        assert_eq!(held(TCP, true, a, range("64000-65535")), Some(("0.0.0.0".into(), 65000)));
        assert_eq!(held(TCP, true, Ipv4Addr::new(198, 18, 0, 2), range("61000-61099")), None, "another address");
        assert_eq!(held(TCP, false, a, range("61001-61099")), Some(("198.18.0.1".into(), 61001)), "UDP: any");
        // ::ffff:198.18.0.1 port 61008 and ::1 port 61009.
        assert_eq!(held(TCP6, true, a, range("61005-61099")), Some(("[::ffff:198.18.0.1]".into(), 61008)));
        assert_eq!(held(TCP6, true, a, range("61009-61099")), None, "::1 is not the egress address");
    }

    #[test]
    fn managed_defaults_and_static_overrides() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let args = |v: &[&str]| Cli::try_parse_from(std::iter::once("run").chain(v.iter().copied())).map(|c| c.run);
        let data = Ipv4Addr::new(198, 18, 0, 1);
        let a = args(&[]).expect("no flags");
        let e = managed(&a, IoKind::Afxdp, data).expect("on by default");
        assert_eq!((e.addr, e.ports), (Some(data), DEFAULT_PORTS));
        assert_eq!(managed(&a, IoKind::Tap, data).map(|e| e.ports), Some(TAP_PORTS));
        let a = args(&["--egress-addr", "198.18.0.7", "--egress-ports", "40000-40999"]).expect("flags");
        let e = managed(&a, IoKind::Tap, data).expect("on");
        assert_eq!((e.addr, e.ports), (Some(Ipv4Addr::new(198, 18, 0, 7)), range("40000-40999")));
        assert!(managed(&args(&["--no-egress"]).expect("flag"), IoKind::Afxdp, data).is_none());
        let bad = args(&["--egress-ports", "100-200"]).expect_err("refused");
        assert!(bad.to_string().contains("at least 1024"), "{bad}");
        assert!(args(&["--no-egress", "--egress-addr", "198.18.0.7"]).is_err(), "--no-egress conflicts");

        // Static mode: the file as it is, completed or overridden.
        let file = |egress: &str| -> TablesSpec {
            toml::from_str(&format!("[node]\ndata_ip = \"198.18.0.1\"\ndata_mac = \"02:00:00:00:00:aa\"\n{egress}"))
                .expect("spec")
        };
        let with = "[node.egress]\naddr = \"198.18.0.9\"\nports = \"50000-50999\"\n";
        let mut s = file(with);
        static_override(&args(&[]).expect("no flags"), &mut s);
        let e = s.node.egress.expect("kept");
        assert_eq!((e.addr, e.ports), (Some(Ipv4Addr::new(198, 18, 0, 9)), range("50000-50999")));
        let mut s = file(with);
        static_override(&args(&["--egress-ports", "52000-52999"]).expect("flags"), &mut s);
        let e = s.node.egress.expect("kept");
        assert_eq!((e.addr, e.ports), (Some(Ipv4Addr::new(198, 18, 0, 9)), range("52000-52999")));
        let mut s = file("");
        static_override(&args(&[]).expect("no flags"), &mut s);
        assert!(s.node.egress.is_none(), "static mode has no egress unless asked");
        let mut s = file("");
        static_override(&args(&["--egress-addr", "198.18.0.7"]).expect("flags"), &mut s);
        let e = s.node.egress.expect("made");
        assert_eq!((e.addr, e.ports), (Some(Ipv4Addr::new(198, 18, 0, 7)), DEFAULT_PORTS));
        let mut s = file(with);
        static_override(&args(&["--no-egress"]).expect("flags"), &mut s);
        assert!(s.node.egress.is_none());
    }

    #[test]
    fn misses_are_kept_once_and_the_oldest_forgotten() {
        let ip = |n: u32| Ipv4Addr::from(0xc612_0000 + n);
        let mut m = Misses::default();
        assert!(!m.add([None, None]), "no miss, no change");
        assert!(m.add([Some(ip(1)), None]));
        assert!(!m.add([Some(ip(1)), Some(ip(1))]), "a known miss changes nothing");
        assert!(m.add([Some(ip(2)), Some(ip(1))]));
        assert_eq!(m.list(), [ip(1), ip(2)]);
        for n in 3..=70 {
            m.add([Some(ip(n))]);
        }
        let l = m.list();
        assert_eq!(l.len(), MAX_MISSES);
        assert_eq!((l[0], l[MAX_MISSES - 1]), (ip(7), ip(70)), "the oldest forgotten");
    }

    /// A namespace removed on drop (also when the test fails).
    struct Netns(&'static str);

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", self.0]).status();
        }
    }

    fn ip(args: &str) {
        let v: Vec<&str> = args.split_whitespace().collect();
        let o = Command::new("ip").args(&v).output().expect("running ip");
        assert!(o.status.success(), "ip {args}: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Runs `f` on a thread inside namespace `ns`.
    fn inside<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(path).expect("the namespace");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the namespace");
            f()
        })
        .join()
        .expect("the thread in the namespace")
    }

    #[test]
    fn kernel_ports_reserved_and_restored_and_the_address_checked_on_the_nic() {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
            eprintln!("skipped: needs root (network namespaces)");
            return;
        }
        let ns = "mp-en-k";
        let _ = Command::new("ip").args(["netns", "del", ns]).stderr(std::process::Stdio::null()).status();
        let _guard = Netns(ns);
        ip(&format!("netns add {ns}"));
        ip(&format!("-n {ns} link add up0 type veth peer name up0p"));
        ip(&format!("-n {ns} link set up0 up"));
        ip(&format!("-n {ns} addr add 198.18.0.1/24 dev up0"));
        ip(&format!("-n {ns} addr add 198.18.0.7/32 dev up0"));
        let host_before = std::fs::read_to_string(RESERVED).expect("the host's reserved ports");
        let read = || std::fs::read_to_string(RESERVED).expect("reserved ports").trim().to_owned();
        let data = Ipv4Addr::new(198, 18, 0, 1);
        let (during, after, with_old, refused, not_on, on, udp_held, wild, free) = inside(ns, move || {
            let g = claim_kernel_ports("up0", data, data, range("61000-65535")).expect("claimed");
            let during = read();
            drop(g);
            let after = read();
            write(std::path::Path::new(RESERVED), "8080").expect("written");
            let g = claim_kernel_ports("up0", Ipv4Addr::new(198, 18, 0, 7), data, range("61000-61999"))
                .expect("claimed with the /32 on the NIC");
            let with_old = read();
            drop(g);
            let refused = claim_kernel_ports("up0", Ipv4Addr::new(198, 18, 0, 8), data, range("61000-61999"))
                .expect_err("not on the NIC")
                .to_string();
            let not_on = read();
            let on = on_nic("up0", data).is_ok();
            // A kernel socket bound on the egress address inside the range.
            let s = std::net::UdpSocket::bind("198.18.0.7:61500").expect("bound");
            let udp_held = claim_kernel_ports("up0", Ipv4Addr::new(198, 18, 0, 7), data, range("61000-61999"))
                .expect_err("a socket holds a port")
                .to_string();
            drop(s);
            // A TCP listener on the wildcard.
            let l = std::net::TcpListener::bind("0.0.0.0:61600").expect("listening");
            let wild = check_sockets(Ipv4Addr::new(198, 18, 0, 7), range("61000-61999"))
                .expect_err("the listener holds a port")
                .to_string();
            let free = check_sockets(Ipv4Addr::new(198, 18, 0, 7), range("62000-62999")).is_ok();
            drop(l);
            (during, after, with_old, refused, not_on, on, udp_held, wild, free)
        });
        assert_eq!(during, "61000-65535");
        assert_eq!(after, "", "the old (empty) value restored");
        assert_eq!(with_old, "8080,61000-61999", "added to what was there");
        assert_eq!(refused, "egress address 198.18.0.8 is not on the data NIC up0: ip addr add 198.18.0.8/32 dev up0");
        assert_eq!(not_on, "8080", "restored, and nothing reserved when refused");
        assert!(on, "the data address is on up0");
        assert!(udp_held.contains("udp socket on 198.18.0.7:61500 holds a port"), "{udp_held}");
        assert!(wild.starts_with("a kernel tcp socket on 0.0.0.0:61600 holds a port of the egress range"), "{wild}");
        assert!(free, "a range the listener is not in");
        assert_eq!(std::fs::read_to_string(RESERVED).expect("host"), host_before, "the host's value untouched");
    }
}
