//! Egress: tasks reach the world through their own node. The routed lab
//! of `routed.rs` (a node on each side of a router, managed: cluster init
//! and join) plus an "outside" subnet behind the router's third leg, whose
//! link has an MTU of 1300, with nginx on 198.18.30.10. Each node's
//! default route is the router, which is all a node needs: the next hop
//! comes from its FIB.
//!
//! ```text
//!   node1 198.18.10.1 ─ brA ─ ra1 198.18.10.254 ┐
//!                                               rt ─ rb 198.18.20.254 ─ brB ─ node2 198.18.20.2
//!   out 198.18.30.10 ─ brC (MTU 1300) ─ rc 198.18.30.254 ┘
//! ```
//!
//! From a task on each node: `curl` and busybox `wget` get nginx's page,
//! and nginx saw the node's data address; ping and UDP work; 1000
//! connections from one task are open at once and every one answered;
//! `tracepath` learns the path MTU 1300 (the router's frag-needed comes
//! back translated) with the gateway and the router as hops; a task of an
//! `--internal` network reaches nothing (counted `egress_internal`);
//! VXLAN to a peer is refused (`egress_to_vtep`); a service on node 1's
//! own host, on its data address, is reached through the host link.

use crate::lab::{BIN, Lab, in_ns, in_ns_ok, ip, task_ip, wait_for};
use crate::routed::{RNode, boot, cli_ok, init_and_join, leg};
use crate::{Io, need_root, serial};
use std::collections::BTreeSet;
use std::time::Instant;

const OUT: &str = "198.18.30.10";
const PAGE: &str = "meshplane egress: the outside world\n";

/// nginx in `ns` on OUT:80, logging each client's address and port.
fn nginx(lab: &mut Lab, ns: &str) -> (usize, std::path::PathBuf) {
    let d = lab.dir.join("nginx");
    std::fs::create_dir_all(d.join("www")).expect("nginx dir");
    std::fs::write(d.join("www/index.html"), PAGE).expect("page");
    let _ = std::process::Command::new("chmod").args(["-R", "a+rwX", lab.dir.to_str().unwrap_or("/")]).status();
    let _ = std::process::Command::new("chmod").args(["711", &std::env::temp_dir().to_string_lossy()]).status();
    let log = d.join("access.log");
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile 8192;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{ log_format peer '$remote_addr $remote_port'; access_log {log} peer; default_type text/plain;\n\
         server {{ listen {OUT}:80; root {d}/www; }} }}\n",
        d = d.display(),
        log = log.display(),
    );
    std::fs::write(d.join("nginx.conf"), conf).expect("nginx.conf");
    let conf = d.join("nginx.conf");
    let p = lab.spawn(
        ns,
        "nginx",
        &["nginx", "-c", conf.to_str().unwrap_or_default(), "-p", d.to_str().unwrap_or_default()],
    );
    wait_for("nginx to listen", 10, || {
        assert!(lab.running(p), "nginx exited: {}", lab.log(p));
        String::from_utf8_lossy(&in_ns(ns, &["ss", "-ltn"]).stdout).contains(":80 ")
    });
    (p, log)
}

/// Node `n`'s counters (worker 0) from its admin API.
fn worker0(n: &RNode) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(&n.state, &["stats", "--format", "json"])).expect("stats json");
    v["dataplane"]["workers"][0].clone()
}

fn drops(n: &RNode, reason: &str) -> u64 {
    worker0(n)["drops"][reason].as_u64().unwrap_or(0)
}

pub(super) fn egress(io: Io) {
    let _g = serial();
    let mut lab = Lab::new(&format!("eg-{}", io.arg()));
    let fab = lab.ns("fab");
    for br in ["brA", "brB", "brC", "br1"] {
        ip(&format!("-n {fab} link add {br} type bridge"));
        ip(&format!("-n {fab} link set {br} up"));
    }
    for f in ["iptables", "ip6tables", "arptables"] {
        let _ = in_ns(&fab, &["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{f}=0")]);
    }
    let rt = lab.ns("rt");
    in_ns_ok(&rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    leg(&fab, "brA", "ra1", &rt, "ra1", "02:00:00:00:0a:fe", "198.18.10.254");
    leg(&fab, "brB", "rb", &rt, "rb", "02:00:00:00:14:fe", "198.18.20.254");
    leg(&fab, "brC", "rc", &rt, "rc", "02:00:00:00:1e:fe", "198.18.30.254");
    let out = lab.ns("out");
    leg(&fab, "brC", "o0", &out, "o0", "02:00:00:00:1e:0a", OUT);
    ip(&format!("-n {out} route add default via 198.18.30.254"));
    // Its checksums complete on the wire, as a real server's are (a veth
    // leaves them partial, and an AF_XDP uplink cannot tell).
    in_ns_ok(&out, &["ethtool", "-K", "o0", "tx", "off"]);
    // The outside link's MTU: 1300 (the path MTU a task must learn).
    for (ns, dev) in [(&rt, "rc"), (&out, "o0"), (&fab, "rc"), (&fab, "o0")] {
        ip(&format!("-n {ns} link set {dev} mtu 1300"));
    }
    let n1 = boot(&mut lab, io, &fab, 1, "brA", 10, 20);
    let n2 = boot(&mut lab, io, &fab, 2, "brB", 20, 10);
    for (n, side) in [(&n1, 10), (&n2, 20)] {
        ip(&format!("-n {} route add default via 198.18.{side}.254", n.ns));
    }
    let (nginx, access) = nginx(&mut lab, &out);

    init_and_join(&n1, &n2);
    cli_ok(&n1.state, &["network", "create", "--subnet", "198.19.9.0/24", "--internal", "vault"]);
    #[rustfmt::skip]
    cli_ok(&n1.state, &["service", "create", "--name", "web", "--network", "app", "--vip-port", "80", "--target-port", "8080"]);
    #[rustfmt::skip]
    cli_ok(&n1.state, &["service", "create", "--name", "safe", "--network", "vault", "--vip-port", "80", "--target-port", "8080"]);
    let t = [lab.ns("t1"), lab.ns("t2"), lab.ns("t3")];
    for (tns, svc, node, id) in
        [(&t[0], "web", "node1", "web.1"), (&t[1], "web", "node2", "web.2"), (&t[2], "safe", "node1", "safe.1")]
    {
        cli_ok(&n1.state, &["task", "attach", "--service", svc, "--node", node, "--netns", tns, "--id", id]);
    }
    for tns in &t {
        wait_for(&format!("the task port in {tns}"), 20, || {
            String::from_utf8_lossy(&in_ns(tns, &["ip", "-4", "route", "show", "default"]).stdout).contains("via")
        });
    }
    let tasks: serde_json::Value =
        serde_json::from_str(&cli_ok(&n1.state, &["task", "ls", "--format", "json"])).expect("json");
    eprintln!("{}: tasks web.1 {} web.2 {}", io.arg(), task_ip(&tasks, "web.1"), task_ip(&tasks, "web.2"));
    let url = format!("http://{OUT}/");

    // curl and busybox wget from a task on each node.
    for (tns, node) in [(&t[0], &n1), (&t[1], &n2)] {
        let t0 = Instant::now();
        wait_for(&format!("a first fetch from {tns}"), 15, || {
            in_ns(tns, &["curl", "-sf", "--max-time", "2", &url]).status.success()
        });
        eprintln!("{}: {tns} first fetch after {:?}", io.arg(), t0.elapsed());
        assert_eq!(in_ns_ok(tns, &["curl", "-sf", "--max-time", "5", &url]), PAGE);
        assert_eq!(in_ns_ok(tns, &["busybox", "wget", "-q", "-O", "-", &url]), PAGE);
        in_ns_ok(tns, &["ping", "-c", "2", "-i", "0.2", "-W", "2", OUT]);
        let w = worker0(node);
        assert!(w["egress"]["new_conns"].as_u64() >= Some(3), "{w}");
    }
    let log = std::fs::read_to_string(&access).expect("access log");
    for data_ip in ["198.18.10.1 ", "198.18.20.2 "] {
        assert!(log.lines().filter(|l| l.starts_with(data_ip)).count() >= 2, "nginx never saw {data_ip}:\n{log}");
    }
    // UDP both ways.
    let u = lab.udp(&t[0], &out, &format!("{OUT}:5002"), &format!("{OUT}:5002"), 200);
    assert!(u.starts_with("udp: 200/200"), "{u}");

    // 1000 connections from one task open at once, every one answered
    // from a port of its own.
    let before = std::fs::read_to_string(&access).map(|l| l.lines().count()).unwrap_or(0);
    let hold = format!(
        "ulimit -n 4096 && exec {BIN} tool tcp-hold --connect {OUT}:80 --conns 1000 --hold-ms 1000 --timeout 30"
    );
    let o = in_ns_ok(&t[0], &["sh", "-c", &hold]);
    assert!(o.contains("1000 connections open at once") && o.contains("1000/1000 answered"), "{o}");
    let log = std::fs::read_to_string(&access).expect("access log");
    let ports: BTreeSet<&str> = log.lines().skip(before).filter_map(|l| l.strip_prefix("198.18.10.1 ")).collect();
    assert!(ports.len() >= 1000, "{} distinct source ports seen", ports.len());
    assert_eq!(drops(&n1, "egress_ports_exhausted"), 0);
    eprintln!("{}: node1 egress counters {}", io.arg(), worker0(&n1)["egress"]);

    // tracepath: the gateway, the router, and the path MTU 1300 learned
    // from the router's frag-needed, translated back to the task.
    let tp = in_ns_ok(&t[0], &["tracepath", "-n", "-m", "5", OUT]);
    eprintln!("{}: tracepath:\n{tp}", io.arg());
    assert!(tp.contains("pmtu 1300"), "{tp}");
    assert!(tp.contains("198.19.0.254") && tp.contains("198.18.10.254"), "hops: {tp}");
    // (The counters are published every half second.)
    wait_for("ICMP errors translated and time-exceeded counted", 5, || {
        let e = &worker0(&n1)["egress"];
        e["icmp_in"].as_u64() > Some(0) && e["time_exceeded"].as_u64() > Some(0)
    });

    // An internal network reaches nothing outside.
    let before = drops(&n1, "egress_internal");
    let o = in_ns(&t[2], &["curl", "-sf", "--max-time", "3", &url]);
    assert!(!o.status.success(), "a task of an internal network fetched from outside");
    wait_for("egress_internal counted", 5, || drops(&n1, "egress_internal") > before);
    // VXLAN to a peer from a task is refused.
    let before = drops(&n1, "egress_to_vtep");
    let _ = in_ns(&t[0], &[BIN, "tool", "udp-ping", "--connect", "198.18.20.2:4789", "--count", "1"]);
    wait_for("egress_to_vtep counted", 5, || drops(&n1, "egress_to_vtep") > before);

    // A service on node 1's host, on its data address: reached through
    // the host link, seen from meshplane's end of it.
    let host =
        lab.spawn(&n1.ns, "host-service", &[BIN, "tool", "http-name", "--listen", "0.0.0.0:8088", "--name", "host"]);
    wait_for("the host's service", 10, || {
        assert!(lab.running(host), "{}", lab.log(host));
        String::from_utf8_lossy(&in_ns(&n1.ns, &["ss", "-ltn"]).stdout).contains(":8088 ")
    });
    let body = in_ns_ok(&t[0], &["curl", "-sf", "--max-time", "5", "http://198.18.10.1:8088/"]);
    assert!(body.starts_with("host saw 198.18.250.6:"), "{body}");
    lab.signal(host, "TERM");

    assert!(lab.stop(nginx));
    for n in [&n1, &n2] {
        assert!(lab.stop(n.proc_), "{} did not stop cleanly:\n{}", n.ns, lab.log(n.proc_));
    }
}

both_backends!(egress: egress_afxdp, egress_tap);
