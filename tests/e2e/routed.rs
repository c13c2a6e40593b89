//! A routed underlay: two fabric subnets joined by a router namespace
//! (kernel forwarding, on only inside it), a managed meshplane node on
//! each side (cluster init + join), a task on each. The tasks reach each
//! other by ping, TCP (checked byte for byte) and UDP across the router;
//! during a 10 ms ping the router's MAC on node 1's side changes (it
//! announces it with a gratuitous ARP) and then node 1's route moves to
//! the router's second leg, the first taken down: replies never stop for
//! a second, and TCP and UDP work again over the new path.
//!
//! ```text
//!   node1 198.18.10.1 ─ brA ─┬ ra1 198.18.10.254 ┐
//!                            └ ra2 198.18.10.253 ┤ rt (forwarding) ─ rb 198.18.20.254 ─ brB ─ node2 198.18.20.2
//! ```
//!
//! With a TAP uplink meshplane holds the data address on its TAP; the
//! node's kernel has a leg of its own on the same segment (k0,
//! 198.18.x.11) whose FIB and neighbour table the node reads.

use crate::lab::{BIN, Lab, in_ns, in_ns_ok, ip, run, task_ip, wait_for};
use crate::{Io, need_root, serial};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A managed node of the routed lab.
pub(super) struct RNode {
    pub(super) ns: String,
    pub(super) state: PathBuf,
    pub(super) proc_: usize,
}

/// The CLI against `state`'s admin socket; must succeed.
pub(super) fn cli_ok(state: &std::path::Path, args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).arg("--state-dir").arg(state).output().expect("running meshplane");
    assert!(
        o.status.success(),
        "meshplane {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A veth from bridge `br` in `fab` (end `fab_if`) to `ns` (end `ifname`
/// with `mac` and `addr`/24).
pub(super) fn leg(fab: &str, br: &str, fab_if: &str, ns: &str, ifname: &str, mac: &str, addr: &str) {
    ip(&format!("link add {fab_if} netns {fab} type veth peer name {ifname} netns {ns}"));
    ip(&format!("-n {fab} link set {fab_if} master {br} up"));
    ip(&format!("-n {ns} link set {ifname} address {mac} up"));
    ip(&format!("-n {ns} addr add {addr}/24 dev {ifname}"));
}

/// Node `n` on subnet 198.18.`side`.0/24 (bridge `br`), its route to the
/// other subnet through the router's `gw`.
pub(super) fn boot(lab: &mut Lab, io: Io, fab: &str, n: u8, br: &str, side: u8, other: u8) -> RNode {
    boot_with(lab, io, fab, (n, br, side, other), &[])
}

/// [`boot`] with more `node run` arguments.
pub(super) fn boot_with(lab: &mut Lab, io: Io, fab: &str, at: (u8, &str, u8, u8), extra: &[&str]) -> RNode {
    let (n, br, side, other) = at;
    let ns = lab.ns(&format!("n{n}"));
    leg(fab, "br1", &format!("m{n}"), &ns, "mg0", &format!("02:00:00:00:01:f{n}"), &format!("198.18.1.{n}"));
    let data_ip = format!("198.18.{side}.{n}");
    let data_mac = format!("02:00:00:00:00:0{n}");
    let uplink = match io {
        Io::Afxdp => {
            leg(fab, br, &format!("d{n}"), &ns, "up0", &data_mac, &data_ip);
            in_ns_ok(&ns, &["ethtool", "-K", "up0", "tx", "off"]);
            "up0"
        }
        Io::Tap => {
            // The kernel's own leg on the data segment.
            leg(fab, br, &format!("k{n}"), &ns, "k0", &format!("02:00:00:00:02:0{n}"), &format!("198.18.{side}.1{n}"));
            "mpup"
        }
    };
    ip(&format!("-n {ns} route add 198.18.{other}.0/24 via 198.18.{side}.254"));
    let state = lab.dir.join(format!("node{n}"));
    let st = state.to_str().expect("utf-8 path").to_owned();
    #[rustfmt::skip]
    let p = lab.spawn(&ns, &format!("node{n}"), &[BIN, "node", "run", "--name", &format!("node{n}"),
        "--state-dir", &st, "--advertise-addr", &format!("198.18.1.{n}"), "--data-path-addr", &data_ip,
        "--data-iface", uplink, "--data-mac", &data_mac, "--io", io.arg(),
        "--host-link", &format!("198.18.250.{}/30", 4 * n)].into_iter().chain(extra.iter().copied()).collect::<Vec<_>>());
    let sock = state.join("admin.sock");
    wait_for(&format!("node{n} to start"), 20, || {
        assert!(lab.running(p), "node{n} exited:\n{}", lab.log(p));
        sock.exists()
    });
    if io == Io::Tap {
        // The TAP the node made, onto the data segment.
        ip(&format!("-n {ns} link set mpup netns {fab}"));
        ip(&format!("-n {fab} link set mpup name u{n}"));
        ip(&format!("-n {fab} link set u{n} master {br} up"));
    }
    RNode { ns, state, proc_: p }
}

/// Node 1 makes the cluster, node 2 joins it as a manager; network `app`
/// (198.19.0.0/24).
pub(super) fn init_and_join(n1: &RNode, n2: &RNode) {
    let init = cli_ok(&n1.state, &["cluster", "init"]);
    let token = init
        .split_whitespace()
        .find(|w| w.starts_with("MPTKN-") && init.contains(&format!("manager: meshplane cluster join --token {w}")))
        .unwrap_or_else(|| panic!("no manager token in: {init}"))
        .to_owned();
    cli_ok(&n2.state, &["cluster", "join", "--token", &token, "198.18.1.1"]);
    cli_ok(&n1.state, &["network", "create", "--subnet", "198.19.0.0/24", "app"]);
}

/// Reply times (seconds, from `ping -D`) in a ping log.
fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

/// Ping, TCP both ways and UDP between the tasks.
fn traffic(lab: &mut Lab, t: [&str; 2], ips: [&str; 2], what: &str) {
    in_ns_ok(t[0], &["ping", "-c", "3", "-i", "0.2", "-W", "2", ips[1]]);
    let (a1, a0) = (format!("{}:5001", ips[1]), format!("{}:5001", ips[0]));
    let a = lab.tcp(t[0], t[1], &a1, &a1, 4_000_000);
    assert!(a.starts_with(&format!("peer={}:", ips[0])) && a.ends_with("bytes=4000000 ok"), "{what}: {a}");
    let b = lab.tcp(t[1], t[0], &a0, &a0, 2_000_000);
    assert!(b.starts_with(&format!("peer={}:", ips[1])) && b.ends_with("bytes=2000000 ok"), "{what}: {b}");
    let u5 = format!("{}:5002", ips[1]);
    let u = lab.udp(t[0], t[1], &u5, &u5, 200);
    assert!(u.starts_with("udp: 200/200"), "{what}: {u}");
}

/// The fabric namespace with `bridges` up (no netfilter on them); its name.
pub(super) fn fabric(lab: &mut Lab, bridges: &[&str]) -> String {
    let fab = lab.ns("fab");
    for br in bridges {
        ip(&format!("-n {fab} link add {br} type bridge"));
        ip(&format!("-n {fab} link set {br} up"));
    }
    for f in ["iptables", "ip6tables", "arptables"] {
        let _ = in_ns(&fab, &["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{f}=0")]);
    }
    fab
}

/// The router `rt` forwarding between its legs on the fabric: (bridge,
/// leg name, MAC, address).
pub(super) fn router(lab: &mut Lab, fab: &str, legs: &[(&str, &str, &str, &str)]) -> String {
    let rt = lab.ns("rt");
    in_ns_ok(&rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for (br, name, mac, addr) in legs {
        leg(fab, br, name, &rt, name, mac, addr);
    }
    rt
}

fn routed(io: Io) {
    let _g = serial();
    let mut lab = Lab::new(&format!("ru-{}", io.arg()));
    let fab = fabric(&mut lab, &["brA", "brB", "br1"]);
    // The router: forwarding, gratuitous ARP when a MAC changes, and each
    // leg answering ARP only for its own address (two legs on brA).
    let rt = lab.ns("rt");
    for s in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.arp_notify=1", "net.ipv4.conf.all.arp_ignore=1"] {
        in_ns_ok(&rt, &["sysctl", "-qw", s]);
    }
    leg(&fab, "brA", "ra1", &rt, "ra1", "02:00:00:00:0a:fe", "198.18.10.254");
    leg(&fab, "brA", "ra2", &rt, "ra2", "02:00:00:00:0a:fd", "198.18.10.253");
    leg(&fab, "brB", "rb", &rt, "rb", "02:00:00:00:14:fe", "198.18.20.254");
    let n1 = boot(&mut lab, io, &fab, 1, "brA", 10, 20);
    let n2 = boot(&mut lab, io, &fab, 2, "brB", 20, 10);
    init_and_join(&n1, &n2);
    #[rustfmt::skip]
    cli_ok(&n1.state, &["service", "create", "--name", "web", "--network", "app", "--vip-port", "80", "--target-port", "8080"]);
    let t = [lab.ns("t1"), lab.ns("t2")];
    for (i, tns) in t.iter().enumerate() {
        let node = format!("node{}", i + 1);
        let id = format!("web.{}", i + 1);
        cli_ok(&n1.state, &["task", "attach", "--service", "web", "--node", &node, "--netns", tns, "--id", &id]);
    }
    for tns in &t {
        wait_for(&format!("the task port in {tns}"), 20, || {
            String::from_utf8_lossy(&run(&["ip", "-n", tns, "-4", "route", "show", "default"]).stdout).contains("via")
        });
    }
    let tasks: serde_json::Value =
        serde_json::from_str(&cli_ok(&n1.state, &["task", "ls", "--format", "json"])).expect("json");
    let ip_of = |id: &str| task_ip(&tasks, id);
    let ips = [ip_of("web.1"), ip_of("web.2")];
    let (tr, ir) = ([t[0].as_str(), t[1].as_str()], [ips[0].as_str(), ips[1].as_str()]);

    // Across the router once node 1 has learned the router's MAC.
    let t0 = Instant::now();
    wait_for("a first ping across the router", 10, || {
        in_ns(tr[0], &["ping", "-c", "1", "-W", "1", ir[1]]).status.success()
    });
    eprintln!("{}: first ping answered after {:?}", io.arg(), t0.elapsed());
    for l in lab.log(n1.proc_).lines().filter(|l| l.contains("underlay")) {
        eprintln!("node1: {l}");
    }
    traffic(&mut lab, tr, ir, "across the router");

    // During a 10 ms ping (bounded: 5 s, 500 packets): the router's MAC
    // changes, then the route moves to its second leg and the first goes.
    let pinger = lab.spawn(tr[0], "ping", &["ping", "-D", "-n", "-i", "0.01", "-c", "500", "-w", "5", ir[1]]);
    std::thread::sleep(Duration::from_millis(1200));
    ip(&format!("-n {rt} link set ra1 address 02:00:00:00:0a:ee"));
    let changed_mac = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    ip(&format!("-n {} route replace 198.18.20.0/24 via 198.18.10.253", n1.ns));
    ip(&format!("-n {rt} link set ra1 down"));
    let moved = Instant::now();
    wait_for("the ping to end", 10, || !lab.running(pinger));
    let log = lab.log(pinger);
    let times = reply_times(&log);
    assert!(times.len() > 200, "too few replies ({}):\n{log}", times.len());
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    eprintln!(
        "{}: {} replies; longest gap {:.0} ms (MAC changed {:?} ago, route moved {:?} ago)",
        io.arg(),
        times.len(),
        gap * 1e3,
        changed_mac.elapsed(),
        moved.elapsed()
    );
    assert!(gap < 1.0, "traffic stopped for {gap:.3} s:\n{log}");
    let last = times.last().copied().unwrap_or_default();
    assert!(times.iter().filter(|&&x| x > last - 1.5).count() > 50, "replies stopped after the route moved:\n{log}");
    // Node 1 followed both: the new MAC, then the second leg.
    let log1 = lab.log(n1.proc_);
    for (via, mac) in [("via 198.18.10.254 ", "MAC 02:00:00:00:0a:ee"), ("via 198.18.10.253 ", "MAC 02:00:00:00:0a:fd")]
    {
        assert!(
            log1.lines().any(|l| l.contains("underlay: peer 198.18.20.2 ") && l.contains(via) && l.contains(mac)),
            "node1 never used {via}{mac}:\n{log1}"
        );
    }
    // The kernel's entry for the second leg, which node 1's resolver had
    // it learn.
    let neigh = in_ns_ok(&n1.ns, &["ip", "neigh", "show", "198.18.10.253"]);
    assert!(neigh.contains("02:00:00:00:0a:fd"), "{neigh}");
    traffic(&mut lab, tr, ir, "over the second leg");

    for n in [&n1, &n2] {
        assert!(lab.stop(n.proc_), "{} did not stop cleanly:\n{}", n.ns, lab.log(n.proc_));
    }
}

both_backends!(routed: routed_underlay_afxdp, routed_underlay_tap);
